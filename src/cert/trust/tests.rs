use sha2::{Digest, Sha256};

use super::{ChainStatus, Root, SHIPPED, TrustStore, shipped_roots};
use crate::{
    cert::{CertEnvironment, CertificateChain},
    testing::{openssl, self_signed},
};

/// 2026-12-01T00:00:00Z: inside every fixture's validity.
const NOW: i64 = 1_796_083_200;

#[test]
fn the_shipped_roots_are_the_files_their_digests_name() {
    for (name, pem, sha256) in SHIPPED {
        let roots = Root::from_pem(pem, "shipped").expect("a shipped root parses");
        assert_eq!(roots.len(), 1, "{name}: one certificate a file");
        assert_eq!(roots[0].sha256(), sha256, "{name}: the pinned SHA-256");
        assert!(
            roots[0].subject().contains(name),
            "{name}: {}",
            roots[0].subject()
        );
        let der = CertificateChain::from_pem(pem).expect("pem");
        assert_eq!(
            crate::hex::encode(&Sha256::digest(der.der().next().expect("one"))),
            sha256
        );
    }
    assert_eq!(shipped_roots().len(), SHIPPED.len());
}

/// A root, an intermediate under it and a leaf under that, made with openssl in `dir`;
/// returns (root PEM, leaf PEM, intermediate PEM).
fn hierarchy(dir: &std::path::Path, leaf_days: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    std::fs::write(
        dir.join("ext.cnf"),
        "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         [leaf]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,nonRepudiation\n",
    )
    .expect("ext");
    self_signed(
        dir,
        "root.key",
        "root.pem",
        &["-days", "3650", "-subj", "/CN=Test Root"],
    );
    let issue = |name: &str, issuer: &str, subject: &str, section: &str, days: &str| {
        let key = format!("{name}.key");
        let _ = openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &format!("{name}.csr"),
                "-subj",
                subject,
            ],
        );
        let _ = openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                days,
                "-CA",
                &format!("{issuer}.pem"),
                "-CAkey",
                &format!("{issuer}.key"),
                "-CAcreateserial",
                "-extfile",
                "ext.cnf",
                "-extensions",
                section,
            ],
        );
    };
    issue("intermediate", "root", "/CN=Test Issuing CA", "ca", "3650");
    issue("leaf", "intermediate", "/CN=Leaf/O=Org", "leaf", leaf_days);
    let read = |f: &str| std::fs::read(dir.join(f)).expect("read");
    (read("root.pem"), read("leaf.pem"), read("intermediate.pem"))
}

fn chain(parts: &[&[u8]]) -> CertificateChain {
    CertificateChain::from_pem(&parts.concat()).expect("chain")
}

#[test]
fn a_chain_to_a_configured_root_is_valid_and_names_its_issuer() {
    let dir = tempfile::tempdir().expect("dir");
    let (root, leaf, intermediate) = hierarchy(dir.path(), "30");
    let store = TrustStore::new(Root::from_pem(&root, "root.pem").expect("root"), Vec::new());
    let now = crate::agent::unix_now();
    let judged = store.judge(&chain(&[&leaf, &intermediate]), CertEnvironment::Test, now);
    assert_eq!(
        judged.status,
        ChainStatus::Valid {
            root: "CN=Test Root".into()
        }
    );
    let issuer = CertificateChain::from_pem(&intermediate).expect("intermediate");
    assert_eq!(judged.issuer.as_deref(), issuer.der().next());

    // Test roots do not vouch for a production certificate.
    let judged = store.judge(
        &chain(&[&leaf, &intermediate]),
        CertEnvironment::Production,
        now,
    );
    assert_eq!(judged.status.name(), "untrusted", "{:?}", judged.status);
    assert!(
        judged.status.detail().contains("[trust] prod_roots"),
        "{}",
        judged.status.detail()
    );
}

#[test]
fn a_missing_intermediate_a_foreign_root_and_no_roots_are_untrusted() {
    let dir = tempfile::tempdir().expect("dir");
    let (root, leaf, intermediate) = hierarchy(dir.path(), "30");
    let other = tempfile::tempdir().expect("dir");
    let (foreign, _, _) = hierarchy(other.path(), "30");
    let now = crate::agent::unix_now();
    let trusted = TrustStore::new(Root::from_pem(&root, "root.pem").expect("root"), Vec::new());
    let status = trusted
        .judge(&chain(&[&leaf]), CertEnvironment::Test, now)
        .status;
    assert_eq!(status.name(), "untrusted", "{status:?}");
    assert!(
        status.detail().contains("missing intermediate"),
        "{}",
        status.detail()
    );

    // A root of the same name with another key vouches for nothing.
    let foreign = TrustStore::new(
        Root::from_pem(&foreign, "other.pem").expect("root"),
        Vec::new(),
    );
    let judged = foreign.judge(&chain(&[&leaf, &intermediate]), CertEnvironment::Test, now);
    assert_eq!(judged.status.name(), "invalid", "{:?}", judged.status);
    assert!(
        judged.status.detail().contains("signature"),
        "{}",
        judged.status.detail()
    );

    let none = TrustStore::new(Vec::new(), Vec::new());
    let status = none
        .judge(&chain(&[&leaf, &intermediate]), CertEnvironment::Test, now)
        .status;
    assert!(
        status.detail().starts_with("no root is trusted for test"),
        "{}",
        status.detail()
    );
}

#[test]
fn a_broken_path_is_invalid() {
    let dir = tempfile::tempdir().expect("dir");
    let (root, leaf, intermediate) = hierarchy(dir.path(), "30");
    let store = TrustStore::new(Root::from_pem(&root, "root.pem").expect("root"), Vec::new());
    // Judged a year on, the leaf has expired.
    let later = crate::agent::unix_now() + 365 * 86_400;
    let status = store
        .judge(
            &chain(&[&leaf, &intermediate]),
            CertEnvironment::Test,
            later,
        )
        .status;
    assert_eq!(
        status,
        ChainStatus::Invalid {
            detail: "a certificate on the path has expired".into()
        }
    );

    // The intermediate as the leaf: a CA certificate cannot sign grants.
    let status = store
        .judge(
            &chain(&[&intermediate]),
            CertEnvironment::Test,
            NOW.max(crate::agent::unix_now()),
        )
        .status;
    assert_eq!(status.name(), "invalid", "{status:?}");
    assert!(
        status.detail().contains("CA certificate"),
        "{}",
        status.detail()
    );
}

#[test]
fn roots_that_are_not_certificates_are_refused_with_the_reason() {
    assert!(Root::from_pem(b"not pem", "x").is_err());
    let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(Root::from_pem(pem, "x").is_err());
}
