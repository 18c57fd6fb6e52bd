//! The token goes away under a running agent and comes back: the agent heals by itself.
//! The token is deleted and re-created with `softhsm2-util` (the same key imported again
//! from a PKCS#12 file) while callers keep signing; requests fail with UNAVAILABLE during
//! the outage, health says NOT_SERVING, and service returns with no restart.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{BIN, DevAgent, TEST_AUD, grant_request, openssl, params, read, self_signed, verify};
use tonic::Code;

/// Runs a tool with the test's SoftHSM configuration; its stderr if it fails.
fn run(program: &str, args: &[&std::ffi::OsStr], dir: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .env("GRANT_AGENT_CONFIG", dir.join("config.toml"))
        .output()
        .unwrap_or_else(|e| {
            panic!("{program}: {e} (install SoftHSM2 with: sudo apt-get install -y softhsm2)")
        });
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Imports the key and certificate from the PKCS#12 file into the token.
fn import(dir: &Path) -> Result<(), String> {
    let p12 = dir.join("vs.p12");
    let password = dir.join("p12-password");
    let args = [
        "key".as_ref(),
        "import-p12".as_ref(),
        "--label".as_ref(),
        "vs".as_ref(),
        "--password-file".as_ref(),
        password.as_os_str(),
        p12.as_os_str(),
    ];
    run(BIN, &args, dir)
}

/// Deletes the token and makes it again with `user_pin`, importing the same key.
///
/// The agent's SoftHSM keeps reading and locking the token folder while it recovers, so
/// a re-provisioning step now and then meets its lock and fails ("Could not get info
/// about the initialized token"). An operator would start over, and so does this: each
/// attempt begins from an empty folder, so a half-made token is never left beside a new
/// one.
fn recreate_token(dir: &Path, user_pin: &str) {
    let mut failures = Vec::new();
    for _ in 0..5 {
        remove_tokens(dir);
        match init_token(dir, user_pin) {
            Ok(()) => return,
            Err(failure) => {
                eprintln!("re-provisioning failed, starting over: {failure}");
                failures.push(failure);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot re-create the token: {failures:#?}");
}

/// The token's files disappear, as when a token is re-provisioned. (softhsm2-util
/// --delete-token can fail while the agent's SoftHSM writes lock files under load, so the
/// folder is emptied here, retrying while files come and go.)
fn remove_tokens(dir: &Path) {
    let tokens = dir.join("tokens");
    for attempt in 0.. {
        let mut gone = true;
        for entry in std::fs::read_dir(&tokens).expect("tokens folder").flatten() {
            gone &= std::fs::remove_dir_all(entry.path()).is_ok();
        }
        if gone {
            return;
        }
        assert!(attempt < 100, "cannot remove the token's files");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn init_token(dir: &Path, user_pin: &str) -> Result<(), String> {
    let so_pin = read(&dir.join("so-pin"));
    let args = [
        "--init-token",
        "--free",
        "--label",
        "grant-agent",
        "--so-pin",
        &so_pin,
        "--pin",
        user_pin,
    ]
    .map(std::ffi::OsStr::new);
    run("softhsm2-util", &args, dir)?;
    if user_pin == read(&dir.join("pin")) {
        import(dir)?;
    }
    Ok(())
}

/// OpenSC's PKCS#11 spy, which stays loaded in the process when the agent drops it and
/// passes every call to SoftHSM: the stand-in for a vendor module that never unloads.
const SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";

/// An agent signing with a key that exists outside the token (so it can be imported again).
fn agent_with_importable_key() -> DevAgent {
    agent_with_importable_key_through(None)
}

/// [`agent_with_importable_key`], with `module` in front of SoftHSM when given (the
/// module reads SoftHSM's path from `PKCS11SPY`, as OpenSC's spy does).
fn agent_with_importable_key_through(module: Option<&str>) -> DevAgent {
    let dir = DevAgent::start().stop();
    let p = dir.path();
    self_signed(
        p,
        "vs.key",
        "vs.pem",
        &[
            "-days",
            "30",
            "-subj",
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 Test4 CA G2 ST Business",
            "-addext",
            "keyUsage=critical,nonRepudiation",
        ],
    );
    std::fs::write(p.join("p12-password"), "pw\n").expect("password");
    let _ = openssl(
        &[
            "pkcs12", "-export", "-inkey", "vs.key", "-in", "vs.pem", "-out", "vs.p12", "-passout",
            "pass:pw",
        ],
        p,
    );
    import(p).expect("import the key");
    let dev = read(&p.join("config.toml"));
    let head = &dev[..dev.find("[[keys]]").expect("keys")];
    let config =
        format!("{head}[[keys]]\nname = \"default\"\nlabel = \"vs\"\ncertificate = \"token\"\n")
            .replace(
                "[pkcs11]\n",
                "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[pkcs11]\n",
            );
    let Some(module) = module else {
        std::fs::write(p.join("agent.toml"), config).expect("config");
        return DevAgent::serve(dir, "agent.toml");
    };
    let softhsm = grant_agent::dev::softhsm_module().expect("SoftHSM");
    let config = config.replace(
        &format!("module = \"{}\"", softhsm.display()),
        &format!("module = \"{module}\""),
    );
    assert!(config.contains(module), "{config}");
    std::fs::write(p.join("agent.toml"), config).expect("config");
    let softhsm = softhsm.display().to_string();
    DevAgent::serve_with_env(
        dir,
        "agent.toml",
        &[("PKCS11SPY", &softhsm), ("PKCS11SPY_OUTPUT", "/dev/null")],
    )
}

#[tokio::test]
async fn the_agent_heals_when_the_token_is_deleted_and_recreated_under_load() {
    heals_under_load(agent_with_importable_key()).await;
}

/// Issue 16's reproduction: the same outage behind a module that stays loaded. Before
/// the module was finalized after a failed open, its stale slot list answered "no token"
/// for as long as the test waited.
#[tokio::test]
async fn the_agent_heals_behind_a_module_that_stays_loaded() {
    assert!(
        Path::new(SPY).exists(),
        "OpenSC's pkcs11-spy is required: apt-get install opensc (softhsm/setup.sh does it)"
    );
    heals_under_load(agent_with_importable_key_through(Some(SPY))).await;
}

/// Four callers repeat `call` while the agent's token is deleted and re-created, until
/// `back` holds for an answer and a second more has passed. Every answer with its time,
/// when the outage began, and when service was back.
async fn outage_under_load<T, C, F>(
    agent: &DevAgent,
    call: C,
    back: impl Fn(&T) -> bool,
) -> (Vec<(Instant, T)>, Instant, Instant)
where
    T: Send + 'static,
    C: Fn() -> F + Clone + Send + 'static,
    F: std::future::Future<Output = T> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (call, stop) = (call.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    outcomes.push((Instant::now(), call().await));
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outage = Instant::now();
    let dir = agent.dir.path().to_owned();
    tokio::task::spawn_blocking(move || recreate_token(&dir, &read(&dir.join("pin")).clone()))
        .await
        .expect("recreate");
    // Service comes back with no restart.
    let until = Instant::now() + Duration::from_secs(30);
    while !back(&call().await) {
        assert!(
            Instant::now() < until,
            "the agent did not recover within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for task in load {
        outcomes.extend(task.await.expect("load task"));
    }
    (outcomes, outage, back)
}

/// Deletes and re-creates the agent's token under load, and checks that service comes
/// back with no restart and the same key.
async fn heals_under_load(agent: DevAgent) {
    let client = agent.client().await;
    let before = client
        .clone()
        .sign_grant(grant_request(params()))
        .await
        .expect("signed")
        .into_inner();

    let sign = {
        let client = client.clone();
        move || {
            let mut client = client.clone();
            async move {
                client
                    .sign_grant(grant_request(params()))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| (s.code(), s.message().to_owned()))
            }
        }
    };
    let (outcomes, outage, back) = outage_under_load(&agent, sign, Result::is_ok).await;
    let back = back - outage;
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    let signed = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
    println!(
        "recovery: {} requests, {} failed during the outage, service back after {back:?}",
        outcomes.len(),
        failed.len()
    );
    for (code, message) in &failed {
        assert_eq!(*code, Code::Unavailable, "{message}");
    }
    // Everything after the token was back succeeded.
    let settled = outage + back + Duration::from_millis(200);
    assert!(
        outcomes
            .iter()
            .filter(|(t, _)| *t > settled)
            .all(|(_, r)| r.is_ok()),
        "failures after recovery"
    );
    assert!(
        signed > failed.len(),
        "{signed} signed, {} failed",
        failed.len()
    );
    let after = client
        .clone()
        .sign_grant(grant_request(params()))
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(
        after.certificate_sha256, before.certificate_sha256,
        "the same key and certificate"
    );
    let _ = verify(&after.assertion, TEST_AUD);
    assert_eq!(agent.health().await, 1, "SERVING again");
    let out = Command::new(BIN)
        .args(["client", "health", "--addr", &agent.addr])
        .output()
        .expect("client health");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SERVING\n");
    let log = agent.log();
    assert!(log.contains("the token is gone; recovering"), "{log}");
    assert!(log.contains("the token is back; serving again"), "{log}");
    // The documented alerts see it: the errors that found the token gone are PKCS#11
    // errors, and the recovery is counted and timed.
    let metrics = common::http_get(agent.metrics_url()).await;
    let value = |prefix: &str| common::metric_sum(&metrics, prefix);
    assert!(
        value("grant_agent_pkcs11_errors_total{") >= 1.0,
        "increase(grant_agent_pkcs11_errors_total) would not fire: {metrics}"
    );
    assert!(value("grant_agent_recoveries_total ") >= 1.0, "{metrics}");
    let took = value("grant_agent_last_recovery_seconds ");
    assert!(
        took > 0.0 && took <= back.as_secs_f64() + 1.0,
        "last recovery {took} s, service back after {back:?}: {metrics}"
    );
}

/// The same outage under JSON load (`POST /api/v1/grant`, HTTP/1.1 keep-alive): while the
/// token is away every answer is a 503 whose body is an OAuth error,
/// `temporarily_unavailable`, never a hang or a broken connection; once it is back every
/// answer is a 200 with an assertion, with no restart.
#[tokio::test]
async fn json_callers_get_oauth_503s_while_the_token_is_away_and_grants_after() {
    let agent = agent_with_importable_key();
    let url = format!("http://{}/api/v1/grant", agent.addr);
    let body = serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
        "client_id": params().client_id, "environment": "test"});
    // Plain http://, so HTTP/1.1 with keep-alive.
    let http = common::test_http_client(None);
    let post = {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        move || {
            let request = http
                .post(&url)
                .timeout(Duration::from_secs(30))
                .header("content-type", "application/json")
                .body(body.to_string());
            async move {
                let response = request.send().await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let bytes = response.bytes().await.map_err(|e| e.to_string())?;
                let json: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                Ok::<_, String>((status, json))
            }
        }
    };
    assert_eq!(post().await.expect("answered").0, 200);

    let (outcomes, outage, back) =
        outage_under_load(&agent, post, |r| matches!(r, Ok((200, _)))).await;
    let mut unavailable = 0;
    for (at, outcome) in &outcomes {
        let (status, json) = outcome
            .as_ref()
            .expect("every request answered, none broken");
        match status {
            200 => assert!(json["assertion"].is_string(), "{json}"),
            503 => {
                unavailable += 1;
                assert_eq!(json["error"], "temporarily_unavailable", "{json}");
                assert!(
                    *at < back + Duration::from_millis(200),
                    "a 503 after recovery: {json}"
                );
            }
            other => panic!("HTTP {other}: {json}"),
        }
    }
    println!(
        "JSON recovery: {} requests, {unavailable} answered 503, back after {:?}",
        outcomes.len(),
        back - outage
    );
    assert!(agent.log().contains("the token is back; serving again"));
}

#[tokio::test]
async fn health_notices_a_lost_token_with_no_request() {
    let agent = agent_with_importable_key();
    assert_eq!(agent.health().await, 1, "SERVING");
    let dir = agent.dir.path().to_owned();
    tokio::task::spawn_blocking(move || remove_tokens(&dir))
        .await
        .expect("remove");
    // No request is made: the agent's own check finds the token gone.
    let lost = agent
        .wait_for_health(
            2,
            Duration::from_secs(10),
            "health still SERVING 10 s after the token was removed",
        )
        .await;
    println!("NOT_SERVING {lost:?} after the token was removed");
    let dir = agent.dir.path().to_owned();
    tokio::task::spawn_blocking(move || recreate_token(&dir, &read(&dir.join("pin"))))
        .await
        .expect("recreate");
    let _ = agent
        .wait_for_health(
            1,
            Duration::from_secs(30),
            "not SERVING 30 s after the token came back",
        )
        .await;
    let grant = agent
        .sign(params())
        .await
        .expect("signed after the token came back");
    let _ = verify(&grant.assertion, TEST_AUD);
    assert!(agent.log().contains("found by the idle check"));
}

#[tokio::test]
async fn a_refused_pin_while_recovering_is_not_retried() {
    let agent = agent_with_importable_key();
    let mut client = agent.client().await;
    let _ = client
        .sign_grant(grant_request(params()))
        .await
        .expect("signed");
    let dir = agent.dir.path().to_owned();
    tokio::task::spawn_blocking(move || recreate_token(&dir, "a-different-pin"))
        .await
        .expect("recreate");
    let status = client
        .sign_grant(grant_request(params()))
        .await
        .expect_err("token gone");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = agent.log();
    assert_eq!(
        log.matches("refused the PIN while recovering; not retrying")
            .count(),
        1,
        "one attempt, then no more: {log}"
    );
    assert_eq!(
        log.matches("the token is still unavailable").count(),
        0,
        "{log}"
    );
    let status = client
        .sign_grant(grant_request(params()))
        .await
        .expect_err("still down");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.message(),
        "signing in the token failed: the token is unavailable (being recovered, or waiting for an operator: see the agent log)"
    );
    assert_eq!(agent.health().await, 2, "NOT_SERVING");
    // The probe command says so too.
    let out = Command::new(BIN)
        .args(["client", "health", "--addr", &agent.addr])
        .output()
        .expect("client health");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_SERVING"));
    // Liveness is not readiness: the process answers, so a liveness probe does not
    // restart it into another C_Login with the same wrong PIN.
    let out = Command::new(BIN)
        .args(["client", "health", "--liveness", "--addr", &agent.addr])
        .output()
        .expect("client health --liveness");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SERVING\n");
}
