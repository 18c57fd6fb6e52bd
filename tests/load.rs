//! Under load the agent never queues without bound: a full queue is refused at once with
//! RESOURCE_EXHAUSTED, and a request whose deadline cannot be met is refused at once with
//! DEADLINE_EXCEEDED, while the rest are signed. Such refusals are overload, not failure:
//! outcome `busy` in the audit trail and the metrics, no PKCS#11 error, and a log line a
//! second at most rather than one per refusal.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::time::{Duration, Instant};

use common::{DevAgent, TEST_AUD, grant_request, http_get, params, read, verify};
use grant_agent::proto::SignGrantRequest;
use tonic::Code;

/// The dev token, served with one session and a queue of `queue`, and metrics.
fn one_session(queue: usize) -> DevAgent {
    let dir = DevAgent::start().stop();
    let config = read(&dir.path().join("config.toml")).replace(
        "[pkcs11]\n",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[pkcs11]\nsessions = 1\nqueue = {queue}\n"
        ),
    );
    std::fs::write(dir.path().join("agent.toml"), config).expect("config");
    DevAgent::serve(dir, "agent.toml")
}

/// The value of a sample (`name` with its labels, as exposed), or `None` when absent.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Overload refusals were counted and audited as `busy`, never as failures, and logged in
/// a few summary lines whose counts add up to `busy`.
async fn busy_is_overload_not_failure(agent: &DevAgent, busy: usize) {
    // The summary of the last second is logged a second after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = http_get(agent.metrics_url()).await;
    let expected = f64::from(u32::try_from(busy).expect("count"));
    assert_eq!(
        sample(
            &text,
            "grant_agent_grants_total{key=\"default\",outcome=\"busy\"}"
        ),
        Some(expected),
        "{text}"
    );
    assert!(!text.contains("outcome=\"failed\""), "{text}");
    assert!(
        !text.contains("grant_agent_pkcs11_errors_total{"),
        "overload is not a PKCS#11 error:\n{text}"
    );
    let busy_lines = |log: &str| {
        log.lines()
            .filter(|l| l.starts_with("{\"audit\"") && l.contains("\"outcome\":\"busy\""))
            .count()
    };
    let log = agent.log_when(|log| busy_lines(log) >= busy);
    let audited = busy_lines(&log);
    assert_eq!(audited, busy, "{log}");
    assert!(!log.contains("signing failed"), "{log}");
    let summaries: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("overloaded: refused requests"))
        .map(|l| {
            assert!(l.contains("WARN"), "{l}");
            let at = l.find("refused=").expect("a count") + "refused=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a number")
        })
        .collect();
    assert_eq!(
        summaries.iter().sum::<u64>(),
        u64::try_from(busy).expect("count"),
        "every refusal is in a summary line: {summaries:?}\n{log}"
    );
    assert!(
        summaries.len() <= 3 && (busy < 2 || summaries.len() < busy),
        "{} lines for {busy} refusals: {summaries:?}",
        summaries.len()
    );
}

/// The value of an unlabelled gauge.
fn gauge(metrics: &str, name: &str) -> f64 {
    sample(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_and_the_rest_is_signed() {
    let agent = one_session(4);
    let client = agent.client().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                (c.sign_grant(grant_request(params())).await, sent.elapsed())
            })
        })
        .collect();
    let (mut signed, mut busy) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            (Ok(r), _) => {
                let _ = verify(&r.into_inner().assertion, TEST_AUD);
                signed += 1;
            }
            (Err(status), took) => {
                common::assert_token_busy(&status);
                assert!(
                    took < Duration::from_secs(1),
                    "refused at once, not after waiting ({took:?})"
                );
                busy += 1;
            }
        }
    }
    assert_eq!(signed + busy, 64);
    assert!(
        signed >= 5,
        "one signing and four waiting at least: {signed}"
    );
    assert!(busy > 0, "64 at once must overflow a queue of 4");
    busy_is_overload_not_failure(&agent, busy).await;
    let _ = verify(
        &agent.sign(params()).await.expect("serving").assertion,
        TEST_AUD,
    );
}

#[tokio::test]
async fn a_deadline_that_cannot_be_met_is_refused_at_once() {
    let agent = one_session(10_000);
    let client = agent.client().await;
    // Warm up, so the agent knows how long a sign takes.
    for _ in 0..20 {
        let _ = client
            .clone()
            .sign_grant(grant_request(params()))
            .await
            .expect("signed");
    }
    // Fill the queue: 3,000 requests over 16 connections (each takes at most
    // `limits.max_concurrent_streams`, 100, at once), about two seconds of signing on one
    // session.
    let mut clients = vec![client.clone()];
    for _ in 1..16 {
        clients.push(agent.client().await);
    }
    let backlog: Vec<_> = (0..3000)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            tokio::spawn(async move { c.sign_grant(grant_request(params())).await })
        })
        .collect();
    // Wait until the agent holds a good part of them, however slow the machine is to send
    // them: 1,000 queued signs take far longer than the hurried request's deadline.
    let started = Instant::now();
    let mut deepest = 0.0_f64;
    loop {
        let depth = gauge(
            &http_get(agent.metrics_url()).await,
            "grant_agent_queue_depth",
        );
        deepest = deepest.max(depth);
        if depth >= 1000.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the backlog never queued up: at most {deepest} waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut hurried = tonic::Request::new(SignGrantRequest {
        grant: Some(params()),
    });
    hurried.set_timeout(Duration::from_millis(300));
    // Had the agent let it wait, the client's own 300 ms timer would have fired first,
    // with another code and message: these prove the agent refused it at once. It goes on
    // a connection of its own, so it is not queued behind the backlog in the client.
    let mut hurried_client = agent.client().await;
    let status = hurried_client
        .sign_grant(hurried)
        .await
        .expect_err("cannot be met");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains("the caller's deadline cannot be met with the queue ahead of it"),
        "refused by the agent's admission, not by the client's timer: {}",
        status.message()
    );
    for task in backlog {
        let _ = task.await.expect("task").expect("the backlog is signed");
    }
    busy_is_overload_not_failure(&agent, 1).await;
}

#[tokio::test]
async fn metrics_count_what_happened_and_logs_carry_request_ids() {
    let dir = DevAgent::start().stop();
    let config = read(&dir.path().join("config.toml")).replace(
        "[pkcs11]\n",
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[pkcs11]\nsessions = 3\n",
    );
    // A second token key, registered on a client: a kid key expires too.
    let generated = std::process::Command::new(common::BIN)
        .args(["key", "generate", "--label", "registered"])
        .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
        .env("GRANT_AGENT_CONFIG", dir.path().join("config.toml"))
        .output()
        .expect("key generate");
    assert!(generated.status.success(), "{generated:?}");
    let config = format!(
        "{config}\n[[keys]]\nname = \"registered\"\nlabel = \"registered\"\n\
         kid = \"registered-2099\"\nnot_after = 2099-01-01T00:00:00Z\n"
    );
    std::fs::write(dir.path().join("agent.toml"), config).expect("config");
    let agent = DevAgent::serve(dir, "agent.toml");
    let mut client = agent.client().await;
    for _ in 0..3 {
        let _ = client
            .sign_grant(grant_request(params()))
            .await
            .expect("signed");
    }
    let mut bad = params();
    bad.lifetime_seconds = 500;
    let _ = client
        .sign_grant(grant_request(bad))
        .await
        .expect_err("refused");

    let text = http_get(agent.metrics_url()).await;
    for expected in [
        "grant_agent_grants_total{key=\"default\",outcome=\"signed\"} 3",
        "grant_agent_grants_total{key=\"default\",outcome=\"refused\"} 1",
        "grant_agent_sign_seconds_count 3",
        "grant_agent_queue_wait_seconds_count 3",
        "grant_agent_sessions 3",
        "grant_agent_queue_depth 0",
        "grant_agent_sessions_busy 0",
        "grant_agent_serving 1",
        "grant_agent_recoveries_total 0",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    let expiry = text
        .lines()
        .find(|l| l.starts_with("grant_agent_certificate_expiry_seconds{key=\"default\""))
        .unwrap_or_else(|| panic!("no expiry gauge in\n{text}"));
    assert!(
        text.contains(
            "grant_agent_certificate_expiry_seconds{key=\"registered\",certificate_sha256=\"\"}"
        ),
        "the kid key's expiry gauge is missing from\n{text}"
    );
    assert!(
        !text.contains("grant_agent_certificate_revoked{key=\"registered\""),
        "a kid key has no certificate to revoke:\n{text}"
    );
    let seconds: i64 = expiry
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!((700 * 86_400..=731 * 86_400).contains(&seconds), "{expiry}");

    // Each audit line (on stderr here) has a request id.
    let log =
        agent.log_when(|log| log.lines().filter(|l| l.starts_with("{\"audit\"")).count() >= 4);
    let ids: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with("{\"audit\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["request_id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 4, "{log}");
    assert!(ids.iter().all(|id| id.len() == 32), "{ids:?}");
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let mut agent = DevAgent::start();
    agent.signal("TERM");
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .expect("the agent stopped");
    assert!(status.success(), "{status:?}");
    let log = agent.log();
    assert!(
        log.contains("shutdown requested") && log.contains("stopped serving"),
        "{log}"
    );
}
