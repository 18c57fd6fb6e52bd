//! `[pkcs11]`: the module, the token, the PIN and the session pool.
//!
//! The PIN itself is never in the file: it comes from a file (whose permissions are
//! checked at load, as ssh checks a private key's) or an environment variable.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Invalid, within};
pub(crate) use crate::hsm::TokenSelector;
use crate::hsm::exposed_pin_file;
pub use crate::hsm::{PinSource, Pkcs11Config};

/// Most sessions a pool may open; more buys nothing on any token we know of.
const MAX_SESSIONS: usize = 256;

/// Requests that may wait for a PKCS#11 session before more are refused.
pub(crate) const DEFAULT_QUEUE: usize = 1024;

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
