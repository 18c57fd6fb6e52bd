//! Access tokens end to end: a real agent on a SoftHSM token exchanges grants at
//! the `mock-maskinporten` binary over real HTTP(S): tokens verify against the mock's
//! JWKS, the cache and single flight are counted at the mock, refresh ahead, force
//! refresh, OAuth2 errors reach the caller intact, retries stay within the deadline with a
//! new grant each time, the mock refuses a replayed jti, and no secret reaches a log.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::time::Duration;

use common::{BIN, DevAgent, Mock, TEST_AUD, grant_request, params, read, verify};
use grant_agent::proto::{
    GetAccessTokenRequest, GetAccessTokenResponse, GrantParameters, SignGrantRequest,
    grant_agent_client::GrantAgentClient,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const CLIENT_ID: &str = "0a3b5c7d-1111-2222-3333-444455556666";

/// A running agent and mock, and the dir they share.
struct Setup {
    agent: DevAgent,
    mock: Mock,
}

/// Options for [`setup`].
#[derive(Default)]
struct Options<'a> {
    /// Access token lifetime at the mock (default 120 s).
    lifetime: Option<u32>,
    /// Serve the mock over HTTPS, with a CA the agent is told to trust (or not).
    https: Option<bool>,
    /// Extra lines for the agent's `[token]` section; `{mock}` becomes the mock's URL.
    token: &'a str,
    /// Replaces the dev config's policy.
    policy: Option<&'a str>,
    /// Appended to the agent's config; `{mock}` becomes the mock's URL.
    extra: &'a str,
    /// Extra lines for the agent's `[pkcs11]` section.
    pkcs11: &'a str,
    /// Extra top-level lines for the mock's config.
    mock: &'a str,
}

/// A dev token and its self-signed test certificate (the mock's trust anchor), a mock
/// that knows the client, and an agent whose `mock` environment discovers the mock.
async fn setup(options: Options<'_>) -> Setup {
    let dir = DevAgent::anchored().await;
    let path = |name: &str| dir.path().join(name);

    let tls = options.https.map(|_| {
        common::server_tls(dir.path());
        (path("server.pem"), path("server.key"))
    });
    let mock = Mock::start(
        dir.path(),
        &format!(
            "{}certificates = \"test\"\nca = \"{}\"\ntoken_lifetime_seconds = {}\n\n\
             [[clients]]\nclient_id = \"{CLIENT_ID}\"\nscopes = [\"test:scope\", \"test:other\"]\n\
             organization_number = \"313367002\"\nconsumer_orgs = [\"974760673\"]\n",
            options.mock,
            path("dev-cert.pem").display(),
            options.lifetime.unwrap_or(120),
        ),
        tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    );

    let mut config =
        read(&path("config.toml")).replace("[pkcs11]\n", &format!("[pkcs11]\n{}", options.pkcs11));
    if let Some(policy) = options.policy {
        let start = config.find("[[policy]]").expect("policy");
        let end = config.find("[[keys]]").expect("keys");
        config.replace_range(start..end, &format!("{policy}\n"));
    }
    let ca_file = match options.https {
        Some(true) => format!("ca_file = \"{}\"\n", path("ca.pem").display()),
        _ => String::new(),
    };
    config.push_str(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[token]\n{ca_file}{}\n\n\
         [environments.mock]\nissuer = \"{}\"\ndiscover = true\ncertificates = \"test\"\n\n\
         [environments.wrongaud]\naudience = \"https://test.maskinporten.no/\"\ntoken_endpoint = \"{}token\"\n",
        options.token.replace("{mock}", &mock.url),
        mock.url,
        mock.url
    ));
    config.push_str(&options.extra.replace("{mock}", &mock.url));
    std::fs::write(path("agent.toml"), config).expect("agent config");
    let agent = DevAgent::serve(dir, "agent.toml");
    Setup { agent, mock }
}

/// An access token the agent must give.
async fn token(
    client: &mut GrantAgentClient<Channel>,
    grant: GrantParameters,
    force_refresh: bool,
) -> GetAccessTokenResponse {
    client
        .get_access_token(ask(grant, force_refresh))
        .await
        .expect("token")
        .into_inner()
}

fn mock_params() -> GrantParameters {
    GrantParameters {
        environment: "mock".into(),
        ..params()
    }
}

fn ask(grant: GrantParameters, force_refresh: bool) -> GetAccessTokenRequest {
    GetAccessTokenRequest {
        grant: Some(grant),
        force_refresh,
    }
}

async fn requests_at_mock(mock: &Mock) -> u64 {
    mock.stats().await["token_requests"]
        .as_u64()
        .expect("token_requests")
}

#[tokio::test]
async fn tokens_verify_are_cached_and_never_logged() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;

    let first = token(&mut client, mock_params(), false).await;
    assert!(!first.from_cache);
    assert_eq!(first.token_type, "Bearer");
    assert_eq!(first.scope, "test:scope");
    let now = common::unix_now();
    assert!(
        (now + 115..=now + 121).contains(&first.expires_at),
        "{}",
        first.expires_at
    );
    let claims = mock.verify_access_token(&first.access_token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(claims["scope"], "test:scope");
    assert_eq!(claims["consumer"]["ID"], "0192:313367002");
    assert_eq!(requests_at_mock(&mock).await, 1);

    // Repeats come from the cache, whatever the order of the scopes.
    let mut two = mock_params();
    two.scopes = vec!["test:scope".into(), "test:other".into()];
    let mut two_reversed = two.clone();
    two_reversed.scopes.reverse();
    for _ in 0..5 {
        let again = token(&mut client, mock_params(), false).await;
        assert!(again.from_cache);
        assert_eq!(again.access_token, first.access_token);
    }
    assert_eq!(requests_at_mock(&mock).await, 1);
    let a = token(&mut client, two, false).await;
    let b = token(&mut client, two_reversed, false).await;
    assert!(!a.from_cache && b.from_cache);
    assert_eq!(a.access_token, b.access_token);
    assert_eq!(requests_at_mock(&mock).await, 2);

    // force_refresh fetches a new token, which then serves the repeats.
    let forced = token(&mut client, mock_params(), true).await;
    assert!(!forced.from_cache);
    assert_ne!(forced.access_token, first.access_token);
    let after = token(&mut client, mock_params(), false).await;
    assert_eq!(after.access_token, forced.access_token);
    assert_eq!(requests_at_mock(&mock).await, 3);

    // The command line prints the bare (cached) token, for $(...) in scripts.
    let out = client_token(&agent.addr)
        .args(["--scope", "test:scope"])
        .output()
        .expect("client token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", forced.access_token)
    );

    // Metrics count hits and misses and time the upstream calls.
    let text = common::http_get(agent.metrics_url()).await;
    assert!(
        text.contains("grant_agent_token_cache_total{result=\"hit\"} 8"),
        "{text}"
    );
    assert!(
        text.contains("grant_agent_token_cache_total{result=\"miss\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("grant_agent_token_upstream_seconds_count{status=\"200\"} 3"),
        "{text}"
    );
    assert!(text.contains("grant_agent_tokens_total{key=\"default\",outcome=\"cached\"}"));

    // Neither log holds a token; the audit lines say what happened without one.
    for log in [agent.log(), mock.log()] {
        for token in [&first.access_token, &forced.access_token, &a.access_token] {
            assert!(!log.contains(token.as_str()), "a token reached a log");
        }
        assert!(!log.contains("eyJ"), "something JWT-shaped reached a log");
    }
    let audit =
        agent.log_when(|l| l.contains(r#""audit":"token""#) && l.contains(r#""outcome":"issued""#));
    assert!(audit.contains(r#""audit":"token""#) && audit.contains(r#""outcome":"issued""#));
}

/// The agent's audit lines of one kind (`"audit":"<kind>"`), parsed, once there are at
/// least `at_least` (the writer thread writes them a moment after the answers).
fn audit_lines(agent: &DevAgent, kind: &str, at_least: usize) -> Vec<serde_json::Value> {
    let tag = format!(r#""audit":"{kind}""#);
    let count = |log: &str| {
        log.lines()
            .filter(|l| l.starts_with('{') && l.contains(&tag))
            .count()
    };
    agent
        .log_when(|log| count(log) >= at_least)
        .lines()
        .filter(|l| l.starts_with('{') && l.contains(&format!(r#""audit":"{kind}""#)))
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

#[tokio::test]
async fn every_grant_behind_a_token_is_audited_and_cached_answers_are_counted() {
    let Setup { agent, mock } = setup(Options {
        extra: "\n[audit]\nsummary_seconds = 1\n",
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    // One 503 first: the fetch spends two grants, each audited with its own jti.
    mock.fault(serde_json::json!({"mode": "status", "status": 503, "count": 1}))
        .await;
    let issued = token(&mut client, mock_params(), false).await;
    assert!(!issued.from_cache);
    for _ in 0..10 {
        assert!(token(&mut client, mock_params(), false).await.from_cache);
    }
    let spent = audit_lines(&agent, "token_grant", 2);
    assert_eq!(spent.len(), 2, "{spent:?}");
    assert_eq!(spent[0]["attempt"], 1);
    assert_eq!(spent[0]["outcome"], "failed");
    assert!(
        spent[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("503"))
    );
    assert_eq!(spent[1]["attempt"], 2);
    assert_eq!(spent[1]["outcome"], "issued");
    assert_ne!(spent[0]["jti"], spent[1]["jti"]);
    for line in &spent {
        assert_eq!(line["certificate_sha256"].as_str().map(str::len), Some(64));
        assert_eq!(line["caller"], "anonymous");
    }
    let answers = audit_lines(&agent, "token", 1);
    assert_eq!(
        answers.len(),
        1,
        "cached answers are counted, not written: {answers:?}"
    );
    assert_eq!(answers[0]["outcome"], "issued");
    assert_eq!(answers[0]["jti"], spent[1]["jti"]);
    assert_eq!(
        answers[0]["certificate_sha256"],
        spent[1]["certificate_sha256"]
    );
    // Within a summary interval or two, the ten cached answers are one count.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let counted = loop {
        let summaries = audit_lines(&agent, "token_cached", 0);
        let counted: u64 = summaries.iter().filter_map(|l| l["count"].as_u64()).sum();
        if counted >= 10 || std::time::Instant::now() > until {
            assert!(summaries.iter().all(|l| l["jti"] == spent[1]["jti"]));
            assert!(summaries.iter().all(|l| l["client_id"] == CLIENT_ID));
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(counted, 10);

    // `cached = "each"` writes every answer.
    let Setup { agent, mock: _mock } = setup(Options {
        extra: "\n[audit]\ncached = \"each\"\n",
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    for _ in 0..4 {
        let _ = token(&mut client, mock_params(), false).await;
    }
    let answers = audit_lines(&agent, "token", 4);
    assert_eq!(answers.len(), 4);
    assert_eq!(
        answers.iter().filter(|l| l["outcome"] == "cached").count(),
        3
    );
    assert!(answers.iter().all(|l| l["jti"] == answers[0]["jti"]));
}

#[tokio::test]
async fn pid_and_iss_onbehalfof_reach_the_token_and_never_a_log() {
    const PID: &str = "01019012480";
    const OTHER_PID: &str = "41019012393";
    const TYPO: &str = "01019012481";
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;
    let mut person = mock_params();
    person.pid = PID.into();
    person.iss_onbehalfof = "kunde-42".into();
    let answer = token(&mut client, person.clone(), false).await;
    let claims = mock.verify_access_token(&answer.access_token).await;
    assert_eq!(claims["pid"], PID);
    assert_eq!(claims["iss_onbehalfof"], "kunde-42");
    // A person-restricted token is that person's alone: never served for another person
    // or for a request without one.
    let plain = token(&mut client, mock_params(), false).await;
    assert!(!plain.from_cache);
    let mut other = person.clone();
    other.pid = OTHER_PID.into();
    let for_other = token(&mut client, other, false).await;
    assert!(!for_other.from_cache);
    assert_ne!(for_other.access_token, answer.access_token);
    let again = token(&mut client, person, false).await;
    assert!(again.from_cache);
    assert_eq!(again.access_token, answer.access_token);

    // A mistyped number is refused naming the field, without echoing the number.
    let mut typo = mock_params();
    typo.pid = TYPO.into();
    let status = client
        .get_access_token(ask(typo, false))
        .await
        .expect_err("invalid pid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("grant.pid"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(TYPO));

    // SignGrant carries both claims too.
    let grant = client
        .sign_grant(SignGrantRequest {
            grant: Some(GrantParameters {
                pid: PID.into(),
                iss_onbehalfof: "kunde-42".into(),
                ..params()
            }),
        })
        .await
        .expect("signed")
        .into_inner();
    let verified = verify(&grant.assertion, TEST_AUD);
    assert_eq!(verified.claims["pid"], PID);
    assert_eq!(verified.claims["iss_onbehalfof"], "kunde-42");

    // No number reaches a log; the audit says a pid was there.
    for log in [agent.log(), mock.log()] {
        for number in [PID, OTHER_PID, TYPO] {
            assert!(!log.contains(number), "a pid reached a log:\n{log}");
        }
    }
    let log = agent
        .log_when(|l| l.contains(r#""pid":true"#) && l.contains(r#""iss_onbehalfof":"kunde-42""#));
    assert!(log.contains(r#""pid":true"#), "{log}");
    assert!(log.contains(r#""iss_onbehalfof":"kunde-42""#), "{log}");
    let metrics = common::http_get(agent.metrics_url()).await;
    assert!(!metrics.contains(PID));
}

#[tokio::test]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let Setup { agent, mock } = setup(Options::default()).await;
    // A slow Maskinporten, so that all 100 arrive while the first is in flight.
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 1000, "count": 1}))
        .await;
    let client = agent.client().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            token(&mut client, mock_params(), false).await
        }));
    }
    let mut tokens = std::collections::BTreeSet::new();
    let mut fetched = 0;
    for task in tasks {
        let token = task.await.expect("task");
        let _ = tokens.insert(token.access_token);
        fetched += usize::from(!token.from_cache);
    }
    assert_eq!(tokens.len(), 1, "everyone got the same token");
    assert_eq!(fetched, 1, "one request fetched, 99 waited for it");
    assert_eq!(requests_at_mock(&mock).await, 1);
}

#[tokio::test]
async fn hot_entries_are_refreshed_ahead_of_expiry() {
    // 8 s tokens: handed out until 2 s before expiry, refreshed from 4 s on.
    let Setup { agent, mock } = setup(Options {
        lifetime: Some(8),
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    let first = token(&mut client, mock_params(), false).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let due = token(&mut client, mock_params(), false).await;
    assert!(
        due.from_cache,
        "a token due for refresh is still served at once"
    );
    assert_eq!(due.access_token, first.access_token);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        requests_at_mock(&mock).await,
        2,
        "refreshed in the background"
    );
    let refreshed = token(&mut client, mock_params(), false).await;
    assert!(refreshed.from_cache);
    assert_ne!(refreshed.access_token, first.access_token);
    assert!(refreshed.expires_at > first.expires_at);
}

#[tokio::test]
async fn oauth_errors_reach_the_caller_intact_and_are_not_retried() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;
    let cases: Vec<(GrantParameters, Code, &str, &str, &str)> = vec![
        (
            GrantParameters {
                client_id: "unknown-client".into(),
                ..mock_params()
            },
            Code::FailedPrecondition,
            "invalid_client",
            "MP-100",
            "not registered in this environment",
        ),
        (
            GrantParameters {
                scopes: vec!["test:forbidden".into()],
                ..mock_params()
            },
            Code::PermissionDenied,
            "invalid_scope",
            "MP-200",
            "check the scope names",
        ),
        (
            GrantParameters {
                consumer_org: "991825827".into(),
                ..mock_params()
            },
            Code::PermissionDenied,
            "invalid_scope",
            "MP-251",
            "delegate the scope",
        ),
        (
            GrantParameters {
                environment: "wrongaud".into(),
                ..mock_params()
            },
            Code::FailedPrecondition,
            "invalid_grant",
            "MP-110",
            "wrong aud",
        ),
    ];
    for (i, (grant, code, error, mp, hint)) in cases.into_iter().enumerate() {
        let before = requests_at_mock(&mock).await;
        let status = client
            .get_access_token(ask(grant, false))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
        let message = status.message();
        assert!(message.contains(error) && message.contains(mp), "{message}");
        assert!(message.contains("trace_id"), "{message}");
        assert!(message.contains(hint), "{message}");
        let info = status.get_details_error_info().expect("ErrorInfo detail");
        assert_eq!(info.reason, error);
        assert_eq!(info.domain, "maskinporten");
        assert_eq!(info.metadata["mp_code"], mp);
        assert!(info.metadata["error_uri"].ends_with(&format!("/errors/{mp}")));
        assert!(info.metadata["error_description"].contains("trace_id"));
        assert_eq!(
            requests_at_mock(&mock).await,
            before + 1,
            "case {i}: 4xx is not retried"
        );
    }
    // The CLI shows the same on stderr and fails.
    let out = client_token(&agent.addr)
        .args(["--scope", "test:forbidden"])
        .output()
        .expect("client token");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("MP-200"),
        "{stderr}"
    );
}

#[tokio::test]
async fn failures_are_retried_with_new_grants_within_the_deadline() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;

    // Two 503s, then an answer: three tries, each with its own grant.
    mock.fault(serde_json::json!({"mode": "status", "status": 503, "count": 2}))
        .await;
    let token = client
        .get_access_token(ask(mock_params(), false))
        .await
        .expect("token after retries")
        .into_inner();
    assert!(!token.from_cache);
    assert_eq!(requests_at_mock(&mock).await, 3);
    let log = agent.log();
    let jtis: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("retrying with a new grant"))
        .filter_map(|l| l.split("jti=").nth(1)?.split_whitespace().next())
        .collect();
    assert_eq!(jtis.len(), 2, "each failed try had its own jti:\n{log}");

    // Dropped connections are retried too.
    mock.fault(serde_json::json!({"mode": "drop", "count": 2}))
        .await;
    let _ = client
        .get_access_token(ask(mock_params(), true))
        .await
        .expect("token after resets");
    assert_eq!(requests_at_mock(&mock).await, 6);

    // Failing for good: the caller's answer comes at the deadline it set; the flight
    // goes on with its own budget until its tries run out.
    mock.fault(serde_json::json!({"mode": "status", "status": 503}))
        .await;
    let before = requests_at_mock(&mock).await;
    let mut request = tonic::Request::new(ask(mock_params(), true));
    request.set_timeout(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let status = client.get_access_token(request).await.expect_err("fails");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while requests_at_mock(&mock).await < before + 4 {
        assert!(
            std::time::Instant::now() < until,
            "the flight stopped early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        requests_at_mock(&mock).await,
        before + 4,
        "4 tries, no more"
    );

    // Without a deadline, after the configured tries (4), with the last failure named.
    let before = requests_at_mock(&mock).await;
    let status = client
        .get_access_token(ask(mock_params(), true))
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("after 4 tries") && status.message().contains("HTTP 503"),
        "{}",
        status.message()
    );
    assert_eq!(requests_at_mock(&mock).await, before + 4);

    // A slow answer beyond the deadline: DEADLINE_EXCEEDED, on time.
    mock.clear_faults().await;
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 5000, "count": 1}))
        .await;
    let mut request = tonic::Request::new(ask(mock_params(), true));
    request.set_timeout(Duration::from_millis(1000));
    let started = std::time::Instant::now();
    let status = client
        .get_access_token(request)
        .await
        .expect_err("too slow");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(2000));

    // And the agent still works.
    mock.clear_faults().await;
    let _ = client
        .get_access_token(ask(mock_params(), true))
        .await
        .expect("token");
}

#[tokio::test]
async fn a_joined_flight_outlives_its_impatient_first_caller() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 2000, "count": 1}))
        .await;
    // Caller A starts the flight with one second to wait; 99 patient callers join it.
    let mut impatient = tonic::Request::new(ask(mock_params(), false));
    impatient.set_timeout(Duration::from_secs(1));
    let first = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            (client.get_access_token(impatient).await, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut patient = tokio::task::JoinSet::new();
    for _ in 0..99 {
        let mut client = client.clone();
        let _ = patient.spawn(async move {
            let mut request = tonic::Request::new(ask(mock_params(), false));
            request.set_timeout(Duration::from_secs(10));
            client.get_access_token(request).await
        });
    }
    let (answer, took) = first.await.expect("task");
    let status = answer.expect_err("A's deadline passes first");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let mut tokens = std::collections::BTreeSet::new();
    while let Some(answer) = patient.join_next().await {
        let token = answer
            .expect("task")
            .expect("a token for every patient caller");
        let _ = tokens.insert(token.into_inner().access_token);
    }
    assert_eq!(tokens.len(), 1, "one flight, one token");
    assert_eq!(requests_at_mock(&mock).await, 1);
    // The next call is served from the cache.
    let cached = token(&mut client, mock_params(), false).await;
    assert!(cached.from_cache);
    assert!(tokens.contains(&cached.access_token));
    assert_eq!(requests_at_mock(&mock).await, 1);
}

#[tokio::test]
async fn a_flight_whose_callers_all_left_still_fills_the_cache() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let mut client = agent.client().await;
    mock.fault(serde_json::json!({"mode": "delay", "delay_ms": 1500, "count": 1}))
        .await;
    let mut request = tonic::Request::new(ask(mock_params(), false));
    request.set_timeout(Duration::from_millis(400));
    let status = client.get_access_token(request).await.expect_err("gave up");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The grant's jti is spent at Maskinporten either way; the token it buys is kept.
    // Once the flight has landed, with nobody waiting, the next call finds it cached.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("access token issued") {
        assert!(std::time::Instant::now() < until, "the flight never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = token(&mut client, mock_params(), false).await;
    assert!(answer.from_cache);
    assert_eq!(requests_at_mock(&mock).await, 1, "no second fetch");
}

#[tokio::test]
async fn the_mock_refuses_a_replayed_grant() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let grant = agent.sign(mock_params()).await.expect("signed");
    let (status, body) = mock.exchange(&grant.assertion).await;
    assert_eq!(status, 200, "{body}");
    let claims = mock
        .verify_access_token(body["access_token"].as_str().expect("token"))
        .await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    let (status, body) = mock.exchange(&grant.assertion).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(
        body["error_uri"]
            .as_str()
            .is_some_and(|u| u.ends_with("/MP-012")),
        "{body}"
    );
}

#[tokio::test]
async fn authorization_details_reach_the_token_and_the_policy() {
    let policy = "[[policy]]\ncaller = \"anonymous\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\n\
                  scopes = [\"*\"]\nenvironments = [\"*\"]\nauthorization_types = [\"urn:altinn:systemuser\"]\n";
    let Setup { agent, mock } = setup(Options {
        policy: Some(policy),
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    let system_user = r#"[{"type":"urn:altinn:systemuser","systemuser_org":{"authority":"iso6523-actorid-upis","ID":"0192:313367002"}}]"#;
    let system = token(
        &mut client,
        GrantParameters {
            authorization_details_json: system_user.into(),
            ..mock_params()
        },
        false,
    )
    .await;
    let claims = mock.verify_access_token(&system.access_token).await;
    assert_eq!(
        claims["authorization_details"][0]["type"],
        "urn:altinn:systemuser"
    );
    // A different authorization_details is a different cache entry.
    let plain = token(&mut client, mock_params(), false).await;
    assert!(!plain.from_cache);
    assert_ne!(plain.access_token, system.access_token);

    let consent = GrantParameters {
        authorization_details_json: r#"[{"type":"urn:altinn:consent","id":"x"}]"#.into(),
        ..mock_params()
    };
    let status = client
        .get_access_token(ask(consent.clone(), false))
        .await
        .expect_err("type not allowed");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("authorization_details type \"urn:altinn:consent\""),
        "{}",
        status.message()
    );
    let status = client
        .sign_grant(grant_request(consent))
        .await
        .expect_err("type not allowed for grants either");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .get_access_token(ask(
            GrantParameters {
                authorization_details_json: r#"[{"id":"x"}]"#.into(),
                ..mock_params()
            },
            false,
        ))
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("grant.authorization_details_json[0].type"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn https_with_a_configured_ca_and_refused_without_it() {
    let Setup { agent, mock } = setup(Options {
        https: Some(true),
        ..Options::default()
    })
    .await;
    assert!(mock.url.starts_with("https://127.0.0.1:"), "{}", mock.url);
    let token = agent
        .client()
        .await
        .get_access_token(ask(mock_params(), false))
        .await
        .expect("token over HTTPS")
        .into_inner();
    let claims = mock.verify_access_token(&token.access_token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);

    let Setup { agent, mock: _mock } = setup(Options {
        https: Some(false),
        ..Options::default()
    })
    .await;
    let status = agent
        .client()
        .await
        .get_access_token(ask(mock_params(), false))
        .await
        .expect_err("untrusted");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("certificate"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn discovery_must_name_the_issuer_asked_about() {
    // A local Maskinporten whose metadata claims another issuer than the one asked, in
    // either document discovery reads; and an issuer that publishes neither.
    let dir = tempfile::tempdir().expect("dir");
    let mut impostors = Vec::new();
    let mut environments = String::new();
    for (name, document) in [
        ("rfc8414", "oauth-authorization-server"),
        ("openid", "openid-configuration"),
    ] {
        let dir = dir.path().join(name);
        std::fs::create_dir(&dir).expect("dir");
        let impostor = Mock::start(
            &dir,
            &format!(
                "issuer = \"https://maskinporten.example/\"\nwell_known = \"{document}\"\n\
                 [[clients]]\nclient_id = \"{CLIENT_ID}\"\nscopes = [\"test:scope\"]\n"
            ),
            None,
        );
        environments.push_str(&format!(
            "[environments.{name}]\nissuer = \"{}\"\ndiscover = true\n\
             [environments.{name}-none]\nissuer = \"{}nothing/\"\ndiscover = true\n",
            impostor.url, impostor.url
        ));
        impostors.push((name, document, impostor));
    }
    let Setup { agent, mock: _mock } = setup(Options {
        extra: &environments,
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    for (name, document, impostor) in &impostors {
        let status = client
            .get_access_token(ask(
                GrantParameters {
                    environment: (*name).into(),
                    ..mock_params()
                },
                false,
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        let expected = format!(
            "{}.well-known/{document} names issuer \"https://maskinporten.example/\"",
            impostor.url
        );
        assert!(status.message().contains(&expected), "{}", status.message());

        // An issuer with a path that publishes neither document: both are tried, at the
        // places RFC 8414 and OpenID Connect Discovery put them.
        let status = client
            .get_access_token(ask(
                GrantParameters {
                    environment: format!("{name}-none"),
                    ..mock_params()
                },
                false,
            ))
            .await
            .expect_err("no metadata");
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        let expected = format!(
            "no metadata: neither {url}.well-known/oauth-authorization-server/nothing nor \
             {url}nothing/.well-known/openid-configuration exists",
            url = impostor.url
        );
        assert!(status.message().contains(&expected), "{}", status.message());
        assert_eq!(requests_at_mock(impostor).await, 0, "no grant was sent");
    }
}

#[tokio::test]
async fn discovery_falls_back_to_openid_configuration() {
    // Like Skyporten: the issuer publishes only /.well-known/openid-configuration.
    let Setup { agent, mock } = setup(Options {
        mock: "well_known = \"openid-configuration\"\n",
        ..Options::default()
    })
    .await;
    let token = token(&mut agent.client().await, mock_params(), false).await;
    let claims = mock.verify_access_token(&token.access_token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(requests_at_mock(&mock).await, 1);
    let log = agent.log();
    assert!(
        log.contains("discovered the token endpoint")
            && log.contains(&format!("{}token", mock.url)),
        "{log}"
    );
}

#[tokio::test]
async fn token_requests_go_through_the_configured_proxy() {
    // The endpoint is a loopback address where nothing listens; the proxy is the mock,
    // which answers the proxied POST. A token proves the request went through the proxy.
    let Setup { agent, mock } = setup(Options {
        token: "proxy = \"{mock}\"",
        extra: "[environments.proxied]\naudience = \"{mock}\"\ntoken_endpoint = \"http://127.0.0.2:9/token\"\n",
        ..Options::default()
    })
    .await;
    let mut client = agent.client().await;
    let proxied = token(
        &mut client,
        GrantParameters {
            environment: "proxied".into(),
            ..mock_params()
        },
        false,
    )
    .await;
    let claims = mock.verify_access_token(&proxied.access_token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(requests_at_mock(&mock).await, 1);
}

#[tokio::test]
async fn a_full_session_queue_is_busy_not_a_failed_token() {
    let Setup { agent, mock: _mock } = setup(Options {
        pkcs11: "sessions = 1\nqueue = 1\n",
        ..Options::default()
    })
    .await;
    let client = agent.client().await;
    // Each its own cache entry (its own scope), so each signs a grant of its own; the mock
    // refuses the scopes it does not know, which is beside the point here.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let grant = GrantParameters {
                    scopes: vec![format!("test:load{i}")],
                    ..mock_params()
                };
                c.get_access_token(ask(grant, false)).await
            })
        })
        .collect();
    let mut busy = 0_u32;
    for task in tasks {
        if let Err(status) = task.await.expect("task")
            && status.code() == Code::ResourceExhausted
        {
            common::assert_token_busy(&status);
            busy += 1;
        }
    }
    assert!(busy > 0, "64 at once must overflow a queue of 1");
    let text = common::http_get(agent.metrics_url()).await;
    let line = format!("grant_agent_tokens_total{{key=\"default\",outcome=\"busy\"}} {busy}");
    assert!(text.contains(&line), "{line} missing from\n{text}");
    assert!(!text.contains("outcome=\"failed\""), "{text}");
    assert!(!text.contains("grant_agent_pkcs11_errors_total{"), "{text}");
    let log = agent.log();
    assert!(
        !log.contains("signing failed") && !log.contains("no access token"),
        "overload is not logged as an error:\n{log}"
    );
}

/// `grant-agent client token` asking the agent at `addr` for the test client's token from
/// the mock; the caller adds the scopes and the rest.
fn client_token(addr: &str) -> std::process::Command {
    let mut command = std::process::Command::new(BIN);
    let _ = command.args([
        "client",
        "token",
        "--addr",
        addr,
        "--client-id",
        CLIENT_ID,
        "--env",
        "mock",
    ]);
    command
}

/// `grant-agent client token ... --out FILE` plus `extra`, as a child process whose
/// stderr goes to `stderr`.
fn token_to_file(
    agent: &DevAgent,
    scope: &str,
    file: &std::path::Path,
    extra: &[&str],
    stderr: &std::path::Path,
) -> std::process::Child {
    client_token(&agent.addr)
        .args(["--scope", scope, "--out"])
        .arg(file)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("client token --out")
}

/// Waits up to `timeout` for `check` to give something.
async fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(found) = check() {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn client_token_out_writes_the_token_to_a_private_file() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("maskinporten-token");
    let stderr = dir.path().join("stderr");
    // A file that others could read is replaced by one they cannot.
    std::fs::write(&file, "stale").expect("stale");
    let out = token_to_file(&agent, "test:scope", &file, &[], &stderr)
        .wait_with_output()
        .expect("ran");
    assert!(out.status.success(), "{}", read(&stderr));
    assert!(out.stdout.is_empty(), "the token goes to the file alone");
    let token = std::fs::read_to_string(&file).expect("token file");
    assert!(
        !token.ends_with('\n'),
        "the bare token, as credential_source.file reads it"
    );
    let claims = mock.verify_access_token(&token).await;
    assert_eq!(claims["client_id"], CLIENT_ID);
    assert_eq!(mode(&file), 0o600);
    assert!(!read(&stderr).contains(&token), "the token reached stderr");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");

    let out = token_to_file(&agent, "test:scope", &file, &["--format", "json"], &stderr)
        .wait_with_output()
        .expect("ran");
    assert!(out.status.success(), "{}", read(&stderr));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("file")).expect("JSON");
    assert_eq!(
        json["access_token"].as_str(),
        Some(token.as_str()),
        "cached"
    );
    assert_eq!(json["token_type"], "Bearer");
    assert!(
        json["expires_at"]
            .as_i64()
            .is_some_and(|t| t > common::unix_now())
    );

    // The flags that make no sense together are refused, by name.
    for (args, message) in [
        (
            &["--json"][..],
            "'--json' cannot be used with '--out <FILE>'",
        ),
        (&["--watch"][..], "--out <FILE>"),
    ] {
        let mut command = client_token(&agent.addr);
        let _ = command.args(["--scope", "test:scope"]).args(args);
        if args == ["--json"] {
            let _ = command.arg("--out").arg(&file);
        }
        let out = command.output().expect("ran");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{stderr}");
    }
    // A file that cannot be written is named with the flag.
    let nowhere = dir.path().join("missing").join("token");
    let out = token_to_file(&agent, "test:scope", &nowhere, &[], &stderr)
        .wait_with_output()
        .expect("ran");
    assert!(!out.status.success());
    let text = read(&stderr);
    assert!(
        text.contains(&format!("--out {}: cannot create", nowhere.display())),
        "{text}"
    );
}

#[tokio::test]
async fn client_token_watch_renews_before_expiry_and_rides_out_failures() {
    // 6 s tokens: the watch renews at two thirds of what is left, about 4 s.
    let Setup { agent, mock } = setup(Options {
        lifetime: Some(6),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    let stderr = dir.path().join("stderr");
    let mut watch = token_to_file(&agent, "test:scope", &file, &["--watch"], &stderr);
    let read_token = || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| !t.is_empty())
    };

    let first = eventually(Duration::from_secs(10), read_token)
        .await
        .expect("a first token");
    let first_expires = mock.verify_access_token(&first).await["exp"]
        .as_i64()
        .expect("exp");
    let second = eventually(Duration::from_secs(10), || {
        read_token().filter(|t| *t != first)
    })
    .await
    .expect("a renewed token");
    assert!(
        common::unix_now() <= first_expires,
        "renewed before the first token expired"
    );
    assert_eq!(
        mock.verify_access_token(&second).await["client_id"],
        CLIENT_ID
    );
    assert_eq!(mode(&file), 0o600);

    // Maskinporten fails for a while: the watch retries, then renews once it is back.
    mock.fault(serde_json::json!({"mode": "status", "status": 503}))
        .await;
    let retried = eventually(Duration::from_secs(15), || {
        read(&stderr).contains("retrying").then_some(())
    })
    .await;
    assert!(retried.is_some(), "{}", read(&stderr));
    mock.clear_faults().await;
    let third = eventually(Duration::from_secs(20), || {
        read_token().filter(|t| *t != first && *t != second)
    })
    .await
    .expect("renewed after the failures");
    assert_eq!(
        mock.verify_access_token(&third).await["client_id"],
        CLIENT_ID
    );
    assert!(watch.try_wait().expect("wait").is_none(), "still watching");

    // SIGTERM ends it cleanly, leaving the file.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = eventually(Duration::from_secs(5), || watch.try_wait().expect("wait")).await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "{exited:?}\n{}",
        read(&stderr)
    );
    assert!(read_token().is_some());
    let log = read(&stderr);
    for token in [&first, &second, &third] {
        assert!(!log.contains(token.as_str()), "a token reached stderr");
    }
    assert!(
        log.contains("UNAVAILABLE") || log.contains("Unavailable"),
        "{log}"
    );
}

#[tokio::test]
async fn client_token_watch_stops_on_a_refusal_a_retry_would_repeat() {
    let Setup { agent, mock } = setup(Options::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    let stderr = dir.path().join("stderr");
    let mut watch = token_to_file(&agent, "test:forbidden", &file, &["--watch"], &stderr);
    let exited = eventually(Duration::from_secs(10), || watch.try_wait().expect("wait")).await;
    let text = read(&stderr);
    assert!(exited.is_some_and(|s| !s.success()), "{exited:?}\n{text}");
    assert!(
        text.contains("--watch stopped: the agent refused: PermissionDenied")
            && text.contains("MP-200"),
        "{text}"
    );
    assert!(!file.exists(), "nothing written");
    assert_eq!(requests_at_mock(&mock).await, 1, "not retried");

    // An agent that is not there (yet) is waited for, not given up on; SIGINT ends that.
    let mut waiting = client_token("127.0.0.1:9")
        .args(["--scope", "test:scope", "--watch", "--out"])
        .arg(&file)
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("client token --watch");
    let retried = eventually(Duration::from_secs(10), || {
        let text = read(&stderr);
        (text.contains("retrying") && text.contains("cannot connect")).then_some(())
    })
    .await;
    assert!(retried.is_some(), "{}", read(&stderr));
    assert!(waiting.try_wait().expect("wait").is_none(), "still waiting");
    let status = std::process::Command::new("kill")
        .args(["-INT", &waiting.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = eventually(Duration::from_secs(5), || waiting.try_wait().expect("wait")).await;
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
}

#[tokio::test]
async fn skyporten_grants_carry_its_issuer_exactly() {
    // The dev agent's certificate is a test certificate: sky-test takes it, sky does not.
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let signed = client
        .sign_grant(SignGrantRequest {
            grant: Some(GrantParameters {
                environment: "sky-test".into(),
                ..params()
            }),
        })
        .await
        .expect("signed for sky-test")
        .into_inner();
    let claims = verify(&signed.assertion, "https://test.sky.maskinporten.no").claims;
    assert_eq!(
        claims["aud"], "https://test.sky.maskinporten.no",
        "no trailing slash"
    );
    let status = client
        .sign_grant(SignGrantRequest {
            grant: Some(GrantParameters {
                environment: "sky".into(),
                ..params()
            }),
        })
        .await
        .expect_err("a test certificate for production Skyporten");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
}
