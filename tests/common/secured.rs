//! An agent as a security team runs it: mutual TLS on 127.0.0.1 with callers' certificates
//! from a test CA (made with openssl), a Unix socket, a policy and an audit file.

use std::path::Path;

use grant_agent::{client::ClientTls, proto::SignGrantRequest};

use super::{DevAgent, issue, params, read, self_signed};

/// The SPIFFE id of the caller the policy knows.
pub(crate) const PAYMENTS: &str = "spiffe://acme/ns/prod/sa/payments";
/// The SPIFFE id of a caller with a trusted certificate that no rule names.
pub(crate) const OTHER: &str = "spiffe://acme/ns/prod/sa/other";

/// A CA for the agent's listener and its callers, a server certificate for 127.0.0.1,
/// two caller certificates (`payments`, `other`), and one from a CA the agent does not
/// trust (`rogue`).
pub(crate) fn tls_material(dir: &Path) {
    let ext = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("extfile");
    super::server_tls(dir);
    self_signed(
        dir,
        "rogue-ca.key",
        "rogue-ca.pem",
        &["-days", "2", "-subj", "/CN=Rogue CA"],
    );
    ext(
        "payments.ext",
        &format!("subjectAltName=URI:{PAYMENTS}\nextendedKeyUsage=clientAuth\n"),
    );
    issue(dir, "ca", "payments", "/CN=payments", "payments.ext");
    ext(
        "other.ext",
        &format!("subjectAltName=URI:{OTHER}\nextendedKeyUsage=clientAuth\n"),
    );
    issue(dir, "ca", "other", "/CN=other", "other.ext");
    issue(dir, "rogue-ca", "rogue", "/CN=rogue", "payments.ext");
}

/// The test process's uid.
pub(crate) fn uid() -> u32 {
    read(Path::new("/proc/self/status"))
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("uid")
}

/// The [pkcs11] section of the dev config.
pub(crate) fn pkcs11_section(dir: &Path) -> String {
    let dev = read(&dir.join("config.toml"));
    let start = dev.find("[pkcs11]").expect("pkcs11");
    let end = dev[start..].find("\n\n").map_or(dev.len(), |e| start + e);
    dev[start..end].to_owned()
}

/// The dev token's key, bound to its certificate.
pub(crate) const DEV_KEY: &str = "[[keys]]\nname = \"default\"\nlabel = \"virksomhetssertifikat\"\ncertificate = \"token\"\ncertificate_environment = \"test\"\n";

/// Writes `agent.toml`: `top` (listeners, [tls], [limits], ...), the audit file, the dev
/// token, `policy` and the dev key.
pub(crate) fn write_config(dir: &Path, top: &str, policy: &str) {
    let text = format!(
        "default_environment = \"test\"\n{top}\n[audit]\nfile = \"audit.jsonl\"\n\n{}\n\n{policy}\n{DEV_KEY}",
        pkcs11_section(dir)
    );
    std::fs::write(dir.join("agent.toml"), text).expect("config");
}

/// Client TLS settings for the caller `who`, trusting the agent through `ca`.
pub(crate) fn tls(dir: &Path, who: &str, ca: &str) -> ClientTls {
    ClientTls {
        ca: dir.join(ca),
        certificate: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
        domain: None,
    }
}

/// A request the payments rule allows.
pub(crate) fn payments_request() -> SignGrantRequest {
    let mut p = params();
    p.client_id = "payments-api".into();
    p.scopes = vec!["nav:aareg/v1/arbeidsforhold".into()];
    p.consumer_org = "974760673".into();
    SignGrantRequest { grant: Some(p) }
}

/// A fresh dev token in a folder with the TLS material above, the agent stopped.
pub(crate) fn prepared() -> tempfile::TempDir {
    let dir = DevAgent::start().stop();
    tls_material(dir.path());
    dir
}
