//! The user PIN: where it comes from, and reading it without leaving copies or trusting a
//! file others may read. The PIN itself is never in the config file.

use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;

use super::HsmError;

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

impl std::fmt::Display for ExposedPinFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

/// Reads a PIN file, refusing one that group or others may read: checked on the open
/// file, so the file checked is the file read.
fn read_pin_file(path: &std::path::Path) -> Result<String, HsmError> {
    use std::io::Read;
    let failed =
        |e: std::io::Error| HsmError::PinSource(format!("pin_file {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let metadata = file.metadata().map_err(failed)?;
    if let Some(exposed) = exposed_pin_file(path, &metadata) {
        return Err(HsmError::PinSource(format!("pin_file {exposed}")));
    }
    // Sized up front, as fs::read_to_string does, so the PIN is not left behind in a
    // smaller buffer given back on growth.
    let mut pin = String::with_capacity(usize::try_from(metadata.len()).unwrap_or(0) + 1);
    if let Err(e) = file.read_to_string(&mut pin) {
        zeroize::Zeroize::zeroize(&mut pin);
        return Err(failed(e));
    }
    Ok(pin)
}

/// Reads the user PIN from its configured source into a zeroizing secret.
pub fn read_pin(source: &PinSource) -> Result<AuthPin, HsmError> {
    let mut pin = match source {
        PinSource::File(path) => read_pin_file(path)?,
        PinSource::Env(var) => std::env::var(var)
            .map_err(|_| HsmError::PinSource(format!("pin_env {var} is not set")))?,
    };
    if pin.ends_with('\n') {
        let _ = pin.pop();
        if pin.ends_with('\r') {
            let _ = pin.pop();
        }
    }
    // Copy into an exactly-sized box and wipe the original: converting the String itself
    // could reallocate and leave an unwiped copy in freed memory.
    let secret = (!pin.is_empty()).then(|| AuthPin::new(Box::from(pin.as_str())));
    zeroize::Zeroize::zeroize(&mut pin);
    secret.ok_or_else(|| HsmError::PinSource("the PIN is empty".into()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use cryptoki::types::AuthPin;

    use super::*;

    fn pin_file(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, "8765-4321\n").expect("pin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    fn read(path: &std::path::Path) -> Result<AuthPin, HsmError> {
        read_pin(&PinSource::File(path.to_owned()))
    }

    #[test]
    fn a_pin_file_group_or_others_may_read_is_refused_when_read() {
        let (_dir, path) = pin_file(0o644);
        let e = read(&path).expect_err("refused").to_string();
        assert_eq!(
            e,
            format!(
                "cannot read the user PIN: pin_file {p} is readable by group or others (mode 0644); run: chmod 600 {p}",
                p = path.display()
            )
        );
        assert!(!e.contains("8765"), "the PIN stays out of the error");
    }

    #[test]
    fn an_owner_only_pin_file_is_read() {
        for mode in [0o600, 0o400] {
            let (_dir, path) = pin_file(mode);
            assert!(read(&path).is_ok(), "mode {mode:o}");
        }
        let (_dir, path) = pin_file(0o600);
        std::fs::write(&path, "\n").expect("empty pin");
        let e = read(&path).expect_err("empty").to_string();
        assert_eq!(e, "cannot read the user PIN: the PIN is empty");
    }

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
