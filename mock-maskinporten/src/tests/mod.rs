//! Tests for the local Maskinporten. Keys are generated once per test process (RSA
//! key generation is the slow part); certificates, configs and grants are made per test
//! in a temporary folder.

mod config;
mod http;
mod verify;
mod x5c;

use std::{
    path::Path,
    str::FromStr,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use der::{Encode, EncodePem, pem::LineEnding};
use rsa::{
    Pkcs1v15Sign, PrivateKey, pkcs8::EncodePrivateKey, sha2::Sha384, sha2::Sha512,
    traits::PublicKeyParts,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use x509_cert::{
    Certificate,
    builder::{Builder, CertificateBuilder, profile::BuilderProfile},
    ext::{Extension, ToExtension, pkix::BasicConstraints},
    name::Name,
    serial_number::SerialNumber,
    spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef},
    time::{Time, Validity},
};

use grant_agent::{agent::unix_now, grant::Algorithm, maskinporten::JWT_BEARER};

use super::MockConfig;

/// The issuer the verification tests use.
pub(super) const ISSUER: &str = "http://mock.test/";
/// The client with a registered key (kid mode).
pub(super) const KID_CLIENT: &str = "kid-client";
/// The client with a virksomhetssertifikat (x5c mode).
pub(super) const CERT_CLIENT: &str = "cert-client";
/// The kid registered on [`KID_CLIENT`].
pub(super) const KID: &str = "client-key";
/// The organisation both clients belong to.
pub(super) const ORG: &str = "991825827";
/// An organisation that delegated to [`KID_CLIENT`].
pub(super) const DELEGATING_ORG: &str = "974760673";
/// A test CA name (Buypass "Test4", so the leaf counts as a test certificate).
pub(super) const TEST_CA: &str = "CN=Mock Buypass Class 3 Test4 CA,O=Buypass AS,C=NO";

/// Which pre-generated key.
#[derive(Clone, Copy)]
pub(super) enum TestKey {
    /// Signs the CA certificates.
    Ca,
    /// The virksomhetssertifikat's key.
    Leaf,
    /// The key registered on [`KID_CLIENT`].
    Client,
}

/// RSA-2048 keys, generated once, in parallel.
pub(super) fn key(which: TestKey) -> &'static PrivateKey {
    static KEYS: OnceLock<Vec<PrivateKey>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(|| PrivateKey::new(&mut getrandom::SysRng, 2048).expect("keygen"))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("keygen thread"))
                .collect()
        })
    });
    &keys[which as usize]
}

/// A certificate profile for tests: any subject and issuer, CA or not.
struct TestProfile {
    subject: Name,
    issuer: Name,
    ca: bool,
}

impl BuilderProfile for TestProfile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
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
        let constraints = BasicConstraints {
            ca: self.ca,
            path_len_constraint: None,
        };
        Ok(vec![constraints.to_extension(tbs.subject(), &[])?])
    }
}

/// A certificate for `key`'s public half, named `subject`, signed by `issuer_key` in
/// the name `issuer`, valid from two hours ago until `valid_for` seconds from now
/// (negative: already expired); `ca` marks a CA certificate.
pub(super) fn certificate(
    subject: &str,
    key: &PrivateKey,
    issuer: (&str, &PrivateKey),
    ca: bool,
    valid_for: i64,
) -> Certificate {
    let (issuer, issuer_key) = issuer;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let not_after = if valid_for >= 0 {
        now + Duration::from_secs(valid_for.unsigned_abs())
    } else {
        now - Duration::from_secs(valid_for.unsigned_abs())
    };
    let validity = Validity::new(
        Time::try_from(now - hour * 2).expect("time"),
        Time::try_from(not_after).expect("time"),
    );
    let profile = TestProfile {
        subject: Name::from_str(subject).expect("subject"),
        issuer: Name::from_str(issuer).expect("issuer"),
        ca,
    };
    let spki = SubjectPublicKeyInfoOwned::from_key(&key.to_public_key()).expect("spki");
    let serial = SerialNumber::new(&uuid::Uuid::new_v4().as_bytes()[..8]).expect("serial");
    let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(issuer_key.clone());
    CertificateBuilder::new(profile, serial, validity, spki)
        .expect("builder")
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .expect("certificate")
}

/// A leaf for [`ORG`] issued by the test CA: the chain `[leaf, ca]` as DER.
pub(super) fn test_chain() -> Vec<Vec<u8>> {
    let ca = test_ca();
    let leaf = certificate(
        &format!("CN=Mock Leaf,O=ACME,2.5.4.97=NTRNO-{ORG},C=NO"),
        key(TestKey::Leaf),
        (TEST_CA, key(TestKey::Ca)),
        false,
        86_400,
    );
    vec![leaf.to_der().expect("der"), ca.to_der().expect("der")]
}

/// The self-signed test CA, the mock's trust anchor.
pub(super) fn test_ca() -> Certificate {
    certificate(
        TEST_CA,
        key(TestKey::Ca),
        (TEST_CA, key(TestKey::Ca)),
        true,
        86_400,
    )
}

/// A folder with `ca.pem`, `client.jwk.json` and `token-key.pem`.
pub(super) fn files() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_pem = test_ca().to_pem(LineEnding::LF).expect("pem");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write ca");
    let client = key(TestKey::Client);
    let jwk = json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(client.n_bytes()),
        "e": URL_SAFE_NO_PAD.encode(client.e_bytes()),
        "kid": "ignored-by-the-config",
    });
    std::fs::write(dir.path().join("client.jwk.json"), jwk.to_string()).expect("write jwk");
    let token_key = key(TestKey::Ca)
        .to_pkcs8_der()
        .expect("pkcs8")
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .expect("pem");
    std::fs::write(dir.path().join("token-key.pem"), token_key.as_bytes()).expect("write key");
    dir
}

/// The clients every test uses, after `top` (top-level keys).
pub(super) fn config_text(top: &str) -> String {
    format!(
        r#"{top}
ca = "ca.pem"

[[clients]]
client_id = "{KID_CLIENT}"
scopes = ["test:read", "test:write", "wild:*"]
organization_number = "{ORG}"
consumer_orgs = ["{DELEGATING_ORG}"]
[[clients.keys]]
jwk = "client.jwk.json"
kid = "{KID}"
[[clients.keys]]
jwk = "client.jwk.json"
kid = "expired-key"
expires_at = 2020-01-01T00:00:00Z

[[clients]]
client_id = "{CERT_CLIENT}"
scopes = ["test:read"]
organization_number = "{ORG}"
"#
    )
}

/// A config in `dir` with `top` added.
pub(super) fn config(dir: &Path, top: &str) -> MockConfig {
    let file = dir.join("mock.toml");
    MockConfig::from_toml_str(&config_text(top), &file.display().to_string()).expect("config")
}

/// A grant under construction: header, claims, and the key and algorithm to sign with.
pub(super) struct Grant {
    pub(super) header: Map<String, Value>,
    pub(super) claims: Map<String, Value>,
    key: &'static PrivateKey,
    algorithm: Algorithm,
}

impl Grant {
    /// A valid kid-mode grant from [`KID_CLIENT`] for `test:read`.
    pub(super) fn kid(aud: &str) -> Self {
        Grant::new(
            json!({"alg": "RS256", "kid": KID}),
            KID_CLIENT,
            aud,
            key(TestKey::Client),
        )
    }

    /// A valid x5c-mode grant from [`CERT_CLIENT`] with `chain`.
    pub(super) fn x5c(aud: &str, chain: &[Vec<u8>]) -> Self {
        let x5c: Vec<String> = chain.iter().map(|der| STANDARD.encode(der)).collect();
        Grant::new(
            json!({"alg": "RS256", "x5c": x5c}),
            CERT_CLIENT,
            aud,
            key(TestKey::Leaf),
        )
    }

    fn new(header: Value, iss: &str, aud: &str, key: &'static PrivateKey) -> Self {
        let now = unix_now();
        let claims = json!({
            "aud": aud,
            "iss": iss,
            "scope": "test:read",
            "iat": now,
            "exp": now + 60,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        Grant {
            header: header.as_object().cloned().unwrap_or_default(),
            claims: claims.as_object().cloned().unwrap_or_default(),
            key,
            algorithm: Algorithm::Rs256,
        }
    }

    /// Sets (or with `Value::Null`, removes) a claim.
    pub(super) fn claim(mut self, name: &str, value: impl Into<Value>) -> Self {
        match value.into() {
            Value::Null => {
                let _ = self.claims.remove(name);
            }
            value => {
                let _ = self.claims.insert(name.into(), value);
            }
        }
        self
    }

    /// Sets (or with `Value::Null`, removes) a header member.
    pub(super) fn header(mut self, name: &str, value: impl Into<Value>) -> Self {
        match value.into() {
            Value::Null => {
                let _ = self.header.remove(name);
            }
            value => {
                let _ = self.header.insert(name.into(), value);
            }
        }
        self
    }

    /// Signs with another key.
    pub(super) fn signed_by(mut self, which: TestKey) -> Self {
        self.key = key(which);
        self
    }

    /// Signs with RS384 or RS512 (and says so in `alg`).
    pub(super) fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self.header("alg", algorithm.jws_name())
    }

    /// The compact JWS.
    pub(super) fn assertion(&self) -> String {
        let mut jws = URL_SAFE_NO_PAD.encode(Value::Object(self.header.clone()).to_string());
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(Value::Object(self.claims.clone()).to_string()));
        let input = jws.as_bytes();
        let signature = match self.algorithm {
            Algorithm::Rs256 => self
                .key
                .sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(input)),
            Algorithm::Rs384 => self
                .key
                .sign(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(input)),
            Algorithm::Rs512 => self
                .key
                .sign(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(input)),
        }
        .expect("sign");
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(signature));
        jws
    }

    /// The token request body.
    pub(super) fn form(&self) -> Vec<u8> {
        form(&[("grant_type", JWT_BEARER), ("assertion", &self.assertion())])
    }
}

/// A form-encoded body.
pub(super) fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        let _ = serializer.append_pair(name, value);
    }
    serializer.finish().into_bytes()
}
