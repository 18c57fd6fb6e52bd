//! `grant-agent dev`: a development SoftHSM token, made idempotently in a state folder,
//! so a new user (and CI) can run the real agent with no HSM and no configuration.
//!
//! The folder holds `softhsm2.conf` and `tokens/` (the token), `pin` and `so-pin`
//! (random, mode 0600) and `config.toml`. The token holds an RSA-2048 key pair generated
//! inside it (sensitive, never extractable) and a self-signed certificate shaped like a
//! SEID 2.0 *test* virksomhetssertifikat, signed by that key and stored next to it.
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module is initialised, so the process must
//! have it in its environment from the start; [`ensure_environment`] re-executes the
//! program with it set rather than changing the environment of a running process.
//!
//! `dev` alone may serve plain TCP beyond loopback (in a container, `--listen
//! 0.0.0.0:50051`): its token is throwaway and its certificate self-signed, which no
//! Maskinporten accepts. The config file keeps to loopback, so `serve --config` on it
//! never opens that door; [`listen_beyond_loopback`] opens it in memory, with a warning.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::{fs::OpenOptionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
    time::Duration,
};

use der::Encode;
use x509_cert::{
    builder::{Builder, CertificateBuilder, profile::BuilderProfile},
    ext::{
        Extension, ToExtension,
        pkix::{KeyUsage, KeyUsages},
    },
    name::Name,
    serial_number::SerialNumber,
    spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef},
    time::Validity,
};

use crate::{
    config::Config,
    hsm::{HsmError, Token, TokenKey, TokenSigner, init_token, read_pin},
};

/// Token label of the development token.
pub(crate) const TOKEN_LABEL: &str = "grant-agent";
/// Key label of the development key.
pub(crate) const KEY_LABEL: &str = "virksomhetssertifikat";
/// A synthetic organisation number with a valid check digit, as in Digdir's test data.
pub(crate) const ORGANIZATION_NUMBER: &str = "313367002";
const KEY_ID: [u8; 1] = [0x01];
/// The dev certificate as PEM, beside the config: its own `[trust] test_roots`, so the
/// dev agent shows a valid chain as a real key would.
const DEV_ROOT: &str = "dev-root.pem";
const REEXEC_MARK: &str = "GRANT_AGENT_DEV_REEXEC";

/// Where SoftHSM's module is installed by the distributions we support.
const SOFTHSM_MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

/// Why the development setup failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// SoftHSM is not installed.
    #[error(
        "SoftHSM2 is not installed (looked for {0}); install it with: sudo apt-get install -y softhsm2"
    )]
    NoSoftHsm(String),
    /// A file in the state folder could not be written or read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Re-executing with `SOFTHSM2_CONF` set failed.
    #[error("cannot re-run with SOFTHSM2_CONF set: {0}")]
    Exec(String),
    /// The generated config is invalid (a bug).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The token refused an operation.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The certificate could not be built.
    #[error("cannot build the development certificate: {0}")]
    Certificate(String),
}

/// The SoftHSM module on this machine.
pub fn softhsm_module() -> Result<PathBuf, DevError> {
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| DevError::NoSoftHsm(SOFTHSM_MODULES.join(", ")))
}

/// Returns when `SOFTHSM2_CONF` names `state_dir`'s config; otherwise writes that config
/// and re-executes this program with it set (and does not return on success).
pub fn ensure_environment(state_dir: &Path) -> Result<(), DevError> {
    let conf = state_dir.join("softhsm2.conf");
    if std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(conf.as_os_str()) {
        return Ok(());
    }
    if std::env::var_os(REEXEC_MARK).is_some() {
        return Err(DevError::Exec(format!(
            "SOFTHSM2_CONF is still not {} after re-running",
            conf.display()
        )));
    }
    let tokens = state_dir.join("tokens");
    fs::create_dir_all(&tokens).map_err(file_error(&tokens))?;
    let text = format!(
        "# Written by grant-agent dev.\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    fs::write(&conf, text).map_err(file_error(&conf))?;
    let exe = std::env::current_exe().map_err(|e| DevError::Exec(e.to_string()))?;
    let error = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env(REEXEC_MARK, "1")
        .exec();
    Err(DevError::Exec(error.to_string()))
}

/// Makes (or reuses) the token, key, certificate and config in `state_dir`, and returns
/// the config's path. Safe to run again: what exists is kept, what is missing is made.
pub fn provision(state_dir: &Path, listen: SocketAddr) -> Result<PathBuf, DevError> {
    let listen = SocketAddr::new(loopback_of(listen), listen.port());
    let module = softhsm_module()?;
    let pin_path = state_dir.join("pin");
    let so_pin_path = state_dir.join("so-pin");
    write_secret_once(&pin_path)?;
    write_secret_once(&so_pin_path)?;
    let config_path = state_dir.join("config.toml");
    let config_text = format!(
        "# Written by grant-agent dev: a development token, not for production.\n\
         listen = \"{listen}\"\n\
         # Plain TCP on loopback for development; production uses [tls] or unix_socket.\n\
         insecure = true\n\
         default_environment = \"test\"\n\n\
         [pkcs11]\n\
         module = \"{module}\"\n\
         token_label = \"{TOKEN_LABEL}\"\n\
         pin_file = \"pin\"\n\n\
         # Every local process may ask for anything: fine for a dev token, never for production.\n\
         [[policy]]\n\
         caller = \"anonymous\"\n\
         keys = [\"*\"]\n\
         client_ids = [\"*\"]\n\
         scopes = [\"*\"]\n\
         environments = [\"*\"]\n\
         resources = [\"*\"]\n\
         consumer_orgs = [\"*\"]\n\
         authorization_types = [\"*\"]\n\
         allow_pid = true\n\
         iss_onbehalfof = [\"*\"]\n\
         requests_per_second = 100000\n\n\
         [[keys]]\n\
         name = \"default\"\n\
         label = \"{KEY_LABEL}\"\n\
         certificate = \"token\"\n\
         # The self-signed dev certificate has no known issuer: declare it a test certificate.\n\
         certificate_environment = \"test\"\n\n\
         # The dev certificate is its own root (written from the token at every start).\n\
         [trust]\n\
         test_roots = [\"{DEV_ROOT}\"]\n",
        module = module.display(),
    );
    fs::write(&config_path, config_text).map_err(file_error(&config_path))?;
    // Only [pkcs11]: [trust] names the certificate this run may still have to make.
    let pkcs11 = Config::load_token_settings(&config_path)?;
    let pin = read_pin(&pkcs11.pin)?;

    let token = match Token::open(&pkcs11, &pin, Default::default()) {
        Ok(token) => token,
        Err(HsmError::TokenNotFound { .. }) => {
            let so_pin = read_pin(&crate::config::PinSource::File(so_pin_path))?;
            init_token(&module, TOKEN_LABEL, &so_pin, &pin)?;
            tracing::info!(label = TOKEN_LABEL, "initialised a development token");
            Token::open(&pkcs11, &pin, Default::default())?
        }
        Err(e) => return Err(e.into()),
    };
    let result = ensure_key_and_certificate(&token);
    let closed = token.close();
    let root = state_dir.join(DEV_ROOT);
    let pem = <x509_cert::Certificate as der::Decode>::from_der(&result?)
        .and_then(|c| der::EncodePem::to_pem(&c, der::pem::LineEnding::LF))
        .map_err(|e| DevError::Certificate(e.to_string()))?;
    fs::write(&root, pem).map_err(file_error(&root))?;
    closed?;
    Ok(config_path)
}

/// Serves `config` on `listen` even where that is not loopback: plain TCP on which anyone
/// who reaches the address gets grants, allowed for `grant-agent dev` alone and logged as a
/// warning. A loopback address changes nothing. The config file written by [`provision`]
/// listens on loopback on the same port, so `serve --config` on it stays local.
pub fn listen_beyond_loopback(config: &mut Config, listen: SocketAddr) {
    if listen.ip().is_loopback() {
        return;
    }
    tracing::warn!(
        %listen,
        "grant-agent dev: plain TCP beyond loopback, for development only: whoever reaches \
         this address gets grants from the throwaway dev token, whose self-signed certificate \
         no Maskinporten accepts"
    );
    config.access.listen = Some(listen);
}

/// The loopback address of `listen`'s family: what the config file says for an address
/// beyond loopback.
fn loopback_of(listen: SocketAddr) -> IpAddr {
    match listen.ip() {
        ip if ip.is_loopback() => ip,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Returns the certificate's DER.
fn ensure_key_and_certificate(token: &Token) -> Result<Vec<u8>, DevError> {
    let locator = crate::config::KeyLocator::Label(KEY_LABEL.into());
    let key = match token.find_key(&locator) {
        Ok(key) => key,
        Err(HsmError::KeyNotFound(_)) => {
            tracing::info!(
                label = KEY_LABEL,
                "generating an RSA-2048 key pair in the token"
            );
            token.generate_rsa_key(KEY_LABEL, &KEY_ID, 2048)?
        }
        Err(e) => return Err(e.into()),
    };
    match token.certificates_der(&key) {
        Ok(mut ders) if !ders.is_empty() => Ok(ders.swap_remove(0)),
        Ok(_) | Err(HsmError::CertificateNotFound(_)) => {
            let (der, subject) = self_signed_certificate(token, &key)?;
            let _ = token.store_certificate(KEY_LABEL, &key.id, &der, &subject)?;
            tracing::info!("stored a self-signed SEID 2.0-style test certificate in the token");
            Ok(der)
        }
        Err(e) => Err(e.into()),
    }
}

/// A leaf certificate for signing: digitalSignature and nonRepudiation, as Buypass and
/// Commfides issue them. Self-signed, so issuer = subject.
struct SelfSignedLeaf {
    subject: Name,
}

impl BuilderProfile for SelfSignedLeaf {
    fn get_issuer(&self, subject: &Name) -> Name {
        subject.clone()
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &x509_cert::TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let usage = KeyUsage(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation);
        Ok(vec![usage.to_extension(tbs.subject(), &[])?])
    }
}

/// Builds the certificate inside the token; returns (certificate DER, subject DER).
fn self_signed_certificate(token: &Token, key: &TokenKey) -> Result<(Vec<u8>, Vec<u8>), DevError> {
    let fail = |e: &dyn std::fmt::Display| DevError::Certificate(e.to_string());
    let subject = Name::from_str(&format!(
        "CN=GRANT-AGENT DEV TEST,O=GRANT-AGENT DEV TEST,2.5.4.97=NTRNO-{ORGANIZATION_NUMBER},C=NO"
    ))
    .map_err(|e| fail(&e))?;
    let signer = TokenSigner::new(token, key)?;
    let spki = SubjectPublicKeyInfoOwned::from_key(&signature::Keypair::verifying_key(&signer))
        .map_err(|e| fail(&e))?;
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] &= 0x7f;
    let serial = SerialNumber::new(&serial).map_err(|e| fail(&e))?;
    let validity =
        Validity::from_now(Duration::from_secs(2 * 365 * 24 * 3600)).map_err(|e| fail(&e))?;
    let builder = CertificateBuilder::new(SelfSignedLeaf { subject }, serial, validity, spki)
        .map_err(|e| fail(&e))?;
    let certificate = builder
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .map_err(|e| fail(&e))?;
    let der = certificate.to_der().map_err(|e| fail(&e))?;
    let subject = certificate
        .tbs_certificate()
        .subject()
        .to_der()
        .map_err(|e| fail(&e))?;
    Ok((der, subject))
}

/// Writes a random secret to `path` (mode 0600) unless the file exists.
fn write_secret_once(path: &Path) -> Result<(), DevError> {
    if path.exists() {
        return Ok(());
    }
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_error(path))?;
    file.write_all(&secret.as_bytes()[..16])
        .map_err(file_error(path))
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::File {
        path: path.display().to_string(),
        source,
    }
}
