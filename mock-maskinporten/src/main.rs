//! The `mock-maskinporten` command: parses the command line, reads the config and serves
//! the local Maskinporten until SIGINT or SIGTERM.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use grant_agent::telemetry::{self, LogFormat};
use mock_maskinporten::{MockConfig, MockServer};

/// A local Maskinporten for tests and CI: checks grants as Maskinporten does and issues
/// access tokens signed with its own key (JWKS at /jwks). Not for production.
#[derive(Parser)]
#[command(name = "mock-maskinporten", version)]
struct Cli {
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
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logs(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("mock-maskinporten: error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let config = MockConfig::from_file(&cli.config)?;
    let scheme = if cli.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let tls = cli.tls_cert.zip(cli.tls_key);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = MockServer::bind(config, cli.listen, tls).await?;
        let url = format!("{scheme}://{}/", server.local_addr());
        println!("mock-maskinporten: listening on {url}");
        if server.issuer() != url {
            println!("mock-maskinporten: issuer {}", server.issuer());
        }
        server.serve(grant_agent::server::shutdown_signal()).await?;
        Ok(())
    })
}
