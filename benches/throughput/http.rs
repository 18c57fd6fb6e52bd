//! The load generator's HTTP/JSON client: `POST /api/v1/token` over HTTP/2 with prior
//! knowledge, on hyper's own connection (no pool, no retries), as lean per request as the
//! tonic channel the gRPC steps use, so the two rates compare the agent's two fronts.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/2 connection to the agent, shared by the callers given a clone.
#[derive(Clone)]
pub(crate) struct Client {
    sender: Option<SendRequest<Full<Bytes>>>,
    uri: http::Uri,
}

impl Client {
    /// Connects to `addr` ("127.0.0.1:PORT") and drives the connection on a task.
    pub(crate) async fn connect(addr: &str) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("HTTP/2 handshake");
        drop(tokio::spawn(connection));
        Client {
            sender: Some(sender),
            uri: format!("http://{addr}/api/v1/token").parse().expect("uri"),
        }
    }

    /// A client for steps that do not use HTTP/JSON.
    pub(crate) fn unconnected() -> Client {
        Client {
            sender: None,
            uri: http::Uri::from_static("http://localhost/"),
        }
    }

    /// A texas-shaped token request for `client_id` at the `mock` environment; true when
    /// the answer is 200 with a token.
    pub(crate) async fn cached_token(&mut self, client_id: &str) -> bool {
        let Some(sender) = self.sender.as_mut() else {
            return false;
        };
        let body = format!(
            r#"{{"identity_provider":"maskinporten","target":"nav:aareg/v1/arbeidsforhold","client_id":"{client_id}","environment":"mock"}}"#
        );
        let request = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let Ok(response) = sender.send_request(request).await else {
            return false;
        };
        let ok = response.status() == http::StatusCode::OK;
        match response.into_body().collect().await {
            Ok(body) => ok && body.to_bytes().starts_with(b"{\"access_token\""),
            Err(_) => false,
        }
    }
}
