//! The `grant-agent` command: parses the command line and calls into the library.
//! `cli` holds the commands that talk to a running agent.

mod cli;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args, Parser, Subcommand};
use grant_agent::{
    admin,
    agent::{Agent, SignError},
    config::{Config, PinSource},
    dev,
    grant::{Algorithm, GrantParameters},
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
        command: cli::ClientCommand,
    },
    /// Manage keys in the token (made in it or moved into it, never out).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage certificates in the token.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// A local Maskinporten for tests and CI: checks grants as Maskinporten does and issues
    /// access tokens signed with its own key (JWKS at /jwks). Not for production.
    MockMaskinporten {
        /// Address to serve on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The mock's TOML config: clients, scopes, trusted CA (docs/tokens.md).
        #[arg(long)]
        config: PathBuf,
        /// Serve HTTPS with this certificate chain (PEM).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key for --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

/// The config whose `[pkcs11]` section names the token (keys need not be configured yet).
#[derive(Args)]
struct TokenArgs {
    /// The TOML config file.
    #[arg(long, env = "GRANT_AGENT_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Generate an RSA key pair inside the token: sensitive, never extractable, sign-only.
    Generate {
        #[command(flatten)]
        token: TokenArgs,
        /// CKA_LABEL of the new key (and later of its certificate).
        #[arg(long)]
        label: String,
        /// Key type.
        #[arg(long = "type", value_enum, default_value_t = KeyType::Rsa2048)]
        key_type: KeyType,
    },
    /// Write a PKCS#10 certificate request (SEID 2.0 subject), signed inside the token.
    Csr {
        #[command(flatten)]
        token: TokenArgs,
        /// Label of the key.
        #[arg(long)]
        label: String,
        /// The organisation number (nine digits).
        #[arg(long)]
        org_number: String,
        /// The organisation's registered name.
        #[arg(long)]
        org_name: String,
        /// Write the PEM here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the public key as a JWK, to register on a Maskinporten client (kid mode).
    Jwk {
        #[command(flatten)]
        token: TokenArgs,
        /// Label of the key.
        #[arg(long)]
        label: String,
        /// The kid to put in the JWK [default: the RFC 7638 thumbprint].
        #[arg(long)]
        kid: Option<String>,
        /// The `alg` to put in the JWK.
        #[arg(long, default_value = "RS256", value_parser = ["RS256", "RS384", "RS512"])]
        algorithm: String,
    },
    /// List the keys and certificates in the token.
    List {
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Move the key and chain of a PKCS#12 file into the token (sensitive, never extractable).
    ImportP12 {
        #[command(flatten)]
        token: TokenArgs,
        /// CKA_LABEL for the imported key and certificate.
        #[arg(long)]
        label: String,
        /// File holding the PKCS#12 password [default: ask on the terminal].
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The .p12/.pfx file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Store an issued certificate (and its chain) in the token next to its key.
    Import {
        #[command(flatten)]
        token: TokenArgs,
        /// Label of the key the certificate was issued for.
        #[arg(long)]
        label: String,
        /// PEM file: the certificate, optionally followed by its chain.
        file: PathBuf,
    },
}

/// RSA key sizes Maskinporten accepts.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyType {
    /// RSA, 2048 bits.
    Rsa2048,
    /// RSA, 3072 bits.
    Rsa3072,
    /// RSA, 4096 bits.
    Rsa4096,
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
        Command::Serve { config } => serve(&config, |endpoints| {
            for endpoint in endpoints {
                println!("grant-agent: listening on {endpoint}");
            }
        }),
        Command::Key { command } => key_command(command),
        Command::Check { config } => {
            let c = Config::load(&config)?;
            grant_agent::token::check_settings(&c.token)?;
            let names: std::collections::BTreeSet<&str> =
                c.keys.iter().map(|k| k.name.as_str()).collect();
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
        Command::Cert {
            command: CertCommand::Import { token, label, file },
        } => {
            let pem = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let token = admin::open_token(&token.config)?;
            let result = admin::import_certificate(&token, &label, &pem);
            let closed = token.close();
            let (chain, written) = result?;
            closed?;
            println!(
                "imported {written} certificate object(s) for key {label:?}: {} (sha256 {}, environment {})",
                chain.subject(),
                chain.leaf_sha256_hex(),
                chain.environment().name()
            );
            Ok(())
        }
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
            serve(&config_path, |endpoints| {
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
        Command::Client { command } => runtime()?.block_on(cli::client(command)),
        Command::MockMaskinporten {
            listen,
            config,
            tls_cert,
            tls_key,
        } => {
            let config = grant_agent::mock::MockConfig::from_file(&config)?;
            let tls = tls_cert.is_some();
            runtime()?.block_on(async {
                let server =
                    grant_agent::mock::MockServer::bind(config, listen, tls_cert.zip(tls_key))
                        .await?;
                let scheme = if tls { "https" } else { "http" };
                let url = format!("{scheme}://{}/", server.local_addr());
                println!("mock-maskinporten: listening on {url}");
                if server.issuer() != url {
                    println!("mock-maskinporten: issuer {}", server.issuer());
                }
                server.serve(server::shutdown_signal()).await?;
                Ok(())
            })
        }
    }
}

fn key_command(command: KeyCommand) -> Result<(), Failure> {
    let (KeyCommand::Generate { token, .. }
    | KeyCommand::Csr { token, .. }
    | KeyCommand::Jwk { token, .. }
    | KeyCommand::ImportP12 { token, .. }
    | KeyCommand::List { token }) = &command;
    // Read the file and password before touching the token, so a typo costs nothing.
    let p12 = match &command {
        KeyCommand::ImportP12 {
            file,
            password_file,
            ..
        } => Some((
            zeroize::Zeroizing::new(
                std::fs::read(file).map_err(|e| format!("FILE {}: {e}", file.display()))?,
            ),
            p12_password(password_file.as_deref())?,
        )),
        _ => None,
    };
    let token = admin::open_token(&token.config)?;
    let result: Result<String, admin::AdminError> = match command {
        KeyCommand::Generate {
            label, key_type, ..
        } => {
            let bits = match key_type {
                KeyType::Rsa2048 => 2048,
                KeyType::Rsa3072 => 3072,
                KeyType::Rsa4096 => 4096,
            };
            admin::generate(&token, &label, bits).map(|key| {
                format!(
                    "generated RSA-{} key {label:?} (id {}) in the token: sensitive, never extractable\n\
                     next: grant-agent key csr --label {label:?} --org-number N --org-name NAME",
                    key.bits,
                    key.id.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            })
        }
        KeyCommand::Csr {
            label,
            org_number,
            org_name,
            out,
            ..
        } => admin::csr(&token, &label, &org_number, &org_name).and_then(|pem| match out {
            None => Ok(pem.trim_end().to_owned()),
            Some(path) => std::fs::write(&path, pem)
                .map(|()| format!("wrote the certificate request to {}", path.display()))
                .map_err(|e| admin::AdminError::Invalid {
                    flag: "--out",
                    problem: format!("{}: {e}", path.display()),
                }),
        }),
        KeyCommand::Jwk {
            label,
            kid,
            algorithm,
            ..
        } => token
            .find_key(&grant_agent::config::KeyLocator::Label(label))
            .map_err(admin::AdminError::from)
            .and_then(|key| {
                let alg = Algorithm::from_jws_name(&algorithm).unwrap_or(Algorithm::Rs256);
                admin::jwk(&key, alg, kid.as_deref())
            })
            .map(|jwk| jwk.to_string()),
        KeyCommand::ImportP12 { label, .. } => {
            let (data, password) = p12.unwrap_or_default();
            admin::import_p12(&token, &label, &data, &password).map(|(key, chain)| {
                format!(
                    "imported RSA-{} key {label:?} with {} certificate(s) into the token: sensitive, never extractable\n\
                     certificate: {} (sha256 {}, environment {})\n\
                     the token now holds the key: delete the .p12 file and its password",
                    key.bits,
                    chain.der().count(),
                    chain.subject(),
                    chain.leaf_sha256_hex(),
                    chain.environment().name()
                )
            })
        }
        KeyCommand::List { .. } => {
            admin::list(&token, grant_agent::agent::unix_now()).map(|s| s.trim_end().to_owned())
        }
    };
    let closed = token.close();
    println!("{}", result?);
    Ok(closed?)
}

/// The PKCS#12 password, from `--password-file` or asked for on the terminal.
fn p12_password(file: Option<&Path>) -> Result<zeroize::Zeroizing<String>, Failure> {
    use std::io::IsTerminal;
    let mut password = match file {
        Some(path) => zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--password-file {}: {e}", path.display()))?,
        ),
        None if std::io::stdin().is_terminal() => {
            zeroize::Zeroizing::new(rpassword::prompt_password("PKCS#12 password: ")?)
        }
        None => return Err("--password-file: required when there is no terminal to ask on".into()),
    };
    if password.ends_with('\n') {
        let _ = password.pop();
        if password.ends_with('\r') {
            let _ = password.pop();
        }
    }
    Ok(password)
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

/// Starts the agent, serves until SIGINT/SIGTERM (reloading on SIGHUP), then logs out and
/// finalizes the module.
fn serve(config_path: &Path, on_ready: impl FnOnce(&[String])) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let pin = take_pin(&config.pkcs11.pin)?;
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

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
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
            let field = invalid.field.split('[').next().unwrap_or_default();
            let flag = match field {
                "grant.client_id" => "--client-id",
                "grant.scopes" => "--scope",
                "grant.environment" => "--env",
                "grant.resources" => "--resource",
                "grant.consumer_org" => "--consumer-org",
                "grant.lifetime_seconds" => "--lifetime",
                "grant.authorization_details_json" => "--authorization-details",
                _ => "--key",
            };
            format!("{flag}: {}", invalid.reason).into()
        }
        SignError::UnknownKey(name) => format!("--key: no key is named {name:?}").into(),
        other => other.into(),
    }
}
