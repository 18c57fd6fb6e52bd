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

/// `openssl req -x509` in `dir`: a new unencrypted RSA-2048 key in `key` and a certificate
/// signed by it in `cert`, with `options` (subject, days, extensions).
pub(crate) fn self_signed(dir: &Path, key: &str, cert: &str, options: &[&str]) {
    let mut args = vec!["req", "-x509", "-newkey", "rsa:2048", "-nodes"];
    args.extend_from_slice(&["-keyout", key, "-out", cert]);
    args.extend_from_slice(options);
    let _ = openssl(dir, &args);
}
