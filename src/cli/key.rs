//! `grant-agent key ...` and `grant-agent cert ...`: key and certificate management in
//! the token (keys are made in it or moved into it, never out).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use grant_agent::{admin, grant::Algorithm};

use crate::Failure;

/// The config whose `[pkcs11]` section names the token (keys need not be configured yet).
#[derive(Args)]
pub(crate) struct TokenArgs {
    /// The TOML config file.
    #[arg(long, env = "GRANT_AGENT_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
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
pub(crate) enum CertCommand {
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
    /// Check every configured key's certificate as Maskinporten will: expiry, the chain to
    /// a trusted root, and revocation (OCSP, then the CRL). Exits 1 when a key cannot sign.
    Check {
        /// The TOML config file.
        #[arg(long, env = "GRANT_AGENT_CONFIG")]
        config: PathBuf,
    },
}

/// RSA key sizes Maskinporten accepts.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum KeyType {
    /// RSA, 2048 bits.
    Rsa2048,
    /// RSA, 3072 bits.
    Rsa3072,
    /// RSA, 4096 bits.
    Rsa4096,
}

/// Runs one `key` command.
pub(crate) fn key_command(command: KeyCommand) -> Result<(), Failure> {
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
    let result = key_result(&token, command, p12);
    let closed = token.close();
    println!("{}", result?);
    Ok(closed?)
}

/// What a key command did, in the words the operator sees; `p12` is the file and password
/// `import-p12` read before the token was opened.
fn key_result(
    token: &grant_agent::hsm::Token,
    command: KeyCommand,
    p12: Option<(zeroize::Zeroizing<Vec<u8>>, zeroize::Zeroizing<String>)>,
) -> Result<String, admin::AdminError> {
    match command {
        KeyCommand::Generate {
            label, key_type, ..
        } => {
            let bits = match key_type {
                KeyType::Rsa2048 => 2048,
                KeyType::Rsa3072 => 3072,
                KeyType::Rsa4096 => 4096,
            };
            admin::generate(token, &label, bits).map(|key| {
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
        } => admin::csr(token, &label, &org_number, &org_name).and_then(|pem| match out {
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
            admin::import_p12(token, &label, &data, &password).map(|(key, chain)| {
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
            admin::list(token, grant_agent::agent::unix_now()).map(|s| s.trim_end().to_owned())
        }
    }
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

/// Runs one `cert` command.
pub(crate) fn cert_command(command: CertCommand) -> Result<(), Failure> {
    let (token, label, file) = match command {
        CertCommand::Import { token, label, file } => (token, label, file),
        CertCommand::Check { config } => return super::check::check(&config),
    };
    let pem = std::fs::read(&file).map_err(|e| format!("FILE {}: {e}", file.display()))?;
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
