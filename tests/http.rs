//! The HTTP/JSON API with a real HTTP client: curl against the agent over mutual TLS
//! (HTTP/1.1 and HTTP/2) and over the Unix socket, exchanging at the `mock-maskinporten`
//! binary. texas-shaped requests, the cache, policy refusals, bad JSON, Maskinporten's
//! own errors, and the bounds a hostile HTTP/1.1 peer meets.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    io::Write,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    api::{
        Answer, CLIENT_ID, PAYMENTS_H1, PAYMENTS_H2, Via, api_agent, curl, post, raw,
        read_to_close, token_requests,
    },
    read,
    secured::{OTHER, PAYMENTS},
    verify,
};

#[tokio::test]
async fn texas_requests_get_tokens_over_mutual_tls_and_the_unix_socket() {
    let (agent, mock) = api_agent("", 100).await;
    let texas = serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope"});

    // Only identity_provider and target: the caller's rule fixes the client_id, the
    // config the environment.
    let first = post(&agent, &PAYMENTS_H1, "/api/v1/token", &texas);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(first.header("cache-control"), Some("no-store"));
    let token = first.json();
    assert_eq!(token["token_type"], "Bearer");
    let expires_in = token["expires_in"].as_i64().expect("expires_in");
    assert!((1..=120).contains(&expires_in), "{expires_in}");
    let access_token = token["access_token"].as_str().expect("access_token");
    let claims = mock.verify_access_token(access_token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(token_requests(&mock).await, 1);

    // The same request over HTTP/2 is a cache hit: same token, no new exchange.
    let cached = post(&agent, &PAYMENTS_H2, "/api/v1/token", &texas);
    assert_eq!(cached.status, 200, "{}", cached.body);
    assert_eq!(cached.json()["access_token"], access_token);
    assert_eq!(token_requests(&mock).await, 1);

    // texas's other body, a form, as `curl -d` sends it.
    let form = curl(
        &agent,
        &PAYMENTS_H1,
        "/api/v1/token",
        "identity_provider=maskinporten&target=test%3Ascope",
        "application/x-www-form-urlencoded",
    );
    assert_eq!(form.status, 200, "{}", form.body);
    assert_eq!(form.json()["access_token"], access_token);
    assert_eq!(token_requests(&mock).await, 1);

    // skip_cache goes to Maskinporten again.
    let mut fresh = texas.clone();
    fresh["skip_cache"] = true.into();
    let refreshed = post(&agent, &PAYMENTS_H1, "/api/v1/token", &fresh);
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_ne!(refreshed.json()["access_token"], access_token);
    assert_eq!(token_requests(&mock).await, 2);

    // The Unix socket's caller may use any client_id, so it names one; resource may be
    // a list as well as texas's one string.
    let unix = post(
        &agent,
        &Via::Unix,
        "/api/v1/token",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:other",
            "client_id": CLIENT_ID, "resource": ["https://api.example.no/"]}),
    );
    assert_eq!(unix.status, 200, "{}", unix.body);
    let claims = mock
        .verify_access_token(unix.json()["access_token"].as_str().expect("token"))
        .await;
    assert_eq!(claims["scope"], "test:other");

    // A signed grant for callers that post to Maskinporten themselves.
    let grant = post(
        &agent,
        &Via::Unix,
        "/api/v1/grant",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
            "client_id": CLIENT_ID}),
    );
    assert_eq!(grant.status, 200, "{}", grant.body);
    let grant = grant.json();
    let verified = verify(grant["assertion"].as_str().expect("assertion"), &mock.url);
    assert_eq!(verified.claims["iss"], CLIENT_ID);
    assert_eq!(verified.claims["jti"], grant["jti"]);
    let (status, answer) = mock.exchange(grant["assertion"].as_str().expect("a")).await;
    assert_eq!(status, 200, "{answer}");

    // Audited as GetAccessToken and SignGrant are, by the caller's proven identity.
    let payments = format!("uri:{PAYMENTS}");
    let issued = agent.wait_for_audit(|l| {
        l["audit"] == "token" && l["caller"] == payments.as_str() && l["outcome"] == "issued"
    });
    assert!(issued.is_some(), "{:?}", agent.audit_lines());
    let signed = agent.wait_for_audit(|l| l["audit"] == "grant" && l["outcome"] == "signed");
    assert!(signed.is_some(), "{:?}", agent.audit_lines());
    // No token or assertion in the agent's log or audit.
    let log = agent.log();
    let audit = read(&agent.dir.path().join("audit.jsonl"));
    for secret in [access_token, grant["assertion"].as_str().expect("a")] {
        assert!(!log.contains(secret) && !audit.contains(secret));
    }
}

#[tokio::test]
async fn refusals_are_oauth_errors_with_the_status_of_their_code() {
    let (agent, mock) = api_agent("[limits]\nrequest_timeout_seconds = 1\n", 100).await;
    let error = |answer: &Answer, status: u16, error: &str, names: &str| {
        assert_eq!(answer.status, status, "{}", answer.body);
        let json = answer.json();
        assert_eq!(json["error"], error, "{json}");
        let description = json["error_description"].as_str().expect("description");
        assert!(
            description.contains(names),
            "{description} should name {names}"
        );
    };

    // The policy: a scope the caller's rule does not allow.
    let refused = post(
        &agent,
        &PAYMENTS_H2,
        "/api/v1/token",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:other"}),
    );
    error(&refused, 403, "access_denied", "test:other");

    // Bad JSON, by the field.
    let cases = [
        (
            r#"{"identity_provider":"maskinporten","target":5}"#,
            "target",
        ),
        (
            r#"{"identity_provider":"maskinporten","target":"a","scopes":["x"]}"#,
            "scopes",
        ),
        (
            r#"{"identity_provider":"maskinporten","target":"a","resource":{"x":1}}"#,
            "resource",
        ),
        (
            r#"{"identity_provider":"maskinporten","target":"a","skip_cache":"yes"}"#,
            "skip_cache",
        ),
        (r#"{"target":"a"}"#, "identity_provider"),
        (
            r#"{"identity_provider":"idporten","target":"a"}"#,
            "identity_provider",
        ),
        (
            r#"{"identity_provider":"maskinporten","target":"a b"#,
            "the body",
        ),
        (
            r#"{"identity_provider":"maskinporten","target":" "}"#,
            "target",
        ),
    ];
    for (body, field) in cases {
        let answer = curl(
            &agent,
            &PAYMENTS_H1,
            "/api/v1/token",
            body,
            "application/json",
        );
        error(&answer, 400, "invalid_request", field);
    }
    // Without client_id, a caller whose rule allows several must name one.
    let unix = post(
        &agent,
        &Via::Unix,
        "/api/v1/token",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope"}),
    );
    error(&unix, 400, "invalid_request", "client_id");
    // A validation error names the JSON field, not the gRPC one.
    let lifetime = post(
        &agent,
        &Via::Unix,
        "/api/v1/grant",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
            "client_id": CLIENT_ID, "lifetime_seconds": 600}),
    );
    error(&lifetime, 400, "invalid_request", "lifetime_seconds");

    // A deadline in the headers, as gRPC clients send it, bounds the call: 300 ms is too
    // little for a token endpoint that takes 2 s.
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 2000, "count": 1}))
        .await;
    let deadline = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-H",
            "content-type: application/json",
            "-H",
            "grpc-timeout: 300m",
            "-d",
        ])
        .arg(
            serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
                "client_id": CLIENT_ID, "skip_cache": true})
            .to_string(),
        )
        .arg("--unix-socket")
        .arg(agent.dir.path().join("agent.sock"))
        .args(["-w", "\n%{http_code}", "http://localhost/api/v1/token"])
        .output()
        .expect("curl");
    let deadline = String::from_utf8_lossy(&deadline.stdout).into_owned();
    assert!(deadline.ends_with("\n504"), "{deadline}");
    assert!(deadline.contains("temporarily_unavailable"), "{deadline}");
    mock.clear_faults().await;

    // Maskinporten's own refusal passes through: its error, its description, its hint.
    let before = token_requests(&mock).await;
    let upstream = post(
        &agent,
        &Via::Unix,
        "/api/v1/token",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:forbidden",
            "client_id": CLIENT_ID}),
    );
    error(&upstream, 403, "invalid_scope", "trace_id");
    let json = upstream.json();
    assert!(
        json["hint"]
            .as_str()
            .expect("hint")
            .contains("check the scope names"),
        "{json}"
    );
    assert!(
        json["error_uri"]
            .as_str()
            .expect("error_uri")
            .ends_with("/errors/MP-200")
    );
    assert_eq!(
        token_requests(&mock).await,
        before + 1,
        "a 4xx is not retried"
    );

    // The door: content type, size, path, method.
    let form = curl(
        &agent,
        &Via::Unix,
        "/api/v1/token",
        "identity_provider=maskinporten&target=a&scope=b",
        "application/x-www-form-urlencoded",
    );
    error(&form, 400, "invalid_request", "scope");
    let text = curl(&agent, &Via::Unix, "/api/v1/token", "{}", "text/plain");
    error(&text, 415, "invalid_request", "application/json");
    let huge = format!(
        r#"{{"identity_provider":"maskinporten","target":"{}"}}"#,
        "a".repeat(70_000)
    );
    let large = curl(
        &agent,
        &Via::Unix,
        "/api/v1/token",
        &huge,
        "application/json",
    );
    error(&large, 413, "invalid_request", "65536");
    let nowhere = curl(
        &agent,
        &Via::Unix,
        "/api/v1/nothing",
        "{}",
        "application/json",
    );
    error(&nowhere, 404, "not_found", "/api/v1/token");
    let get = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(agent.dir.path().join("agent.sock"))
        .arg("http://localhost/api/v1/token")
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&get.stdout), "405");

    // A caller the policy does not know never reaches HTTP: its TLS handshake fails.
    let other = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(agent.dir.path().join("ca.pem"))
        .arg("--cert")
        .arg(agent.dir.path().join("other.pem"))
        .arg("--key")
        .arg(agent.dir.path().join("other.key"))
        .args(["-H", "content-type: application/json", "-d", "{}"])
        .arg(format!("https://{}/api/v1/token", agent.addr))
        .output()
        .expect("curl");
    assert!(!other.status.success(), "{OTHER} must be refused");

    // Every refusal is audited, with the code the caller got.
    let reason =
        |l: &serde_json::Value, text: &str| l["reason"].as_str().is_some_and(|r| r.contains(text));
    for (outcome, code, text) in [
        ("denied", "PermissionDenied", "test:other"),
        ("refused", "InvalidArgument", "content-type"),
        ("refused", "InvalidArgument", "target"),
        ("refused", "ResourceExhausted", "65536"),
    ] {
        let line = agent.wait_for_audit(|l| {
            l["audit"] == "token" && l["outcome"] == outcome && l["code"] == code && reason(l, text)
        });
        assert!(
            line.is_some(),
            "{outcome} {code} {text}: {:?}",
            agent.audit_lines()
        );
    }
}

#[tokio::test]
async fn callers_over_their_rate_get_429_with_retry_after() {
    let (agent, _mock) = api_agent("", 2).await;
    let body = serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
        "client_id": CLIENT_ID});
    let limited = (0..20)
        .map(|_| post(&agent, &Via::Unix, "/api/v1/grant", &body))
        .find(|answer| answer.status != 200)
        .expect("the rate of 2 a second is reached within 20 requests");
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(limited.json()["error"], "temporarily_unavailable");
    assert!(limited.body.contains("over its limit"), "{}", limited.body);
}

#[tokio::test]
async fn slow_idle_and_oversized_http1_peers_are_cut_off() {
    let (agent, _mock) = api_agent("[limits]\nrequest_timeout_seconds = 1\n", 100).await;
    let socket = agent.dir.path().join("agent.sock");

    // A body that never finishes: 408 after request_timeout, audited.
    let started = Instant::now();
    let mut slow = raw(
        &socket,
        b"POST /api/v1/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"identity",
    );
    let answer = read_to_close(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Headers that never finish, and a keep-alive connection left idle: closed within
    // request_timeout, without an answer to wait for.
    for send in [&b"POST /api/v1/token HTTP/1.1\r\nhost: x\r\n"[..], b""] {
        let started = Instant::now();
        let mut idle = raw(&socket, send);
        if send.is_empty() {
            // A complete request first, then silence.
            idle.write_all(
                b"POST /api/v1/nothing HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
            )
            .expect("send");
        }
        let _ = read_to_close(&mut idle);
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "closed after {:?}",
            started.elapsed()
        );
    }

    // A header block over max_header_list_bytes (8 KiB by default) is refused.
    let mut big = b"POST /api/v1/token HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..400 {
        big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let mut oversized = raw(&socket, &big);
    let answer = read_to_close(&mut oversized);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Junk that is neither HTTP/2 nor an HTTP/1.1 request is closed unanswered.
    for start in [&b"hello agent\r\n\r\n"[..], b"\x16\x03\x01\x02\x00\x01\x00"] {
        let mut junk = raw(&socket, start);
        assert_eq!(read_to_close(&mut junk), "");
    }
    // What looks like a request line but is not one gets hyper's 400.
    let mut line = raw(&socket, b"HELO agent\r\n\r\n");
    assert!(read_to_close(&mut line).starts_with("HTTP/1.1 400"));

    // The agent still serves.
    let ok = post(
        &agent,
        &Via::Unix,
        "/api/v1/grant",
        &serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
            "client_id": CLIENT_ID}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}

/// A JSON caller that hangs up over HTTP/1.1 while its token is being fetched: the fetch
/// runs in its own task, so it finishes and fills the cache; the next caller gets that
/// token without a second exchange, and the agent goes on serving.
#[tokio::test]
async fn a_caller_hanging_up_mid_fetch_over_http1_does_not_cancel_the_fetch() {
    let (agent, mock) = api_agent("", 100).await;
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 3000, "count": 1}))
        .await;
    let texas = serde_json::json!({"identity_provider": "maskinporten", "target": "test:other",
        "client_id": common::api::CLIENT_ID});
    let body = texas.to_string();
    let request = format!(
        "POST /api/v1/token HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stream = raw(&agent.path("agent.sock"), request.as_bytes());
    // Hang up once Maskinporten has the grant (it answers 3 s later).
    let until = Instant::now() + Duration::from_secs(60);
    while token_requests(&mock).await == 0 {
        assert!(Instant::now() < until, "the exchange never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);

    let next = post(&agent, &Via::Unix, "/api/v1/token", &texas);
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(
        token_requests(&mock).await,
        1,
        "the abandoned fetch served the next caller: no second exchange"
    );
    let token = next.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let claims = mock.verify_access_token(&token).await;
    assert_eq!(claims["scope"], "test:other");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}
