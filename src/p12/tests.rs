//! The p12 module's tests, on files openssl exports at test time: encryption choices,
//! passwords, chains, and corrupt or hostile input.

use std::path::Path;

use cbc::cipher::KeyInit;
use der::Encode;
use hmac::{Hmac, Mac};
use pkcs5::pbes2;
use pkcs12::kdf::{self, Pkcs12KeyType};
use tempfile::TempDir;

use super::*;
use crate::testing::{openssl, run_openssl};

const PASSWORD: &str = "Virksomhet-2024!";

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).expect("read fixture")
}

/// A self-signed RSA-2048 certificate and key: `key.pem`, `cert.pem`.
fn self_signed(dir: &Path) {
    crate::testing::self_signed(
        dir,
        "key.pem",
        "cert.pem",
        &["-subj", "/CN=Test Virksomhet", "-days", "2"],
    );
}

/// `openssl pkcs12 -export` of `key.pem` + `cert.pem` with extra options, to `out`.
fn export(dir: &Path, out: &str, extra: &[&str]) -> Vec<u8> {
    let pass = format!("pass:{PASSWORD}");
    let mut args = vec![
        "pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem", "-out", out, "-passout", &pass,
    ];
    args.extend_from_slice(extra);
    let _ = openssl(dir, &args);
    read(dir, out)
}

fn modulus(dir: &Path, key: &str) -> Vec<u8> {
    let out =
        String::from_utf8(openssl(dir, &["rsa", "-in", key, "-modulus", "-noout"])).expect("utf-8");
    let hex = out.trim().strip_prefix("Modulus=").expect("Modulus= line");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn cert_der(dir: &Path, pem: &str) -> Vec<u8> {
    openssl(dir, &["x509", "-in", pem, "-outform", "der"])
}

/// The algorithms `openssl pkcs12 -info` reports, to be sure the fixture is what the
/// test claims it is.
fn info(dir: &Path, file: &str) -> String {
    let pass = format!("pass:{PASSWORD}");
    let output = run_openssl(
        dir,
        &[
            "pkcs12", "-info", "-legacy", "-noout", "-in", file, "-passin", &pass,
        ],
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_reads_self_signed(dir: &Path, p12: &[u8]) {
    let contents = read_pkcs12(p12, PASSWORD).expect("read PKCS#12");
    assert_eq!(contents.key.modulus, modulus(dir, "key.pem"));
    assert_eq!(contents.key.public_exponent, [1, 0, 1]);
    assert_eq!(contents.chain, vec![cert_der(dir, "cert.pem")]);
    assert_key_consistent(&contents.key);
}

/// n = p·q and the CRT parts agree with d, checked with the `rsa` crate.
fn assert_key_consistent(parts: &RsaPrivateParts) {
    use rsa::{BoxedUint, PrivateKey};
    let uint = |b: &[u8]| {
        BoxedUint::from_be_slice(b, u32::try_from(b.len() * 8).expect("bits")).expect("uint")
    };
    let key = PrivateKey::from_components(
        uint(&parts.modulus),
        uint(&parts.public_exponent),
        uint(&parts.private_exponent),
        vec![uint(&parts.prime1), uint(&parts.prime2)],
    )
    .expect("RSA key from components");
    key.validate().expect("consistent RSA key");
}

#[test]
fn reads_openssl3_default_export() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    let p12 = export(dir.path(), "modern.p12", &[]);
    let info = info(dir.path(), "modern.p12");
    assert!(info.contains("MAC: sha256"), "{info}");
    assert!(info.contains("PBES2, PBKDF2, AES-256-CBC"), "{info}");
    assert_reads_self_signed(dir.path(), &p12);
}

#[test]
fn reads_legacy_export() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    let p12 = export(dir.path(), "legacy.p12", &["-legacy"]);
    let info = info(dir.path(), "legacy.p12");
    assert!(info.contains("MAC: sha1"), "{info}");
    assert!(info.contains("pbeWithSHA1And40BitRC2-CBC"), "{info}");
    assert!(info.contains("pbeWithSHA1And3-KeyTripleDES-CBC"), "{info}");
    assert_reads_self_signed(dir.path(), &p12);
}

#[test]
fn reads_other_encryption_choices() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (&["-certpbe", "NONE"], "PKCS7 Data\nCertificate bag"),
        (
            &["-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES"],
            "Encrypted data: pbeWithSHA1And3-KeyTripleDES-CBC",
        ),
        (
            &[
                "-legacy",
                "-keypbe",
                "PBE-SHA1-2DES",
                "-certpbe",
                "PBE-SHA1-RC2-128",
            ],
            "pbeWithSHA1And2-KeyTripleDES-CBC",
        ),
        (&["-keypbe", "NONE", "-certpbe", "NONE"], "Key bag"),
        (
            &["-keypbe", "AES-128-CBC", "-macalg", "sha512"],
            "MAC: sha512",
        ),
        (&["-keypbe", "DES-EDE3-CBC"], "PBES2, PBKDF2, DES-EDE3-CBC"),
        (&["-nomac"], "PBES2"),
    ];
    for (options, expect) in cases {
        let p12 = export(dir.path(), "variant.p12", options);
        let info = info(dir.path(), "variant.p12");
        assert!(info.contains(expect), "{options:?}: {info}");
        assert_reads_self_signed(dir.path(), &p12);
    }
}

#[test]
fn empty_password() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    for extra in [&[][..], &["-legacy"][..]] {
        let mut args = vec![
            "pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem", "-out", "e.p12",
            "-passout", "pass:",
        ];
        args.extend_from_slice(extra);
        let _ = openssl(dir.path(), &args);
        let contents = read_pkcs12(&read(dir.path(), "e.p12"), "").expect("read");
        assert_eq!(contents.key.modulus, modulus(dir.path(), "key.pem"));
    }
}

#[test]
fn empty_password_given_as_no_password() {
    // Some exporters key the MAC with an empty password without the terminating zero
    // character ("no password"); OpenSSL accepts both, and so does this reader.
    let dir = TempDir::new().expect("temp dir");
    let d = dir.path();
    self_signed(d);
    let _ = openssl(
        d,
        &[
            "pkcs12", "-export", "-keypbe", "NONE", "-certpbe", "NONE", "-inkey", "key.pem", "-in",
            "cert.pem", "-out", "n.p12", "-passout", "pass:",
        ],
    );
    let mut pfx = Pfx::from_der(&read(d, "n.p12")).expect("parse");
    let auth_safe = pfx
        .auth_safe
        .content
        .decode_as::<OctetString>()
        .expect("octets");
    let mac = pfx.mac_data.as_mut().expect("MAC");
    assert_eq!(mac.mac.algorithm.oid, SHA256);
    let key = kdf::derive_key::<sha2::Sha256>(
        &[],
        mac.mac_salt.as_bytes(),
        Pkcs12KeyType::Mac,
        mac.iterations,
        32,
    );
    let mut hmac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("key");
    hmac.update(auth_safe.as_bytes());
    mac.mac.digest = OctetString::new(hmac.finalize().into_bytes().to_vec()).expect("mac");
    let p12 = pfx.to_der().expect("encode");

    let contents = read_pkcs12(&p12, "").expect("read");
    assert_eq!(contents.key.modulus, modulus(d, "key.pem"));
    let err = read_pkcs12(&p12, "x").expect_err("wrong password accepted");
    assert!(matches!(err, P12Error::WrongPassword), "{err:?}");
}

/// Root → intermediate → leaf.
fn ca_chain(dir: &Path) {
    crate::testing::self_signed(
        dir,
        "root.key",
        "root.pem",
        &["-subj", "/CN=Test Root CA", "-days", "3"],
    );
    let ca_ext = "ca.ext";
    std::fs::write(
        dir.join(ca_ext),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .expect("write ext");
    sign(
        dir,
        "inter",
        "/CN=Test Issuing CA",
        "root",
        Some(ca_ext),
        "2",
    );
    sign(dir, "leaf", "/CN=Test Virksomhet", "inter", None, "3");
}

fn sign(dir: &Path, name: &str, subject: &str, ca: &str, ext: Option<&str>, serial: &str) {
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let _ = openssl(
        dir,
        &[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
            subject,
        ],
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-set_serial",
        serial,
        "-days",
        "2",
        "-out",
        &pem,
    ];
    if let Some(ext) = ext {
        args.extend_from_slice(&["-extfile", ext]);
    }
    let _ = openssl(dir, &args);
}

#[test]
fn chain_is_leaf_then_issuers() {
    let dir = TempDir::new().expect("temp dir");
    let dir = dir.path();
    ca_chain(dir);
    let pass = format!("pass:{PASSWORD}");
    let (leaf, inter, root) = (
        cert_der(dir, "leaf.pem"),
        cert_der(dir, "inter.pem"),
        cert_der(dir, "root.pem"),
    );

    // Leaf + its issuing CA, as in the task: [leaf, ca].
    let _ = openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            "leaf.key",
            "-in",
            "leaf.pem",
            "-certfile",
            "inter.pem",
            "-out",
            "two.p12",
            "-passout",
            &pass,
        ],
    );
    let contents = read_pkcs12(&read(dir, "two.p12"), PASSWORD).expect("read");
    assert_eq!(contents.key.modulus, modulus(dir, "leaf.key"));
    assert_eq!(contents.chain, vec![leaf.clone(), inter.clone()]);

    // The whole chain, handed to openssl root first. OpenSSL 3.0 then stores
    // [leaf, root, intermediate]; the reader must still give leaf, intermediate, root.
    let mut bundle = read(dir, "root.pem");
    bundle.extend(read(dir, "inter.pem"));
    bundle.extend(read(dir, "leaf.pem"));
    std::fs::write(dir.join("bundle.pem"), bundle).expect("write bundle");
    let _ = openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-legacy",
            "-inkey",
            "leaf.key",
            "-in",
            "bundle.pem",
            "-out",
            "three.p12",
            "-passout",
            &pass,
        ],
    );
    let contents = read_pkcs12(&read(dir, "three.p12"), PASSWORD).expect("read");
    assert_eq!(contents.chain, vec![leaf, inter, root]);
}

#[test]
fn wrong_password() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    for extra in [&[][..], &["-legacy"][..]] {
        let p12 = export(dir.path(), "w.p12", extra);
        for wrong in ["wrong", "", "virksomhet-2024!", "Virksomhet-2024!\n", "🔑"] {
            let err = read_pkcs12(&p12, wrong).expect_err("wrong password accepted");
            assert!(
                matches!(err, P12Error::WrongPassword),
                "{extra:?} {wrong:?}: {err:?}"
            );
        }
    }
    let err = read_pkcs12(&export(dir.path(), "w.p12", &[]), "x").expect_err("wrong");
    assert_eq!(
        err.to_string(),
        "wrong password, or the file is damaged (the PKCS#12 integrity check failed)"
    );

    // Without a MAC the password is only found wrong when decryption fails.
    for extra in [
        &["-nomac"][..],
        &["-nomac", "-legacy"][..],
        &["-nomac", "-certpbe", "AES-256-CBC"][..],
    ] {
        let p12 = export(dir.path(), "nomac.p12", extra);
        for wrong in ["wrong", "", "Virksomhet-2024"] {
            let err = read_pkcs12(&p12, wrong).expect_err("wrong password accepted");
            assert!(
                matches!(err, P12Error::DecryptionFailed),
                "{extra:?} {wrong:?}: {err:?}"
            );
        }
    }
}

#[test]
fn corrupt_input_is_an_error_not_a_panic() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    for extra in [&[][..], &["-legacy"][..]] {
        let p12 = export(dir.path(), "c.p12", extra);
        for len in [0, 1, 2, 4, 16, 100, p12.len() / 2, p12.len() - 1] {
            assert!(
                read_pkcs12(&p12[..len], PASSWORD).is_err(),
                "truncated to {len}"
            );
        }
        let mut longer = p12.clone();
        longer.push(0);
        assert!(read_pkcs12(&longer, PASSWORD).is_err(), "trailing byte");
        for i in (0..p12.len()).step_by(3) {
            let mut flipped = p12.clone();
            flipped[i] ^= 0x5a;
            // Every byte is either structure or covered by the MAC.
            assert!(read_pkcs12(&flipped, PASSWORD).is_err(), "byte {i} flipped");
        }
    }

    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let len = usize::try_from(next() % 600).expect("small");
        let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        if round % 2 == 0 && bytes.len() > 4 {
            // Look like a DER SEQUENCE so the parser gets further in.
            bytes[0] = 0x30;
            bytes[1] = 0x82;
        }
        assert!(read_pkcs12(&bytes, PASSWORD).is_err());
    }

    // Absurd lengths.
    for bytes in [
        &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff, 0x02, 0x01, 0x03][..],
        &[0x30, 0x88, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
        &[0x30, 0x80, 0x02, 0x01, 0x03, 0x00, 0x00][..],
    ] {
        assert!(read_pkcs12(bytes, PASSWORD).is_err());
    }
}

#[test]
fn huge_iteration_counts_are_refused_quickly() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    let p12 = export(dir.path(), "i.p12", &[]);

    // MAC iterations.
    let mut pfx = Pfx::from_der(&p12).expect("parse");
    if let Some(mac) = pfx.mac_data.as_mut() {
        mac.iterations = i32::MAX;
    }
    let hostile = pfx.to_der().expect("encode");
    let start = std::time::Instant::now();
    let err = read_pkcs12(&hostile, PASSWORD).expect_err("accepted");
    assert!(matches!(err, P12Error::TooManyIterations), "{err:?}");
    assert!(start.elapsed().as_secs() < 2);

    // PBKDF2 iterations in a file without a MAC.
    let p12 = export(dir.path(), "i.p12", &["-nomac", "-certpbe", "AES-256-CBC"]);
    let pfx = Pfx::from_der(&p12).expect("parse");
    let auth_safe = pfx
        .auth_safe
        .content
        .decode_as::<OctetString>()
        .expect("octets");
    let mut safes = AuthenticatedSafe::from_der(auth_safe.as_bytes()).expect("safes");
    for content in &mut safes {
        if content.content_type != ID_ENCRYPTED_DATA {
            continue;
        }
        let mut encrypted = content.content.decode_as::<EncryptedData>().expect("enc");
        let alg = &mut encrypted.enc_content_info.content_enc_alg;
        let mut params = alg
            .parameters
            .as_ref()
            .expect("params")
            .decode_as::<pbes2::Parameters>()
            .expect("pbes2");
        if let pbes2::Kdf::Pbkdf2(pbkdf2) = &mut params.kdf {
            pbkdf2.iteration_count = u32::MAX;
        }
        alg.parameters = Some(der::Any::encode_from(&params).expect("any"));
        content.content = der::Any::encode_from(&encrypted).expect("any");
    }
    let auth_safe = OctetString::new(safes.to_der().expect("encode")).expect("octets");
    let pfx = Pfx {
        version: pfx.version,
        auth_safe: ContentInfo {
            content_type: ID_DATA,
            content: der::Any::encode_from(&auth_safe).expect("any"),
        },
        mac_data: None,
    };
    let start = std::time::Instant::now();
    let err = read_pkcs12(&pfx.to_der().expect("encode"), PASSWORD).expect_err("accepted");
    assert!(matches!(err, P12Error::TooManyIterations), "{err:?}");
    assert!(start.elapsed().as_secs() < 2);
}

#[test]
fn ec_key_is_not_rsa() {
    let dir = TempDir::new().expect("temp dir");
    let d = dir.path();
    let _ = openssl(
        d,
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-out",
            "key.pem",
        ],
    );
    let _ = openssl(
        d,
        &[
            "req", "-x509", "-new", "-key", "key.pem", "-out", "cert.pem", "-subj", "/CN=EC",
            "-days", "2",
        ],
    );
    let p12 = export(d, "ec.p12", &[]);
    let err = read_pkcs12(&p12, PASSWORD).expect_err("EC key accepted");
    assert!(matches!(err, P12Error::NotRsa), "{err:?}");
    assert!(
        err.to_string()
            .contains("Maskinporten only accepts RSA (RS256/RS384/RS512)"),
        "{err}"
    );
}

/// One PFX without a MAC holding the contents of all `files` (each made with `-nomac`).
fn merge_without_mac(files: &[Vec<u8>]) -> Vec<u8> {
    let mut safes: Vec<ContentInfo> = Vec::new();
    for file in files {
        let pfx = Pfx::from_der(file).expect("parse");
        assert!(pfx.mac_data.is_none(), "merge files made with -nomac");
        let octets = pfx
            .auth_safe
            .content
            .decode_as::<OctetString>()
            .expect("octets");
        safes.extend(AuthenticatedSafe::from_der(octets.as_bytes()).expect("safes"));
    }
    let octets = OctetString::new(safes.to_der().expect("encode")).expect("octets");
    let pfx = Pfx {
        version: pkcs12::pfx::Version::V3,
        auth_safe: ContentInfo {
            content_type: ID_DATA,
            content: der::Any::encode_from(&octets).expect("any"),
        },
        mac_data: None,
    };
    pfx.to_der().expect("encode")
}

#[test]
fn key_and_certificate_problems() {
    let dir = TempDir::new().expect("temp dir");
    let d = dir.path();
    self_signed(d);
    crate::testing::self_signed(
        d,
        "other.key",
        "other.pem",
        &["-subj", "/CN=Other", "-days", "2"],
    );
    let pass = format!("pass:{PASSWORD}");
    let make = |out: &str, args: &[&str]| {
        let mut all = vec![
            "pkcs12", "-export", "-nomac", "-out", out, "-passout", &pass,
        ];
        all.extend_from_slice(args);
        let _ = openssl(d, &all);
        read(d, out)
    };
    let key_only = make("k.p12", &["-nocerts", "-inkey", "key.pem"]);
    let other_key_only = make("ok.p12", &["-nocerts", "-inkey", "other.key"]);
    let other_cert_only = make("oc.p12", &["-nokeys", "-in", "other.pem"]);
    let cert_only = make("c.p12", &["-nokeys", "-in", "cert.pem"]);

    let err = read_pkcs12(&cert_only, PASSWORD).expect_err("no key");
    assert!(matches!(err, P12Error::NoKey), "{err:?}");
    let err = read_pkcs12(&key_only, PASSWORD).expect_err("no certificate");
    assert!(matches!(err, P12Error::NoCertificate), "{err:?}");
    let mixed = merge_without_mac(&[key_only.clone(), other_cert_only.clone()]);
    let err = read_pkcs12(&mixed, PASSWORD).expect_err("someone else's certificate");
    assert!(matches!(err, P12Error::NoCertificate), "{err:?}");
    let two = merge_without_mac(&[key_only.clone(), other_key_only, cert_only.clone()]);
    let err = read_pkcs12(&two, PASSWORD).expect_err("two keys");
    assert!(matches!(err, P12Error::MultipleKeys), "{err:?}");

    // An unrelated certificate stays in the chain, after the leaf.
    let extra = merge_without_mac(&[other_cert_only, key_only, cert_only]);
    let contents = read_pkcs12(&extra, PASSWORD).expect("read");
    assert_eq!(
        contents.chain,
        vec![cert_der(d, "cert.pem"), cert_der(d, "other.pem")]
    );
}

#[test]
fn debug_does_not_print_key_values() {
    let dir = TempDir::new().expect("temp dir");
    self_signed(dir.path());
    let p12 = export(dir.path(), "d.p12", &[]);
    let contents = read_pkcs12(&p12, PASSWORD).expect("read");
    let shown = format!("{contents:?}");
    assert!(shown.contains("modulus_bits: 2048"), "{shown}");
    let prime_start = format!("{:?}", &contents.key.prime1[..3]);
    let prime_start = prime_start.trim_matches(['[', ']']);
    assert!(!shown.contains(prime_start), "{shown}");
}
