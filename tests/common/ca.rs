//! A test PKI made with the `openssl` CLI in a temp dir, for the revocation tests: a root,
//! an issuing CA with an `openssl ca` database (so `-revoke` and `-gencrl` work), a
//! delegated OCSP responder certificate, leaves pointing at local responders, a running
//! `openssl ocsp` responder killed on drop, and a tiny HTTP server for CRLs and hostile
//! answers. Nothing here reaches the internet.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener as StdListener,
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `openssl` in `dir` with the words of `line` and then `more` (arguments that may
/// hold spaces), failing the test with its stderr.
pub(crate) fn openssl(dir: &Path, line: &str, more: &[&str]) {
    let out = Command::new("openssl")
        .args(line.split_whitespace())
        .args(more)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {line} {more:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free port on 127.0.0.1, free when this returns (nothing listens on it).
pub(crate) fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One certificate issued by a test CA.
pub(crate) struct Issued {
    pub(crate) pem: PathBuf,
    pub(crate) der: Vec<u8>,
}

/// The root and issuing CA, and the delegated responder, in their own temp dir.
pub(crate) struct TestCa {
    pub(crate) dir: tempfile::TempDir,
    /// The issuing CA's certificate, DER.
    pub(crate) issuer_der: Vec<u8>,
    /// The port leaves name as their OCSP responder (nothing listens until `responder`).
    pub(crate) ocsp_port: u16,
}

impl TestCa {
    /// A root, an issuing CA named "CN=`issuer_cn`" (RSA 2048, SHA-256) and a delegated
    /// responder (P-256, id-kp-OCSPSigning), each valid for 30 days.
    pub(crate) fn new(issuer_cn: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path();
        std::fs::create_dir(path.join("newcerts")).expect("newcerts");
        std::fs::write(path.join("index.txt"), "").expect("index");
        std::fs::write(path.join("serial"), "1000\n").expect("serial");
        std::fs::write(path.join("crlnumber"), "01\n").expect("crlnumber");
        std::fs::write(path.join("openssl.cnf"), CONFIG).expect("config");
        openssl(
            path,
            "req -x509 -newkey rsa:2048 -nodes -keyout root.key -out root.pem -days 30 \
             -config openssl.cnf -extensions ca_ext",
            &["-subj", "/CN=Test Root"],
        );
        openssl(
            path,
            "req -new -newkey rsa:2048 -nodes -keyout issuing.key -out issuing.csr \
             -config openssl.cnf",
            &["-subj", &format!("/CN={issuer_cn}")],
        );
        openssl(
            path,
            "x509 -req -in issuing.csr -CA root.pem -CAkey root.key -set_serial 1 -days 30 \
             -extfile openssl.cnf -extensions ca_ext -out issuing.pem",
            &[],
        );
        let ca = TestCa {
            issuer_der: pem_to_der(&path.join("issuing.pem")),
            dir,
            ocsp_port: free_port(),
        };
        let _ = ca.issue_with_section("responder", "responder", None);
        ca
    }

    /// The default OCSP URL of this CA's leaves.
    pub(crate) fn ocsp_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.ocsp_port)
    }

    /// A leaf "CN=`name`" (P-256) recorded in the CA database, with these AIA OCSP and
    /// CRL DP URIs (an empty string leaves the extension out).
    pub(crate) fn issue(&self, name: &str, ocsp: &str, crl: &str) -> Issued {
        let ext = self.write_leaf_ext(name, ocsp, crl);
        self.issue_with_section(name, "leaf", Some(&ext))
    }

    /// A leaf for `csr` (a key made in the token) with `subject` (openssl `-subj` form),
    /// recorded in the CA database, with these AIA OCSP and CRL DP URIs; `pem` holds the
    /// leaf followed by the issuing CA, as `grant-agent cert import` takes a chain.
    pub(crate) fn issue_for(&self, csr: &Path, subject: &str, ocsp: &str, crl: &str) -> Issued {
        let name = format!("token-{}", uuid::Uuid::new_v4());
        let ext = self.write_leaf_ext(&name, ocsp, crl);
        let pem = format!("{name}.pem");
        openssl(
            self.dir.path(),
            "ca -batch -config openssl.cnf -notext -preserveDN -extensions leaf",
            &[
                "-in",
                csr.to_str().expect("utf-8 path"),
                "-subj",
                subject,
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
        let leaf = self.issued(&pem);
        let chain = self.dir.path().join(format!("{name}-chain.pem"));
        let issuing = std::fs::read(self.dir.path().join("issuing.pem")).expect("issuing");
        std::fs::write(
            &chain,
            [std::fs::read(&leaf.pem).expect("leaf"), issuing].concat(),
        )
        .expect("chain");
        Issued {
            pem: chain,
            der: leaf.der,
        }
    }

    /// A leaf the CA database does not know (signed with `openssl x509`), so the responder
    /// answers "unknown"; serial 0x7777.
    pub(crate) fn issue_unrecorded(&self, name: &str, ocsp: &str, crl: &str) -> Issued {
        let ext = self.write_leaf_ext(name, ocsp, crl);
        let csr = self.csr(name);
        let pem = format!("{name}.pem");
        openssl(
            self.dir.path(),
            "x509 -req -CA issuing.pem -CAkey issuing.key -set_serial 0x7777 -days 30 \
             -extensions leaf",
            &["-in", &csr, "-extfile", &ext, "-out", &pem],
        );
        self.issued(&pem)
    }

    /// Writes the `[leaf]` extension section for these URIs; returns the file's name.
    fn write_leaf_ext(&self, name: &str, ocsp: &str, crl: &str) -> String {
        let mut ext =
            String::from("[leaf]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\n");
        if !ocsp.is_empty() {
            ext.push_str(&format!("authorityInfoAccess = OCSP;URI:{ocsp}\n"));
        }
        if !crl.is_empty() {
            ext.push_str(&format!("crlDistributionPoints = URI:{crl}\n"));
        }
        let file = format!("{name}.ext");
        std::fs::write(self.dir.path().join(&file), ext).expect("ext");
        file
    }

    /// A P-256 key and CSR for "CN=`name`"; returns the CSR's file name.
    fn csr(&self, name: &str) -> String {
        let csr = format!("{name}.csr");
        openssl(
            self.dir.path(),
            "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes",
            &[
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        csr
    }

    fn issue_with_section(&self, name: &str, section: &str, extfile: Option<&str>) -> Issued {
        let csr = self.csr(name);
        let pem = format!("{name}.pem");
        let mut more = vec!["-in", &csr, "-out", &pem, "-extensions", section];
        if let Some(extfile) = extfile {
            more.extend(["-extfile", extfile]);
        }
        openssl(
            self.dir.path(),
            "ca -batch -config openssl.cnf -notext",
            &more,
        );
        self.issued(&pem)
    }

    fn issued(&self, pem: &str) -> Issued {
        let pem = self.dir.path().join(pem);
        Issued {
            der: pem_to_der(&pem),
            pem,
        }
    }

    /// Revokes `leaf` for `reason` and returns the revocation time the database recorded.
    pub(crate) fn revoke(&self, leaf: &Issued, reason: &str) -> i64 {
        let pem = leaf.pem.to_str().expect("utf-8 path");
        openssl(
            self.dir.path(),
            "ca -config openssl.cnf",
            &["-revoke", pem, "-crl_reason", reason],
        );
        let index = std::fs::read_to_string(self.dir.path().join("index.txt")).expect("index");
        let line = index
            .lines()
            .rfind(|l| l.starts_with('R'))
            .expect("a revoked entry");
        let when = line.split('\t').nth(2).expect("revocation field");
        utc_time(when.split(',').next().expect("time"))
    }

    /// A fresh CRL (DER) from the database, valid for `hours`.
    pub(crate) fn crl(&self, hours: u32) -> Vec<u8> {
        let path = self.dir.path();
        openssl(
            path,
            "ca -config openssl.cnf -gencrl -out issuing.crl.pem",
            &["-crlhours", &hours.to_string()],
        );
        openssl(
            path,
            "crl -in issuing.crl.pem -outform DER -out issuing.crl",
            &[],
        );
        std::fs::read(path.join("issuing.crl")).expect("crl")
    }

    /// Starts `openssl ocsp` on this CA's OCSP port, signing with the key and certificate
    /// at `signer` (`file("responder")`: the delegated one; `file("issuing")`: the CA
    /// itself; or another CA's), with `extra` arguments (`-nmin 1`, `-rmd sha1`).
    pub(crate) fn responder(&self, signer: &Path, extra: &[&str]) -> Responder {
        let port = self.ocsp_port.to_string();
        let mut child = Command::new("openssl")
            .args([
                "ocsp",
                "-index",
                "index.txt",
                "-port",
                &port,
                "-CA",
                "issuing.pem",
            ])
            .arg("-rsigner")
            .arg(signer.with_extension("pem"))
            .arg("-rkey")
            .arg(signer.with_extension("key"))
            .args(extra)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start openssl ocsp");
        let stderr = child.stderr.take().expect("stderr");
        let responder = Responder { child };
        wait_until_listening(stderr, self.ocsp_port);
        responder
    }

    /// The path stem of one of this CA's key and certificate pairs ("responder",
    /// "issuing").
    pub(crate) fn file(&self, stem: &str) -> PathBuf {
        self.dir.path().join(stem)
    }

    /// Asks the running responder about `leaf` with the `openssl ocsp` client (its own
    /// nonce, unless `extra` says `-no_nonce`) and returns the DER response, to be
    /// replayed.
    pub(crate) fn fetch_response(&self, leaf: &Issued, extra: &[&str]) -> Vec<u8> {
        let out = self.dir.path().join("captured.der");
        openssl(
            self.dir.path(),
            "ocsp -issuer issuing.pem -noverify -timeout 60",
            &[
                "-cert",
                leaf.pem.to_str().expect("utf-8 path"),
                "-url",
                &self.ocsp_url(),
                "-respout",
                out.to_str().expect("utf-8 path"),
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        std::fs::read(out).expect("response")
    }
}

/// A running `openssl ocsp`, killed on drop.
pub(crate) struct Responder {
    child: Child,
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (up to a minute, for a loaded machine) until `openssl ocsp` says it listens.
/// Its own words, not a probe of the port: OpenSSL 3.0's responder stops answering
/// after a connection that closes without a request, and exits after a request that is
/// not OCSP. Its stderr is drained to the end so that its per-request log never fills the
/// pipe.
fn wait_until_listening(stderr: ChildStderr, port: u16) {
    let (ready, listening) = mpsc::channel();
    drop(std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if line.contains("waiting for OCSP client connections") {
                let _ = ready.send(());
            }
        }
    }));
    listening
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("openssl ocsp did not listen on {port}"));
}

fn pem_to_der(pem: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(pem).expect("pem");
    let (_, der) = der::pem::decode_vec(text.trim().as_bytes()).expect("PEM certificate");
    der
}

/// An `openssl ca` database time (UTCTime "YYMMDDHHMMSSZ") as Unix seconds.
fn utc_time(stamp: &str) -> i64 {
    let n = |range: std::ops::Range<usize>| stamp[range].parse::<u8>().expect("digits");
    let time = der::DateTime::new(
        2000 + u16::from(n(0..2)),
        n(2..4),
        n(4..6),
        n(6..8),
        n(8..10),
        n(10..12),
    )
    .expect("a database time");
    i64::try_from(time.unix_duration().as_secs()).expect("in range")
}

/// What the HTTP server answers to any request.
#[derive(Clone)]
pub(crate) enum Behaviour {
    /// 200 with these bytes.
    Serve(Vec<u8>),
    /// 200 with this many bytes and no Content-Length (read until the connection closes).
    Stream(usize),
    /// Reads the request and never answers.
    Silent,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 answering every request as its `Behaviour` says.
pub(crate) struct HttpServer {
    pub(crate) port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl HttpServer {
    /// Binds a free port and serves on the current tokio runtime.
    pub(crate) async fn start(behaviour: Behaviour) -> HttpServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let shared = behaviour.clone();
        drop(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let now = shared.lock().expect("behaviour").clone();
                drop(tokio::spawn(answer(stream, now)));
            }
        }));
        HttpServer { port, behaviour }
    }

    /// Changes what later requests get.
    pub(crate) fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("behaviour") = behaviour;
    }

    /// A URL on this server.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

async fn answer(mut stream: tokio::net::TcpStream, behaviour: Behaviour) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while request.len() < head_end + length {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
    }
    match behaviour {
        Behaviour::Serve(body) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        }
        Behaviour::Stream(size) => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await;
            let chunk = vec![0x30u8; 8192];
            let mut sent = 0;
            while sent < size {
                let n = chunk.len().min(size - sent);
                if stream.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                sent += n;
            }
        }
        Behaviour::Silent => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    let _ = stream.shutdown().await;
}

const CONFIG: &str = "\
[ca]
default_ca = issuing

[issuing]
dir = .
database = ./index.txt
new_certs_dir = ./newcerts
certificate = ./issuing.pem
private_key = ./issuing.key
serial = ./serial
crlnumber = ./crlnumber
default_md = sha256
default_days = 30
default_crl_days = 1
policy = any
unique_subject = no
copy_extensions = none

[any]
commonName = supplied

[req]
distinguished_name = dn
prompt = no

[dn]
CN = unused

[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[responder]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = OCSPSigning
";
