//! `grant-agent client ...`: for scripts and probes, talking to a running agent. Results
//! go to stdout alone (a grant, a token), so `$(grant-agent client token ...)` works;
//! refusals go to stderr with the agent's whole message and a non-zero exit.
//! `client token --out FILE [--watch]` writes the token to a file instead, and keeps it
//! fresh ([`grant_agent::client::token_file`]).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use grant_agent::{
    client::{self, token_file},
    grant::GrantParameters,
    proto,
};

use crate::{Failure, GrantArgs};

#[derive(Subcommand)]
pub(crate) enum ClientCommand {
    /// Sign a grant on the agent and print it to stdout.
    Grant {
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        grant: GrantArgs,
    },
    /// Get an access token from the agent (cached or fresh) and print it to stdout, e.g.
    /// `curl -H "Authorization: Bearer $(grant-agent client token ...)"`.
    Token {
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        grant: GrantArgs,
        /// Skip the agent's cache and fetch a new token.
        #[arg(long)]
        force_refresh: bool,
        /// Print the whole answer as JSON (access_token, token_type, expires_at, scope,
        /// from_cache) instead of the bare token.
        #[arg(long, conflicts_with = "out")]
        json: bool,
        /// Write the token to FILE (mode 0600, replaced atomically) instead of stdout, for
        /// tools that read a credential file (e.g. Google's credential_source.file).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// With --out: keep FILE fresh, renewing the token at two thirds of its life and
        /// retrying transient failures, until SIGTERM or SIGINT; a refusal a retry would
        /// repeat stops it with the agent's message.
        #[arg(long, requires = "out")]
        watch: bool,
        /// With --out: what FILE holds [default: text, the bare token without a newline].
        #[arg(long, value_enum, requires = "out")]
        format: Option<OutFormat>,
    },
    /// Exit 0 when the agent is SERVING (its token is usable), 1 otherwise: the readiness
    /// probe.
    Health {
        #[command(flatten)]
        connection: Connection,
        /// Only whether the agent's process answers, SERVING while its token is away: the
        /// liveness probe (restarting an agent for its token would run C_Login again).
        #[arg(long, conflicts_with = "key")]
        liveness: bool,
        /// Whether this key can sign: SERVING while the token is usable and the key has a
        /// certificate valid now and not revoked (health service `key/NAME`).
        #[arg(long, value_name = "NAME")]
        key: Option<String>,
    },
    /// Print the agent's keys (ListKeys) as JSON: certificate, expiry, chain status and
    /// revocation status with its time of check, one object a version.
    Keys {
        #[command(flatten)]
        connection: Connection,
    },
}

/// What `client token --out` writes.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OutFormat {
    /// The bare access token, without a newline.
    Text,
    /// {"access_token", "token_type", "expires_at", "scope"}.
    Json,
}

/// Where the agent is, and the caller's TLS identity for mutual TLS.
#[derive(Args)]
pub(crate) struct Connection {
    /// The agent: HOST:PORT, or unix:/path/to/socket.
    #[arg(long, default_value = "127.0.0.1:50051", env = "GRANT_AGENT_ADDR")]
    addr: String,
    /// CA bundle for the agent's certificate (mutual TLS).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This caller's certificate (mutual TLS).
    #[arg(long, requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// This caller's private key (mutual TLS).
    #[arg(long, requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// Name to expect in the agent's certificate [default: the host in --addr].
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
}

impl Connection {
    fn tls(&self) -> Result<Option<client::ClientTls>, Failure> {
        Ok(match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(certificate), Some(key)) => Some(client::ClientTls {
                ca: ca.clone(),
                certificate: certificate.clone(),
                key: key.clone(),
                domain: self.tls_domain.clone(),
            }),
            (None, None, None) => None,
            _ => return Err("--tls-ca, --tls-cert and --tls-key go together".into()),
        })
    }

    async fn connect(
        &self,
    ) -> Result<proto::grant_agent_client::GrantAgentClient<tonic::transport::Channel>, Failure>
    {
        Ok(client::connect(&self.addr, self.tls()?.as_ref()).await?)
    }
}

fn refused(status: &tonic::Status) -> Failure {
    format!(
        "the agent refused: {:?}: {}",
        status.code(),
        status.message()
    )
    .into()
}

/// Runs one client command.
pub(crate) async fn client(command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Health {
            connection,
            liveness,
            key,
        } => health(&connection, liveness, key).await,
        ClientCommand::Keys { connection } => {
            let keys = connection
                .connect()
                .await?
                .list_keys(proto::ListKeysRequest {})
                .await
                .map_err(|s| refused(&s))?
                .into_inner()
                .keys;
            let keys: Vec<_> = keys.iter().map(key_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&keys).unwrap_or_default()
            );
            Ok(())
        }
        ClientCommand::Grant { connection, grant } => {
            let response = connection
                .connect()
                .await?
                .sign_grant(proto::SignGrantRequest {
                    grant: Some(GrantParameters::from(grant)),
                })
                .await
                .map_err(|s| refused(&s))?;
            println!("{}", response.into_inner().assertion);
            Ok(())
        }
        ClientCommand::Token {
            connection,
            grant,
            force_refresh,
            out: Some(out),
            watch,
            format,
            ..
        } => {
            let request = proto::GetAccessTokenRequest {
                grant: Some(GrantParameters::from(grant)),
                force_refresh,
            };
            token_to_file(connection, request, out, watch, format).await
        }
        ClientCommand::Token {
            connection,
            grant,
            force_refresh,
            json,
            out: None,
            ..
        } => {
            let request = proto::GetAccessTokenRequest {
                grant: Some(GrantParameters::from(grant)),
                force_refresh,
            };
            print_token(&connection, request, json).await
        }
    }
}

/// `client health`: Ok when the agent (with `liveness`, its process; with `key`, that
/// key) is SERVING.
async fn health(
    connection: &Connection,
    liveness: bool,
    key: Option<String>,
) -> Result<(), Failure> {
    let service = match (&key, liveness) {
        (Some(name), _) => format!("{}{name}", grant_agent::server::KEY_SERVICE_PREFIX),
        (None, true) => grant_agent::server::LIVENESS_SERVICE.to_owned(),
        (None, false) => "grantagent.v1.GrantAgent".to_owned(),
    };
    if client::serving(&connection.addr, connection.tls()?.as_ref(), &service).await? {
        println!("SERVING");
        Ok(())
    } else if let Some(name) = key {
        Err(format!("key {name:?} is NOT_SERVING: it cannot sign now (token unavailable, certificate expired or revoked: see `grant-agent client keys`)").into())
    } else if liveness {
        Err("the agent's process does not answer as SERVING".into())
    } else {
        Err("the agent is NOT_SERVING (its token is unavailable)".into())
    }
}

/// One ListKeys entry as JSON, with the proto's field names.
fn key_json(k: &proto::KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": k.name,
        "active": k.active,
        "is_default": k.is_default,
        "algorithm": k.algorithm,
        "kid": k.kid,
        "subject": k.subject,
        "issuer": k.issuer,
        "organization_number": k.organization_number,
        "environment": k.environment,
        "certificate_sha256": k.certificate_sha256,
        "not_before": k.not_before,
        "not_after": k.not_after,
        "days_to_expiry": k.days_to_expiry,
        "expires_soon": k.expires_soon,
        "chain_status": k.chain_status,
        "chain_detail": k.chain_detail,
        "revocation_status": k.revocation_status,
        "revocation_checked_at": k.revocation_checked_at,
        "revocation_last_good": k.revocation_last_good,
        "revoked_at": k.revoked_at,
        "revocation_reason": k.revocation_reason,
        "revocation_detail": k.revocation_detail,
    })
}

/// `client token --out`: writes the token to `out` once, or with `watch` keeps it fresh
/// until interrupted.
async fn token_to_file(
    connection: Connection,
    request: proto::GetAccessTokenRequest,
    out: PathBuf,
    watch: bool,
    format: Option<OutFormat>,
) -> Result<(), Failure> {
    let format = match format {
        None | Some(OutFormat::Text) => token_file::FileFormat::Text,
        Some(OutFormat::Json) => token_file::FileFormat::Json,
    };
    let source = token_file::Source {
        tls: connection.tls()?,
        addr: connection.addr,
        request,
    };
    let file = token_file::TokenFile::new(out, format);
    if !watch {
        // One try; an interrupt ends it as it ends any command.
        let once = std::future::pending();
        return Ok(token_file::keep_fresh(source, &file, false, once).await?);
    }
    token_file::keep_fresh(source, &file, true, grant_agent::server::shutdown_signal())
        .await
        .map_err(|e| format!("--watch stopped: {e}").into())
}

/// `client token`: prints the token, or with `json` the whole answer.
async fn print_token(
    connection: &Connection,
    request: proto::GetAccessTokenRequest,
    json: bool,
) -> Result<(), Failure> {
    let token = connection
        .connect()
        .await?
        .get_access_token(request)
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": token.expires_at,
                "scope": token.scope,
                "from_cache": token.from_cache,
            })
        );
    } else {
        println!("{}", token.access_token);
    }
    Ok(())
}
