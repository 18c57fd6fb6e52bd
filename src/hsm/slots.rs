//! Finding the token among the module's slots, and reading a token's information.
//!
//! Token information (label, serial number, PIN flags, session limit) is read with the
//! workspace crate `pkcs11_token_info`, not cryptoki's `get_token_info`: cryptoki 0.12
//! fails the whole read when the token's clock is not in the standard's form, as on
//! opencryptoki 3.8, whose tokens it could then neither find by label nor check. One
//! reader for every module, so the SoftHSM suite runs the path opencryptoki needs.

use std::path::Path;

use cryptoki::{
    context::{Function, Pkcs11},
    error::{Error as Pkcs11Error, Rv, RvError},
    slot::Slot,
};
pub(super) use pkcs11_token_info::Limit;
use pkcs11_token_info::{Error as ReadError, TokenInfo};

use super::{FailedCall, HsmError, TokenSelector};

/// The information of the token in `slot` of `module`, which must be loaded and
/// initialised in this process (it is the same library, found again by its path).
pub(super) fn token_info(module: &Path, slot: Slot) -> Result<TokenInfo, HsmError> {
    pkcs11_token_info::read(module, slot.into()).map_err(|error| read_error(module, error))
}

/// The reader's error as the agent's: the module's own failures as [`HsmError::Module`],
/// C_GetTokenInfo's return value as a failed call, so that its
/// [`Recovery`](super::Recovery) sees a token that went away.
fn read_error(module: &Path, error: ReadError) -> HsmError {
    let module_error = |source| HsmError::Module {
        module: module.display().to_string(),
        source,
    };
    match error {
        ReadError::Load(source) => module_error(Pkcs11Error::LibraryLoading(source)),
        ReadError::FunctionList(rv) => {
            module_error(Pkcs11Error::Pkcs11(rv_error(rv), Function::GetFunctionList))
        }
        ReadError::Missing(_) => module_error(Pkcs11Error::NullFunctionPointer),
        ReadError::TokenInfo(rv) => FailedCall::of("C_GetTokenInfo")(Pkcs11Error::Pkcs11(
            rv_error(rv),
            Function::GetTokenInfo,
        ))
        .into(),
    }
}

/// A failed call's return value. The reader reports failures only, so CKR_OK is not
/// expected; should it come, it is a failure without a better name.
fn rv_error(rv: u64) -> RvError {
    match Rv::from(rv) {
        Rv::Error(rv) => rv,
        Rv::Ok => RvError::FunctionFailed,
    }
}

/// Finds the token's slot. Slot numbers change when tokens are (re)initialised on some
/// modules (SoftHSM), so a label or serial number is the stable choice.
pub(super) fn find_token(
    pkcs11: &Pkcs11,
    module: &Path,
    selector: &TokenSelector,
) -> Result<Slot, HsmError> {
    // Slots are listed without reading their tokens, so that a slot whose token cannot be
    // read does not hide the others.
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(FailedCall::of("C_GetSlotList"))?;
    let mut present = Vec::new();
    for slot in slots {
        if let TokenSelector::Slot(id) = selector {
            if slot.id() == *id {
                return Ok(slot);
            }
            present.push(format!("slot {}", slot.id()));
            continue;
        }
        let info = match token_info(module, slot) {
            Ok(info) if info.token_initialized() => info,
            Ok(_) => continue,
            Err(error) => {
                tracing::debug!(slot = slot.id(), %error, "skipping a slot whose token cannot be read");
                // Named as such, so "tokens present" never says "none" about a slot
                // whose token is there but cannot be read.
                present.push(format!(
                    "slot {} (its token information cannot be read: {error})",
                    slot.id()
                ));
                continue;
            }
        };
        let found = match selector {
            TokenSelector::Label(label) => info.label() == label,
            TokenSelector::Serial(serial) => info.serial_number() == serial,
            TokenSelector::Slot(_) => false,
        };
        if found {
            return Ok(slot);
        }
        present.push(format!(
            "\"{}\" (serial {}, slot {})",
            info.label(),
            info.serial_number(),
            slot.id()
        ));
    }
    Err(HsmError::TokenNotFound {
        label: selector.to_string(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::Recovery;

    /// CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED and CKR_SLOT_ID_INVALID.
    const TOKEN_NOT_PRESENT: u64 = 0xE0;
    const NOT_INITIALIZED: u64 = 0x190;
    const SLOT_ID_INVALID: u64 = 0x3;

    #[test]
    fn a_token_that_went_away_reads_as_gone() {
        let e = read_error(Path::new("/m.so"), ReadError::TokenInfo(TOKEN_NOT_PRESENT));
        assert_eq!(
            e.to_string(),
            "PKCS#11 C_GetTokenInfo failed: TokenNotPresent"
        );
        assert_eq!(
            e.call().map(FailedCall::recovery),
            Some(Recovery::Reinitialize)
        );
        let e = read_error(Path::new("/m.so"), ReadError::TokenInfo(NOT_INITIALIZED));
        assert_eq!(
            e.call().map(FailedCall::recovery),
            Some(Recovery::Reinitialize),
            "{e}"
        );
        let e = read_error(Path::new("/m.so"), ReadError::TokenInfo(SLOT_ID_INVALID));
        assert_eq!(
            e.to_string(),
            "PKCS#11 C_GetTokenInfo failed: SlotIdInvalid"
        );
        // SoftHSM numbers slots anew when a token is initialised: the slot is gone.
        assert_eq!(
            e.call().map(FailedCall::recovery),
            Some(Recovery::Reinitialize)
        );
    }

    #[test]
    fn a_module_the_reader_cannot_use_is_named() {
        let e = read_error(Path::new("/m.so"), ReadError::Missing("C_GetTokenInfo"));
        assert!(matches!(&e, HsmError::Module { module, .. } if module == "/m.so"));
        assert!(
            e.to_string()
                .starts_with("cannot load PKCS#11 module /m.so: "),
            "{e}"
        );
        let e = read_error(Path::new("/m.so"), ReadError::FunctionList(SLOT_ID_INVALID));
        assert!(
            matches!(
                e,
                HsmError::Module {
                    source: Pkcs11Error::Pkcs11(RvError::SlotIdInvalid, Function::GetFunctionList),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_module_that_cannot_be_opened_is_a_module_error() {
        let e = token_info(
            Path::new("/nonexistent/module.so"),
            Slot::try_from(0u64).expect("slot 0"),
        )
        .expect_err("no module");
        assert!(
            e.to_string()
                .starts_with("cannot load PKCS#11 module /nonexistent/module.so: "),
            "{e}"
        );
    }
}
