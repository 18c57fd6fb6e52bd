//! Certificates that rotate: the `[tls]` certificate, key and client CA replaced while
//! the agent runs, by SIGHUP and by the files changing alone. New handshakes get the new
//! material, established connections keep working, a broken file keeps the old one.
//! Certificates are made with openssl; files are replaced by rename, as spiffe-helper
//! and Kubernetes do.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    DevAgent, http_get, issue, metric_sum,
    secured::{PAYMENTS, payments_request, prepared, tls, write_config},
    self_signed,
};
use grant_agent::client::{ClientTls, connect};

/// The files the agent reads, in a folder of their own (`live/`), as a secret volume.
const TLS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n[tls]\ncertificate = \"live/server.pem\"\nkey = \"live/server.key\"\nclient_ca = \"live/clients.pem\"\n";

/// The payments rule, with room for the load of `rotation_under_load_fails_no_request`.
fn policy() -> String {
    format!(
        "[[policy]]\ncaller = \"uri:{PAYMENTS}\"\nkeys = [\"default\"]\nclient_ids = [\"payments-*\"]\n\
         scopes = [\"nav:*\"]\nenvironments = [\"test\"]\nconsumer_orgs = [\"974760673\"]\n\
         requests_per_second = 100000\n\n"
    )
}

/// An agent serving `server.pem` (CA `ca.pem`) and trusting callers from `ca.pem`; in
/// the same folder a second server certificate `server-b.pem` from another CA
/// (`ca-b.pem`), and a payments certificate `payments-c.pem` from a third (`ca-c.pem`).
fn rotating_agent() -> DevAgent {
    let dir = prepared();
    let path = dir.path();
    std::fs::create_dir(path.join("live")).expect("live folder");
    new_ca_issuing(path, "ca-b", "server-b", "server.ext");
    new_ca_issuing(path, "ca-c", "payments-c", "payments.ext");
    install(path, "server.pem", "server.pem");
    install(path, "server.key", "server.key");
    install(path, "ca.pem", "clients.pem");
    write_config(path, &format!("listen = \"127.0.0.1:0\"\n{TLS}"), &policy());
    let mut command = Command::new(common::BIN);
    let _ = command
        .args(["serve", "--config", "agent.toml", "--pid-file", "agent.pid"])
        .current_dir(path)
        .env("SOFTHSM2_CONF", path.join("softhsm2.conf"));
    DevAgent::spawn(command, dir)
}

/// Sends `signal` the way spiffe-helper does: to the process its pid file names.
fn signal_by_pid_file(agent: &DevAgent, signal: &str) {
    let pid = std::fs::read_to_string(agent.dir.path().join("agent.pid")).expect("pid file");
    assert_eq!(
        pid,
        format!("{}\n", agent.pid()),
        "the pid file names the agent"
    );
    let status = Command::new("kill")
        .args([&format!("-{signal}"), pid.trim()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// A new CA `CA.pem` in `dir` and one certificate `NAME.pem` from it, with the
/// extensions in `ext_file`.
fn new_ca_issuing(dir: &Path, ca: &str, name: &str, ext_file: &str) {
    let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
    let subject = format!("/CN={ca}");
    self_signed(dir, &key, &pem, &["-days", "2", "-subj", &subject]);
    issue(dir, ca, name, &format!("/CN={name}"), ext_file);
}

/// Puts `from` at `live/to` the way rotation tools do: written aside, then renamed.
fn install(dir: &Path, from: &str, to: &str) {
    let staged = dir.join("live").join(format!(".{to}.new"));
    let _ = std::fs::copy(dir.join(from), &staged).expect("stage");
    std::fs::rename(&staged, dir.join("live").join(to)).expect("rename");
}

/// The subject line of the certificate the agent shows a new handshake, read with
/// `openssl s_client` as the payments caller.
fn served_subject(agent: &DevAgent) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &agent.addr, "-alpn", "h2"])
        .args(["-cert", "payments.pem", "-key", "payments.key"])
        .current_dir(agent.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject from s_client: {text}"))
        .to_owned()
}

/// Waits up to 10 s for the agent to serve a certificate whose subject has `name`.
fn wait_for_subject(agent: &DevAgent, name: &str) -> Duration {
    let start = Instant::now();
    loop {
        let subject = served_subject(agent);
        if subject.contains(name) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {subject}; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the caller in `client` gets a grant on a new connection (a new handshake).
async fn grant_on_new_connection(agent: &DevAgent, client: &ClientTls) -> bool {
    match connect(&agent.addr, Some(client)).await {
        Err(_) => false,
        Ok(mut c) => c.sign_grant(payments_request()).await.is_ok(),
    }
}

#[tokio::test]
async fn sighup_rotates_the_server_certificate_and_open_connections_keep_working() {
    let agent = rotating_agent();
    let dir = agent.dir.path();
    assert!(served_subject(&agent).contains("localhost"));
    let mut old = connect(&agent.addr, Some(&tls(dir, "payments", "ca.pem")))
        .await
        .expect("connect");
    let _ = old.sign_grant(payments_request()).await.expect("grant");

    install(dir, "server-b.key", "server.key");
    install(dir, "server-b.pem", "server.pem");
    signal_by_pid_file(&agent, "HUP");
    let _ = wait_for_subject(&agent, "server-b");
    let log = agent.log_when(|l| l.contains("TLS files reloaded") && l.contains("SIGHUP"));
    assert!(log.contains("SIGHUP"), "{log}");

    assert!(grant_on_new_connection(&agent, &tls(dir, "payments", "ca-b.pem")).await);
    assert!(
        !grant_on_new_connection(&agent, &tls(dir, "payments", "ca.pem")).await,
        "a new handshake must not get the old certificate"
    );
    // The open connection was handshaken with the old certificate; a new one trusting
    // only the old CA would fail, so these grants prove it is still the same one.
    for _ in 0..3 {
        let _ = old
            .sign_grant(payments_request())
            .await
            .expect("the connection open before the reload still works");
    }
    drop(old);

    // At a signalled exit the pid file goes with the process.
    let mut agent = agent;
    signal_by_pid_file(&agent, "TERM");
    let exit = agent
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits");
    assert!(exit.success(), "{exit:?}");
    assert!(!agent.dir.path().join("agent.pid").exists());
}

#[tokio::test]
async fn changed_files_reload_without_a_signal_and_a_broken_file_keeps_the_old_ones() {
    let agent = rotating_agent();
    let dir = agent.dir.path();
    install(dir, "server-b.key", "server.key");
    install(dir, "server-b.pem", "server.pem");
    let took = wait_for_subject(&agent, "server-b");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(agent.log().contains("file change"), "{}", agent.log());

    // A garbled certificate: one error line naming the file; new connections still get B.
    std::fs::write(
        dir.join("live/server.pem"),
        "-----BEGIN CERTIFICATE-----\nnot a certificate!\n-----END CERTIFICATE-----\n",
    )
    .expect("garble");
    let log = agent.log_when(|l| l.contains("TLS reload failed"));
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS reload failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("live/server.pem"), "{}", failed[0]);
    assert!(served_subject(&agent).contains("server-b"));
    assert!(grant_on_new_connection(&agent, &tls(dir, "payments", "ca-b.pem")).await);

    // A certificate whose key is not the one in `key`: the error names both files.
    install(dir, "server.pem", "server.pem");
    let log = agent.log_when(|l| l.matches("TLS reload failed").count() >= 2);
    let mismatch = log
        .lines()
        .filter(|l| l.contains("TLS reload failed"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second failure: {log}"));
    assert!(
        mismatch.contains("tls.key") && mismatch.contains("live/server.key"),
        "{mismatch}"
    );
    assert!(served_subject(&agent).contains("server-b"));
    let metrics = http_get(agent.metrics_url()).await;
    assert_eq!(
        metric_sum(
            &metrics,
            "grant_agent_tls_reloads_total{outcome=\"failed\"}"
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "grant_agent_tls_reloads_total{outcome=\"ok\"}"),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("grant_agent_tls_certificate_not_after_seconds{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rotated_client_ca_admits_its_callers_and_refuses_the_old_ones() {
    let agent = rotating_agent();
    let dir = agent.dir.path();
    let old_ca = tls(dir, "payments", "ca.pem");
    let new_ca = tls(dir, "payments-c", "ca.pem");
    assert!(grant_on_new_connection(&agent, &old_ca).await);
    assert!(!grant_on_new_connection(&agent, &new_ca).await);

    install(dir, "ca-c.pem", "clients.pem");
    agent.signal("HUP");
    let _ = agent.log_when(|l| l.contains("TLS files reloaded"));
    assert!(
        grant_on_new_connection(&agent, &new_ca).await,
        "{}",
        agent.log()
    );
    assert!(
        !grant_on_new_connection(&agent, &old_ca).await,
        "a caller from the old CA must be refused on a new handshake"
    );
}

/// The issue's proof: the server certificate and the client CA rotate while callers keep
/// signing, on connections open across the reload and on new ones, and not one request
/// fails. The callers trust both server CAs and the new client CA bundle holds the old
/// and the new CA, as a rotation does while callers move over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let agent = rotating_agent();
    let dir = agent.dir.path().to_owned();
    let both = |a: &str, b: &str, to: &str| {
        let text = std::fs::read_to_string(dir.join(a)).expect("ca")
            + &std::fs::read_to_string(dir.join(b)).expect("ca");
        std::fs::write(dir.join(to), text).expect("bundle");
    };
    both("ca.pem", "ca-b.pem", "trust.pem");
    both("ca.pem", "ca-c.pem", "clients-next.pem");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|n| {
            let (addr, client, stop) = (
                agent.addr.clone(),
                tls(&dir, "payments", "trust.pem"),
                std::sync::Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0_u32, Vec::new());
                // Caller 0 keeps one connection across the reload; the others open a
                // new one every five requests, so handshakes meet every moment of it.
                let per_connection = if n == 0 { u32::MAX } else { 5 };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut connection = match connect(&addr, Some(&client)).await {
                        Ok(c) => c,
                        Err(e) => {
                            failed.push(format!("connect: {e:?}"));
                            if failed.len() > 20 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    for _ in 0..per_connection {
                        match connection.sign_grant(payments_request()).await {
                            Ok(_) => ok += 1,
                            Err(e) => {
                                failed.push(format!("{e}"));
                                break;
                            }
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    install(&dir, "server-b.key", "server.key");
    install(&dir, "server-b.pem", "server.pem");
    install(&dir, "clients-next.pem", "clients.pem");
    signal_by_pid_file(&agent, "HUP");
    // `wait_for_subject` runs openssl and sleeps: off the callers' async workers.
    let waited = tokio::task::block_in_place(|| wait_for_subject(&agent, "server-b"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let (mut ok, mut failed) = (0, Vec::new());
    for caller in callers {
        let (o, f) = caller.await.expect("caller");
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the rotation (new certificate after {waited:?}): {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests in 3 s of load");
    println!("{ok} requests across the rotation, none failed");
    // After it: a client certificate of the new CA is accepted on a new connection.
    assert!(grant_on_new_connection(&agent, &tls(&dir, "payments-c", "trust.pem")).await);
}
