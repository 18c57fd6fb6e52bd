//! The `grant-agent` command: parses the command line and calls into the library.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args, Parser, Subcommand};
use grant_agent::{
    agent::{Agent, SignError},
    config::Config,
    dev,
    grant::GrantParameters,
    proto::{self, grant_agent_client::GrantAgentClient},
    server,
    telemetry::{self, LogFormat},
};

/// Signs Maskinporten JWT grants with a key that never leaves a PKCS#11 token.
#[derive(Parser)]
#[command(name = "grant-agent", version, about)]
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
        /// Address to serve on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Folder for the token, PINs and config [default: .dev in the project folder].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Ask a running agent for something.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Sign a grant on the agent and print it to stdout.
    Grant {
        /// The agent's address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[command(flatten)]
        grant: GrantArgs,
    },
}

/// What goes into a grant.
#[derive(Args)]
struct GrantArgs {
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
        }
    }
}

type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match run(cli.command) {
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
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve { config } => serve(&config, |_| {}),
        Command::Sign { config, grant } => {
            let agent = Agent::start(&Config::load(&config)?)?;
            let signed = agent.sign_grant_blocking(&grant.into());
            let closed = agent.close();
            println!("{}", signed.map_err(name_the_flag)?.assertion);
            Ok(closed?)
        }
        Command::Dev { listen, state_dir } => {
            let state_dir = absolute(
                &state_dir.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev")),
            )?;
            dev::ensure_environment(&state_dir)?;
            let config_path = dev::provision(&state_dir, listen)?;
            let conf = state_dir.join("softhsm2.conf");
            let exe = std::env::current_exe()
                .map_or_else(|_| "grant-agent".to_owned(), |p| p.display().to_string());
            serve(&config_path, |addr| {
                println!("grant-agent dev: listening on {addr}");
                println!("  token, PINs and config in {}", state_dir.display());
                println!(
                    "  sign a grant:  grant-agent client grant --addr {addr} --client-id my-client --scope test:scope"
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
        Command::Client {
            command: ClientCommand::Grant { addr, grant },
        } => runtime()?.block_on(async {
            let endpoint = if addr.contains("://") {
                addr
            } else {
                format!("http://{addr}")
            };
            let mut client = GrantAgentClient::connect(endpoint.clone())
                .await
                .map_err(|e| format!("--addr {endpoint}: cannot connect: {e}"))?;
            let params: GrantParameters = grant.into();
            let response = client
                .sign_grant(proto::SignGrantRequest {
                    grant: Some(proto::GrantParameters {
                        key: params.key,
                        client_id: params.client_id,
                        scopes: params.scopes,
                        environment: params.environment,
                        resources: params.resources,
                        consumer_org: params.consumer_org,
                        lifetime_seconds: params.lifetime_seconds,
                    }),
                })
                .await
                .map_err(|s| format!("the agent refused: {:?}: {}", s.code(), s.message()))?;
            println!("{}", response.into_inner().assertion);
            Ok(())
        }),
    }
}

/// Starts the agent, serves until SIGINT/SIGTERM (reloading on SIGHUP), then logs out and
/// finalizes the module.
fn serve(config_path: &Path, on_ready: impl FnOnce(SocketAddr)) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let agent = Arc::new(Agent::start(&config)?);
    let runtime = runtime()?;
    runtime.block_on(async {
        let _reload = tokio::spawn(server::reload_on_hangup(
            Arc::clone(&agent),
            config_path.to_owned(),
            config.listen,
        ));
        let _watch = tokio::spawn(Arc::clone(&agent).watch());
        server::run(
            Arc::clone(&agent),
            config.listen,
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

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    Ok(std::path::absolute(path).map_err(|e| format!("--state-dir {}: {e}", path.display()))?)
}

/// On the command line a bad field is a bad flag: say which.
fn name_the_flag(error: SignError) -> Failure {
    match error {
        SignError::Invalid(invalid) => {
            let field = invalid.field.split('[').next().unwrap_or_default();
            let flag = match field {
                "grant.client_id" => "--client-id",
                "grant.scopes" => "--scope",
                "grant.environment" => "--env",
                "grant.resources" => "--resource",
                "grant.consumer_org" => "--consumer-org",
                "grant.lifetime_seconds" => "--lifetime",
                _ => "--key",
            };
            format!("{flag}: {}", invalid.reason).into()
        }
        SignError::UnknownKey(name) => format!("--key: no key is named {name:?}").into(),
        other => other.into(),
    }
}
