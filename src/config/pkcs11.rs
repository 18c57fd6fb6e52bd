//! `[pkcs11]`: the module, the token, the PIN and the session pool.
//!
//! The PIN itself is never in the file: it comes from a file (whose permissions are
//! checked at load, as ssh checks a private key's) or an environment variable.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ConfigError, Invalid, within};

/// Most sessions a pool may open; more buys nothing on any token we know of.
const MAX_SESSIONS: usize = 256;

/// Requests that may wait for a PKCS#11 session before more are refused.
pub const DEFAULT_QUEUE: usize = 1024;

/// How to reach the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 shared library.
    pub module: PathBuf,
    /// Which token: by label (slot numbers move; labels do not), serial number or slot id.
    pub token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Sessions in the signing pool.
    pub sessions: usize,
    /// Requests that may wait for a session; more are refused at once.
    pub queue: usize,
}

/// How the token is found among the module's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// By token label (`token_label`).
    Label(String),
    /// By token serial number (`token_serial`).
    Serial(String),
    /// By slot id (`slot_id`), for modules whose slots are fixed (opencryptoki, some HSMs).
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(f, "labelled \"{label}\""),
            TokenSelector::Serial(serial) => write!(f, "with serial number \"{serial}\""),
            TokenSelector::Slot(slot) => write!(f, "in slot {slot}"),
        }
    }
}

/// The user PIN is read from a file or an environment variable, never from the command line
/// (which every user of the machine can read in `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN; one trailing newline is ignored.
    File(PathBuf),
    /// The name of an environment variable holding the PIN.
    Env(String),
}

/// A PIN file that users other than the agent's may read or change, as (problem, fix).
///
/// As ssh does for private keys: a PIN file the agent's user owns must be open to that
/// user only (0600 or 0400). A file owned by another user (root, or the kubelet for a
/// Kubernetes Secret under `fsGroup`, which forces mode 0440) reaches the agent through
/// its group, so there group read is allowed, and nothing else for group or others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExposedPinFile {
    /// What is wrong, naming the file and its mode.
    pub(crate) problem: String,
    /// The command that fixes it.
    pub(crate) fix: String,
}

impl fmt::Display for ExposedPinFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.problem, self.fix)
    }
}

/// Checks a PIN file's permissions from its metadata (`stat`, or `fstat` of the open file).
pub(crate) fn exposed_pin_file(
    path: &Path,
    metadata: &std::fs::Metadata,
) -> Option<ExposedPinFile> {
    use std::os::unix::fs::MetadataExt;
    let owned_by_agent = metadata.uid() == rustix::process::geteuid().as_raw();
    pin_file_exposure(path, metadata.mode(), owned_by_agent)
}

fn pin_file_exposure(path: &Path, mode: u32, owned_by_agent: bool) -> Option<ExposedPinFile> {
    let (forbidden, fix_mode) = if owned_by_agent {
        (0o077, "600")
    } else {
        (0o037, "440")
    };
    let open = mode & forbidden;
    if open == 0 {
        return None;
    }
    let how = if open & 0o044 != 0 {
        "readable"
    } else if open & 0o022 != 0 {
        "writable"
    } else {
        "executable"
    };
    let path = path.display();
    Some(ExposedPinFile {
        problem: format!(
            "{path} is {how} by group or others (mode {:04o})",
            mode & 0o7777
        ),
        fix: format!("run: chmod {fix_mode} {path}"),
    })
}

/// Sessions when the config sets none: four per CPU (at least 4). A soft token signs on the
/// CPU, so extra sessions keep every core busy while other requests are between signs
/// (measured on 2 cores: 2 sessions reach 0.56 of raw C_Sign/s through gRPC, 8 reach
/// 0.86; see docs/performance.md). A hardware HSM caps sessions: set `pkcs11.sessions`.
pub fn default_sessions() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (n.get() * 4).max(4))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPkcs11 {
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    slot_id: Option<u64>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    queue: Option<usize>,
}

/// Validates `[pkcs11]`; a relative `pin_file` resolves against `base`.
pub(super) fn pkcs11(
    raw: RawPkcs11,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<Pkcs11Config, ConfigError> {
    if raw.module.as_os_str().is_empty() {
        return Err(invalid(
            "pkcs11.module",
            "is empty".into(),
            "set it to the PKCS#11 library, e.g. \"/usr/lib/softhsm/libsofthsm2.so\"",
        ));
    }
    let token = token_selector(raw.token_label, raw.token_serial, raw.slot_id, invalid)?;
    let pin = pin_source(raw.pin_file, raw.pin_env, base, invalid)?;
    let sessions = within(
        "pkcs11.sessions",
        raw.sessions,
        1..=MAX_SESSIONS,
        default_sessions(),
        &format!("use 1 to {MAX_SESSIONS}, or leave it out for four per CPU"),
        invalid,
    )?;
    let queue = within(
        "pkcs11.queue",
        raw.queue,
        1..=100_000,
        DEFAULT_QUEUE,
        "use 1 to 100000 waiting requests",
        invalid,
    )?;
    Ok(Pkcs11Config {
        module: raw.module,
        token,
        pin,
        sessions,
        queue,
    })
}

/// Exactly one of `token_label`, `token_serial` and `slot_id`.
fn token_selector(
    label: Option<String>,
    serial: Option<String>,
    slot: Option<u64>,
    invalid: Invalid<'_>,
) -> Result<TokenSelector, ConfigError> {
    match (label, serial, slot) {
        (Some(label), None, None) if !label.is_empty() && label.len() <= 32 => {
            Ok(TokenSelector::Label(label))
        }
        (Some(label), None, None) => Err(invalid(
            "pkcs11.token_label",
            format!("must be 1 to 32 bytes, got {}", label.len()),
            "use the label the token was initialised with (softhsm2-util --show-slots lists them)",
        )),
        (None, Some(serial), None) if !serial.is_empty() && serial.len() <= 16 => {
            Ok(TokenSelector::Serial(serial))
        }
        (None, None, Some(slot)) => Ok(TokenSelector::Slot(slot)),
        _ => Err(invalid(
            "pkcs11.token_label",
            "exactly one of token_label, token_serial (1 to 16 characters) and slot_id must be set"
                .into(),
            "prefer token_label; use slot_id only where slots are fixed",
        )),
    }
}

/// Exactly one of `pin_file` and `pin_env`.
fn pin_source(
    file: Option<PathBuf>,
    env: Option<String>,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<PinSource, ConfigError> {
    match (file, env) {
        (Some(path), None) => Ok(PinSource::File(base.join(path))),
        (None, Some(var)) if !var.is_empty() => Ok(PinSource::Env(var)),
        (None, Some(_)) => Err(invalid(
            "pkcs11.pin_env",
            "is empty".into(),
            "name the environment variable that holds the PIN",
        )),
        (None, None) => Err(invalid(
            "pkcs11",
            "has neither pin_file nor pin_env".into(),
            "add pin_file = \"/run/secrets/hsm-pin\" or pin_env = \"GRANT_AGENT_PIN\"",
        )),
        (Some(_), Some(_)) => Err(invalid(
            "pkcs11",
            "has both pin_file and pin_env".into(),
            "keep exactly one of them",
        )),
    }
}

/// A PIN file others may read is refused at load, so `check` and `serve` fail before any
/// session opens. A file that cannot be examined yet is left to the read, which says why.
pub(super) fn refuse_exposed_pin_file(
    pkcs11: &Pkcs11Config,
    file: &str,
) -> Result<(), ConfigError> {
    let PinSource::File(path) = &pkcs11.pin else {
        return Ok(());
    };
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    match exposed_pin_file(path, &metadata) {
        None => Ok(()),
        Some(exposed) => Err(ConfigError::Invalid {
            file: file.to_owned(),
            key: "pkcs11.pin_file".to_owned(),
            problem: exposed.problem,
            fix: exposed.fix,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::pin_file_exposure;

    #[test]
    fn a_pin_file_is_open_to_its_owner_only_or_read_through_the_group() {
        let at = Path::new("/x/pin");
        let problem = |mode, owned| pin_file_exposure(at, mode, owned).map(|e| e.to_string());
        // The agent's own file: owner only, as ssh wants of a private key.
        assert_eq!(problem(0o100600, true), None);
        assert_eq!(problem(0o100400, true), None);
        assert_eq!(
            problem(0o100644, true).as_deref(),
            Some("/x/pin is readable by group or others (mode 0644); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100640, true).as_deref(),
            Some("/x/pin is readable by group or others (mode 0640); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100620, true).as_deref(),
            Some("/x/pin is writable by group or others (mode 0620); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100601, true).as_deref(),
            Some("/x/pin is executable by group or others (mode 0601); run: chmod 600 /x/pin")
        );
        // Another user's file (root:agent-group 0440, a Secret under fsGroup): read
        // through the group, nothing more.
        assert_eq!(problem(0o100440, false), None);
        assert_eq!(problem(0o100400, false), None);
        assert_eq!(
            problem(0o100444, false).as_deref(),
            Some("/x/pin is readable by group or others (mode 0444); run: chmod 440 /x/pin")
        );
        assert_eq!(
            problem(0o100460, false).as_deref(),
            Some("/x/pin is writable by group or others (mode 0460); run: chmod 440 /x/pin")
        );
    }
}
