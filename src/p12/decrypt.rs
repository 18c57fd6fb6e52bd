//! What the password unlocks: the MAC check (RFC 7292 appendix B key derivation, then
//! HMAC) and decryption with PBES2 or the PKCS#12 PBE schemes, each within the file's
//! budget of key-derivation iterations.

use cbc::cipher::{
    BlockCipherDecrypt, BlockModeDecrypt, InnerIvInit, KeyInit, block_padding::Pkcs7,
};
use der::{Decode, Tag, Tagged, asn1::AnyRef};
use des::{TdesEde2, TdesEde3};
use hmac::{
    EagerHash, Hmac, Mac,
    digest::{Digest, FixedOutputReset, OutputSizeUser, block_api::BlockSizeUser},
};
use pkcs5::pbes2;
use pkcs12::{
    MacData,
    kdf::{self, Pkcs12KeyType},
    pbe_params::Pkcs12PbeParams,
};
use rc2::Rc2;
use spki::AlgorithmIdentifierOwned;
use zeroize::Zeroizing;

use super::{P12Error, SHA1, SHA224, SHA256, SHA384, SHA512, der_error};

/// The password in the two forms PKCS#12 uses: UTF-8 for PBES2, and for the MAC and the
/// PKCS#12 PBE schemes big-endian UTF-16 with a terminating zero character.
pub(super) struct Password<'a> {
    pub(super) utf8: &'a [u8],
    pub(super) bmp: Zeroizing<Vec<u8>>,
}

pub(super) fn bmp_password(password: &str) -> Zeroizing<Vec<u8>> {
    let mut bmp = Zeroizing::new(Vec::with_capacity(password.len() * 2 + 2));
    for unit in password.encode_utf16().chain([0]) {
        bmp.extend_from_slice(&unit.to_be_bytes());
    }
    bmp
}

/// What is left of [`MAX_KDF_ITERATIONS`](super::MAX_KDF_ITERATIONS) for this file.
pub(super) struct Budget {
    pub(super) left: u64,
}

impl Budget {
    /// Accounts for `times` derivations of `iterations` rounds each.
    fn spend(&mut self, iterations: i64, times: u64) -> Result<(), P12Error> {
        let Ok(rounds) = u64::try_from(iterations) else {
            return Err(P12Error::Malformed(format!(
                "iteration count {iterations} is negative"
            )));
        };
        if rounds == 0 {
            return Err(P12Error::Malformed("iteration count is zero".to_owned()));
        }
        let cost = rounds.saturating_mul(times);
        self.left = self
            .left
            .checked_sub(cost)
            .ok_or(P12Error::TooManyIterations)?;
        Ok(())
    }
}

/// Checks the PKCS#12 MAC (RFC 7292 appendix B key derivation, then HMAC).
pub(super) fn mac_matches(
    mac: &MacData,
    bmp_password: &[u8],
    auth_safe: &[u8],
    budget: &mut Budget,
) -> Result<bool, P12Error> {
    let algorithm = mac.mac.algorithm.oid;
    let check = match algorithm {
        SHA1 => hmac_matches::<sha1::Sha1>,
        SHA224 => hmac_matches::<sha2::Sha224>,
        SHA256 => hmac_matches::<sha2::Sha256>,
        SHA384 => hmac_matches::<sha2::Sha384>,
        SHA512 => hmac_matches::<sha2::Sha512>,
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "MAC algorithm {other}"
            )));
        }
    };
    budget.spend(mac.iterations.into(), 1)?;
    Ok(check(
        bmp_password,
        mac.mac_salt.as_bytes(),
        mac.iterations,
        auth_safe,
        mac.mac.digest.as_bytes(),
    ))
}

fn hmac_matches<D>(password: &[u8], salt: &[u8], rounds: i32, data: &[u8], expected: &[u8]) -> bool
where
    D: Digest + FixedOutputReset + BlockSizeUser + EagerHash,
    Hmac<D>: KeyInit + Mac,
{
    let key = Zeroizing::new(kdf::derive_key::<D>(
        password,
        salt,
        Pkcs12KeyType::Mac,
        rounds,
        <D as OutputSizeUser>::output_size(),
    ));
    let Ok(mut mac) = <Hmac<D> as KeyInit>::new_from_slice(&key) else {
        return false;
    };
    mac.update(data);
    mac.verify_slice(expected).is_ok()
}

/// Decrypts a bag or a content with the password-based scheme `algorithm` names.
///
/// Every plaintext in a PKCS#12 file is a DER SEQUENCE (SafeContents or PrivateKeyInfo);
/// anything else means the key was wrong, which without a MAC is how a wrong password
/// shows, so it is reported as [`P12Error::DecryptionFailed`] rather than as garbage.
pub(super) fn decrypt(
    algorithm: &AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let plaintext = decrypt_unchecked(algorithm, ciphertext, secret, budget)?;
    match AnyRef::from_der(&plaintext) {
        Ok(any) if any.tag() == Tag::Sequence => Ok(plaintext),
        _ => Err(P12Error::DecryptionFailed),
    }
}

fn decrypt_unchecked(
    algorithm: &AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let oid = algorithm.oid;
    let Some(params) = &algorithm.parameters else {
        return Err(P12Error::Malformed(format!(
            "encryption algorithm {oid} has no parameters"
        )));
    };
    if oid == pbes2::PBES2_OID {
        return pbes2_decrypt(params, ciphertext, secret, budget);
    }

    // The PKCS#12 PBE schemes (RFC 7292 appendix C): key and IV from the PKCS#12 KDF.
    let key_len = match oid {
        pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC => 24,
        pkcs12::PKCS_12_PBE_WITH_SHAAND2_KEY_TRIPLE_DES_CBC
        | pkcs12::PKCS_12_PBE_WITH_SHAAND128_BIT_RC2_CBC => 16,
        pkcs12::PKCS_12_PBEWITH_SHAAND40_BIT_RC2_CBC => 5,
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "encryption algorithm {other}"
            )));
        }
    };
    let params = params
        .decode_as::<Pkcs12PbeParams>()
        .map_err(|e| der_error("PBE parameters", e))?;
    budget.spend(params.iterations.into(), 2)?;
    let derive = |usage, len| {
        Zeroizing::new(kdf::derive_key::<sha1::Sha1>(
            &secret.bmp,
            params.salt.as_bytes(),
            usage,
            params.iterations,
            len,
        ))
    };
    let key = derive(Pkcs12KeyType::EncryptionKey, key_len);
    let iv = derive(Pkcs12KeyType::Iv, 8);
    let bad_key = |_| P12Error::Malformed("cipher key of the wrong length".to_owned());
    match oid {
        pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC => cbc_decrypt(
            TdesEde3::new_from_slice(&key).map_err(bad_key)?,
            &iv,
            ciphertext,
        ),
        pkcs12::PKCS_12_PBE_WITH_SHAAND2_KEY_TRIPLE_DES_CBC => cbc_decrypt(
            TdesEde2::new_from_slice(&key).map_err(bad_key)?,
            &iv,
            ciphertext,
        ),
        // RC2's effective key length is the key length in these two schemes.
        _ => cbc_decrypt(
            Rc2::new_with_eff_key_len(&key, key_len * 8),
            &iv,
            ciphertext,
        ),
    }
}

/// PBES2 (RFC 8018) with PBKDF2, as current exporters write it.
fn pbes2_decrypt(
    params: &der::Any,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let params = params
        .decode_as::<pbes2::Parameters>()
        .map_err(|e| der_error("PBES2 parameters", e))?;
    match &params.kdf {
        pbes2::Kdf::Pbkdf2(pbkdf2) => budget.spend(pbkdf2.iteration_count.into(), 1)?,
        // scrypt's memory cost is as much a risk as its time; no PKCS#12 exporter
        // in use for these certificates writes it.
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "key derivation {} (in PBES2)",
                other.oid()
            )));
        }
    }
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let len = params
        .decrypt_in_place(secret.utf8, &mut buffer)
        .map_err(pkcs5_error)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

fn cbc_decrypt<C: BlockCipherDecrypt>(
    cipher: C,
    iv: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let decryptor = cbc::Decryptor::<C>::inner_iv_slice_init(cipher, iv)
        .map_err(|_| P12Error::Malformed("IV of the wrong length".to_owned()))?;
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let len = decryptor
        .decrypt_padded::<Pkcs7>(&mut buffer)
        .map_err(|_| P12Error::DecryptionFailed)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

fn pkcs5_error(error: pkcs5::Error) -> P12Error {
    match error {
        pkcs5::Error::DecryptFailed => P12Error::DecryptionFailed,
        pkcs5::Error::UnsupportedAlgorithm { oid } => {
            P12Error::UnsupportedAlgorithm(format!("{oid} (in PBES2)"))
        }
        other => P12Error::Malformed(format!("bad PBES2 encryption: {other}")),
    }
}
