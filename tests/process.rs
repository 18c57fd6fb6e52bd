//! Process hardening, seen from outside as the kernel reports it: the agent's core file
//! limit, whether other processes of its user may look inside it, and the open files
//! limit it serves with. Each test starts the real binary as a child.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{BIN, read, require_softhsm};

/// The unprivileged user the dumpable check runs the agent and its neighbour as.
const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// A child killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// A line of `/proc/PID/limits`, e.g. "Max core file size", as (soft, hard).
    fn limit(&self, name: &str) -> (String, String) {
        let limits = read(Path::new(&format!("/proc/{}/limits", self.pid())));
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} in\n{limits}"));
        let mut figures = line[name.len()..].split_whitespace();
        let mut next = || figures.next().expect("figure").to_owned();
        (next(), next())
    }
}

/// Starts `command` and waits up to 60 s for a `: listening on` line on its stdout; its
/// stderr goes to `log`.
fn start(mut command: Command, log: &Path) -> Running {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = Running(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let _reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(": listening on ") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        panic!("did not start within 60 s; its log:\n{}", read(log));
    }
    child
}

/// `grant-agent dev` on its own SoftHSM token in `dir/state`, owned by `owner` (uid and
/// gid), in a folder any user may read; `wrapper` (e.g. `setpriv ...`, `prlimit ...`)
/// runs it.
fn dev_agent(dir: &Path, owner: u32, wrapper: &[&str]) -> Running {
    require_softhsm();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(owner), Some(owner)).expect("chown state dir");
    let mut command = Command::new(wrapper[0]);
    let _ = command
        .args(&wrapper[1..])
        .args([BIN, "dev", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env_remove("SOFTHSM2_CONF");
    start(command, &dir.join("agent.log"))
}

#[test]
fn no_core_files_even_when_started_with_an_unlimited_core_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uid = rustix::process::geteuid().as_raw();
    let agent = dev_agent(dir.path(), uid, &["prlimit", "--core=unlimited:unlimited"]);
    assert_eq!(agent.limit("Max core file size"), ("0".into(), "0".into()));
}

#[test]
fn processes_of_the_same_user_cannot_look_inside_the_agent() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs the agent as another user, so it runs as root"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut setpriv = vec!["setpriv"];
    setpriv.extend(NOBODY);
    let agent = dev_agent(dir.path(), 65534, &setpriv);
    // A control: another process of that user, dumpable, owns its /proc files.
    let neighbour = Running(
        Command::new("setpriv")
            .args(NOBODY)
            .args(["sleep", "60"])
            .spawn()
            .expect("sleep"),
    );
    std::thread::sleep(Duration::from_millis(200));
    let owner = |pid: u32| {
        std::fs::metadata(format!("/proc/{pid}/status"))
            .expect("status")
            .uid()
    };
    assert_eq!(owner(neighbour.pid()), 65534, "setpriv changed the user");
    assert_eq!(
        owner(agent.pid()),
        0,
        "a non-dumpable process's /proc files are root's"
    );
    // And so its neighbour, same user, cannot read its environment (nor its memory).
    let peek = Command::new("setpriv")
        .args(NOBODY)
        .args(["cat", &format!("/proc/{}/environ", agent.pid())])
        .output()
        .expect("cat");
    assert!(!peek.status.success());
    assert!(
        String::from_utf8_lossy(&peek.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&peek.stderr)
    );
    let peek = Command::new("setpriv")
        .args(NOBODY)
        .args(["cat", &format!("/proc/{}/environ", neighbour.pid())])
        .output()
        .expect("cat");
    assert!(peek.status.success(), "the control is readable");
}

#[test]
fn serving_raises_the_open_files_limit_to_the_hard_limit() {
    require_softhsm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new("prlimit");
    let _ = command
        .args(["--nofile=256:4096", BIN, "dev", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("SOFTHSM2_CONF")
        .env("RUST_LOG", "info");
    let log = dir.path().join("agent.log");
    let agent = start(command, &log);
    assert_eq!(
        agent.limit("Max open files"),
        ("4096".into(), "4096".into())
    );
    assert!(
        read(&log).contains("open files limit raised from 256 to 4096"),
        "{}",
        read(&log)
    );
    // And no core files here either: the hardening runs again after dev re-executes.
    assert_eq!(agent.limit("Max core file size"), ("0".into(), "0".into()));
}
