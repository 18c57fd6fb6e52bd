//! Signing throughput and latency, measured in one run on one fresh SoftHSM token:
//! (a) raw PKCS#11 C_Sign/s with the agent's key and session count, (b) SignGrant
//! grants/s and p50/p99 latency through gRPC at concurrency 1, 4, 16 and 64, the ratio
//! (b)/(a) at saturation, (c) cached GetAccessToken requests/s (against the local
//! Maskinporten; build it first: `cargo build --release -p mock-maskinporten`), the
//! agent's peak RSS, and its RSS across a soak.
//! Beside (b), the transport alone: a health check over the same connections. On
//! `fault-pkcs11` (build it first: `cargo build --release -p fault-pkcs11`), (d) a
//! network HSM (2 ms a sign, 32 sessions) against usable sessions / latency, and (e) the
//! agent's own ceiling (a sign that costs nothing) against a bare health check.
//!
//! `cargo bench --bench throughput`. Environment: `BENCH_SECONDS` per step (default 5),
//! `BENCH_ROUNDS` of raw and agent steps taken in turn for the targets (default 5),
//! `BENCH_SOAK` requests in the soak (default 200000; 0 skips it), and
//! `BENCH_CPU_DMA_LATENCY` (µs, needs root) to hold that PM QoS request during the run.
//! `BENCH_AGENT_CPUS` and `BENCH_CLIENT_CPUS` (CPU lists as taskset takes them, such as
//! `0` and `1`, or `0-1` and `2-3`) run the agent and the raw baseline on the first CPUs
//! and the load generator on the second, so the client no longer takes the agent's time.
//!
//! `BENCH_ONLY=network` runs (d) and (e) alone (see `throughput/network.rs`), and
//! `BENCH_ONLY=tokens` runs (c) alone, with its rounds against a health check.
//!
//! The machine is noisy, so the figures that matter are ratios to the baseline measured in
//! the same run, not absolute numbers.
//! The run ends on a verdict, target by target, for that run's placement and idle settings.

#![allow(
    clippy::expect_used,
    reason = "a benchmark that cannot go on should stop loudly"
)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use grant_agent::proto::{
    GetAccessTokenRequest, GrantParameters, SignGrantRequest, grant_agent_client::GrantAgentClient,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[path = "throughput/http.rs"]
mod http_json;
#[path = "throughput/network.rs"]
mod network;

const RAW_MODE: &str = "GRANT_AGENT_BENCH_RAW";
/// The raw baseline's module and thread count, when not SoftHSM with the agent's default.
const RAW_MODULE: &str = "GRANT_AGENT_BENCH_RAW_MODULE";
const RAW_SESSIONS: &str = "GRANT_AGENT_BENCH_RAW_SESSIONS";

/// Failed requests over the whole run: figures from a run with failures are not valid, so
/// the bench then exits non-zero (CI runs it briefly to keep it working).
static FAILED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The targets: (b)/(a) at saturation, p50 at concurrency 1 over one raw sign,
/// and the agent's RSS.
const SATURATION_TARGET: f64 = 0.90;
const LATENCY_TARGET_US: f64 = 200.0;
const RSS_TARGET_MIB: f64 = 50.0;

/// How much the soak may grow the agent's RSS after its first tenth before it counts as a leak.
const SOAK_GROWTH_MIB: f64 = 1.0;

/// `BENCH_AGENT_CPUS`, when the run is pinned: every process the bench starts runs there.
static AGENT_CPUS: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn main() {
    if let Ok(dir) = std::env::var(RAW_MODE) {
        raw(Path::new(&dir));
        return;
    }
    if grant_agent::dev::softhsm_module().is_err() {
        eprintln!(
            "SoftHSM2 is required: sudo apt-get install -y softhsm2 (or bash softhsm/setup.sh)"
        );
        std::process::exit(1);
    }
    let placement = pin();
    // Held until the bench ends; the first line shows it.
    let _latency_request = std::env::var("BENCH_CPU_DMA_LATENCY")
        .ok()
        .map(|us| hold_cpu_dma_latency(&us));
    let seconds: u64 = env_number("BENCH_SECONDS", 5);
    let soak: u64 = env_number("BENCH_SOAK", 200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut agent, addr) = start_agent(dir.path());
    let pid = agent.id();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only == "network" || only == "tokens" {
        // (d) and (e), or (c), alone, for work on the agent's hot path.
        let setting = format!(
            "{}; {}",
            placement
                .as_deref()
                .unwrap_or("agent and load generator share the cores"),
            idle_driver()
        );
        println!("grant-agent, BENCH_ONLY={only}, {seconds} s per step; {setting}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut verdict = Verdict::default();
        let rounds = env_number("BENCH_ROUNDS", 5).max(1);
        if only == "network" {
            network::run(&runtime, dir.path(), seconds, rounds, &mut verdict);
        } else {
            let steps = Steps {
                seconds,
                rounds,
                raw_rate: None,
            };
            cached_tokens(&runtime, dir.path(), &addr, &steps, &mut verdict);
        }
        verdict.print(&setting);
        let _ = agent.kill();
        let _ = agent.wait();
        return;
    }

    // (a) The baseline: the token's own signing rate, without the agent, in a child
    // process that stays up for the whole run so that it can be asked again between steps.
    // It runs where the agent runs, so it reports the agent's cores and session count.
    let mut raw = RawSigner::start(dir.path());
    let (sessions, cores) = (raw.sessions, raw.cores);
    // Where the run ran and how idle CPUs behave: on the first line, and again on the verdict.
    let setting = format!(
        "{}; {}",
        placement
            .as_deref()
            .unwrap_or("agent and load generator share the cores"),
        idle_driver()
    );
    println!(
        "grant-agent throughput on SoftHSM RSA-2048, {sessions} sessions, {seconds} s per step; {setting}"
    );
    let length = Duration::from_secs(seconds);
    let before = raw.rate(length);
    let single = raw.single(length / 2);
    let paced = raw.paced(length / 2);
    println!(
        "(a) raw C_Sign: {before:.0}/s on {sessions} sessions, {cores} cores ({:.0} µs of CPU each); one sign p50 {single:.0} µs back to back, {paced:.0} µs with pauses between",
        cores as f64 / before * 1e6,
    );

    // (b) Through the agent.
    // Unless pinned apart, the load generator shares the cores with the agent and the
    // token: one thread, no work stealing, so it takes as little from them as a lean
    // client (wrk, ghz) would.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for concurrency in [1_usize, 4, 16, 64] {
        let step = measure(&runtime, &addr, pid, concurrency, length, Call::Sign);
        rows.push((concurrency, step));
    }
    // The transport's floor, measured the same way: a round trip with nothing behind it.
    let health_1 = measure(&runtime, &addr, pid, 1, length, Call::Health);
    let health_16 = measure(&runtime, &addr, pid, 16, length, Call::Health);
    let after = raw.rate(length);
    let raw_rate = (before + after) / 2.0;
    println!(
        "    raw C_Sign again after (b): {after:.0}/s; the sweep's ratios are to the mean, {raw_rate:.0}/s"
    );
    println!(
        "(b) SignGrant over gRPC, and the transport alone (grpc.health.v1 Check, same connections):"
    );
    println!(
        "    call     concurrency   per second   ratio to (a)   p50 µs   p99 µs   errors   CPU µs/call: agent   load generator"
    );
    let calls = rows
        .iter()
        .map(|(concurrency, step)| ("grant", *concurrency, step))
        .chain([("health", 1, &health_1), ("health", 16, &health_16)]);
    for (call, concurrency, step) in calls {
        println!(
            "    {call:<6}   {concurrency:>11}   {:>10.0}   {:>12.3}   {:>6.0}   {:>6.0}   {:>6}   {:>18.0}   {:>14.0}",
            step.rate,
            step.rate / raw_rate,
            step.p50,
            step.p99,
            step.errors,
            step.agent_us,
            step.client_us,
        );
    }

    // The targets, from raw and agent steps taken in turns, so that the machine's drift
    // (10–20 % within minutes) falls on both sides of each ratio alike.
    let saturated = rows
        .iter()
        .max_by(|a, b| a.1.rate.total_cmp(&b.1.rate))
        .map_or(64, |(concurrency, _)| *concurrency);
    let rounds = env_number("BENCH_ROUNDS", 5).max(1);
    let short = Duration::from_secs(seconds.div_ceil(2));
    let (mut ratios, mut over, mut over_paced) = (Vec::new(), Vec::new(), Vec::new());
    // Means over the rounds at saturation: raw signs/s, and CPU µs per grant.
    let (mut raw_mean, mut agent_us, mut client_us) = (0.0, 0.0, 0.0);
    for _ in 0..rounds {
        let (raw_single, raw_paced) = (raw.single(short), raw.paced(short));
        let one = measure(&runtime, &addr, pid, 1, short, Call::Sign);
        over.push(one.p50 - raw_single);
        over_paced.push(one.p50 - raw_paced);
        let raw_rate = raw.rate(short);
        let busy = measure(&runtime, &addr, pid, saturated, short, Call::Sign);
        ratios.push(busy.rate / raw_rate);
        raw_mean += raw_rate / rounds as f64;
        agent_us += busy.agent_us / rounds as f64;
        client_us += busy.client_us / rounds as f64;
    }
    let list = |values: &[f64], format: fn(f64) -> String| {
        values
            .iter()
            .map(|v| format(*v))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "targets, from raw and agent steps taken in turn (rounds: {rounds}, {} s per step):",
        short.as_secs()
    );
    let mut verdict = Verdict::default();
    let saturation = median(&ratios);
    println!(
        "    saturation ratio (b)/(a) at concurrency {saturated}: median {saturation:.3}, rounds {} (target >= {SATURATION_TARGET:.2})",
        list(&ratios, |v| format!("{v:.3}"))
    );
    verdict.add(
        saturation >= SATURATION_TARGET,
        format!("saturation ratio (b)/(a) {saturation:.3} (>= {SATURATION_TARGET:.2})"),
    );
    // With every core busy, the rate is the cores' time divided by the CPU each grant
    // takes there: the agent's (which includes the sign), plus the load generator's when
    // it shares the cores.
    let sign_cpu = cores as f64 / raw_mean * 1e6;
    let (cost, floor, sharing) = if placement.is_some() {
        (
            agent_us,
            health_16.agent_us,
            "the load generator runs elsewhere",
        )
    } else {
        (
            agent_us + client_us,
            health_16.agent_us + health_16.client_us,
            "both on these cores",
        )
    };
    println!(
        "    CPU per grant there: agent {agent_us:.0} µs (of which one sign {sign_cpu:.0} µs), load generator {client_us:.0} µs ({sharing}), so the cores allow at most {:.3} of raw; the transport alone, {floor:.0} µs, allows {:.3}",
        sign_cpu / cost,
        sign_cpu / (sign_cpu + floor),
    );
    let above = median(&over);
    println!(
        "    p50 at concurrency 1 minus one raw sign: median {above:.0} µs, rounds {} (target <= {LATENCY_TARGET_US:.0} µs); a bare round trip alone takes {:.0} µs",
        list(&over, |v| format!("{v:.0}")),
        health_1.p50
    );
    verdict.add(
        above <= LATENCY_TARGET_US,
        format!(
            "p50 at concurrency 1, {above:+.0} µs over one raw sign (<= +{LATENCY_TARGET_US:.0} µs; a bare round trip took {:.0} µs of that)",
            health_1.p50
        ),
    );
    println!(
        "    the same minus one raw sign after a 0.4 ms pause, as the agent's signing thread meets a request at concurrency 1: median {:.0} µs",
        median(&over_paced),
    );
    let (rss, hwm) = memory(pid);
    println!(
        "    agent RSS {:.1} MiB, peak {:.1} MiB (target < {RSS_TARGET_MIB:.0} MiB)",
        rss, hwm
    );
    verdict.add(
        hwm < RSS_TARGET_MIB,
        format!("peak RSS {hwm:.1} MiB so far (< {RSS_TARGET_MIB:.0} MiB)"),
    );
    let steps = Steps {
        seconds,
        rounds,
        raw_rate: Some(raw_rate),
    };
    cached_tokens(&runtime, dir.path(), &addr, &steps, &mut verdict);
    network::run(
        &runtime,
        dir.path(),
        seconds.div_ceil(2),
        rounds,
        &mut verdict,
    );

    if soak > 0 {
        // In tenths, so that growth and a plateau can be told apart.
        let before = memory(pid).0;
        let tenth = (soak / 10).max(1);
        let (mut requests, mut errors, mut seconds) = (0, 0, 0.0);
        let mut trail = Vec::new();
        while requests < soak as usize {
            let run = runtime.block_on(load(
                &addr,
                16,
                Duration::from_secs(3600),
                Some(tenth as usize),
                Call::Sign,
            ));
            requests += run.latencies.len() + run.errors;
            errors += run.errors;
            seconds += run.elapsed.as_secs_f64();
            trail.push(memory(pid).0);
        }
        let after = memory(pid);
        println!(
            "soak: {requests} requests in {seconds:.0} s ({errors} errors); RSS {before:.1} MiB before, {:.1} MiB after (peak {:.1} MiB)",
            after.0, after.1
        );
        println!(
            "    RSS after each tenth, MiB: {}",
            list(&trail, |v| format!("{v:.1}"))
        );
        // The first tenth warms the allocator and the metrics' label sets; a leak shows
        // as growth after it. 1 MiB over 200,000 requests is about 5 bytes a request.
        let growth = after.0 - trail.first().copied().unwrap_or(before);
        verdict.add(
            errors == 0 && growth <= SOAK_GROWTH_MIB && after.1 < RSS_TARGET_MIB,
            format!(
                "soak: RSS {growth:+.1} MiB after the first tenth, peak {:.1} MiB, {errors} errors (growth <= {SOAK_GROWTH_MIB} MiB, peak < {RSS_TARGET_MIB:.0} MiB, no errors)",
                after.1
            ),
        );
    } else {
        verdict.skip("soak (BENCH_SOAK=0)");
    }
    verdict.print(&setting);
    let _ = agent.kill();
    let _ = agent.wait();
    let failed = FAILED.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        eprintln!("{failed} requests failed: the figures above are not valid");
        std::process::exit(1);
    }
}

/// (c): a second agent on the same token whose `mock` environment is a local
/// Maskinporten; after one exchange fills the cache, every request is a cache hit.
/// How long the steps of (c) run, and (a)'s rate when it was measured.
struct Steps {
    seconds: u64,
    rounds: u64,
    raw_rate: Option<f64>,
}

/// The target for cached GetAccessToken against a bare health check.
const CACHED_TARGET: f64 = 0.80;
/// The target for the cached token over HTTP/JSON against the same over gRPC.
const HTTP_TARGET: f64 = 0.80;
/// In flight for the cached-token rounds against the health check.
const CACHED_CONCURRENCY: usize = 64;

fn cached_tokens(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    signer: &str,
    steps: &Steps,
    verdict: &mut Verdict,
) {
    let seconds = steps.seconds;
    // The dev certificate, from a grant's x5c, is the mock's trust anchor.
    let grant = runtime.block_on(async {
        grant_agent::client::connect(signer, None)
            .await
            .expect("connect")
            .sign_grant(SignGrantRequest {
                grant: Some(grant_parameters()),
            })
            .await
            .expect("grant")
            .into_inner()
            .assertion
    });
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(
        &b64.decode(grant.split('.').next().expect("header"))
            .expect("base64url"),
    )
    .expect("header JSON");
    let leaf = base64::engine::general_purpose::STANDARD
        .decode(header["x5c"][0].as_str().expect("x5c"))
        .expect("x5c is base64");
    let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &leaf).expect("PEM");
    std::fs::write(dir.join("dev-cert.pem"), pem).expect("anchor");
    std::fs::write(
        dir.join("mock.toml"),
        format!(
            "ca = \"{}\"\n[[clients]]\nclient_id = \"{CLIENT_ID}\"\nscopes = [\"nav:aareg/v1/arbeidsforhold\"]\n",
            dir.join("dev-cert.pem").display()
        ),
    )
    .expect("mock config");
    let (mut mock, mock_url) = start(
        command(mock_bin())
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(dir.join("mock.toml")),
    );
    let config = std::fs::read_to_string(dir.join("config.toml")).expect("dev config")
        + &format!(
            "\n[environments.mock]\nissuer = \"{mock_url}\"\ndiscover = true\ncertificates = \"test\"\n"
        );
    std::fs::write(dir.join("tokens.toml"), config).expect("agent config");
    let (mut agent, addr) = start(
        command(env!("CARGO_BIN_EXE_grant-agent"))
            .args(["serve", "--config"])
            .arg(dir.join("tokens.toml"))
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf")),
    );
    println!(
        "(c) cached GetAccessToken over gRPC (one exchange at a local Maskinporten fills the cache):"
    );
    println!("    concurrency   requests/s   ratio to (a)   p50 µs   p99 µs   errors");
    for concurrency in [1_usize, 16] {
        let step = measure(
            runtime,
            &addr,
            agent.id(),
            concurrency,
            Duration::from_secs(seconds),
            Call::CachedToken,
        );
        println!(
            "    {concurrency:>11}   {:>10.0}   {:>12}   {:>6.0}   {:>6.0}   {:>6}",
            step.rate,
            steps
                .raw_rate
                .map_or_else(|| "-".to_owned(), |raw| format!("{:.2}", step.rate / raw)),
            step.p50,
            step.p99,
            step.errors
        );
    }
    // The figure: cached answers against a bare health check, in turns, so that
    // the machine's drift falls on both alike. The audit is as configured by default
    // (cached answers summarised, not written one by one).
    println!(
        "    in turns with a grpc.health.v1 check, {CACHED_CONCURRENCY} in flight over as many connections:"
    );
    println!(
        "    round   tokens/s   health/s   ratio   HTTP tokens/s   HTTP/gRPC   agent CPU µs: token   health   HTTP token"
    );
    let length = Duration::from_millis(seconds * 1000 / 3).max(Duration::from_millis(500));
    let mut ratios = Vec::new();
    let mut http_ratios = Vec::new();
    for round in 1..=steps.rounds {
        let tokens = measure(
            runtime,
            &addr,
            agent.id(),
            CACHED_CONCURRENCY,
            length,
            Call::CachedToken,
        );
        let health = measure(
            runtime,
            &addr,
            agent.id(),
            CACHED_CONCURRENCY,
            length,
            Call::Health,
        );
        let json = measure(
            runtime,
            &addr,
            agent.id(),
            CACHED_CONCURRENCY,
            length,
            Call::HttpCachedToken,
        );
        let ratio = tokens.rate / health.rate;
        ratios.push(ratio);
        let http_ratio = json.rate / tokens.rate;
        http_ratios.push(http_ratio);
        println!(
            "    {round:>5}   {:>8.0}   {:>8.0}   {ratio:>5.3}   {:>13.0}   {http_ratio:>9.3}   {:>19.1}   {:>6.1}   {:>10.1}",
            tokens.rate, health.rate, json.rate, tokens.agent_us, health.agent_us, json.agent_us
        );
    }
    let ratio = median(&ratios);
    println!("    median cached tokens/health {ratio:.3} (target >= {CACHED_TARGET:.2})");
    verdict.add(
        ratio >= CACHED_TARGET,
        format!("cached GetAccessToken: {ratio:.3} of health checks/s (>= {CACHED_TARGET:.2})"),
    );
    let http_ratio = median(&http_ratios);
    println!(
        "    median HTTP/JSON cached tokens / gRPC cached tokens {http_ratio:.3} (target >= {HTTP_TARGET:.2})"
    );
    verdict.add(
        http_ratio >= HTTP_TARGET,
        format!(
            "cached token over HTTP/JSON: {http_ratio:.3} of the gRPC rate (>= {HTTP_TARGET:.2})"
        ),
    );
    for child in [&mut agent, &mut mock] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where `cargo build [--release] -p mock-maskinporten` put the local Maskinporten: next
/// to the agent's binary first (the bench's own profile), then the other profile's folder.
fn mock_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_grant-agent"));
    let here = bin.parent().expect("target folder");
    let target = here.parent().expect("target folder");
    [
        here.join("mock-maskinporten"),
        target.join("release/mock-maskinporten"),
        target.join("debug/mock-maskinporten"),
    ]
    .into_iter()
    .find(|path| path.exists())
    .unwrap_or_else(|| {
        panic!(
            "no mock-maskinporten next to {}: run `cargo build --release -p mock-maskinporten`",
            bin.display()
        )
    })
}

const CLIENT_ID: &str = "0a3b5c7d-1111-2222-3333-444455556666";

fn grant_parameters() -> GrantParameters {
    GrantParameters {
        client_id: CLIENT_ID.into(),
        scopes: vec!["nav:aareg/v1/arbeidsforhold".into()],
        environment: "test".into(),
        ..GrantParameters::default()
    }
}

/// One load step's figures.
struct Step {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: usize,
    /// CPU per request in the agent and in this process (the load generator), in µs.
    agent_us: f64,
    client_us: f64,
}

/// The targets, met or missed in this run, printed last so that a run ends on its
/// answer. Misses do not fail the bench: on a shared machine they are figures, not faults.
#[derive(Default)]
struct Verdict(Vec<(Option<bool>, String)>);

impl Verdict {
    fn add(&mut self, met: bool, what: String) {
        self.0.push((Some(met), what));
    }

    fn skip(&mut self, what: &str) {
        self.0.push((None, what.to_owned()));
    }

    fn print(&self, setting: &str) {
        let count = |wanted: bool| {
            self.0
                .iter()
                .filter(|(met, _)| *met == Some(wanted))
                .count()
        };
        let (met, missed) = (count(true), count(false));
        println!(
            "verdict: {met} of {} targets met ({setting}):",
            met + missed
        );
        for (met, what) in &self.0 {
            let word = match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not run",
            };
            println!("    {word:<8}  {what}");
        }
    }
}

/// Runs one step of `concurrency` callers for `duration` against the agent `pid` at `addr`.
fn measure(
    runtime: &tokio::runtime::Runtime,
    addr: &str,
    pid: u32,
    concurrency: usize,
    duration: Duration,
    call: Call,
) -> Step {
    let me = std::process::id();
    let (agent_before, client_before) = (cpu_seconds(pid), cpu_seconds(me));
    let run = runtime.block_on(load(addr, concurrency, duration, None, call));
    let per_request = |seconds: f64| seconds / run.latencies.len().max(1) as f64 * 1e6;
    Step {
        rate: run.latencies.len() as f64 / run.elapsed.as_secs_f64(),
        p50: percentile(&run.latencies, 0.50),
        p99: percentile(&run.latencies, 0.99),
        errors: run.errors,
        agent_us: per_request(cpu_seconds(pid) - agent_before),
        client_us: per_request(cpu_seconds(me) - client_before),
    }
}

/// What the load sends.
#[derive(Clone, Copy)]
enum Call {
    Sign,
    CachedToken,
    /// The cached token through the HTTP/JSON API (`POST /api/v1/token`) over HTTP/2.
    HttpCachedToken,
    /// `grpc.health.v1.Health/Check`: the smallest call the agent serves, no signing and
    /// no grant, so what it costs is the gRPC transport's floor on this machine.
    Health,
}

/// The baseline's child process: the same key and mechanism as the agent, one session
/// per thread, no gRPC, no grant building. It answers one question per line on stdin.
struct RawSigner {
    /// The agent's session count and cores, as the child sees them where it runs.
    sessions: usize,
    cores: usize,
    child: std::process::Child,
    questions: std::process::ChildStdin,
    answers: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl RawSigner {
    fn start(dir: &Path) -> Self {
        Self::spawn(
            command(std::env::current_exe().expect("bench binary"))
                .env(RAW_MODE, dir)
                .env("SOFTHSM2_CONF", dir.join("softhsm2.conf")),
        )
    }

    /// The baseline on another `module` (with the environment it needs), signing on
    /// `sessions` threads.
    fn start_on(
        dir: &Path,
        module: &Path,
        env: &[(&str, &std::ffi::OsStr)],
        sessions: usize,
    ) -> Self {
        let mut command = command(std::env::current_exe().expect("bench binary"));
        let _ = command
            .env(RAW_MODE, dir)
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .env(RAW_MODULE, module)
            .env(RAW_SESSIONS, sessions.to_string())
            .envs(env.iter().copied());
        Self::spawn(&mut command)
    }

    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("raw baseline");
        let mut answers = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = answers
            .next()
            .expect("raw baseline ended")
            .expect("read raw");
        let (sessions, cores) = first.split_once(' ').expect("SESSIONS CORES");
        RawSigner {
            sessions: sessions.parse().expect("sessions"),
            cores: cores.parse().expect("cores"),
            questions: child.stdin.take().expect("stdin"),
            answers,
            child,
        }
    }

    fn ask(&mut self, question: &str, duration: Duration) -> f64 {
        use std::io::Write;
        writeln!(self.questions, "{question} {}", duration.as_millis()).expect("ask raw");
        let answer = self
            .answers
            .next()
            .expect("raw baseline ended")
            .expect("read raw");
        answer.trim().parse().expect("raw baseline answer")
    }

    /// Signs per second on every session at once.
    fn rate(&mut self, duration: Duration) -> f64 {
        self.ask("rate", duration)
    }

    /// p50 of one sign at a time, back to back, in µs.
    fn single(&mut self, duration: Duration) -> f64 {
        self.ask("single", duration)
    }

    /// p50 of one sign at a time after a 0.4 ms pause, in µs: at concurrency 1 the
    /// agent's signing thread parks between requests and its CPU cools, as here.
    fn paced(&mut self, duration: Duration) -> f64 {
        self.ask("paced", duration)
    }
}

impl Drop for RawSigner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    latencies: Vec<f64>,
    errors: usize,
    elapsed: Duration,
}

/// `concurrency` callers signing for `duration` (or until `total` requests are done).
async fn load(
    addr: &str,
    concurrency: usize,
    duration: Duration,
    total: Option<usize>,
    call: Call,
) -> Run {
    // Callers are separate processes in practice, each with its own connection: spread the
    // callers over up to 8 HTTP/2 connections rather than funnelling all through one.
    let mut clients = Vec::new();
    let mut json_clients = Vec::new();
    for _ in 0..concurrency.min(8) {
        if matches!(call, Call::HttpCachedToken) {
            json_clients.push(http_json::Client::connect(addr).await);
            continue;
        }
        clients.push(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("address")
                .connect()
                .await
                .expect("connect"),
        );
    }
    if json_clients.is_empty() {
        json_clients.push(http_json::Client::unconnected());
    } else {
        clients.push(tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy());
    }
    let started = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let channel = clients[i % clients.len()].clone();
            let mut client = GrantAgentClient::new(channel.clone());
            let mut health = HealthClient::new(channel);
            let mut json = json_clients[i % json_clients.len()].clone();
            let done = std::sync::Arc::clone(&done);
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                while started.elapsed() < duration
                    && total
                        .is_none_or(|t| done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < t)
                {
                    let sent = Instant::now();
                    let ok = match call {
                        Call::Sign => client
                            .sign_grant(SignGrantRequest {
                                grant: Some(grant_parameters()),
                            })
                            .await
                            .is_ok(),
                        Call::CachedToken => client
                            .get_access_token(GetAccessTokenRequest {
                                grant: Some(GrantParameters {
                                    environment: "mock".into(),
                                    ..grant_parameters()
                                }),
                                force_refresh: false,
                            })
                            .await
                            .is_ok(),
                        Call::HttpCachedToken => json.cached_token(CLIENT_ID).await,
                        Call::Health => health
                            .check(HealthCheckRequest {
                                service: "grantagent.v1.GrantAgent".into(),
                            })
                            .await
                            .is_ok_and(|r| r.get_ref().status == 1),
                    };
                    if ok {
                        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut run = Run {
        latencies: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("load task");
        run.latencies.extend(latencies);
        run.errors += errors;
    }
    run.elapsed = started.elapsed();
    run.latencies.sort_by(f64::total_cmp);
    let _ = FAILED.fetch_add(run.errors, std::sync::atomic::Ordering::Relaxed);
    run
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// User plus system CPU time of a process, in seconds (Linux clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised command name come state, ppid, ...; utime and stime are
    // fields 14 and 15 of the line, so 12th and 13th from the state.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The kernel's idle driver, under `haltpoll` how long an idle CPU polls before it halts,
/// and any PM QoS request (`/dev/cpu_dma_latency`, held by tuned's latency profiles) that
/// keeps idle CPUs polling: on a VM these set the cost of every thread wake-up, which
/// dominates latency at concurrency 1.
fn idle_driver() -> String {
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_owned());
    let driver = match read("/sys/devices/system/cpu/cpuidle/current_driver") {
        Ok(driver) => match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
            Ok(ns) if driver == "haltpoll" => format!("cpuidle {driver}, guest_halt_poll_ns {ns}"),
            _ => format!("cpuidle {driver}"),
        },
        Err(_) => "cpuidle driver unknown".into(),
    };
    // Only root may read the request; the kernel's "no limit" is 2,000,000,000 µs.
    let request = std::fs::read("/dev/cpu_dma_latency")
        .ok()
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(i32::from_ne_bytes);
    match request {
        Some(2_000_000_000) => format!("{driver}, cpu_dma_latency unset"),
        Some(us) => format!("{driver}, cpu_dma_latency {us} µs"),
        None => driver,
    }
}

/// Pins the run when `BENCH_AGENT_CPUS` and `BENCH_CLIENT_CPUS` are set: this process (the
/// load generator) moves to the client's CPUs now, and [`command`] starts every other
/// process on the agent's. Returns the placement for the first line.
fn pin() -> Option<String> {
    let agent = std::env::var("BENCH_AGENT_CPUS").ok();
    let client = std::env::var("BENCH_CLIENT_CPUS").ok();
    let (agent, client) = match (agent, client) {
        (None, None) => return None,
        (Some(agent), Some(client)) => (agent, client),
        _ => fail("BENCH_AGENT_CPUS and BENCH_CLIENT_CPUS: set both or neither"),
    };
    let (agent_set, client_set) = (
        cpu_list("BENCH_AGENT_CPUS", &agent),
        cpu_list("BENCH_CLIENT_CPUS", &client),
    );
    if agent_set.iter().any(|cpu| client_set.contains(cpu)) {
        fail("BENCH_AGENT_CPUS and BENCH_CLIENT_CPUS: the two lists must not share a CPU");
    }
    let pinned = Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", &client])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status();
    if !pinned.is_ok_and(|status| status.success()) {
        fail(&format!(
            "BENCH_CLIENT_CPUS: taskset cannot move the load generator to CPUs {client}"
        ));
    }
    let usable = Command::new("taskset")
        .args(["--cpu-list", &agent, "true"])
        .stderr(Stdio::null())
        .status();
    if !usable.is_ok_and(|status| status.success()) {
        fail(&format!(
            "BENCH_AGENT_CPUS: taskset cannot run a process on CPUs {agent}"
        ));
    }
    let _ = AGENT_CPUS.set(agent.clone());
    Some(format!(
        "agent and raw baseline on CPUs {agent}, load generator on CPUs {client}"
    ))
}

/// The CPUs in a taskset-style list (`0`, `0,2`, `0-3`), or a message naming `name`.
fn cpu_list(name: &str, list: &str) -> Vec<usize> {
    let cpu = |text: &str| -> usize {
        text.trim().parse().unwrap_or_else(|_| {
            fail(&format!(
                "{name}: {list:?} is not a CPU list such as 0, 0,2 or 0-3"
            ))
        })
    };
    let cpus: Vec<usize> = list
        .split(',')
        .flat_map(|part| {
            let (first, last) = match part.split_once('-') {
                Some((first, last)) => (cpu(first), cpu(last)),
                None => (cpu(part), cpu(part)),
            };
            if first > last {
                fail(&format!("{name}: {part:?} runs backwards"));
            }
            first..=last
        })
        .collect();
    if cpus.is_empty() {
        fail(&format!("{name}: {list:?} names no CPU"));
    }
    cpus
}

/// A command for `program`, started on `BENCH_AGENT_CPUS` when the run is pinned.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match AGENT_CPUS.get() {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            let _ = command.args(["--cpu-list", cpus]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}

/// Holds a PM QoS request of `us` microseconds for as long as the returned file is open,
/// as tuned's `latency-performance` profile does: idle CPUs then poll instead of halting.
/// It lets the figures docs/operations.md gives for that switch be measured in one command.
fn hold_cpu_dma_latency(us: &str) -> std::fs::File {
    use std::io::Write;
    let us: i32 = us
        .parse()
        .expect("BENCH_CPU_DMA_LATENCY: microseconds, such as 0");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .expect("BENCH_CPU_DMA_LATENCY: cannot open /dev/cpu_dma_latency (it needs root)");
    file.write_all(&us.to_ne_bytes())
        .expect("BENCH_CPU_DMA_LATENCY: cannot write /dev/cpu_dma_latency");
    file
}

/// (VmRSS, VmHWM) of a process in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

fn start_agent(dir: &Path) -> (std::process::Child, String) {
    start(
        command(env!("CARGO_BIN_EXE_grant-agent"))
            .args(["dev", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir)
            .env_remove("SOFTHSM2_CONF"),
    )
}

/// Starts a grant-agent command that prints "...: listening on ADDR"; the child and ADDR.
fn start(command: &mut Command) -> (std::process::Child, String) {
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start grant-agent");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split_once(": listening on ").map(|(_, a)| a.to_owned()))
        .expect("grant-agent did not start");
    // Keep draining stdout so the agent never blocks on a full pipe.
    let _drain = std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The baseline's side of [`RawSigner`], in a child process whose SOFTHSM2_CONF points at
/// the bench token: first prints the agent's session count and cores as seen from where it
/// runs, then answers `rate MS`, `single MS` and `paced MS` on stdin, one per line.
fn raw(dir: &Path) {
    use cryptoki::{
        context::{CInitializeArgs, CInitializeFlags, Pkcs11},
        mechanism::Mechanism,
        object::{Attribute, ObjectClass},
        session::UserType,
        types::AuthPin,
    };
    let sessions = std::env::var(RAW_SESSIONS)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(grant_agent::config::default_sessions);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{sessions} {cores}");
    let module = std::env::var_os(RAW_MODULE).map_or_else(
        || grant_agent::dev::softhsm_module().expect("softhsm"),
        PathBuf::from,
    );
    let pkcs11 = Pkcs11::new(module).expect("load");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|i| i.label() == "grant-agent")
        })
        .expect("token");
    let pin = std::fs::read_to_string(dir.join("pin")).expect("pin");
    let login = pkcs11.open_ro_session(slot).expect("session");
    login
        .login(UserType::User, Some(&AuthPin::from(pin)))
        .expect("login");
    let key = login
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"virksomhetssertifikat".to_vec()),
        ])
        .expect("find")[0];
    // A message the size of a real signing input (header with x5c, and claims).
    let message = vec![b'a'; 1600];
    let measure = |threads: usize, duration: Duration| -> (f64, Vec<f64>) {
        let started = Instant::now();
        let results: Vec<Vec<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let session = pkcs11.open_ro_session(slot).expect("session");
                    let message = &message;
                    scope.spawn(move || {
                        let mut latencies = Vec::new();
                        while started.elapsed() < duration {
                            let t = Instant::now();
                            let _ = session
                                .sign(&Mechanism::Sha256RsaPkcs, key, message)
                                .expect("C_Sign");
                            latencies.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        latencies
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let mut all: Vec<f64> = results.into_iter().flatten().collect();
        all.sort_by(f64::total_cmp);
        (all.len() as f64 / started.elapsed().as_secs_f64(), all)
    };
    let paced = |duration: Duration| -> Vec<f64> {
        let session = pkcs11.open_ro_session(slot).expect("session");
        let started = Instant::now();
        let mut latencies = Vec::new();
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_micros(400));
            let t = Instant::now();
            let _ = session
                .sign(&Mechanism::Sha256RsaPkcs, key, &message)
                .expect("C_Sign");
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
        }
        latencies.sort_by(f64::total_cmp);
        latencies
    };
    for question in std::io::stdin().lines() {
        let question = question.expect("stdin");
        let (what, millis) = question.split_once(' ').expect("QUESTION MS");
        let duration = Duration::from_millis(millis.parse().expect("milliseconds"));
        let answer = match what {
            "rate" => measure(sessions, duration).0,
            "single" => percentile(&measure(1, duration).1, 0.5),
            "paced" => percentile(&paced(duration), 0.5),
            other => panic!("unknown question {other}"),
        };
        println!("{answer}");
    }
}
