//! Reading answers from HTTP servers the agent does not control (Maskinporten, OCSP
//! responders, CRL distribution points): a body is read only up to a limit, and a failed
//! request is described by its causes, which reqwest's own message leaves out.

/// The body, refused as soon as it is known to be over `limit` bytes: by its
/// Content-Length, or while it streams in.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let too_large = || format!("the answer is larger than {limit} bytes");
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A reqwest error with its causes ("connection refused", "certificate expired"). The
/// agent's requests carry secrets (an assertion) only in their bodies, never in a URL,
/// so nothing here is secret.
pub(crate) fn describe(error: reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
