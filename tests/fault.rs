//! The agent on `fault-pkcs11`, the project's PKCS#11 module that passes every call to
//! SoftHSM and injects, on command, the faults of the network HSMs the test machines
//! cannot install (see `fault-pkcs11/src/lib.rs` and docs/hsm-compatibility.md). Each
//! test asserts what a caller sees, and that grants verify afterwards.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{BIN, DevAgent, TEST_AUD, grant_request, params, read, verify};
use tonic::Code;

/// The fault module, built next to the agent's binary by `cargo build -p fault-pkcs11`.
fn fault_module() -> PathBuf {
    let module = Path::new(BIN)
        .parent()
        .expect("target folder")
        .join("libfault_pkcs11.so");
    assert!(
        module.exists(),
        "{} is missing: run `cargo build -p fault-pkcs11` (softhsm/test.sh does it)",
        module.display()
    );
    module
}

/// A fresh dev token whose `agent.toml` uses the fault module, with `faults` in its
/// control file and `extra` added to its `[pkcs11]` section; the environment the agent
/// needs for it.
fn behind_faults(faults: &str, extra: &str) -> (tempfile::TempDir, PathBuf, [(String, String); 2]) {
    let dir = DevAgent::start().stop();
    let p = dir.path();
    let softhsm = grant_agent::dev::softhsm_module().expect("SoftHSM");
    let config = read(&p.join("config.toml"))
        .replace(
            &format!("module = \"{}\"", softhsm.display()),
            &format!("module = \"{}\"{extra}", fault_module().display()),
        )
        .replace(
            "[pkcs11]\n",
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[pkcs11]\n",
        );
    assert!(config.contains("libfault_pkcs11"), "{config}");
    std::fs::write(p.join("agent.toml"), config).expect("config");
    let control = p.join("faults");
    std::fs::write(&control, faults).expect("control file");
    let env = [
        (
            "FAULT_PKCS11_MODULE".to_owned(),
            softhsm.display().to_string(),
        ),
        (
            "FAULT_PKCS11_CONTROL".to_owned(),
            control.display().to_string(),
        ),
    ];
    (dir, control, env)
}

/// An agent serving on [`behind_faults`].
fn agent_behind_faults(faults: &str, extra: &str) -> (DevAgent, PathBuf) {
    let (dir, control, env) = behind_faults(faults, extra);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    (DevAgent::serve_with_env(dir, "agent.toml", &env), control)
}

/// Changes the faults in force (the module reads the file again when its mtime moves).
fn set_faults(control: &Path, faults: &str) {
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(control, faults).expect("control file");
}

async fn sign(agent: &DevAgent) -> Result<String, tonic::Status> {
    agent.sign(params()).await.map(|r| r.assertion)
}

/// Waits up to `limit` for `sign` to succeed; the time it took.
async fn until_signed(agent: &DevAgent, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match sign(agent).await {
            Ok(assertion) => {
                let _ = verify(&assertion, TEST_AUD);
                return started.elapsed();
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    started.elapsed() < limit,
                    "no grant within {limit:?}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The agent's metrics, and a reader of one sum in them.
async fn metrics(agent: &DevAgent) -> impl Fn(&str) -> f64 {
    let text = common::http_get(agent.metrics_url()).await;
    move |prefix: &str| common::metric_sum(&text, prefix)
}

/// Signs, makes the token fail the next sign with `rv` once, and signs again: the agent
/// must get past the error within that request (`after` says how).
async fn signs_past_one(agent: &DevAgent, control: &Path, rv: &str, after: &str) {
    let _ = verify(&sign(agent).await.expect("signed"), TEST_AUD);
    set_faults(control, &format!("sign_errors = {rv} 1\n"));
    let _ = verify(&sign(agent).await.expect(after), TEST_AUD);
}

/// Signs `n` grants on `tasks` concurrent clients and verifies each.
async fn sign_all(agent: &DevAgent, tasks: usize, n: usize) {
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let mut client = agent.client().await;
        let _ = load.spawn(async move {
            let mut signed = Vec::new();
            for _ in 0..n / tasks {
                let response = client
                    .sign_grant(grant_request(params()))
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                signed.push(response.into_inner().assertion);
            }
            Ok::<_, String>(signed)
        });
    }
    while let Some(result) = load.join_next().await {
        for assertion in result.expect("task").expect("every grant signed") {
            let _ = verify(&assertion, TEST_AUD);
        }
    }
}

#[tokio::test]
async fn a_burst_of_device_errors_is_backed_off_without_reinitialising() {
    let (agent, control) = agent_behind_faults("", "");
    let _ = verify(&sign(&agent).await.expect("signed"), TEST_AUD);
    // AWS CloudHSM when throttled answers DEVICE_ERROR: a re-initialisation would make it
    // worse. The requests wait and try again; the callers never see it.
    set_faults(&control, "sign_errors = DEVICE_ERROR 3\n");
    for _ in 0..10 {
        let _ = verify(
            &sign(&agent).await.expect("signed after a backoff"),
            TEST_AUD,
        );
    }
    let value = metrics(&agent).await;
    assert_eq!(
        value("grant_agent_pkcs11_errors_total{class=\"device\",rv=\"DeviceError\"}"),
        3.0
    );
    assert_eq!(value("grant_agent_recoveries_total "), 0.0);
    assert!(
        agent.log().matches("recovering").count() == 0,
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn device_errors_that_persist_reinitialise_the_token_once_per_period() {
    let (agent, control) = agent_behind_faults("", "");
    let _ = verify(&sign(&agent).await.expect("signed"), TEST_AUD);
    set_faults(&control, "sign_errors = DEVICE_ERROR every 1\n");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let status = sign(&agent).await.expect_err("every sign fails");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let value = metrics(&agent).await;
    // After DEVICE_ERROR_PERSISTS (5 s) of nothing but DEVICE_ERROR, one re-initialisation;
    // then the requests back off again for another period.
    assert_eq!(
        value("grant_agent_recoveries_total "),
        1.0,
        "{}",
        agent.log()
    );
    set_faults(&control, "\n");
    let _ = until_signed(&agent, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_session_the_hsm_dropped_is_replaced_alone_and_never_used_again() {
    // A network HSM dropped one session (Luna, YubiHSM 2 after 30 s idle): that session
    // is replaced, the request signs on the new one, and nothing else is touched.
    let (agent, control) = agent_behind_faults("", "");
    signs_past_one(
        &agent,
        &control,
        "SESSION_HANDLE_INVALID",
        "signed on a new session",
    )
    .await;
    // The dead session stays dead in the module: had it gone back to the pool, each use
    // would fail again and be counted.
    sign_all(&agent, 4, 40).await;
    let value = metrics(&agent).await;
    assert_eq!(
        value("grant_agent_pkcs11_errors_total{class=\"session\""),
        1.0,
        "{}",
        agent.log()
    );
    assert_eq!(value("grant_agent_recoveries_total "), 0.0);
    // At a rate, under concurrent load: every grant still signs.
    set_faults(&control, "sign_errors = SESSION_HANDLE_INVALID every 10\n");
    sign_all(&agent, 8, 200).await;
    let value = metrics(&agent).await;
    assert!(value("grant_agent_pkcs11_errors_total{class=\"session\"") >= 20.0);
    assert_eq!(value("grant_agent_recoveries_total "), 0.0);
}

#[tokio::test]
async fn a_general_error_resets_the_context_and_the_request_still_signs() {
    // Thales Luna after some network faults: CKR_GENERAL_ERROR, and only a new context
    // helps. The request that met it waits for the re-initialisation and signs.
    let (agent, control) = agent_behind_faults("", "");
    signs_past_one(&agent, &control, "GENERAL_ERROR", "signed after the reset").await;
    sign_all(&agent, 4, 20).await;
    let value = metrics(&agent).await;
    assert_eq!(value("grant_agent_recoveries_total "), 1.0);
    assert_eq!(
        value("grant_agent_pkcs11_errors_total{class=\"token\",rv=\"GeneralError\"}"),
        1.0
    );
}

#[tokio::test]
async fn per_session_handles_are_found_again_in_each_session() {
    // AWS CloudHSM Client SDK 5: a handle found in one session is KEY_HANDLE_INVALID in
    // another. Each session finds the key once and keeps its own handle; the idle check
    // on the anchor session too.
    let (agent, _control) = agent_behind_faults("per_session_handles = true\n", "\nsessions = 4");
    sign_all(&agent, 8, 80).await;
    let handle_errors = metrics(&agent).await("grant_agent_pkcs11_errors_total{class=\"handle\"");
    assert!(
        (1.0..=5.0).contains(&handle_errors),
        "each of 4 sessions and the anchor finds the key at most once: {handle_errors}"
    );
    // Idle checks (every 2 s) and more signs find nothing new to mend.
    tokio::time::sleep(Duration::from_secs(5)).await;
    sign_all(&agent, 8, 80).await;
    let value = metrics(&agent).await;
    assert_eq!(
        value("grant_agent_pkcs11_errors_total{class=\"handle\""),
        handle_errors
    );
    assert_eq!(value("grant_agent_recoveries_total "), 0.0);
    assert_eq!(agent.health().await, 1);
}

#[tokio::test]
async fn a_lost_login_is_restored_without_a_restart() {
    // A network HSM that reconnected, or a logout elsewhere: USER_NOT_LOGGED_IN, and the
    // module really is logged out. The agent logs in again on its anchor session.
    let (agent, control) = agent_behind_faults("", "");
    signs_past_one(
        &agent,
        &control,
        "USER_NOT_LOGGED_IN",
        "signed after logging in again",
    )
    .await;
    sign_all(&agent, 4, 20).await;
    let value = metrics(&agent).await;
    assert!(value("grant_agent_pkcs11_errors_total{class=\"login\"") >= 1.0);
    assert_eq!(
        value("grant_agent_recoveries_total "),
        0.0,
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("logged in again"), "{}", agent.log());
}

#[tokio::test]
async fn a_lost_login_on_a_token_one_wrong_pin_from_locking_is_not_logged_in_to() {
    let (agent, control) = agent_behind_faults("", "");
    let _ = verify(&sign(&agent).await.expect("signed"), TEST_AUD);
    set_faults(
        &control,
        "sign_errors = USER_NOT_LOGGED_IN 1\npin_flags = final_try\n",
    );
    let status = sign(&agent).await.expect_err("not logged in");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for _ in 0..5 {
        assert_eq!(
            sign(&agent).await.expect_err("still out").code(),
            Code::Unavailable
        );
    }
    let log = agent.log();
    assert!(log.contains("CKF_USER_PIN_FINAL_TRY"), "{log}");
    assert_eq!(
        log.matches("when logging in again; not retrying").count(),
        1,
        "{log}"
    );
    assert_eq!(
        agent.health().await,
        2,
        "NOT_SERVING until an operator acts"
    );
}

#[tokio::test]
async fn a_token_that_vanishes_while_idle_and_returns_is_noticed_both_ways() {
    let (agent, control) = agent_behind_faults("", "");
    let _ = verify(&sign(&agent).await.expect("signed"), TEST_AUD);
    set_faults(&control, "token = absent\n");
    let _ = agent
        .wait_for_health(
            2,
            Duration::from_secs(10),
            "still SERVING 10 s after the token vanished, with no request",
        )
        .await;
    let status = sign(&agent).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    set_faults(&control, "token = present\n");
    let _ = agent
        .wait_for_health(
            1,
            Duration::from_secs(30),
            "not SERVING 30 s after the token came back",
        )
        .await;
    let _ = until_signed(&agent, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_token_session_cap_holds_under_load_and_reload() {
    // YubiHSM 2 allows 16 sessions, appliances fewer per partition: here 3, against 8
    // configured. The agent keeps one for its anchor and pools the rest, and a reload
    // under load reads the token through the same pool, never a session more.
    // 20 ms a sign (a network HSM), so both pooled sessions are busy when the reload
    // comes, and it must wait for one rather than open a fourth.
    let (agent, _control) =
        agent_behind_faults("max_sessions = 3\nsign_latency_ms = 20\n", "\nsessions = 8");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (mut client, stop) = (agent.client().await, std::sync::Arc::clone(&stop));
        let _ = load.spawn(async move {
            let mut signed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let assertion = client
                    .sign_grant(grant_request(params()))
                    .await
                    .map_err(|s| format!("{s:?}"))?
                    .into_inner()
                    .assertion;
                signed.push(assertion);
            }
            Ok::<_, String>(signed)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.signal("HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("reload") {
        assert!(Instant::now() < until, "no reload: {}", agent.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(result) = load.join_next().await {
        let signed = result
            .expect("task")
            .expect("signed within the session cap");
        let _ = verify(signed.last().expect("a grant"), TEST_AUD);
    }
    let log = agent.log();
    assert!(
        log.contains("the token allows fewer sessions; using fewer") && log.contains("allowed=2"),
        "{log}"
    );
    assert!(!log.contains("reload failed"), "{log}");
    assert!(!log.contains("SessionCount"), "{log}");
}

#[tokio::test]
async fn instant_sign_answers_with_its_fixed_signature() {
    let (agent, _control) = agent_behind_faults("instant_sign = true\n", "");
    let assertion = sign(&agent).await.expect("signed");
    use base64::Engine;
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(assertion.rsplit('.').next().expect("signature"))
        .expect("base64url");
    assert_eq!(signature, vec![0x5a; 256]);
}

#[test]
fn a_token_one_wrong_pin_from_locking_is_not_tried() {
    for (flag, name) in [
        ("final_try", "CKF_USER_PIN_FINAL_TRY"),
        ("locked", "CKF_USER_PIN_LOCKED"),
    ] {
        let (dir, _control, env) = behind_faults(&format!("pin_flags = {flag}\n"), "");
        let mut child = std::process::Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("agent.toml"))
            .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
            .envs(env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve");
        // An agent that logged in anyway would serve until killed.
        let until = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                panic!("the agent started on a token with {name} set");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(
            stderr.contains(&format!("the token reports {name}: not trying the PIN")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_token_that_returns_one_wrong_pin_from_locking_is_not_logged_in_to() {
    let (agent, control) = agent_behind_faults("", "");
    let _ = verify(&sign(&agent).await.expect("signed"), TEST_AUD);
    set_faults(&control, "token = absent\n");
    let _ = agent
        .wait_for_health(2, Duration::from_secs(10), "still SERVING")
        .await;
    set_faults(&control, "pin_flags = final_try\n");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = agent.log();
    assert_eq!(
        log.matches("refused the PIN while recovering; not retrying")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("CKF_USER_PIN_FINAL_TRY"), "{log}");
    assert_eq!(
        agent.health().await,
        2,
        "NOT_SERVING until an operator acts"
    );
}
