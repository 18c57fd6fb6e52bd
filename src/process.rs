//! Process hardening: what the agent does to its own process before it reads a config or
//! a PIN, and the open files limit it serves with.
//!
//! - **Not dumpable** (`prctl(PR_SET_DUMPABLE, 0)`): the agent holds the token PIN and a
//!   logged-in session. A non-dumpable process cannot be ptraced, and its
//!   `/proc/PID/mem`, `environ` and `fd` cannot be read, by other processes of the same
//!   user (only with `CAP_SYS_PTRACE`); the kernel makes its `/proc/PID` files root-owned.
//! - **No core files** (`RLIMIT_CORE` 0, soft and hard): a crash does not write the
//!   process's memory, PIN included, to disk. The hard limit goes to 0 too, so nothing
//!   later in the process (a PKCS#11 module, say) can raise it again.
//! - **Open files** ([`raise_open_files_limit`], at the start of `serve` and `dev`): the
//!   soft `RLIMIT_NOFILE` is raised to the hard limit, as every connection costs a
//!   descriptor; `open_files_limit` is the figure the server sizes its connection cap
//!   from.
//!
//! [`harden`] runs first thing in `main`, for every subcommand (key import reads PKCS#12
//! passwords too). If it fails the agent exits instead of warning: on Linux neither call
//! needs a privilege, so a failure means a sandbox refused them, and an agent that would
//! otherwise run dumpable with the PIN in memory should not start unnoticed. Failing to
//! raise the open files limit only warns: the agent still works, with the lower limit.
//!
//! Everything goes through `rustix`; the crate forbids `unsafe`.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// A hardening step the kernel refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardeningError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE 0): {0}")]
    Dumpable(#[source] std::io::Error),
    /// Setting `RLIMIT_CORE` to 0 failed.
    #[error("cannot set the core file size limit to 0 (setrlimit RLIMIT_CORE): {0}")]
    CoreLimit(#[source] std::io::Error),
    /// Raising the soft `RLIMIT_NOFILE` to the hard limit failed.
    #[error(
        "cannot raise the open files limit from {from} to the hard limit {to} (setrlimit RLIMIT_NOFILE): {source}"
    )]
    OpenFiles {
        /// The soft limit, which stays.
        from: u64,
        /// The hard limit.
        to: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Makes the process non-dumpable and sets its core file size limit to 0 (soft and hard).
/// Call it first thing in `main`, before any secret is read.
pub fn harden() -> Result<(), HardeningError> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError::Dumpable(e.into()))?;
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardeningError::CoreLimit(e.into()))
}

/// The open files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit the process started with.
    pub from: u64,
    /// The soft limit now: the hard limit.
    pub to: u64,
}

/// Raises the soft open files limit to the hard limit; the figures before and after.
pub fn raise_open_files_limit() -> Result<OpenFilesLimit, HardeningError> {
    let limit = getrlimit(Resource::Nofile);
    let from = figure(limit.current);
    // The hard limit of open files is never unlimited on Linux (it is capped by
    // fs.nr_open); if a platform says it is, the soft limit stays as it is.
    if let Some(hard) = limit.maximum
        && limit.current != Some(hard)
    {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        )
        .map_err(|e| HardeningError::OpenFiles {
            from,
            to: hard,
            source: e.into(),
        })?;
    }
    Ok(OpenFilesLimit {
        from,
        to: open_files_limit(),
    })
}

/// The current soft limit of open files (`RLIMIT_NOFILE`), which bounds how many
/// connections the server can hold; `u64::MAX` if unlimited.
pub(crate) fn open_files_limit() -> u64 {
    figure(getrlimit(Resource::Nofile).current)
}

/// A limit as a number, unlimited as `u64::MAX`.
fn figure(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_is_the_largest_figure() {
        assert_eq!(figure(None), u64::MAX);
        assert_eq!(figure(Some(1024)), 1024);
    }

    #[test]
    fn the_open_files_limit_is_the_soft_limit() {
        assert_eq!(
            open_files_limit(),
            figure(getrlimit(Resource::Nofile).current)
        );
    }
}
