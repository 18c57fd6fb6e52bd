//! Why a CA revoked a certificate: RFC 5280's CRLReason, shared by OCSP and CRLs.

/// RFC 5280 §5.3.1's CRLReason (code 7 is unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// unspecified (0).
    Unspecified,
    /// keyCompromise (1): the private key is known to others.
    KeyCompromise,
    /// cACompromise (2).
    CaCompromise,
    /// affiliationChanged (3).
    AffiliationChanged,
    /// superseded (4).
    Superseded,
    /// cessationOfOperation (5).
    CessationOfOperation,
    /// certificateHold (6): suspended, may be released.
    CertificateHold,
    /// removeFromCRL (8).
    RemoveFromCrl,
    /// privilegeWithdrawn (9).
    PrivilegeWithdrawn,
    /// aACompromise (10).
    AaCompromise,
}

impl Reason {
    /// The reason with this CRLReason code; `None` for 7 and codes past 10.
    pub(super) fn from_code(code: u32) -> Option<Reason> {
        Some(match code {
            0 => Reason::Unspecified,
            1 => Reason::KeyCompromise,
            2 => Reason::CaCompromise,
            3 => Reason::AffiliationChanged,
            4 => Reason::Superseded,
            5 => Reason::CessationOfOperation,
            6 => Reason::CertificateHold,
            8 => Reason::RemoveFromCrl,
            9 => Reason::PrivilegeWithdrawn,
            10 => Reason::AaCompromise,
            _ => return None,
        })
    }

    /// RFC 5280's name ("keyCompromise", "cACompromise", ...), as the CA's tools print it.
    pub fn name(&self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "keyCompromise",
            Reason::CaCompromise => "cACompromise",
            Reason::AffiliationChanged => "affiliationChanged",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessationOfOperation",
            Reason::CertificateHold => "certificateHold",
            Reason::RemoveFromCrl => "removeFromCRL",
            Reason::PrivilegeWithdrawn => "privilegeWithdrawn",
            Reason::AaCompromise => "aACompromise",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_rfc_5280_names() {
        let names: Vec<_> = (0..12)
            .map(|code| Reason::from_code(code).map(|r| r.name()))
            .collect();
        assert_eq!(
            names,
            [
                Some("unspecified"),
                Some("keyCompromise"),
                Some("cACompromise"),
                Some("affiliationChanged"),
                Some("superseded"),
                Some("cessationOfOperation"),
                Some("certificateHold"),
                None,
                Some("removeFromCRL"),
                Some("privilegeWithdrawn"),
                Some("aACompromise"),
                None,
            ]
        );
    }
}
