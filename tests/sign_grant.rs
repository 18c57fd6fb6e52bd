//! SignGrant and ListKeys over real gRPC, against a fresh SoftHSM token per test.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::collections::HashSet;

use common::{DevAgent, TEST_AUD, params, unix_now, verify};
use grant_agent::proto::{ListKeysRequest, SignGrantRequest};
use sha2::{Digest, Sha256};
use tonic::Code;

fn request(grant: grant_agent::proto::GrantParameters) -> SignGrantRequest {
    SignGrantRequest { grant: Some(grant) }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_grant_verifies_against_its_x5c_with_every_claim_right() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let before = unix_now();
    let response = client
        .sign_grant(request(params()))
        .await
        .expect("signed")
        .into_inner();
    let after = unix_now();

    let grant = verify(&response.assertion, TEST_AUD);
    let header = grant.header.as_object().expect("header object");
    assert_eq!(header.keys().collect::<Vec<_>>(), ["alg", "x5c"]);
    assert_eq!(grant.header["alg"], "RS256");
    assert_eq!(grant.header["x5c"].as_array().expect("array").len(), 1);

    let claims = grant.claims.as_object().expect("claims object");
    assert_eq!(
        claims.keys().collect::<Vec<_>>(),
        ["aud", "exp", "iat", "iss", "jti", "scope"],
        "no claim beyond the ones Maskinporten lists"
    );
    assert_eq!(claims["aud"], TEST_AUD);
    assert_eq!(claims["iss"], "0a3b5c7d-1111-2222-3333-444455556666");
    assert_eq!(claims["scope"], "test:scope");
    let iat = claims["iat"].as_i64().expect("iat");
    assert!((before..=after).contains(&iat), "iat {iat} is now");
    assert_eq!(claims["exp"].as_i64().expect("exp") - iat, 120);
    let jti = claims["jti"].as_str().expect("jti");
    assert_eq!(
        uuid::Uuid::parse_str(jti).expect("uuid").get_version_num(),
        4
    );

    assert_eq!(response.jti, jti);
    assert_eq!(response.issued_at, iat);
    assert_eq!(response.expires_at, iat + 120);
    assert_eq!(response.algorithm, "RS256");
    assert_eq!(response.key, "default");
    assert_eq!(
        response.certificate_sha256,
        hex(&Sha256::digest(&grant.leaf_der))
    );
}

#[tokio::test]
async fn optional_claims_and_short_lifetime() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let mut p = params();
    p.scopes = vec![
        "nav:aareg/v1/arbeidsforhold".into(),
        "skatteetaten:mva.read".into(),
    ];
    p.resources = vec![
        "https://api.example.no/".into(),
        "urn:altinn:resource:x".into(),
    ];
    p.consumer_org = "974760673".into();
    p.lifetime_seconds = 30;
    let response = client
        .sign_grant(request(p))
        .await
        .expect("signed")
        .into_inner();
    let claims = verify(&response.assertion, TEST_AUD).claims;
    assert_eq!(
        claims["scope"],
        "nav:aareg/v1/arbeidsforhold skatteetaten:mva.read"
    );
    assert_eq!(
        claims["resource"],
        serde_json::json!(["https://api.example.no/", "urn:altinn:resource:x"])
    );
    assert_eq!(claims["consumer_org"], "974760673");
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        30
    );
    // The dev config makes "test" the default environment.
    let mut p = params();
    p.environment.clear();
    let response = client
        .sign_grant(request(p))
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(
        verify(&response.assertion, TEST_AUD).claims["aud"],
        TEST_AUD
    );
}

#[tokio::test]
async fn a_test_certificate_is_refused_for_prod() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let mut p = params();
    p.environment = "prod".into();
    let status = client.sign_grant(request(p)).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .starts_with("key \"default\" has a test certificate (issuer CN=GRANT-AGENT DEV TEST,"),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("which Maskinporten refuses in environment \"prod\"")
    );
}

#[tokio::test]
async fn a_thousand_grants_have_a_thousand_distinct_jti() {
    let agent = DevAgent::start();
    let client = agent.client().await;
    let mut seen = HashSet::new();
    for _ in 0..10 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let mut c = client.clone();
                tokio::spawn(async move { c.sign_grant(request(params())).await })
            })
            .collect();
        for task in batch {
            let response = task.await.expect("task").expect("signed").into_inner();
            assert!(seen.insert(response.jti), "a jti was reused");
        }
    }
    assert_eq!(seen.len(), 1000);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_all_sign_valid_grants() {
    let agent = DevAgent::start();
    let client = agent.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut p = params();
                p.client_id = format!("client-{i}");
                (i, c.sign_grant(request(p)).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, result) = task.await.expect("task");
        let response = result.expect("signed").into_inner();
        let claims = verify(&response.assertion, TEST_AUD).claims;
        assert_eq!(claims["iss"], format!("client-{i}"));
    }
}

#[tokio::test]
async fn bad_input_names_the_field_and_the_agent_keeps_serving() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    type Mutate = fn(&mut grant_agent::proto::GrantParameters);
    let cases: Vec<(Mutate, Code, &str)> = vec![
        (
            |p| p.client_id.clear(),
            Code::InvalidArgument,
            "grant.client_id: must not be empty",
        ),
        (
            |p| p.client_id = "x".repeat(257),
            Code::InvalidArgument,
            "grant.client_id: is longer than 256 bytes",
        ),
        (
            |p| p.client_id = "my client".into(),
            Code::InvalidArgument,
            "grant.client_id: must be printable ASCII",
        ),
        (
            |p| p.scopes.clear(),
            Code::InvalidArgument,
            "grant.scopes: at least one scope is required",
        ),
        (
            |p| p.scopes = vec!["test:a b".into()],
            Code::InvalidArgument,
            "grant.scopes[0]: contains a space",
        ),
        (
            |p| p.scopes = vec!["test:a\tb".into()],
            Code::InvalidArgument,
            "grant.scopes[0]: contains U+0009",
        ),
        (
            |p| p.scopes = vec!["test:ok".into(), "test:æ".into()],
            Code::InvalidArgument,
            "grant.scopes[1]: contains U+00E6",
        ),
        (
            |p| p.scopes = vec!["test:a\"b".into()],
            Code::InvalidArgument,
            "grant.scopes[0]: contains '\"'",
        ),
        (
            |p| p.scopes = vec![format!("test:{}", "s".repeat(300))],
            Code::InvalidArgument,
            "grant.scopes[0]: is longer than 256 bytes",
        ),
        (
            |p| p.scopes = (0..101).map(|i| format!("test:{i}")).collect(),
            Code::InvalidArgument,
            "grant.scopes: more than 100 scopes",
        ),
        (
            |p| p.environment = "staging".into(),
            Code::InvalidArgument,
            "grant.environment: \"staging\" is not a known environment; use one of: prod, sky, sky-test, test",
        ),
        (
            |p| p.lifetime_seconds = 121,
            Code::InvalidArgument,
            "grant.lifetime_seconds: 121 is over the maximum of 120",
        ),
        (
            |p| p.resources = vec!["x".repeat(3000)],
            Code::InvalidArgument,
            "grant.resources[0]: must be 1 to 2048 bytes",
        ),
        (
            |p| p.consumer_org = "123".into(),
            Code::InvalidArgument,
            "grant.consumer_org: must be a nine-digit",
        ),
        (
            |p| p.key = "nope".into(),
            Code::NotFound,
            "grant.key: no key is named \"nope\"",
        ),
    ];
    for (mutate, code, message) in cases {
        let mut p = params();
        mutate(&mut p);
        let status = client.sign_grant(request(p)).await.expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().starts_with(message),
            "{:?} should start with {message:?}",
            status.message()
        );
    }
    // A request with no `grant` at all is a request with every field empty.
    let status = client
        .sign_grant(SignGrantRequest { grant: None })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "grant.client_id: must not be empty");
    // A message over the 64 KiB limit is refused from its length prefix, before it is
    // read, with the gRPC spec's code for a message over the configured maximum.
    let mut p = params();
    p.resources = vec!["https://x/".repeat(7000)];
    let status = client.sign_grant(request(p)).await.expect_err("refused");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert_eq!(
        status.message(),
        "the request message is 70064 bytes, more than the 65536 allowed"
    );

    let response = client
        .sign_grant(request(params()))
        .await
        .expect("still serving");
    let _ = verify(&response.into_inner().assertion, TEST_AUD);
}

#[tokio::test]
async fn list_keys_describes_the_certificate() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let keys = client
        .list_keys(ListKeysRequest {})
        .await
        .expect("listed")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key.name, "default");
    assert!(key.is_default);
    assert_eq!(key.algorithm, "RS256");
    assert_eq!(key.organization_number, "313367002");
    assert!(key.subject.contains("NTRNO-313367002"), "{}", key.subject);
    assert!(
        key.subject.contains("CN=GRANT-AGENT DEV TEST"),
        "{}",
        key.subject
    );
    assert_eq!(
        key.issuer, key.subject,
        "the dev certificate is self-signed"
    );
    let now = unix_now();
    assert!(key.not_before <= now && now < key.not_after);
    let signed = client
        .sign_grant(request(params()))
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(key.certificate_sha256, signed.certificate_sha256);
}

/// Asserts that health on `channel` says SERVING for each of `services`.
async fn assert_serving(channel: &tonic::transport::Channel, services: &[&str]) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel.clone());
    for service in services {
        let status = health
            .check(HealthCheckRequest {
                service: (*service).into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service:?} is SERVING");
    }
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let agent = DevAgent::start();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    assert_serving(&channel, &["", "grantagent.v1.GrantAgent"]).await;

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream
        .message()
        .await
        .expect("reflection answer")
        .and_then(|r| r.message_response)
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grantagent.v1.GrantAgent".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

/// An agent with mutual TLS on its gRPC port and a plaintext health port; the health
/// port's address.
fn health_port_agent() -> (DevAgent, String) {
    let dir = common::secured::prepared();
    common::secured::write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\n[health]\nlisten = \"127.0.0.1:0\"\n[tls]\ncertificate = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n",
        "",
    );
    let agent = DevAgent::serve(dir, "agent.toml");
    let port = agent
        .endpoints
        .iter()
        .find_map(|e| e.strip_suffix(" (grpc.health.v1)")?.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no health port in {:?}", agent.endpoints))
        .to_owned();
    (agent, port)
}

/// `[health] listen`: Kubernetes' gRPC probe reaches health without a client certificate,
/// while the gRPC port wants one; nothing but health answers there.
#[tokio::test]
async fn the_health_port_serves_health_alone_without_a_client_certificate() {
    let (_agent, port) = health_port_agent();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{port}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect without TLS");
    let services = [
        "",
        "grantagent.v1.GrantAgent",
        grant_agent::server::LIVENESS_SERVICE,
    ];
    assert_serving(&channel, &services).await;
    let refused = grant_agent::proto::grant_agent_client::GrantAgentClient::new(channel)
        .sign_grant(common::grant_request(params()))
        .await
        .expect_err("no grants on the health port");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
}

/// The health port's own caps under a flood of probes from one peer: the ninth connection
/// from one address is refused and audited, the eight keep being served, and a freed slot
/// serves again. Each connection is served once before the next is opened, so the count
/// the agent holds is the test's, not a race with its accept loop.
#[tokio::test]
async fn the_health_port_caps_one_peers_connections_and_frees_them() {
    let (agent, port) = health_port_agent();
    let connect = || async {
        tonic::transport::Endpoint::from_shared(format!("http://{port}"))
            .expect("endpoint")
            .connect()
            .await
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        let channel = connect().await.expect("one of the first eight");
        assert_serving(&channel, &[""]).await;
        held.push(channel);
    }
    // The ninth: its TCP connection is accepted and closed at once, so the call fails.
    let ninth = match connect().await {
        Ok(channel) => {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
        }
        Err(_) => false,
    };
    assert!(!ninth, "a ninth connection from one peer was served");
    let refused = agent.wait_for_audit(|l| {
        l["audit"] == "connection"
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("more than 8 connections from this peer"))
    });
    assert!(refused.is_some(), "{:?}", agent.audit_lines());
    // The eight are still served, and closing one makes room again.
    for channel in &held {
        assert_serving(channel, &[""]).await;
    }
    drop(held.pop());
    let started = std::time::Instant::now();
    loop {
        if let Ok(channel) = connect().await {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            if HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "a freed slot did not serve again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
