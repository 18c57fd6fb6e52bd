//! Generates the gRPC code from `proto/` with protox, so no `protoc` is needed.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/grantagent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Server reflection serves this descriptor set so grpcurl works without the .proto.
    fs::write(out.join("grantagent_descriptor.bin"), fds.encode_to_vec())?;
    // GrantParameters gets a Debug of its own (src/lib.rs) that keeps the pid out.
    tonic_prost_build::configure()
        .skip_debug(["grantagent.v1.GrantParameters"])
        .compile_fds(fds)?;

    // `grant-agent --version` says which commit and compiler built it, so an operator can
    // tell exactly what runs. A build outside a git checkout says "unknown".
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Without optional locks `git status` leaves the index alone: rewriting it here would
    // make the next build run this script, and relink the binary, again.
    let dirty = git(&[
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    ])
    .is_some_and(|s| !s.is_empty());
    let date = git(&["log", "-1", "--format=%cs"]).unwrap_or_else(|| "unknown".into());
    let rustc = std::process::Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "rustc unknown".into());
    println!(
        "cargo:rustc-env=GRANT_AGENT_BUILD_INFO=commit {commit}{} ({date}), {rustc}, {} {}",
        if dirty { "-dirty" } else { "" },
        env::var("PROFILE").unwrap_or_default(),
        env::var("TARGET").unwrap_or_default()
    );
    // Where git keeps them: `.git/` in a clone, elsewhere in a worktree (where a missing
    // path would run this script on every build).
    for file in ["HEAD", "index"] {
        let path =
            git(&["rev-parse", "--git-path", file]).unwrap_or_else(|| format!(".git/{file}"));
        println!("cargo:rerun-if-changed={path}");
    }
    Ok(())
}
