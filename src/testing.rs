//! Helpers shared by the unit tests of several modules.

use std::{path::Path, process::Command};

/// Runs `openssl` in `dir`; a missing `openssl` fails the test, it does not skip it.
pub(crate) fn run_openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}); these tests make their fixtures with it. \
                 Install it with `sudo apt-get install -y openssl`"
            )
        })
}

/// Runs `openssl` in `dir` and returns its standard output; it must succeed.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let output = run_openssl(dir, args);
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}
