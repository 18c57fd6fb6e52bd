//! Under load the agent never queues without bound: a full queue is refused at once with
//! RESOURCE_EXHAUSTED, and a request whose deadline cannot be met is refused at once with
//! DEADLINE_EXCEEDED, while the rest are signed.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::time::{Duration, Instant};

use common::{DevAgent, TEST_AUD, params, read, verify};
use grant_agent::proto::SignGrantRequest;
use tonic::Code;

/// The dev token, served with one session and a queue of `queue`.
fn one_session(queue: usize) -> DevAgent {
    let dir = DevAgent::start().stop();
    let config = read(&dir.path().join("config.toml")).replace(
        "[pkcs11]\n",
        &format!("[pkcs11]\nsessions = 1\nqueue = {queue}\n"),
    );
    std::fs::write(dir.path().join("agent.toml"), config).expect("config");
    DevAgent::serve(dir, "agent.toml")
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
                (
                    c.sign_grant(SignGrantRequest {
                        grant: Some(params()),
                    })
                    .await,
                    sent.elapsed(),
                )
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
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                assert!(
                    status
                        .message()
                        .starts_with("signing in the token failed: the token is busy:"),
                    "{}",
                    status.message()
                );
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
    let _ = verify(
        &agent
            .client()
            .await
            .sign_grant(SignGrantRequest {
                grant: Some(params()),
            })
            .await
            .expect("serving")
            .into_inner()
            .assertion,
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
            .sign_grant(SignGrantRequest {
                grant: Some(params()),
            })
            .await
            .expect("signed");
    }
    // Fill the queue: 2,000 waiting requests take over a second on one session.
    let backlog: Vec<_> = (0..2000)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.sign_grant(SignGrantRequest {
                    grant: Some(params()),
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hurried = tonic::Request::new(SignGrantRequest {
        grant: Some(params()),
    });
    hurried.set_timeout(Duration::from_millis(300));
    // Had the agent let it wait, the client's own 300 ms timer would have fired first,
    // with another code and message: these prove the agent refused it at once.
    let status = client
        .clone()
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
}
