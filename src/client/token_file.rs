//! `grant-agent client token --out FILE [--watch]`: a file that always holds a fresh
//! access token, for tools that read their credential from a file (workload identity
//! federation, e.g. Google's `credential_source.file` with Skyporten).
//!
//! The file is replaced, never rewritten in place: the token goes to a new file in the
//! same folder, created with mode 0600 (so no reader ever sees a half-written token, and
//! no one but the owner ever sees one at all), which is synced and then renamed over
//! FILE. With `--watch` the token is renewed at two thirds of its remaining lifetime;
//! transient failures (the agent away, Maskinporten unwell, a busy token) are retried
//! with backoff, and a refusal that a retry would only repeat stops the watch with the
//! agent's message. The token itself is never logged.

use std::{
    fs::OpenOptions,
    future::Future,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tonic::{Code, transport::Channel};
use zeroize::Zeroizing;

use super::{ClientError, ClientTls, connect};
use crate::{
    agent::unix_now,
    proto::{GetAccessTokenRequest, GetAccessTokenResponse, grant_agent_client::GrantAgentClient},
};

/// What the file holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FileFormat {
    /// The bare access token, without a newline (`credential_source.format.type = "text"`).
    #[default]
    Text,
    /// `{"access_token", "token_type", "expires_at", "scope"}` on one line
    /// (`"json"` with `subject_token_field_name = "access_token"`).
    Json,
}

/// Why the file could not be written. Names the flag and the file, never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// FILE names a folder, or nothing.
    #[error("--out {0}: names no file")]
    NoFileName(String),
    /// A step of the write failed.
    #[error("--out {path}: cannot {step}: {source}")]
    Write {
        /// FILE.
        path: String,
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A file kept holding an access token.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
    format: FileFormat,
}

/// Tells temporary files of one process apart.
static TEMP_FILES: AtomicU64 = AtomicU64::new(0);

impl TokenFile {
    /// FILE, written in `format`.
    pub fn new(path: PathBuf, format: FileFormat) -> Self {
        TokenFile { path, format }
    }

    /// FILE.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces FILE with `token`: a new file next to it, mode 0600 from its creation,
    /// synced, renamed over FILE, and the folder synced so the rename survives a crash.
    pub(crate) fn write(&self, token: &GetAccessTokenResponse) -> Result<(), TokenFileError> {
        let shown = self.path.display().to_string();
        let Some(name) = self.path.file_name() else {
            return Err(TokenFileError::NoFileName(shown));
        };
        let folder = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let fail = |step: &'static str| {
            let path = shown.clone();
            move |source| TokenFileError::Write { path, step, source }
        };
        let contents = self.contents(token);
        let temp = folder.join(format!(
            ".{}.{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            TEMP_FILES.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(fail("create a file in its folder"))?;
        let written = file
            .write_all(contents.as_bytes())
            .map_err(fail("write"))
            .and_then(|()| file.sync_all().map_err(fail("sync")))
            .and_then(|()| std::fs::rename(&temp, &self.path).map_err(fail("replace it")));
        drop(file);
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
        std::fs::File::open(folder)
            .and_then(|f| f.sync_all())
            .map_err(fail("sync its folder"))
    }

    fn contents(&self, token: &GetAccessTokenResponse) -> Zeroizing<String> {
        Zeroizing::new(match self.format {
            FileFormat::Text => token.access_token.clone(),
            FileFormat::Json => serde_json::json!({
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": token.expires_at,
                "scope": token.scope,
            })
            .to_string(),
        })
    }
}

/// Whether a refusal with `code` may go away by itself: the agent or Maskinporten
/// unavailable or slow, a busy token, a rate limit. Everything a retry would only repeat
/// (an invalid request, a policy refusal, an unknown key, an expired certificate,
/// Maskinporten's OAuth2 refusals) is not.
pub(crate) fn is_transient(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
    )
}

/// How long to keep a token that expires at `expires_at` (Unix seconds) before renewing
/// it, at `now`: two thirds of what is left of its life, at least a second.
pub(crate) fn renew_after(expires_at: i64, now: i64) -> Duration {
    let left = u64::try_from(expires_at.saturating_sub(now)).unwrap_or(0);
    Duration::from_millis(left.saturating_mul(2000) / 3).max(Duration::from_secs(1))
}

/// The pause before retry number `failures` (1 for the first): from 1 s doubling to at
/// most 30 s, with jitter between half and all of it.
pub(crate) fn retry_pause(failures: u32) -> Duration {
    let full = Duration::from_secs(1)
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(Duration::from_secs(30));
    full.mul_f64(rand::random_range(0.5..=1.0))
}

/// Why a watch stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The agent refused in a way a retry would repeat.
    #[error("the agent refused: {code:?}: {message}")]
    Refused {
        /// The gRPC code.
        code: Code,
        /// The agent's message (OAuth2 error, hint, trace_id; never a token).
        message: String,
    },
    /// The agent cannot be connected to, and retrying would not change that.
    #[error(transparent)]
    Client(ClientError),
    /// The file could not be written.
    #[error(transparent)]
    File(#[from] TokenFileError),
}

/// Where the agent is, and what to ask it for.
#[derive(Debug, Clone)]
pub struct Source {
    /// The agent's address, as `--addr` takes it.
    pub addr: String,
    /// Mutual TLS, if used.
    pub tls: Option<ClientTls>,
    /// The request; `force_refresh` applies to the first token only.
    pub request: GetAccessTokenRequest,
}

/// How long one GetAccessToken may take before it counts as a transient failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a token to `file`; with `watch`, keeps renewing it until `shutdown` completes
/// (then `Ok`). Without `watch` a failure of any kind is returned at once.
pub async fn keep_fresh(
    source: Source,
    file: &TokenFile,
    watch: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WatchError> {
    tokio::pin!(shutdown);
    let mut agent: Option<GrantAgentClient<Channel>> = None;
    let mut force_refresh = source.request.force_refresh;
    let mut held: Option<i64> = None;
    let mut failures = 0_u32;
    loop {
        let fetched = tokio::select! {
            () = &mut shutdown => return Ok(()),
            fetched = fetch(&source, &mut agent, force_refresh) => fetched,
        };
        let pause = match fetched {
            Ok(token) => {
                if held.is_some_and(|h| token.expires_at <= h) && !force_refresh {
                    // The agent's cached copy of the token FILE holds: ask for a new one.
                    force_refresh = true;
                    continue;
                }
                file.write(&token)?;
                held = Some(token.expires_at);
                force_refresh = false;
                failures = 0;
                if !watch {
                    return Ok(());
                }
                let pause = renew_after(token.expires_at, unix_now());
                tracing::info!(
                    file = %file.path().display(),
                    expires_at = token.expires_at,
                    renew_in_s = pause.as_secs(),
                    "wrote a fresh access token"
                );
                pause
            }
            Err(Fetch::Stop(error)) => return Err(error),
            Err(Fetch::Retry(error)) if watch => {
                failures += 1;
                let pause = retry_pause(failures);
                agent = None;
                tracing::warn!(
                    error = %error,
                    failures,
                    retry_in_ms = pause.as_millis(),
                    "no fresh token; retrying"
                );
                if held.is_some_and(|h| h <= unix_now()) {
                    tracing::warn!(
                        file = %file.path().display(),
                        "the token in the file has expired"
                    );
                }
                pause
            }
            Err(Fetch::Retry(error)) => return Err(error),
        };
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// A failed fetch, and whether to try again.
enum Fetch {
    Retry(WatchError),
    Stop(WatchError),
}

async fn fetch(
    source: &Source,
    agent: &mut Option<GrantAgentClient<Channel>>,
    force_refresh: bool,
) -> Result<GetAccessTokenResponse, Fetch> {
    let client = match agent {
        Some(client) => client,
        None => match connect(&source.addr, source.tls.as_ref()).await {
            Ok(client) => agent.insert(client),
            Err(error @ ClientError::Connect { .. }) => {
                return Err(Fetch::Retry(WatchError::Client(error)));
            }
            Err(error) => return Err(Fetch::Stop(WatchError::Client(error))),
        },
    };
    let mut request = tonic::Request::new(GetAccessTokenRequest {
        force_refresh,
        ..source.request.clone()
    });
    request.set_timeout(CALL_TIMEOUT);
    match client.get_access_token(request).await {
        Ok(answer) => Ok(answer.into_inner()),
        Err(status) => {
            let error = WatchError::Refused {
                code: status.code(),
                message: status.message().to_owned(),
            };
            Err(if is_transient(status.code()) {
                Fetch::Retry(error)
            } else {
                Fetch::Stop(error)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn answer(token: &str, expires_at: i64) -> GetAccessTokenResponse {
        GetAccessTokenResponse {
            access_token: token.into(),
            token_type: "Bearer".into(),
            expires_at,
            scope: "test:scope".into(),
            from_cache: false,
        }
    }

    #[test]
    fn the_file_is_replaced_with_mode_0600_and_holds_the_bare_token_or_json() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        // An existing file readable by all is replaced, not rewritten: its mode goes too.
        std::fs::write(&path, "old").expect("old");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("644");
        let text = TokenFile::new(path.clone(), FileFormat::Text);
        text.write(&answer("abc.def", 100)).expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "abc.def");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let json = TokenFile::new(path.clone(), FileFormat::Json);
        json.write(&answer("ghi", 200)).expect("written");
        let value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(value["access_token"], "ghi");
        assert_eq!(value["expires_at"], 200);
        assert_eq!(value["token_type"], "Bearer");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["token"]);
    }

    #[test]
    fn write_errors_name_the_flag_and_the_file_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("no/such/folder/token");
        let error = TokenFile::new(missing.clone(), FileFormat::Text)
            .write(&answer("secret-token", 1))
            .expect_err("no folder")
            .to_string();
        assert!(
            error.starts_with(&format!("--out {}: cannot create", missing.display())),
            "{error}"
        );
        assert!(!error.contains("secret-token"));
        // FILE is a folder: the rename fails and the temporary file is removed.
        let folder = dir.path().join("folder");
        std::fs::create_dir(&folder).expect("mkdir");
        std::fs::write(folder.join("x"), "").expect("non-empty folder");
        let error = TokenFile::new(folder.clone(), FileFormat::Text)
            .write(&answer("secret-token", 1))
            .expect_err("a folder")
            .to_string();
        assert!(error.contains("cannot replace it"), "{error}");
        let left = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(left, 1, "only the folder remains");
        let error = TokenFile::new(PathBuf::from("/"), FileFormat::Text)
            .write(&answer("t", 1))
            .expect_err("root");
        assert_eq!(error.to_string(), "--out /: names no file");
    }

    #[test]
    fn renewal_at_two_thirds_of_what_is_left_and_at_least_a_second() {
        assert_eq!(renew_after(1120, 1000), Duration::from_secs(80));
        assert_eq!(renew_after(1006, 1000), Duration::from_secs(4));
        assert_eq!(renew_after(1001, 1000), Duration::from_secs(1));
        assert_eq!(renew_after(900, 1000), Duration::from_secs(1));
    }

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        for failures in 1..12 {
            let full = Duration::from_secs(1 << (failures - 1).min(5)).min(Duration::from_secs(30));
            let pause = retry_pause(failures);
            assert!(pause >= full / 2 && pause <= full, "{failures}: {pause:?}");
        }
    }

    #[test]
    fn what_a_retry_may_cure() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::Aborted,
            Code::Cancelled,
        ] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unauthenticated,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }
}
