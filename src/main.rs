//! The `grant-agent` command: parses the command line and calls into the library.
//! `cli` holds the client, key and certificate commands.

mod cli;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args, Parser, Subcommand};
use grant_agent::{
    agent::{Agent, SignError},
    config::{Config, PinSource},
    dev,
    grant::{GrantField, GrantParameters},
    hsm::read_pin,
    server,
    telemetry::{self, LogFormat},
};

/// `--version`: the release, the commit, the compiler and the target.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\n",
    env!("GRANT_AGENT_BUILD_INFO")
);

/// Signs Maskinporten JWT grants with a key that never leaves a PKCS#11 token.
#[derive(Parser)]
#[command(name = "grant-agent", version, long_version = LONG_VERSION, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (GrantAgent, health, reflection) with the keys in the config.
    Serve {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Write the agent's process id to FILE once it listens (and SIGHUP reloads), for
        /// tools that signal it, such as spiffe-helper's `pid_file_name`; removed at exit.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Validate a config file without touching the token (run it before a reload).
    Check {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Sign one grant and print it to stdout, without a server.
    Sign {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        grant: GrantArgs,
    },
    /// Make (or reuse) a development SoftHSM token, key, certificate and config, then serve.
    Dev {
        /// Address to serve on; port 0 picks a free port. Beyond loopback (0.0.0.0:50051 in
        /// a container) it is plain TCP for anyone who reaches it: development only, logged
        /// as a warning, and the config file written keeps to loopback.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Folder for the token, PINs and config, relative to the current folder (a
        /// released binary knows no project folder; `.dev` is what `softhsm/demo.sh` uses and
        /// git ignores).
        #[arg(long, default_value = ".dev")]
        state_dir: PathBuf,
    },
    /// Ask a running agent for something.
    Client {
        #[command(subcommand)]
        command: cli::ClientCommand,
    },
    /// Manage keys in the token (made in it or moved into it, never out).
    Key {
        #[command(subcommand)]
        command: cli::KeyCommand,
    },
    /// Manage certificates in the token.
    Cert {
        #[command(subcommand)]
        command: cli::CertCommand,
    },
}

/// What goes into a grant.
#[derive(Args)]
pub(crate) struct GrantArgs {
    /// The Maskinporten client_id (the `iss` claim).
    #[arg(long)]
    client_id: String,
    /// A scope; repeat for more.
    #[arg(long = "scope", required = true)]
    scopes: Vec<String>,
    /// Environment: test, prod or one from the config [default: the config's default_environment].
    #[arg(long = "env", default_value = "")]
    environment: String,
    /// Key name [default: the config's default key].
    #[arg(long, default_value = "")]
    key: String,
    /// A `resource` value; repeat for more.
    #[arg(long = "resource")]
    resources: Vec<String>,
    /// Organisation number to act for (delegation).
    #[arg(long, default_value = "")]
    consumer_org: String,
    /// Grant lifetime in seconds, at most 120 [default: 120].
    #[arg(long = "lifetime", default_value_t = 0)]
    lifetime_seconds: u32,
    /// authorization_details as a JSON array (Altinn system user or consent), e.g.
    /// '[{"type":"urn:altinn:systemuser","systemuser_org":{...}}]'.
    #[arg(long = "authorization-details", default_value = "")]
    authorization_details_json: String,
    /// A person-restricted token's national identity number or D-number (the `pid`
    /// claim). Prefer the environment variable: a command line is visible to every user
    /// of the machine.
    #[arg(
        long,
        env = "GRANT_AGENT_PID",
        hide_env_values = true,
        default_value = ""
    )]
    pid: String,
    /// The customer a supplier acts for (the `iss_onbehalfof` claim).
    #[arg(long = "iss-onbehalfof", default_value = "")]
    iss_onbehalfof: String,
}

impl From<GrantArgs> for GrantParameters {
    fn from(a: GrantArgs) -> Self {
        GrantParameters {
            key: a.key,
            client_id: a.client_id,
            scopes: a.scopes,
            environment: a.environment,
            resources: a.resources,
            consumer_org: a.consumer_org,
            lifetime_seconds: a.lifetime_seconds,
            authorization_details_json: a.authorization_details_json,
            pid: a.pid,
            iss_onbehalfof: a.iss_onbehalfof,
        }
    }
}

type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    // Before anything is read: no config, PIN or password may sit in a dumpable process.
    if let Err(error) = grant_agent::process::harden() {
        eprintln!("grant-agent: error: {error}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match run(cli.command, cli.log_format) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("grant-agent: error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(&format!("\n  caused by: {text}"));
                }
                source = cause.source();
            }
            eprintln!("{message}");
            exit_code(&*error)
        }
    }
}

/// EX_CONFIG (sysexits.h): the token refused the PIN, or said one more wrong PIN would
/// lock it (so it was not tried). A supervisor must not start the
/// agent again with the same PIN, which would count towards locking the token; the
/// systemd unit stops restarting on it (`RestartPreventExitStatus=78`).
const EXIT_PIN_REFUSED: u8 = 78;

/// The exit status for `error`: [`EXIT_PIN_REFUSED`] when the token refused the PIN
/// anywhere in its chain, else 1.
fn exit_code(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<grant_agent::hsm::HsmError>()
            .is_some_and(grant_agent::hsm::HsmError::pin_refused)
        {
            return ExitCode::from(EXIT_PIN_REFUSED);
        }
        cause = error.source();
    }
    ExitCode::FAILURE
}

/// `check`: loads and validates the config, then prints what it found.
fn check_command(config: &Path) -> Result<(), Failure> {
    let c = Config::load(config)?;
    grant_agent::token::check_settings(&c.token)?;
    let names: std::collections::BTreeSet<&str> = c.keys.iter().map(|k| k.name.as_str()).collect();
    println!(
        "{}: valid: {} key name(s) ({} version(s)), {} policy rule(s), listeners: {}{}",
        config.display(),
        names.len(),
        c.keys.len(),
        c.access.policy.len(),
        [
            c.access.listen.map(|a| {
                let mode = if c.access.tls.is_some() {
                    "mutual TLS"
                } else {
                    "insecure loopback"
                };
                format!("{a} ({mode})")
            }),
            c.access
                .unix_socket
                .as_ref()
                .map(|u| format!("unix:{}", u.path.display())),
            c.health_listen.map(|a| format!("{a} (health)")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
        if c.access.policy.is_empty() {
            "; WARNING: no policy rules, every grant request will be refused"
        } else {
            ""
        }
    );
    Ok(())
}

/// `dev`: a SoftHSM token, key and config in `state_dir`, then serve on `listen`.
fn dev_command(listen: SocketAddr, state_dir: PathBuf) -> Result<(), Failure> {
    let state_dir = absolute(&state_dir)?;
    dev::ensure_environment(&state_dir)?;
    let config_path = dev::provision(&state_dir, listen)?;
    let mut config = Config::load(&config_path)?;
    dev::listen_beyond_loopback(&mut config, listen);
    let conf = state_dir.join("softhsm2.conf");
    let exe = std::env::current_exe()
        .map_or_else(|_| "grant-agent".to_owned(), |p| p.display().to_string());
    let pin = take_pin(&config.pkcs11.pin)?;
    serve(&config_path, config, pin, |endpoints| {
        let addr = endpoints.first().map_or("", String::as_str);
        println!("grant-agent dev: listening on {addr}");
        println!("  token, PINs and config in {}", state_dir.display());
        println!(
            "  sign a grant:  {exe} client grant --addr {addr} --client-id my-client --scope test:scope"
        );
        println!(
            "  with grpcurl:  grpcurl -plaintext -d '{{\"grant\":{{\"client_id\":\"my-client\",\"scopes\":[\"test:scope\"]}}}}' {addr} grantagent.v1.GrantAgent/SignGrant"
        );
        println!(
            "  run it again:  SOFTHSM2_CONF={} {exe} serve --config {}",
            conf.display(),
            config_path.display()
        );
    })
}

/// Runs `command` with logs in `log_format`. `serve` sets up logging once its config is
/// read, because `[tracing]` decides whether traces are sent too; every other command
/// sets it up first thing.
fn run(command: Command, log_format: LogFormat) -> Result<(), Failure> {
    if !matches!(command, Command::Serve { .. }) {
        telemetry::init_logs(log_format);
    }
    match command {
        Command::Serve { config, pid_file } => serve_command(&config, pid_file, log_format),
        Command::Key { command } => cli::key_command(command),
        Command::Check { config } => check_command(&config),
        Command::Cert { command } => cli::cert_command(command),
        Command::Sign { config, grant } => {
            let config = Config::load(&config)?;
            let agent = Agent::start(&config)?;
            // As the server does before serving: a revoked certificate never signs.
            runtime()?.block_on(server::check_certificates(&agent, &config))?;
            let signed = agent.sign_grant_blocking(&grant.into());
            let closed = agent.close();
            println!("{}", signed.map_err(name_the_flag)?.assertion);
            Ok(closed?)
        }
        Command::Dev { listen, state_dir } => dev_command(listen, state_dir),
        Command::Client { command } => runtime()?.block_on(cli::client(command)),
    }
}

/// `serve`: loads the config, takes the PIN, sets up logs and traces, serves, and at the
/// end sends the spans still queued.
fn serve_command(
    config_path: &Path,
    pid_file: Option<PathBuf>,
    log_format: LogFormat,
) -> Result<(), Failure> {
    let pid_file = pid_file.map(PidFile::new).transpose()?;
    let config = Config::load(config_path)?;
    // Before telemetry: a PIN from the environment re-executes the agent, and the
    // exporter's threads would be started twice.
    let pin = take_pin(&config.pkcs11.pin)?;
    let telemetry = telemetry::init(log_format, config.tracing.as_ref())?;
    let served = serve(config_path, config, pin, |endpoints| {
        if let Some(pid_file) = &pid_file {
            pid_file.write();
        }
        for endpoint in endpoints {
            println!("grant-agent: listening on {endpoint}");
        }
    });
    telemetry.shutdown();
    served
}

/// Set on the re-executed agent whose PIN arrives on stdin.
const PIN_ON_STDIN: &str = "GRANT_AGENT_PIN_ON_STDIN";

/// The PIN for a serving agent. A PIN from a file is read. A PIN from the environment is
/// read and then the agent re-executes itself without that variable, handing the PIN over
/// on a pipe as stdin: unsetting a variable leaves it in the process's original
/// environment block, which /proc/<pid>/environ shows for the life of the process.
fn take_pin(source: &PinSource) -> Result<cryptoki::types::AuthPin, Failure> {
    use std::{io::Write, os::unix::process::CommandExt};
    let PinSource::Env(var) = source else {
        return Ok(read_pin(source)?);
    };
    if std::env::var_os(PIN_ON_STDIN).is_some() {
        let mut pin = zeroize::Zeroizing::new(String::new());
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut pin)
            .map_err(|e| format!("reading the PIN handed over on stdin: {e}"))?;
        if pin.is_empty() {
            return Err(format!("pkcs11.pin_env: no PIN arrived on stdin (is {var} set?)").into());
        }
        return Ok(cryptoki::types::AuthPin::new(Box::from(pin.as_str())));
    }
    let pin = zeroize::Zeroizing::new(
        std::env::var(var).map_err(|_| format!("pkcs11.pin_env: {var} is not set"))?,
    );
    let (reader, mut writer) = std::io::pipe()?;
    writer.write_all(pin.as_bytes())?;
    drop(writer);
    drop(pin);
    let error = std::process::Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env_remove(var)
        .env(PIN_ON_STDIN, "1")
        .stdin(reader)
        .exec();
    Err(format!("cannot re-run without {var} in the environment: {error}").into())
}

/// Starts the agent on `config` (loaded from `config_path`) with `pin`, serves until SIGINT/SIGTERM
/// (reloading `config_path` on SIGHUP), then logs out and finalizes the module.
fn serve(
    config_path: &Path,
    config: Config,
    pin: cryptoki::types::AuthPin,
    on_ready: impl FnOnce(&[String]),
) -> Result<(), Failure> {
    // After the PIN's re-execution, if any, so it is logged once; before any socket.
    match grant_agent::process::raise_open_files_limit() {
        Ok(l) if l.from < l.to => {
            tracing::info!("open files limit raised from {} to {}", l.from, l.to);
        }
        Ok(l) => tracing::info!("open files limit is {}, the hard limit", l.to),
        Err(error) => tracing::warn!("{error}"),
    }
    let agent = Arc::new(Agent::start_with_pin(&config, pin)?);
    let runtime = runtime()?;
    runtime.block_on(async {
        let _watch = tokio::spawn(Arc::clone(&agent).watch());
        server::run(
            Arc::clone(&agent),
            &config,
            Some(config_path.to_owned()),
            on_ready,
            server::shutdown_signal(),
        )
        .await
    })?;
    // Stopping the runtime ends the background tasks and releases their handles.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match Arc::try_unwrap(agent) {
        Ok(agent) => agent.close()?,
        Err(_) => tracing::warn!("requests still hold the token at exit; skipped C_Finalize"),
    }
    Ok(())
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    Ok(std::path::absolute(path).map_err(|e| format!("--state-dir {}: {e}", path.display()))?)
}

/// On the command line a bad field is a bad flag: say which.
pub(crate) fn name_the_flag(error: SignError) -> Failure {
    match error {
        SignError::Invalid(invalid) => {
            let flag = match invalid.field {
                GrantField::ClientId => "--client-id",
                GrantField::Scopes => "--scope",
                GrantField::Environment => "--env",
                GrantField::Resources => "--resource",
                GrantField::ConsumerOrg => "--consumer-org",
                GrantField::LifetimeSeconds => "--lifetime",
                GrantField::AuthorizationDetails => "--authorization-details",
                GrantField::Pid => "--pid",
                GrantField::IssOnBehalfOf => "--iss-onbehalfof",
            };
            format!("{flag}: {}", invalid.reason).into()
        }
        SignError::UnknownKey(name) => format!("--key: no key is named {name:?}").into(),
        other => other.into(),
    }
}

/// `serve --pid-file`: the process id, written once the agent listens and removed when
/// it ends, if the file still names this process.
struct PidFile(PathBuf);

impl PidFile {
    /// Checks at start that FILE's folder exists, so a typo fails before the token is
    /// opened rather than after.
    fn new(path: PathBuf) -> Result<Self, Failure> {
        let path = std::path::absolute(&path)
            .map_err(|e| format!("--pid-file {}: {e}", path.display()))?;
        match path.parent() {
            Some(folder) if folder.is_dir() => Ok(PidFile(path)),
            _ => Err(format!("--pid-file {}: its folder does not exist", path.display()).into()),
        }
    }

    /// Written aside and renamed into place, so a reader never sees half a number. A
    /// failure is logged, not fatal: the agent serves, and files still reload when they
    /// change.
    fn write(&self) {
        let staged = self.0.with_extension("pid.new");
        let written = std::fs::write(&staged, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&staged, &self.0));
        if let Err(error) = written {
            tracing::error!(file = %self.0.display(), %error, "cannot write the pid file");
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
