//! End to end: the mock on 127.0.0.1:0, a real HTTP client, tokens checked against
//! `/jwks`, counters, faults, and HTTPS.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use reqwest::StatusCode;
use rsa::{BoxedUint, Pkcs1v15Sign, PublicKey};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{sync::oneshot, task::JoinHandle};

use super::{DELEGATING_ORG, Grant, KID_CLIENT, ORG, config, files};
use crate::{MockConfig, MockError, MockServer};

/// A mock serving in the background until dropped or stopped.
struct Running {
    issuer: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(config: MockConfig, tls: Option<(PathBuf, PathBuf)>) -> Running {
        let server = MockServer::bind(config, "127.0.0.1:0".parse().expect("addr"), tls)
            .await
            .expect("bind");
        let issuer = server.issuer().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Running { issuer, stop, task }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("joined").expect("served");
    }
}

/// A client on rustls with ring, trusting `root` (none needed for plain HTTP), with no
/// pooled connections so each request's fate is its own.
fn client(root: Option<CertificateDer<'static>>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(root) = root {
        roots.add(root).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn post_grant(
    client: &reqwest::Client,
    mock: &Running,
    grant: &Grant,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(mock.url("token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(grant.form())
        .send()
        .await
}

async fn json_of(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let response = client.get(url).send().await.expect("GET");
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    json_of(response).await
}

/// Checks the access token's RS256 signature against the JWK set and returns its
/// header and claims.
fn verify_access_token(token: &str, jwks: &Value) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).expect("base64url");
    let header: Value = serde_json::from_slice(&decode(parts[0])).expect("header");
    let claims: Value = serde_json::from_slice(&decode(parts[1])).expect("claims");
    let jwk = &jwks["keys"][0];
    assert_eq!(header["kid"], jwk["kid"]);
    let component = |name: &str| {
        BoxedUint::from_be_slice_vartime(&decode(jwk[name].as_str().expect("component")))
    };
    let key = PublicKey::new(component("n"), component("e")).expect("RSA key");
    let signed = &token[..parts[0].len() + 1 + parts[1].len()];
    key.verify(
        Pkcs1v15Sign::new::<Sha256>(),
        &Sha256::digest(signed.as_bytes()),
        &decode(parts[2]),
    )
    .expect("the access token verifies against /jwks");
    (header, claims)
}

#[tokio::test]
async fn serves_tokens_that_verify_against_jwks_and_counts_requests() {
    let dir = files();
    // No signing_key: the mock generates one.
    let mock = Running::start(config(dir.path(), ""), None).await;
    assert!(mock.issuer.starts_with("http://127.0.0.1:") && mock.issuer.ends_with('/'));
    let http = client(None);

    let metadata = get_json(&http, &mock.url(".well-known/oauth-authorization-server")).await;
    assert_eq!(metadata["issuer"], mock.issuer.as_str());
    assert_eq!(metadata["token_endpoint"], mock.url("token"));
    assert_eq!(metadata["jwks_uri"], mock.url("jwks"));
    assert_eq!(
        metadata["grant_types_supported"],
        json!([super::JWT_BEARER])
    );

    let grant = Grant::kid(&mock.issuer)
        .claim("resource", "https://api.example/")
        .claim("consumer_org", DELEGATING_ORG);
    let response = post_grant(&http, &mock, &grant).await.expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body = json_of(response).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 120);
    assert_eq!(body["scope"], "test:read");

    let jwks = get_json(&http, &mock.url("jwks")).await;
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
    assert_eq!(jwks["keys"][0]["use"], "sig");
    let token = body["access_token"].as_str().expect("access_token");
    let (header, claims) = verify_access_token(token, &jwks);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["iss"], mock.issuer.as_str());
    assert_eq!(claims["client_id"], KID_CLIENT);
    assert_eq!(claims["scope"], "test:read");
    assert_eq!(claims["token_type"], "Bearer");
    assert_eq!(claims["client_amr"], "private_key_jwt");
    assert_eq!(claims["aud"], "https://api.example/");
    assert_eq!(claims["consumer"]["authority"], "iso6523-actorid-upis");
    assert_eq!(claims["consumer"]["ID"], format!("0192:{DELEGATING_ORG}"));
    assert_eq!(claims["supplier"]["ID"], format!("0192:{ORG}"));
    let lifetime = claims["exp"].as_i64().zip(claims["iat"].as_i64());
    assert_eq!(lifetime.map(|(exp, iat)| exp - iat), Some(120));
    assert!(uuid::Uuid::parse_str(claims["jti"].as_str().expect("jti")).is_ok());

    // A refusal: the OAuth2 body, the MP code's URI, a trace id.
    let wrong_aud = Grant::kid("https://test.maskinporten.no/");
    let response = post_grant(&http, &mock, &wrong_aud).await.expect("POST");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json_of(response).await;
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(
        body["error_uri"],
        "https://docs.digdir.no/maskinporten/errors/MP-110"
    );
    let description = body["error_description"].as_str().expect("description");
    let trace_id = description
        .strip_suffix(')')
        .and_then(|d| d.rsplit_once("(trace_id: "))
        .map(|(_, id)| id)
        .expect("ends with a trace id");
    assert!(
        trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{description}"
    );

    // Not a form: refused without an MP code.
    let response = http
        .post(mock.url("token"))
        .header("content-type", "application/json")
        .body(json!({"grant_type": super::JWT_BEARER}).to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json_of(response).await;
    assert_eq!(body["error"], "invalid_request");
    assert!(body.get("error_uri").is_none());

    let stats = get_json(&http, &mock.url("mock/stats")).await;
    assert_eq!(
        stats,
        json!({"token_requests": 3, "tokens_issued": 1, "refused": 2, "faults": 0, "last_traceparent": ""})
    );
    mock.stop().await;
}

#[tokio::test]
async fn faults_answer_with_a_status_delay_or_drop_the_connection() {
    let dir = files();
    let mock = Running::start(config(dir.path(), "signing_key = \"token-key.pem\""), None).await;
    let http = client(None);
    let set_fault = |fault: Value| {
        let request = http
            .post(mock.url("mock/faults"))
            .header("content-type", "application/json")
            .body(fault.to_string());
        async move { request.send().await.expect("POST faults").status() }
    };

    assert_eq!(
        set_fault(json!({"mode": "status", "status": 503, "count": 1})).await,
        StatusCode::OK
    );
    let response = post_grant(&http, &mock, &Grant::kid(&mock.issuer))
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = json_of(response).await;
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("(trace_id: "))
    );
    // count 1: the next request is served normally.
    let response = post_grant(&http, &mock, &Grant::kid(&mock.issuer))
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);

    let delay = Duration::from_millis(300);
    assert_eq!(
        set_fault(json!({"mode": "delay", "delay_ms": 300, "count": 1})).await,
        StatusCode::OK
    );
    let started = Instant::now();
    let response = post_grant(&http, &mock, &Grant::kid(&mock.issuer))
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());

    // No count: every request until cleared.
    assert_eq!(set_fault(json!({"mode": "drop"})).await, StatusCode::OK);
    for _ in 0..2 {
        let error = post_grant(&http, &mock, &Grant::kid(&mock.issuer))
            .await
            .expect_err("a transport error, not a response");
        assert!(error.status().is_none() && !error.is_timeout(), "{error:?}");
    }
    let cleared = http
        .delete(mock.url("mock/faults"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    let response = post_grant(&http, &mock, &Grant::kid(&mock.issuer))
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);

    for bad in [
        json!({"mode": "explode"}),
        json!({"mode": "delay"}),
        json!({"mode": "status", "status": 200}),
        json!({"mode": "drop", "delay_ms": 5}),
        json!({"mode": "drop", "colour": "red"}),
    ] {
        assert_eq!(set_fault(bad).await, StatusCode::BAD_REQUEST);
    }

    let stats = get_json(&http, &mock.url("mock/stats")).await;
    assert_eq!(
        stats,
        json!({"token_requests": 6, "tokens_issued": 3, "refused": 0, "faults": 4, "last_traceparent": ""})
    );
    mock.stop().await;
}

/// A self-signed end-entity certificate for 127.0.0.1 made by openssl: (cert, key) paths.
fn localhost_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let output = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls-key.pem",
            "-out",
            "tls-cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}); this test makes its certificate with it. \
                 Install it with `sudo apt-get install -y openssl`"
            )
        });
    assert!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (dir.join("tls-cert.pem"), dir.join("tls-key.pem"))
}

#[tokio::test]
async fn serves_https_with_the_given_certificate() {
    let dir = files();
    let (cert, key) = localhost_certificate(dir.path());
    let mock = Running::start(
        config(dir.path(), "signing_key = \"token-key.pem\""),
        Some((cert.clone(), key.clone())),
    )
    .await;
    assert!(
        mock.issuer.starts_with("https://127.0.0.1:"),
        "{}",
        mock.issuer
    );
    let root = CertificateDer::from_pem_file(&cert).expect("cert");
    let https = client(Some(root));
    let jwks = get_json(&https, &mock.url("jwks")).await;
    let response = post_grant(&https, &mock, &Grant::kid(&mock.issuer))
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    let _ = verify_access_token(body["access_token"].as_str().expect("token"), &jwks);
    mock.stop().await;

    // A key that does not belong to the certificate is refused at bind, naming the file.
    let other = tempfile::tempdir().expect("tempdir");
    let (_, other_key) = localhost_certificate(other.path());
    let refused = MockServer::bind(
        config(dir.path(), ""),
        "127.0.0.1:0".parse().expect("addr"),
        Some((cert, other_key.clone())),
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(refused, MockError::Tls { .. }), "{refused}");
    assert!(
        refused
            .to_string()
            .starts_with(&other_key.display().to_string()),
        "{refused}"
    );
}

#[tokio::test]
async fn the_metadata_documents_served_are_chosen_by_well_known() {
    let dir = files();
    let http = client(None);
    for (well_known, rfc8414, openid) in [
        ("", true, false),
        ("well_known = \"openid-configuration\"", false, true),
        ("well_known = \"both\"", true, true),
    ] {
        let mock = Running::start(config(dir.path(), well_known), None).await;
        for (path, served) in [
            (".well-known/oauth-authorization-server", rfc8414),
            (".well-known/openid-configuration", openid),
        ] {
            let response = http.get(mock.url(path)).send().await.expect("GET");
            if served {
                assert_eq!(response.status(), StatusCode::OK, "{well_known}: {path}");
                let metadata = json_of(response).await;
                assert_eq!(metadata["issuer"], mock.issuer.as_str());
                assert_eq!(metadata["token_endpoint"], mock.url("token"));
            } else {
                assert_eq!(
                    response.status(),
                    StatusCode::NOT_FOUND,
                    "{well_known}: {path}"
                );
            }
        }
        mock.stop().await;
    }
    let wrong = MockConfig::from_toml_str(
        &super::config_text("well_known = \"oidc\""),
        &dir.path().join("mock.toml").display().to_string(),
    )
    .expect_err("unknown value");
    assert!(wrong.to_string().contains("well_known"), "{wrong}");
}
