//! Answers in one write: response bodies cut into DATA frames that h2 copies into its
//! write buffer, so an answer's headers, message and trailers leave in one system call.
//!
//! h2 copies a DATA frame into its write buffer only below a threshold (256 bytes on
//! I/O that reports vectored writes, 1024 on I/O that does not); a bigger frame is kept
//! aside and written straight from its buffer, and nothing more is buffered until that
//! write is done. The trailers that follow every gRPC message then need a second write:
//! for a grant (a 1.5 KB answer) two `writev` a call where a health check needs one, each
//! waking the peer. So the connection's stream says it does not write vectored (the
//! 1024-byte threshold; h2's buffer is one contiguous slice either way) and [`SmallFrames`]
//! hands hyper the message in pieces under it: the same bytes, in two or three DATA
//! frames instead of one, which HTTP/2 and gRPC allow anywhere.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

/// The largest DATA frame h2 copies into its buffer on I/O that does not write
/// vectored (its `CHAIN_THRESHOLD_WITHOUT_VECTORED_IO` is 1024, copied when below it).
pub(super) const MAX_COPIED_FRAME: usize = 1023;

/// A response body whose data comes in pieces of at most [`MAX_COPIED_FRAME`] bytes.
pub(super) struct SmallFrames<B> {
    inner: B,
    /// The part of the last chunk not handed on yet.
    rest: Bytes,
}

impl<B> SmallFrames<B> {
    pub(super) fn new(inner: B) -> Self {
        SmallFrames {
            inner,
            rest: Bytes::new(),
        }
    }
}

impl<B> Body for SmallFrames<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.rest.has_remaining() {
            let n = self.rest.len().min(MAX_COPIED_FRAME);
            return Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        match frame.into_data() {
            Ok(mut data) if data.len() > MAX_COPIED_FRAME => {
                self.rest = data.split_off(MAX_COPIED_FRAME);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.rest.has_remaining() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn cuts_data_and_keeps_bytes_and_trailers() {
        let message = Bytes::from((0..2500u32).map(|i| i as u8).collect::<Vec<u8>>());
        let mut trailers = http::HeaderMap::new();
        let _ = trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"small"))),
            Ok(Frame::data(message.clone())),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let mut body = SmallFrames::new(StreamBody::new(tokio_stream::iter(frames)));
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            match frame.unwrap_or_else(|never| match never {}).into_data() {
                Ok(chunk) => {
                    sizes.push(chunk.len());
                    data.extend_from_slice(&chunk);
                }
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(sizes, [5, 1023, 1023, 454]);
        assert_eq!(&data[..5], b"small");
        assert_eq!(&data[5..], &message[..]);
        assert_eq!(got_trailers, Some(trailers));
    }

    #[tokio::test]
    async fn a_small_body_passes_as_it_is() {
        let mut body = SmallFrames::new(Full::new(Bytes::from_static(b"ok")));
        assert_eq!(body.size_hint().exact(), Some(2));
        let collected = body.frame().await.map(|f| f.map(|f| f.into_data().ok()));
        assert!(matches!(collected, Some(Ok(Some(d))) if d == "ok"));
        assert!(body.is_end_stream());
    }
}
