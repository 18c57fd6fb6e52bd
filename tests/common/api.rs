//! The HTTP/JSON API's fixtures, shared by tests/http.rs and tests/openapi.rs: an agent
//! with mutual TLS and a Unix socket whose default environment is `mock-maskinporten`,
//! and curl (or a raw HTTP/1.1 peer) to reach it.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::Duration,
};

use super::{
    DevAgent, Mock, read,
    secured::{PAYMENTS, tls_material, uid, write_config},
};

pub(crate) const CLIENT_ID: &str = "0a3b5c7d-1111-2222-3333-444455556666";

/// An agent with mutual TLS and a Unix socket whose default environment is the mock:
/// `payments` may use exactly one client_id (so texas-shaped requests work), the test's
/// uid any, within `rate` requests a second.
pub(crate) async fn api_agent(limits: &str, rate: u32) -> (DevAgent, Mock) {
    api_agent_with(limits, rate, "").await
}

/// [`api_agent`] with `uid_rule` added to the test's uid's policy rule (`allow_pid =
/// true`, say), for tests that need the Unix socket's caller to be allowed more.
pub(crate) async fn api_agent_with(limits: &str, rate: u32, uid_rule: &str) -> (DevAgent, Mock) {
    let dir = DevAgent::anchored().await;
    let path = |name: &str| dir.path().join(name);
    tls_material(dir.path());
    let mock = Mock::start(
        dir.path(),
        &format!(
            "certificates = \"test\"\nca = \"{}\"\n\n[[clients]]\nclient_id = \"{CLIENT_ID}\"\n\
             scopes = [\"test:scope\", \"test:other\"]\norganization_number = \"313367002\"\n\
             consumer_orgs = [\"313367002\"]\n",
            path("dev-cert.pem").display()
        ),
        None,
    );
    let policy = format!(
        "[[policy]]\ncaller = \"uri:{PAYMENTS}\"\nkeys = [\"*\"]\nclient_ids = [\"{CLIENT_ID}\"]\n\
         scopes = [\"test:scope\"]\nenvironments = [\"mock\"]\nallow_pid = true\n\n\
         [[policy]]\ncaller = \"uid:{}\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\nscopes = [\"*\"]\n\
         environments = [\"*\"]\nresources = [\"*\"]\nrequests_per_second = {rate}\nburst = {rate}\n{uid_rule}\n\n",
        uid()
    );
    write_config(
        dir.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\nunix_socket = \"agent.sock\"\n{limits}\n[tls]\n\
             certificate = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n"
        ),
        &policy,
    );
    let config = read(&path("agent.toml")).replace(
        "default_environment = \"test\"",
        "default_environment = \"mock\"",
    );
    let config = format!(
        "{config}\n[environments.mock]\nissuer = \"{}\"\ndiscover = true\ncertificates = \"test\"\n",
        mock.url
    );
    std::fs::write(path("agent.toml"), config).expect("config");
    (DevAgent::serve(dir, "agent.toml"), mock)
}

/// What curl got: the status, the headers (lower-case names) and the body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How curl reaches the agent.
pub(crate) enum Via<'a> {
    /// HTTPS with the caller's certificate `who`, over HTTP/1.1 or HTTP/2.
    Tls { who: &'a str, http2: bool },
    /// The Unix socket.
    Unix,
}

/// `curl -X POST` of `body` (JSON unless `content_type` says otherwise) to `path`.
pub(crate) fn curl(
    agent: &DevAgent,
    via: &Via<'_>,
    path: &str,
    body: &str,
    content_type: &str,
) -> Answer {
    curl_method(agent, via, "POST", path, body, content_type)
}

/// `curl -X method` of `body` with `content_type` to `path`.
pub(crate) fn curl_method(
    agent: &DevAgent,
    via: &Via<'_>,
    method: &str,
    path: &str,
    body: &str,
    content_type: &str,
) -> Answer {
    let dir = agent.dir.path();
    let mut command = Command::new("curl");
    let _ = command.args(["-sS", "-i", "--max-time", "20", "-X", method]);
    let url = match via {
        Via::Tls { who, http2 } => {
            let _ = command
                .arg("--cacert")
                .arg(dir.join("ca.pem"))
                .arg("--cert")
                .arg(dir.join(format!("{who}.pem")))
                .arg("--key")
                .arg(dir.join(format!("{who}.key")))
                .arg(if *http2 { "--http2" } else { "--http1.1" });
            format!("https://{}{path}", agent.addr)
        }
        Via::Unix => {
            let _ = command.arg("--unix-socket").arg(dir.join("agent.sock"));
            format!("http://localhost{path}")
        }
    };
    let out = command
        .args([
            "-H",
            &format!("content-type: {content_type}"),
            "--data-binary",
            body,
        ])
        .arg(url)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Splits an HTTP/1.1-style answer (as `curl -i` prints it) into status, headers and body.
pub(crate) fn parse(text: &str) -> Answer {
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `curl -X POST` of the JSON `body` to `path`.
pub(crate) fn post(
    agent: &DevAgent,
    via: &Via<'_>,
    path: &str,
    body: &serde_json::Value,
) -> Answer {
    curl(agent, via, path, &body.to_string(), "application/json")
}

/// How many token requests the mock has answered.
pub(crate) async fn token_requests(mock: &Mock) -> u64 {
    mock.stats().await["token_requests"]
        .as_u64()
        .expect("token_requests")
}

/// `payments` over HTTP/1.1 with mutual TLS.
pub(crate) const PAYMENTS_H1: Via<'static> = Via::Tls {
    who: "payments",
    http2: false,
};
/// `payments` over HTTP/2 with mutual TLS.
pub(crate) const PAYMENTS_H2: Via<'static> = Via::Tls {
    who: "payments",
    http2: true,
};

/// A raw HTTP/1.1 peer on the Unix socket.
pub(crate) fn raw(socket: &Path, send: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.write_all(send).expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    stream
}

/// Reads until the agent closes the connection (or the read timeout); what it sent.
pub(crate) fn read_to_close(stream: &mut UnixStream) -> String {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}
