//! Who may get grants: mutual TLS and Unix-socket callers against the policy, rate
//! limits, the audit trail, and the listeners the agent refuses to open. Real TLS
//! (certificates made with openssl), a real Unix socket, a real SoftHSM token.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path};

use common::{BIN, DevAgent, TEST_AUD, openssl, params, read, verify};
use grant_agent::{
    client::{ClientTls, connect},
    proto::{GrantParameters, ListKeysRequest, SignGrantRequest},
};
use tonic::Code;

const PAYMENTS: &str = "spiffe://acme/ns/prod/sa/payments";

/// A CA for the agent's listener and its callers, a server certificate for 127.0.0.1,
/// two caller certificates, and one from a CA the agent does not trust.
fn tls_material(dir: &Path) {
    let run = |args: &[&str]| {
        let _ = openssl(args, dir);
    };
    let ext = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("extfile");
    common::server_tls(dir);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rogue-ca.key",
        "-out",
        "rogue-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Rogue CA",
    ]);
    let issue = |name: &str, ca: &str, ext_file: &str| {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            ext_file,
        ]);
    };
    ext(
        "payments.ext",
        &format!("subjectAltName=URI:{PAYMENTS}\nextendedKeyUsage=clientAuth\n"),
    );
    issue("payments", "ca", "payments.ext");
    ext(
        "other.ext",
        "subjectAltName=URI:spiffe://acme/ns/prod/sa/other\nextendedKeyUsage=clientAuth\n",
    );
    issue("other", "ca", "other.ext");
    issue("rogue", "rogue-ca", "payments.ext");
}

fn uid() -> u32 {
    read(Path::new("/proc/self/status"))
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("uid")
}

/// The [pkcs11] section of the dev config.
fn pkcs11_section(dir: &Path) -> String {
    let dev = read(&dir.join("config.toml"));
    let start = dev.find("[pkcs11]").expect("pkcs11");
    let end = dev[start..].find("\n\n").map_or(dev.len(), |e| start + e);
    dev[start..end].to_owned()
}

const DEV_KEY: &str = "[[keys]]\nname = \"default\"\nlabel = \"virksomhetssertifikat\"\ncertificate = \"token\"\ncertificate_environment = \"test\"\n";

fn write_config(dir: &Path, top: &str, policy: &str) {
    let text = format!(
        "default_environment = \"test\"\n{top}\n[audit]\nfile = \"audit.jsonl\"\n\n{}\n\n{policy}\n{DEV_KEY}",
        pkcs11_section(dir)
    );
    std::fs::write(dir.join("agent.toml"), text).expect("config");
}

fn policies(uid: u32) -> String {
    format!(
        "[[policy]]\ncaller = \"uri:{PAYMENTS}\"\nkeys = [\"default\"]\nclient_ids = [\"payments-*\"]\n\
         scopes = [\"nav:*\"]\nenvironments = [\"test\"]\nconsumer_orgs = [\"974760673\"]\n\n\
         [[policy]]\ncaller = \"uid:{uid}\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\nscopes = [\"*\"]\n\
         environments = [\"test\"]\nrequests_per_second = 5\nburst = 5\n\n"
    )
}

fn tls(dir: &Path, who: &str, ca: &str) -> ClientTls {
    ClientTls {
        ca: dir.join(ca),
        certificate: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
        domain: None,
    }
}

fn payments_request() -> SignGrantRequest {
    let mut p = params();
    p.client_id = "payments-api".into();
    p.scopes = vec!["nav:aareg/v1/arbeidsforhold".into()];
    p.consumer_org = "974760673".into();
    SignGrantRequest { grant: Some(p) }
}

/// An agent with mutual TLS on 127.0.0.1 and a Unix socket, the policy above and an audit file.
fn secured_agent() -> DevAgent {
    let dir = DevAgent::start().stop();
    tls_material(dir.path());
    write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nunix_socket = \"agent.sock\"\n[tls]\ncertificate = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n",
        &policies(uid()),
    );
    DevAgent::serve(dir, "agent.toml")
}

#[tokio::test]
async fn mutual_tls_callers_get_what_the_policy_allows_and_nothing_else() {
    let agent = secured_agent();
    let dir = agent.dir.path();
    let mut payments = connect(&agent.addr, Some(&tls(dir, "payments", "ca.pem")))
        .await
        .expect("mTLS connect");
    let grant = payments
        .sign_grant(payments_request())
        .await
        .expect("allowed")
        .into_inner();
    let claims = verify(&grant.assertion, TEST_AUD).claims;
    assert_eq!(claims["iss"], "payments-api");

    // Each dimension of the rule, the other way.
    type Change = fn(&mut GrantParameters);
    let cases: [(Change, &str); 5] = [
        (|p| p.key = "other".into(), "may not use key \"other\""),
        (
            |p| p.client_id = "billing-api".into(),
            "may not use client_id \"billing-api\"",
        ),
        (
            |p| p.scopes.push("skatteetaten:mva".into()),
            "may not use scope \"skatteetaten:mva\"",
        ),
        (
            |p| p.environment = "prod".into(),
            "may not use environment \"prod\"",
        ),
        (
            |p| p.consumer_org = "991825827".into(),
            "may not use consumer_org \"991825827\"",
        ),
    ];
    for (change, expected) in cases {
        let mut request = payments_request();
        change(request.grant.as_mut().expect("grant"));
        let status = payments.sign_grant(request).await.expect_err("denied");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{}",
            status.message()
        );
        assert_eq!(
            status.message(),
            format!("caller uri:{PAYMENTS} {expected}")
        );
    }
    // Without consumer_org, no delegation: allowed.
    let mut request = payments_request();
    request.grant.as_mut().expect("grant").consumer_org.clear();
    let _ = payments
        .sign_grant(request)
        .await
        .expect("allowed without delegation");
    let _ = payments
        .list_keys(ListKeysRequest {})
        .await
        .expect("a known caller may list keys");

    // A trusted certificate that no rule names: refused at the TLS handshake, before
    // it can send a request, and the refusal is audited with the peer's address.
    let refused = match connect(&agent.addr, Some(&tls(dir, "other", "ca.pem"))).await {
        Err(error) => format!("{error:?}"),
        Ok(mut other) => {
            let status = other
                .sign_grant(payments_request())
                .await
                .expect_err("denied");
            format!("{status:?}")
        }
    };
    assert!(refused.contains("CertificateUnknown"), "{refused}");
    let line = agent
        .wait_for_audit(|line| line["audit"] == "connection")
        .expect("a connection refusal in the audit");
    assert_eq!(line["caller"], "uri:spiffe://acme/ns/prod/sa/other");
    assert_eq!(line["outcome"], "denied");
    assert!(
        line["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );

    // A certificate from a CA the agent does not trust, and no certificate at all.
    let rogue = match connect(&agent.addr, Some(&tls(dir, "rogue", "ca.pem"))).await {
        Err(_) => true,
        Ok(mut c) => c.sign_grant(payments_request()).await.is_err(),
    };
    assert!(
        rogue,
        "an untrusted client certificate must not get a grant"
    );
    let anonymous_tls = tonic::transport::Endpoint::from_shared(format!("https://{}", agent.addr))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(
                    &dir.join("ca.pem"),
                )))
                .domain_name("127.0.0.1"),
        )
        .expect("tls");
    let no_cert = match anonymous_tls.connect().await {
        Err(_) => true,
        Ok(channel) => grant_agent::proto::grant_agent_client::GrantAgentClient::new(channel)
            .sign_grant(payments_request())
            .await
            .is_err(),
    };
    assert!(
        no_cert,
        "a caller without a certificate must not get a grant"
    );
    let plain = match connect(&agent.addr, None).await {
        Err(_) => true,
        Ok(mut c) => c.sign_grant(payments_request()).await.is_err(),
    };
    assert!(plain, "plain TCP must not reach a TLS listener");

    // The command-line client speaks mutual TLS too.
    let out = std::process::Command::new(BIN)
        .args([
            "client",
            "grant",
            "--addr",
            &agent.addr,
            "--client-id",
            "payments-cli",
            "--scope",
            "nav:x",
        ])
        .args(["--consumer-org", "974760673", "--env", "test"])
        .arg("--tls-ca")
        .arg(dir.join("ca.pem"))
        .arg("--tls-cert")
        .arg(dir.join("payments.pem"))
        .arg("--tls-key")
        .arg(dir.join("payments.key"))
        .output()
        .expect("client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = verify(String::from_utf8_lossy(&out.stdout).trim_end(), TEST_AUD);
}

#[tokio::test]
async fn unix_socket_callers_are_known_by_uid_and_rate_limited() {
    let agent = secured_agent();
    let dir = agent.dir.path().to_owned();
    let socket = dir.join("agent.sock");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "the socket is not open to others");
    let addr = format!("unix:{}", socket.display());
    let mut local = connect(&addr, None).await.expect("unix connect");
    let grant = local
        .sign_grant(SignGrantRequest {
            grant: Some(params()),
        })
        .await
        .expect("uid allowed");
    let _ = verify(&grant.into_inner().assertion, TEST_AUD);
    let status = local
        .sign_grant(SignGrantRequest {
            grant: Some(GrantParameters {
                environment: "prod".into(),
                ..params()
            }),
        })
        .await
        .expect_err("prod is not in the uid rule");
    assert_eq!(
        status.message(),
        format!("caller uid:{} may not use environment \"prod\"", uid())
    );

    // 5 per second with a burst of 5: 20 at once are cut short.
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let mut c = local.clone();
            tokio::spawn(async move {
                c.sign_grant(SignGrantRequest {
                    grant: Some(params()),
                })
                .await
            })
        })
        .collect();
    let mut limited = 0;
    for task in burst {
        if let Err(status) = task.await.expect("task") {
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(
                status.message(),
                format!(
                    "caller uid:{} is over its limit of 5 requests per second",
                    uid()
                )
            );
            limited += 1;
        }
    }
    assert!(limited >= 10, "only {limited} of 20 were limited");

    // A policy without this uid (reloaded on SIGHUP) refuses it.
    let config = read(&dir.join("agent.toml")).replace(
        &format!("caller = \"uid:{}\"", uid()),
        "caller = \"uid:4294967\"",
    );
    std::fs::write(dir.join("agent.toml"), config).expect("config");
    agent.signal("HUP");
    let mut refused = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Err(status) = local
            .sign_grant(SignGrantRequest {
                grant: Some(params()),
            })
            .await
            && status.code() == Code::PermissionDenied
        {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("the reloaded policy refuses the uid");
    assert_eq!(
        refused.message(),
        format!("caller uid:{} is not in the policy", uid())
    );

    // The command-line client reaches the socket.
    let out = std::process::Command::new(BIN)
        .args([
            "client",
            "grant",
            "--addr",
            &addr,
            "--client-id",
            "x",
            "--scope",
            "a:b",
        ])
        .output()
        .expect("client");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn every_decision_is_one_audit_line_without_secrets() {
    let agent = secured_agent();
    let dir = agent.dir.path();
    let mut payments = connect(&agent.addr, Some(&tls(dir, "payments", "ca.pem")))
        .await
        .expect("connect");
    let signed = payments
        .sign_grant(payments_request())
        .await
        .expect("allowed")
        .into_inner();
    let mut denied = payments_request();
    denied.grant.as_mut().expect("grant").environment = "prod".into();
    let _ = payments.sign_grant(denied).await.expect_err("denied");
    let mut refused = payments_request();
    refused.grant.as_mut().expect("grant").scopes = vec!["nav:bad scope".into()];
    let _ = payments.sign_grant(refused).await.expect_err("refused");

    let audit = read(&dir.join("audit.jsonl"));
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3, "{audit}");
    for line in &lines {
        assert_eq!(line["audit"], "grant");
        assert_eq!(line["caller"], format!("uri:{PAYMENTS}"));
        assert_eq!(line["client_id"], "payments-api");
        assert_eq!(line["key"], "default");
        assert!(line["time"].as_str().expect("time").ends_with('Z'));
        assert!(
            line["peer"]
                .as_str()
                .expect("peer")
                .starts_with("127.0.0.1:")
        );
    }
    assert_eq!(lines[0]["outcome"], "signed");
    assert_eq!(lines[0]["jti"], signed.jti);
    assert_eq!(lines[0]["expires_at"], signed.expires_at);
    assert_eq!(lines[0]["certificate_sha256"], signed.certificate_sha256);
    assert_eq!(
        lines[0]["scopes"],
        serde_json::json!(["nav:aareg/v1/arbeidsforhold"])
    );
    assert_eq!(lines[0]["environment"], "test");
    assert_eq!(lines[1]["outcome"], "denied");
    assert_eq!(lines[1]["code"], "PermissionDenied");
    assert_eq!(lines[1]["environment"], "prod");
    assert_eq!(
        lines[1]["reason"],
        format!("caller uri:{PAYMENTS} may not use environment \"prod\"")
    );
    assert_eq!(lines[2]["outcome"], "refused");
    assert_eq!(lines[2]["code"], "InvalidArgument");

    let signature = signed.assertion.rsplit('.').next().expect("signature");
    let pin = read(&dir.join("pin"));
    for text in [&audit, &agent.log()] {
        assert!(
            !text.contains(signature) && !text.contains("eyJ"),
            "an assertion was logged"
        );
        assert!(!text.contains(&pin), "the PIN was logged");
    }
    let mode = std::fs::metadata(dir.join("audit.jsonl"))
        .expect("audit")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn the_agent_refuses_to_serve_unidentified_callers_on_the_network() {
    let dir = DevAgent::start().stop();
    let serve = |top: &str| {
        write_config(dir.path(), top, "");
        let out = std::process::Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("agent.toml"))
            .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
            .output()
            .expect("serve");
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = serve("listen = \"0.0.0.0:0\"\ninsecure = true\n");
    assert!(
        err.contains("`listen`: 0.0.0.0:0 is not a loopback address, and there is no [tls]"),
        "{err}"
    );
    let err = serve("listen = \"127.0.0.1:0\"\n");
    assert!(
        err.contains(
            "`listen`: 127.0.0.1:0 would serve plain TCP, where callers cannot be identified"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_pin_from_the_environment_is_removed_from_it() {
    let dir = DevAgent::start().stop();
    let pin = read(&dir.path().join("pin"));
    write_config(
        dir.path(),
        "unix_socket = \"agent.sock\"\n",
        &policies(uid()),
    );
    let config = read(&dir.path().join("agent.toml"))
        .replace("pin_file = \"pin\"", "pin_env = \"GA_TEST_PIN\"");
    std::fs::write(dir.path().join("agent.toml"), config).expect("config");
    let agent = DevAgent::serve_with_env(dir, "agent.toml", &[("GA_TEST_PIN", &pin)]);
    let environ = std::fs::read(format!("/proc/{}/environ", agent.pid())).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("SOFTHSM2_CONF="),
        "the environment was read"
    );
    assert!(
        !environ.contains("GA_TEST_PIN"),
        "the PIN variable is still in the environment"
    );
    assert!(!environ.contains(&pin));
    let mut local = connect(&agent.addr, None).await.expect("connect");
    let _ = local
        .sign_grant(SignGrantRequest {
            grant: Some(params()),
        })
        .await
        .expect("logged in with it");
}
