//! Traces end to end: an agent with `[tracing]` sends its spans over OTLP/gRPC to a
//! receiver in this test. A GetAccessToken (exchanged at `mock-maskinporten`) and a
//! SignGrant, both with a caller's W3C `traceparent` and a pid, give spans in the
//! caller's trace, parented request → policy, queue_wait, C_Sign, token_fetch →
//! token_exchange; the token endpoint receives the trace; and no span carries the pid,
//! the assertion, the access token or the PIN. The spans are flushed when the agent
//! stops on SIGTERM.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{DevAgent, Mock, params, read};
use grant_agent::proto::{GetAccessTokenRequest, GrantParameters, SignGrantRequest};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};

const CLIENT_ID: &str = "0a3b5c7d-1111-2222-3333-444455556666";
/// A valid national identity number (check digits), which no span may carry.
const PID: &str = "01019012480";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The span of a caller of the HTTP/JSON API, in the same trace.
const HTTP_CALLER_SPAN: &str = "b7ad6b7169203331";

/// An OTLP/gRPC trace receiver keeping every export.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("exports").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves on a free loopback port; its `http://` address.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let service = TraceServiceServer::new(self.clone());
        drop(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("receiver");
        }));
        format!("http://{address}")
    }

    /// Every span received, and the exports' debug text (every name, attribute and event).
    fn spans(&self) -> (Vec<Span>, String) {
        let exports = self.0.lock().expect("exports");
        let spans = exports
            .iter()
            .flat_map(|e| &e.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.iter().cloned())
            .collect();
        (spans, format!("{exports:?}"))
    }
}

/// A dev token whose certificate the mock trusts, the mock, and an agent with
/// `[tracing]` sending to `collector` and a `mock` environment discovering the mock.
async fn setup(collector: &str) -> (DevAgent, Mock) {
    let dir = DevAgent::anchored().await;
    let path = |name: &str| dir.path().join(name);
    let mock = Mock::start(
        dir.path(),
        &format!(
            "certificates = \"test\"\nca = \"{}\"\n\n[[clients]]\nclient_id = \"{CLIENT_ID}\"\n\
             scopes = [\"test:scope\"]\norganization_number = \"313367002\"\n",
            path("dev-cert.pem").display(),
        ),
        None,
    );
    let mut config = read(&path("config.toml"));
    config.push_str(&format!(
        "\n[environments.mock]\nissuer = \"{}\"\ndiscover = true\ncertificates = \"test\"\n\n\
         [tracing]\notlp_endpoint = \"{collector}\"\nservice_name = \"grant-agent-test\"\n",
        mock.url
    ));
    std::fs::write(path("agent.toml"), config).expect("agent config");
    (DevAgent::serve(dir, "agent.toml"), mock)
}

/// `message` with the caller's `traceparent` in its metadata.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let _ = request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
            .parse()
            .expect("header"),
    );
    request
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The names of `span`'s ancestors in the export, nearest first.
fn ancestors(span: &Span, by_id: &HashMap<Vec<u8>, &Span>) -> Vec<String> {
    let mut names = Vec::new();
    let mut parent = by_id.get(&span.parent_span_id);
    while let Some(up) = parent {
        names.push(up.name.clone());
        parent = by_id.get(&up.parent_span_id);
    }
    names
}

/// The string value of `span`'s attribute `key`.
fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(n) => n.to_string(),
            other => format!("{other:?}"),
        })
}

// Two threads: the receiver answers while the test waits for the agent to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_the_callers_trace_to_the_token_endpoint_without_secrets() {
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let (mut agent, mock) = setup(&collector).await;
    let mut client = agent.client().await;
    let person = GrantParameters {
        environment: "mock".into(),
        pid: PID.into(),
        ..params()
    };
    let token = client
        .get_access_token(traced(GetAccessTokenRequest {
            grant: Some(person.clone()),
            force_refresh: false,
        }))
        .await
        .expect("token")
        .into_inner();
    let grant = client
        .sign_grant(traced(SignGrantRequest {
            grant: Some(GrantParameters {
                environment: "test".into(),
                ..person
            }),
        }))
        .await
        .expect("signed")
        .into_inner();
    // The JSON API takes the traceparent from its HTTP headers.
    let http = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-H",
            "content-type: application/json",
            "-H",
        ])
        .arg(format!("traceparent: 00-{TRACE_ID}-{HTTP_CALLER_SPAN}-01"))
        .arg("-d")
        .arg(
            serde_json::json!({"identity_provider": "maskinporten", "target": "test:scope",
                "client_id": CLIENT_ID, "environment": "test", "pid": PID})
            .to_string(),
        )
        .arg(format!("http://{}/api/v1/grant", agent.addr))
        .output()
        .expect("curl");
    let http_grant: serde_json::Value = serde_json::from_slice(&http.stdout).expect("JSON");
    let http_assertion = http_grant["assertion"]
        .as_str()
        .expect("assertion")
        .to_owned();
    let traceparent = mock.stats().await["last_traceparent"]
        .as_str()
        .expect("last_traceparent")
        .to_owned();
    drop(client);
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(30)).expect("stopped");
    assert!(status.success(), "{status:?}\n{}", agent.log());

    let (spans, text) = receiver.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID),
        "a span outside the caller's trace: {names:?}"
    );
    let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    for request in ["get_access_token", "sign_grant"] {
        let span = spans
            .iter()
            .find(|s| s.name == request && attribute(s, "url.path").is_none())
            .unwrap_or_else(|| panic!("no {request} span in {names:?}"));
        assert_eq!(hex(&span.parent_span_id), CALLER_SPAN, "{request}");
        assert_eq!(span.kind, SpanKind::Server as i32, "{request}");
        assert_eq!(
            attribute(span, "grant_agent.client_id").as_deref(),
            Some(CLIENT_ID)
        );
        assert_eq!(
            attribute(span, "rpc.grpc.status_code").as_deref(),
            Some("0")
        );
    }
    // The JSON API's request: its caller's span is the parent, and it says HTTP.
    let http_span = spans
        .iter()
        .find(|s| attribute(s, "url.path").as_deref() == Some("/api/v1/grant"))
        .unwrap_or_else(|| panic!("no span for POST /api/v1/grant in {names:?}"));
    assert_eq!(http_span.name, "sign_grant");
    assert_eq!(hex(&http_span.parent_span_id), HTTP_CALLER_SPAN);
    assert_eq!(
        attribute(http_span, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(attribute(http_span, "rpc.system"), None);
    let outcome = |name: &str| attribute(by_id_name(&spans, name), "grant_agent.outcome");
    assert_eq!(outcome("get_access_token").as_deref(), Some("issued"));
    assert_eq!(outcome("sign_grant").as_deref(), Some("signed"));
    // Each child leads up to the request that caused it.
    for (request, children) in [
        (
            "get_access_token",
            &[
                "policy",
                "token_fetch",
                "queue_wait",
                "C_Sign",
                "token_exchange",
            ][..],
        ),
        ("sign_grant", &["policy", "queue_wait", "C_Sign"][..]),
    ] {
        for child in children {
            let found = spans.iter().any(|s| {
                s.name == *child && ancestors(s, &by_id).last().map(String::as_str) == Some(request)
            });
            assert!(found, "no {child} span under {request}: {names:?}");
        }
    }
    let policy = by_id_name(&spans, "policy");
    assert_eq!(
        attribute(policy, "grant_agent.decision").as_deref(),
        Some("allowed")
    );

    // The token endpoint got the trace, from the token_exchange span.
    let exchange = by_id_name(&spans, "token_exchange");
    assert_eq!(exchange.kind, SpanKind::Client as i32);
    assert_eq!(
        traceparent,
        format!("00-{TRACE_ID}-{}-01", hex(&exchange.span_id)),
        "the traceparent the token endpoint received"
    );

    // No secret in any name, attribute or event.
    let pin = read(&agent.path("pin"));
    let mut secrets = vec![PID.to_owned(), pin.trim().to_owned()];
    secrets.extend(grant.assertion.split('.').map(str::to_owned));
    secrets.extend(http_assertion.split('.').map(str::to_owned));
    secrets.extend(token.access_token.split('.').map(str::to_owned));
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !text.contains(secret.as_str()),
            "a secret in the spans: {text}"
        );
    }
}

/// The first span named `name`.
fn by_id_name<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} span"))
}

/// Traces are best effort: with nothing listening at the collector's address, tokens and
/// grants are served as before, and SIGTERM still stops the agent (the flush at exit
/// gives up after `export_timeout_seconds`) with a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_request_and_no_hang_at_exit() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let collector = format!("http://{}", closed.local_addr().expect("address"));
    drop(closed);
    let (mut agent, _mock) = setup(&collector).await;
    let mut client = agent.client().await;
    let token = GrantParameters {
        environment: "mock".into(),
        ..params()
    };
    for _ in 0..3 {
        let _ = client
            .get_access_token(traced(GetAccessTokenRequest {
                grant: Some(token.clone()),
                force_refresh: true,
            }))
            .await
            .expect("a token with the collector down");
    }
    for _ in 0..50 {
        let _ = client
            .sign_grant(traced(SignGrantRequest {
                grant: Some(params()),
            }))
            .await
            .expect("a grant with the collector down");
    }
    drop(client);
    agent.signal("TERM");
    let status = agent
        .wait_exit(Duration::from_secs(60))
        .expect("stopped, though the spans could not be sent");
    assert!(status.success(), "{status:?}\n{}", agent.log());
}
