//! Shared helpers: a real agent on a fresh SoftHSM token in a temp dir, started as a
//! child process (PKCS#11 state is per process, and SoftHSM reads SOFTHSM2_CONF from the
//! environment at start), and an independent verifier for the grants it signs.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use der::Decode;
use grant_agent::proto::{
    GrantParameters, SignGrantRequest, SignGrantResponse, grant_agent_client::GrantAgentClient,
};
use tonic::{Status, transport::Channel};

pub(crate) mod api;
pub(crate) mod ca;
pub(crate) mod secured;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_grant-agent");
pub(crate) const TEST_AUD: &str = "https://test.maskinporten.no/";

/// The local Maskinporten's binary, built next to the agent's by `cargo build -p
/// mock-maskinporten` (softhsm/test.sh does it): a test of this package cannot name
/// another package's binary with `CARGO_BIN_EXE_*`.
pub(crate) fn mock_bin() -> PathBuf {
    let bin = Path::new(BIN)
        .parent()
        .expect("target folder")
        .join("mock-maskinporten");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mock-maskinporten` (softhsm/test.sh does it)",
        bin.display()
    );
    bin
}

/// Fails (never skips) when SoftHSM is missing, saying how to install it.
pub(crate) fn require_softhsm() {
    if grant_agent::dev::softhsm_module().is_err() {
        panic!(
            "SoftHSM2 is required for these tests and is not installed.\n\
             Install it with: sudo apt-get install -y softhsm2 opensc\n\
             (or run `bash softhsm/test.sh`, which installs everything and runs the suite)"
        );
    }
}

/// `grant-agent dev` on a fresh token in its own temp dir, killed on drop.
pub(crate) struct DevAgent {
    child: Child,
    /// Where it listens, as `client --addr` takes it ("127.0.0.1:P" or "unix:/path").
    pub(crate) addr: String,
    /// Every endpoint it printed (gRPC listeners, then metrics).
    pub(crate) endpoints: Vec<String>,
    pub(crate) dir: tempfile::TempDir,
}

impl DevAgent {
    /// A fresh dev token, stopped, with its self-signed certificate in `dev-cert.pem`:
    /// the trust anchor a `mock-maskinporten` needs to accept its grants.
    pub(crate) async fn anchored() -> tempfile::TempDir {
        let dev = DevAgent::start();
        let signed = dev.sign(params()).await.expect("signed");
        let leaf = verify(&signed.assertion, TEST_AUD).leaf_der;
        let dir = dev.stop();
        std::fs::write(dir.path().join("dev-cert.pem"), pem(&leaf)).expect("anchor");
        dir
    }

    pub(crate) fn start() -> DevAgent {
        require_softhsm();
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir)
    }

    /// Starts on an existing state dir (to test that `dev` is idempotent).
    pub(crate) fn start_in(dir: tempfile::TempDir) -> DevAgent {
        let mut command = Command::new(BIN);
        let _ = command
            .args(["dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .env_remove("SOFTHSM2_CONF");
        Self::spawn(command, dir)
    }

    /// `grant-agent serve --config DIR/CONFIG` on the token a dev agent made in `dir`.
    /// The config's `listen` must use port 0.
    pub(crate) fn serve(dir: tempfile::TempDir, config: &str) -> DevAgent {
        Self::serve_with_env(dir, config, &[])
    }

    /// [`DevAgent::serve`] with extra environment variables.
    pub(crate) fn serve_with_env(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
    ) -> DevAgent {
        let mut command = Command::new(BIN);
        let _ = command
            .args(["serve", "--config"])
            .arg(dir.path().join(config))
            .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
            .envs(env.iter().copied());
        Self::spawn(command, dir)
    }

    /// The agent's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `command` (which must start an agent on `dir`) and waits until it listens.
    pub(crate) fn spawn(command: Command, dir: tempfile::TempDir) -> DevAgent {
        let (child, endpoints) = start_listening(command, &dir.path().join("agent.log"));
        DevAgent {
            child,
            addr: endpoints[0].clone(),
            endpoints,
            dir,
        }
    }

    /// The Prometheus endpoint (the config must set `[metrics] listen`).
    pub(crate) fn metrics_url(&self) -> &str {
        self.endpoints
            .iter()
            .find(|e| e.ends_with("/metrics"))
            .unwrap_or_else(|| panic!("no metrics endpoint in {:?}", self.endpoints))
    }

    pub(crate) async fn client(&self) -> GrantAgentClient<Channel> {
        grant_agent::client::connect(&self.addr, None)
            .await
            .expect("connect to the agent")
    }

    /// Asks the agent, over a connection of its own, to sign a grant for `grant`.
    pub(crate) async fn sign(&self, grant: GrantParameters) -> Result<SignGrantResponse, Status> {
        self.client()
            .await
            .sign_grant(grant_request(grant))
            .await
            .map(tonic::Response::into_inner)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).expect("agent log")
    }

    /// The agent's log once `done` holds for it, or after 10 s (the caller's assertion
    /// then shows it): audit lines are written by the agent's writer thread, a moment
    /// after the answer they describe.
    pub(crate) fn log_when(&self, done: impl Fn(&str) -> bool) -> String {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if done(&log) || std::time::Instant::now() > until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The health service's status for `grantagent.v1.GrantAgent`: 1 SERVING,
    /// 2 NOT_SERVING (readiness).
    pub(crate) async fn health(&self) -> i32 {
        self.health_of("grantagent.v1.GrantAgent").await
    }

    /// The health service's status for `service` (`key/default`: whether that key signs).
    pub(crate) async fn health_of(&self, service: &str) -> i32 {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status
    }

    /// Waits up to `limit` for [`DevAgent::health`] to say `status`, failing the test
    /// with `what` otherwise; how long it took.
    pub(crate) async fn wait_for_health(
        &self,
        status: i32,
        limit: Duration,
        what: &str,
    ) -> Duration {
        let started = std::time::Instant::now();
        while self.health().await != status {
            assert!(started.elapsed() < limit, "{what} (waited {limit:?})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    }

    /// The lines of the audit file (`audit.jsonl` in the agent's folder) so far.
    pub(crate) fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }

    /// The first audit line that `matches`, waiting up to 5 s for it to be written.
    pub(crate) fn wait_for_audit(
        &self,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.audit_lines().into_iter().find(|l| matches(l)) {
                return Some(line);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command with this token's SoftHSM config in its environment.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let _ = command.env("SOFTHSM2_CONF", self.path("softhsm2.conf"));
        command
    }

    /// Sends a signal (e.g. "HUP") to the agent process.
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the agent to exit by itself, for up to `timeout`; its exit status.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Stops the agent and hands back its state dir.
    pub(crate) fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("placeholder");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a grant-agent command with its log (stderr, at debug level) in `log`, and waits
/// up to 60 s for its `...: listening on ADDR` lines; the child and every ADDR, first
/// the first printed.
fn start_listening(mut command: Command, log: &Path) -> (Child, Vec<String>) {
    let file = std::fs::File::create(log).expect("log file");
    let name = Path::new(command.get_program())
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut child = command
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let _reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, addr)) = line.split_once(": listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let Ok(first) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = child.kill();
        let log = std::fs::read_to_string(log).unwrap_or_default();
        panic!("{name} did not start within 60 s; its log:\n{log}");
    };
    let mut addrs = vec![first];
    // The others are printed right after the first.
    while let Ok(more) = rx.recv_timeout(Duration::from_millis(50)) {
        addrs.push(more);
    }
    (child, addrs)
}

/// Asserts that `status` is the agent's answer when the token's session queue is full:
/// overload, not a failure.
pub(crate) fn assert_token_busy(status: &Status) {
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
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
}

/// The SignGrant request for `grant`.
pub(crate) fn grant_request(grant: GrantParameters) -> SignGrantRequest {
    SignGrantRequest { grant: Some(grant) }
}

/// Grant parameters with a client and one scope; tests change what they test.
pub(crate) fn params() -> GrantParameters {
    GrantParameters {
        client_id: "0a3b5c7d-1111-2222-3333-444455556666".into(),
        scopes: vec!["test:scope".into()],
        environment: "test".into(),
        ..GrantParameters::default()
    }
}

/// A grant checked by an independent JWT library against the public key of its own x5c leaf.
pub(crate) struct Verified {
    pub(crate) header: serde_json::Value,
    pub(crate) claims: serde_json::Value,
    pub(crate) leaf_der: Vec<u8>,
}

pub(crate) fn verify(assertion: &str, audience: &str) -> Verified {
    let head = assertion.split('.').next().expect("header part");
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).expect("base64url header"))
            .expect("JSON header");
    let leaf_der = STANDARD
        .decode(header["x5c"][0].as_str().expect("x5c[0]"))
        .expect("x5c is standard base64");
    let cert = x509_cert::Certificate::from_der(&leaf_der).expect("x5c[0] is a certificate");
    let rsa_public_key = cert
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes();
    let key = jsonwebtoken::DecodingKey::from_rsa_der(rsa_public_key);
    let alg = match header["alg"].as_str().expect("alg") {
        "RS256" => jsonwebtoken::Algorithm::RS256,
        "RS384" => jsonwebtoken::Algorithm::RS384,
        "RS512" => jsonwebtoken::Algorithm::RS512,
        other => panic!("unexpected alg {other}"),
    };
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &validation)
        .expect("signature and claims verify with jsonwebtoken");
    Verified {
        header,
        claims: data.claims,
        leaf_der,
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// OpenSC's pkcs11-tool, logged in to the dev token in `dir`; fails on a non-zero exit.
pub(crate) fn pkcs11_tool(dir: &Path, args: &[&str]) -> std::process::Output {
    let module = grant_agent::dev::softhsm_module().expect("softhsm");
    let pin = read(&dir.join("pin"));
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .args([
            "--module",
            module.to_str().expect("utf-8"),
            "--token-label",
            "grant-agent",
        ])
        .args(["--login", "--pin", &pin])
        .args(args)
        .output()
        .expect("pkcs11-tool (install it with: sudo apt-get install -y opensc)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `Access:` flags pkcs11-tool lists for the private key labelled `label`, read with
/// OpenSC (independent of our code).
pub(crate) fn private_key_access(dir: &Path, label: &str) -> (Vec<String>, String) {
    let out = pkcs11_tool(dir, &["--list-objects", "--type", "privkey"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // It lists every private key; take the block of the one asked for.
    let block = listing
        .split("Private Key Object")
        .find(|b| b.contains(&format!("label:      {label}\n")))
        .unwrap_or_else(|| panic!("no key {label:?} in {listing}"))
        .to_owned();
    let access = block
        .lines()
        .find(|l| l.contains("Access:"))
        .unwrap_or_else(|| panic!("no Access line in {block}"));
    let flags = access
        .split(':')
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .map(|f| f.trim().to_owned())
        .collect();
    (flags, block)
}

/// Asserts the `Access:` flags of a key generated in the token: sensitive from the start,
/// never extractable, made there.
pub(crate) fn assert_generated_in_token(flags: &[String]) {
    for flag in [
        "sensitive",
        "always sensitive",
        "never extractable",
        "local",
    ] {
        assert!(
            flags.contains(&flag.to_owned()),
            "{flag} missing: {flags:?}"
        );
    }
    assert!(!flags.contains(&"extractable".to_owned()), "{flags:?}");
}

/// `grant-agent key csr` for the key labelled `label`, for the test organisation, written
/// to `out`.
pub(crate) fn csr_args<'a>(label: &'a str, out: &'a Path) -> [&'a str; 10] {
    [
        "key",
        "csr",
        "--label",
        label,
        "--org-number",
        "974760673",
        "--org-name",
        "ACME AS",
        "--out",
        out.to_str().expect("utf-8"),
    ]
}

/// A DER certificate as PEM.
pub(crate) fn pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).expect("PEM")
}

/// Runs openssl, failing with an install hint when it is missing.
pub(crate) fn openssl(args: &[&str], dir: &Path) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is required: sudo apt-get install -y openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `openssl req -x509` in `dir`: a new unencrypted RSA-2048 key in `key` and a certificate
/// signed by it in `cert`, with `options` (subject, days, extensions).
pub(crate) fn self_signed(dir: &Path, key: &str, cert: &str, options: &[&str]) {
    let mut args = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
    ];
    args.extend_from_slice(&["-out", cert]);
    args.extend_from_slice(options);
    let _ = openssl(&args, dir);
}

/// A CA (`ca.pem`, `ca.key`) and a server certificate for 127.0.0.1 and localhost signed
/// by it (`server.pem`, `server.key`), made with openssl in `dir`.
pub(crate) fn server_tls(dir: &Path) {
    self_signed(
        dir,
        "ca.key",
        "ca.pem",
        &["-days", "2", "-subj", "/CN=Internal CA"],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extfile");
    issue(dir, "ca", "server", "/CN=localhost", "server.ext");
}

/// A new RSA-2048 key `NAME.key` and a certificate `NAME.pem` for `subject`, issued by the
/// CA `CA.pem`/`CA.key` with the extensions in `ext_file`, all in `dir`.
pub(crate) fn issue(dir: &Path, ca: &str, name: &str, subject: &str, ext_file: &str) {
    let file = |ext: &str| format!("{name}.{ext}");
    let (key, csr, pem) = (file("key"), file("csr"), file("pem"));
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let request = [
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr,
    ];
    let _ = openssl(&[&request[..], &["-subj", subject]].concat(), dir);
    let mut x509 = vec!["x509", "-req", "-in", &csr, "-out", &pem, "-days", "2"];
    x509.extend_from_slice(&["-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial"]);
    x509.extend_from_slice(&["-extfile", ext_file]);
    let _ = openssl(&x509, dir);
}

/// A certificate authority made with openssl, standing in for Buypass or Commfides: it
/// issues certificates for CSRs made in the token, with any subject and validity window.
pub(crate) struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// A self-signed CA whose subject (openssl `-subj` form) becomes the issuer name.
    pub(crate) fn new(parent: &Path, name: &str, subject: &str) -> TestCa {
        let dir = parent.join(name);
        std::fs::create_dir_all(dir.join("issued")).expect("ca dir");
        std::fs::write(dir.join("index.txt"), "").expect("index");
        std::fs::write(dir.join("serial"), "1000\n").expect("serial");
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = test_ca\n[test_ca]\ndatabase = index.txt\nnew_certs_dir = issued\n\
             serial = serial\ndefault_md = sha256\npolicy = anything\nunique_subject = no\n\
             copy_extensions = none\nx509_extensions = leaf\n[anything]\ncommonName = optional\n\
             [leaf]\nkeyUsage = critical,nonRepudiation\n[encrypt]\nkeyUsage = critical,keyEncipherment\n",
        )
        .expect("ca config");
        self_signed(
            &dir,
            "ca.key",
            "ca.pem",
            &["-days", "3650", "-subj", subject],
        );
        TestCa { dir }
    }

    /// Issues a certificate for `csr` with `subject`, valid from `start` to `end` (Unix
    /// seconds); returns a PEM file holding the certificate followed by the CA.
    pub(crate) fn issue(&self, csr: &Path, subject: &str, start: i64, end: i64) -> PathBuf {
        self.issue_with(csr, subject, start, end, "leaf")
    }

    /// As [`TestCa::issue`], with a named extension section (`encrypt` for a certificate
    /// that may not sign).
    pub(crate) fn issue_with(
        &self,
        csr: &Path,
        subject: &str,
        start: i64,
        end: i64,
        extensions: &str,
    ) -> PathBuf {
        let name = format!("{}.pem", uuid::Uuid::new_v4());
        let time = |t: i64| grant_agent::agent::rfc3339(t).replace(['-', 'T', ':'], "");
        let _ = openssl(
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca.key",
                "-in",
                csr.to_str().expect("utf-8"),
                "-out",
                &name,
                "-notext",
                "-preserveDN",
                "-extensions",
                extensions,
                "-startdate",
                &time(start),
                "-enddate",
                &time(end),
                "-subj",
                subject,
            ],
            &self.dir,
        );
        let chain = format!(
            "{}{}",
            read(&self.dir.join(&name)),
            read(&self.dir.join("ca.pem"))
        );
        let path = self.dir.join(format!("chain-{name}"));
        std::fs::write(&path, chain).expect("chain");
        path
    }
}

pub(crate) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The local Maskinporten ([`mock_bin`]) as a child process, killed on drop.
pub(crate) struct Mock {
    child: Child,
    /// Its issuer URL, ending in `/`: the `aud` it expects and the base of its endpoints.
    pub(crate) url: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Mock {
    /// Starts the mock with `config` (TOML) written to `dir/mock.toml`; `tls` is the
    /// server certificate and key for HTTPS.
    pub(crate) fn start(dir: &Path, config: &str, tls: Option<(&Path, &Path)>) -> Mock {
        let config_path = dir.join("mock.toml");
        std::fs::write(&config_path, config).expect("mock config");
        let log = dir.join("mock.log");
        let mut command = Command::new(mock_bin());
        let _ = command
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path);
        if let Some((cert, key)) = tls {
            let _ = command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let (child, mut urls) = start_listening(command, &log);
        let url = urls.swap_remove(0);
        Mock {
            child,
            url,
            log,
            http: test_http_client(tls.map(|_| dir.join("ca.pem"))),
        }
    }

    /// The mock's counters: token_requests, tokens_issued, refused, faults.
    pub(crate) async fn stats(&self) -> serde_json::Value {
        self.http
            .get(format!("{}mock/stats", self.url))
            .send()
            .await
            .expect("stats")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("stats JSON"))
            .expect("stats body")
    }

    /// Switches a failure mode on (`{"mode": "status", "status": 503, "count": 2}`).
    pub(crate) async fn fault(&self, fault: serde_json::Value) {
        let response = self
            .http
            .post(format!("{}mock/faults", self.url))
            .header("content-type", "application/json")
            .body(fault.to_string())
            .send()
            .await
            .expect("faults");
        assert!(response.status().is_success(), "fault {fault} refused");
    }

    /// Switches every failure mode off.
    pub(crate) async fn clear_faults(&self) {
        let response = self
            .http
            .delete(format!("{}mock/faults", self.url))
            .send()
            .await
            .expect("faults");
        assert!(response.status().is_success());
    }

    /// POSTs an assertion to the token endpoint as a service would: (HTTP status, JSON).
    pub(crate) async fn exchange(&self, assertion: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}token", self.url))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion),
            ])
            .send()
            .await
            .expect("token endpoint");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("answer");
        (status, serde_json::from_slice(&body).expect("JSON answer"))
    }

    /// Verifies an access token against the mock's JWKS, as an API would; its claims.
    pub(crate) async fn verify_access_token(&self, token: &str) -> serde_json::Value {
        let body = self
            .http
            .get(format!("{}jwks", self.url))
            .send()
            .await
            .expect("jwks")
            .bytes()
            .await
            .expect("JWKS body");
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&body).expect("JWKS JSON");
        let header = jsonwebtoken::decode_header(token).expect("JWT header");
        let kid = header.kid.expect("kid in the access token");
        let jwk = jwks.find(&kid).expect("the token's kid is in the JWKS");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("RSA JWK");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_issuer(&[self.url.as_str()]);
        validation.validate_aud = false;
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .expect("the access token verifies against the JWKS")
            .claims
    }

    /// The mock's log so far.
    pub(crate) fn log(&self) -> String {
        read(&self.log)
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `GET url` over plain HTTP; the answer must be a success.
/// The sum of the samples whose line starts with `prefix` in a Prometheus text
/// exposition (0 when there are none).
pub(crate) fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) async fn http_get(url: &str) -> String {
    let body = test_http_client(None)
        .get(url)
        .send()
        .await
        .expect("GET")
        .error_for_status()
        .expect("a 2xx answer")
        .bytes()
        .await
        .expect("body");
    String::from_utf8_lossy(&body).into_owned()
}

/// An HTTP client for tests, trusting `ca` (PEM) when given.
pub(crate) fn test_http_client(ca: Option<PathBuf>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        for cert in CertificateDer::pem_file_iter(&ca).expect("ca file") {
            roots.add(cert.expect("PEM")).expect("CA certificate");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .expect("HTTP client")
}
