//! Lowercase hexadecimal, as PKCS#11 ids (`CKA_ID`) and certificate fingerprints are
//! written in the config, in logs and in command output.
//!
//! It imports nothing from the crate, so every layer may use it: `config` reads key ids
//! with it, `cert` prints fingerprints, `hsm` and `admin` name token objects.

/// Lowercase hex of bytes, two digits each.
pub(crate) fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex digits (either case); `None` for an empty string, an odd number of
/// digits or anything that is not a hex digit.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{decode, encode};

    #[test]
    fn encodes_lowercase_and_decodes_either_case() {
        assert_eq!(encode(&[0x00, 0x0a, 0xff]), "000aff");
        assert_eq!(encode(&[]), "");
        assert_eq!(decode("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode(&encode(&[1, 2, 3])), Some(vec![1, 2, 3]));
    }

    #[test]
    fn refuses_what_is_not_whole_bytes_of_hex() {
        for text in ["", "a", "abc", "xy", "0g", "é0"] {
            assert_eq!(decode(text), None, "{text:?}");
        }
    }
}
