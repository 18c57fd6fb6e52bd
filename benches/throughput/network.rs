//! (d) and (e): the agent on `fault-pkcs11`, the project's PKCS#11 module that wraps
//! SoftHSM and plays a network HSM (see `fault-pkcs11/src/lib.rs`).
//!
//! - **(d) a network HSM**: every `C_Sign` takes 2 ms on the appliance and the token
//!   allows 32 sessions, so the agent's pool gets 31 (it keeps one for its login). The
//!   appliance signs (`instant_sign` after the wait), so the agent's sessions are waiting,
//!   not computing, and the most any client can get is
//!   usable sessions / 2 ms. The step runs with `pkcs11.sessions` as docs/operations.md
//!   tells operators to set it for such a token (the cap minus one), and with the default
//!   for comparison; beside both, the same module signed on as many threads with no agent
//!   (what the module's own sleep allows).
//! - **(e) the agent's own ceiling**: `instant_sign`, a sign that costs nothing, so what is
//!   left is the agent's work per grant. SignGrant/s at saturation next to a bare
//!   `grpc.health.v1` check over the same number of connections, in turns.
//!
//! The module is not built from here (a bench must not run cargo): `cargo build --release
//! -p fault-pkcs11` puts it next to the agent's release binary. Without it, both steps are
//! skipped with that command on the line.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Call, RawSigner, Step, Verdict, command, measure, median, start};

/// The targets: signs/s over usable sessions / latency, and SignGrant/s over
/// health checks/s with a sign that costs nothing.
const NETWORK_TARGET: f64 = 0.95;
const CEILING_TARGET: f64 = 0.5;

/// The network HSM modelled in (d).
const SIGN_LATENCY_MS: u64 = 2;
const MAX_SESSIONS: usize = 32;
/// Requests in flight in (d): enough to keep 31 sessions busy with a queue behind them.
const NETWORK_CONCURRENCY: usize = 128;
/// Requests in flight in (e).
const CEILING_CONCURRENCY: usize = 64;

/// Where `cargo build [--release] -p fault-pkcs11` put the module: next to the agent's
/// binary first (the bench's own profile), then the other profile's folder.
fn fault_module() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_grant-agent"));
    let here = bin.parent()?;
    let candidates = [
        here.join("libfault_pkcs11.so"),
        here.parent()?.join("release/libfault_pkcs11.so"),
        here.parent()?.join("debug/libfault_pkcs11.so"),
    ];
    candidates.into_iter().find(|path| path.exists())
}

/// One agent serving on the fault module, with its own control file.
struct FaultAgent {
    child: std::process::Child,
    addr: String,
}

impl FaultAgent {
    /// Starts `grant-agent serve` on the bench's token through `module`, with `faults` in
    /// the control file and `extra` added to `[pkcs11]`.
    fn start(dir: &Path, module: &Path, name: &str, faults: &str, extra: &str) -> Self {
        let (config, control) = write_config(dir, module, name, faults, extra);
        let (child, addr) = start(
            command(env!("CARGO_BIN_EXE_grant-agent"))
                .args(["serve", "--config"])
                .arg(config)
                .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
                .env("FAULT_PKCS11_MODULE", softhsm())
                .env("FAULT_PKCS11_CONTROL", control),
        );
        FaultAgent { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FaultAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn softhsm() -> PathBuf {
    grant_agent::dev::softhsm_module().expect("SoftHSM")
}

/// The dev config with the fault module in SoftHSM's place; its path and the control file's.
fn write_config(
    dir: &Path,
    module: &Path,
    name: &str,
    faults: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let control = dir.join(format!("{name}.faults"));
    std::fs::write(&control, faults).expect("control file");
    let config = std::fs::read_to_string(dir.join("config.toml"))
        .expect("dev config")
        .replace(
            &format!("module = \"{}\"", softhsm().display()),
            &format!("module = \"{}\"{extra}", module.display()),
        );
    assert!(config.contains("libfault_pkcs11"), "{config}");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("fault config");
    (path, control)
}

/// Runs (d) and (e), adding their targets to `verdict`.
pub(super) fn run(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    seconds: u64,
    rounds: u64,
    verdict: &mut Verdict,
) {
    let Some(module) = fault_module() else {
        println!(
            "(d), (e): skipped: the fault module is not built; run `cargo build --release -p fault-pkcs11` first"
        );
        verdict.skip("network HSM (fault module not built: cargo build --release -p fault-pkcs11)");
        verdict
            .skip("agent ceiling (fault module not built: cargo build --release -p fault-pkcs11)");
        return;
    };
    let length = Duration::from_secs(seconds);
    network_hsm(runtime, dir, &module, length, rounds, verdict);
    ceiling(runtime, dir, &module, length, rounds, verdict);
}

/// (d): 2 ms a sign, 32 sessions.
fn network_hsm(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    module: &Path,
    length: Duration,
    rounds: u64,
    verdict: &mut Verdict,
) {
    // The appliance signs, not the agent's CPUs: a fixed signature after the round trip.
    let faults = format!(
        "sign_latency_ms = {SIGN_LATENCY_MS}\nmax_sessions = {MAX_SESSIONS}\ninstant_sign = true\n"
    );
    let usable = MAX_SESSIONS - 1;
    let ideal = usable as f64 * 1000.0 / SIGN_LATENCY_MS as f64;
    println!(
        "(d) a network HSM (fault-pkcs11 {}: {SIGN_LATENCY_MS} ms a sign, {MAX_SESSIONS} sessions, so {usable} usable), {NETWORK_CONCURRENCY} in flight; ideal {usable} / {SIGN_LATENCY_MS} ms = {ideal:.0}/s:",
        module.display()
    );
    // The module alone: raw C_Sign on `usable` threads, no agent.
    let mut raw = RawSigner::start_on(
        dir,
        module,
        &[
            ("FAULT_PKCS11_MODULE", softhsm().as_os_str()),
            (
                "FAULT_PKCS11_CONTROL",
                write_config(dir, module, "raw", &faults, "").1.as_os_str(),
            ),
        ],
        usable,
    );
    let recommended = FaultAgent::start(
        dir,
        module,
        "network",
        &faults,
        &format!("\nsessions = {usable}"),
    );
    let default = FaultAgent::start(dir, module, "network-default", &faults, "");
    // In turns, so that drift falls on every column alike.
    let (mut raw_rates, mut ratios, mut default_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut last: Option<Step> = None;
    for _ in 0..rounds {
        raw_rates.push(raw.rate(length) / ideal);
        let step = measure(
            runtime,
            &recommended.addr,
            recommended.pid(),
            NETWORK_CONCURRENCY,
            length,
            Call::Sign,
        );
        ratios.push(step.rate / ideal);
        let eight = measure(
            runtime,
            &default.addr,
            default.pid(),
            NETWORK_CONCURRENCY,
            length,
            Call::Sign,
        );
        default_ratios.push(eight.rate / ideal);
        last = Some(step);
    }
    drop(raw);
    let list = |values: &[f64]| {
        values
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "    raw C_Sign through the module on {usable} threads: median {:.3} of ideal, rounds {} (the module's own sleep and wake-up)",
        median(&raw_rates),
        list(&raw_rates)
    );
    let ratio = median(&ratios);
    if let Some(step) = &last {
        println!(
            "    SignGrant, pkcs11.sessions = {usable} (docs/operations.md): median {:.0}/s, {ratio:.3} of ideal, rounds {} (target >= {NETWORK_TARGET:.2}); last round p50 {:.0} µs, p99 {:.0} µs, agent CPU {:.0} µs a grant",
            ratio * ideal,
            list(&ratios),
            step.p50,
            step.p99,
            step.agent_us
        );
    }
    let sessions = grant_agent::config::default_sessions().min(usable);
    let share = sessions as f64 / usable as f64;
    let own: Vec<f64> = default_ratios.iter().map(|r| r / share).collect();
    println!(
        "    SignGrant, default sessions ({sessions}): median {:.3} of ideal, rounds {}; {:.3} of its own ideal ({sessions} / {SIGN_LATENCY_MS} ms)",
        median(&default_ratios),
        list(&default_ratios),
        median(&own),
    );
    verdict.add(
        ratio >= NETWORK_TARGET,
        format!(
            "network HSM: {:.0} signs/s, {ratio:.3} of {usable} sessions / {SIGN_LATENCY_MS} ms (>= {NETWORK_TARGET:.2})",
            ratio * ideal
        ),
    );
}

/// (e): a sign that costs nothing; SignGrant against a bare health check, in turns.
fn ceiling(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    module: &Path,
    length: Duration,
    rounds: u64,
    verdict: &mut Verdict,
) {
    let agent = FaultAgent::start(dir, module, "instant", "instant_sign = true\n", "");
    println!(
        "(e) the agent's own ceiling (fault-pkcs11 instant_sign: a fixed signature, no token work; default sessions), {CEILING_CONCURRENCY} in flight, in turns with a grpc.health.v1 check over as many connections:"
    );
    println!(
        "    round   SignGrant/s   health/s   ratio   agent CPU µs: grant   health   load generator CPU µs: grant   health"
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let sign = measure(
            runtime,
            &agent.addr,
            agent.pid(),
            CEILING_CONCURRENCY,
            length,
            Call::Sign,
        );
        let health = measure(
            runtime,
            &agent.addr,
            agent.pid(),
            CEILING_CONCURRENCY,
            length,
            Call::Health,
        );
        let ratio = sign.rate / health.rate;
        ratios.push(ratio);
        println!(
            "    {round:>5}   {:>11.0}   {:>8.0}   {ratio:>5.3}   {:>19.1}   {:>6.1}   {:>28.1}   {:>6.1}",
            sign.rate,
            health.rate,
            sign.agent_us,
            health.agent_us,
            sign.client_us,
            health.client_us
        );
    }
    let ratio = median(&ratios);
    println!("    median SignGrant/health {ratio:.3} (target >= {CEILING_TARGET:.2})");
    verdict.add(
        ratio >= CEILING_TARGET,
        format!(
            "agent ceiling: SignGrant/s {ratio:.3} of health checks/s (>= {CEILING_TARGET:.2})"
        ),
    );
}
