//! Reads a PKCS#11 token's information (`C_GetTokenInfo`) leniently: the label, serial
//! number, flags and session limit, without parsing the token's clock.
//!
//! # Why this crate exists
//!
//! cryptoki 0.12's `Pkcs11::get_token_info` parses `CK_TOKEN_INFO.utcTime` whenever the
//! token sets `CKF_CLOCK_ON_TOKEN`, and fails the whole call when that field is not
//! `YYYYMMDDhhmmss00`. opencryptoki before 3.11 (Debian 12 ships 3.8.1) writes it as
//! `HH:MM:SS`, so through cryptoki such a token has no label, no serial number and no
//! flags, and cannot be selected by label or serial. The agent's crate forbids `unsafe`
//! code, so the one C call that reads the information without that parse lives here.
//!
//! The fix belongs in cryptoki, and this crate is written to be proposed there: read the
//! clock leniently, as the raw string it is or an `Option` that is `None` when it does
//! not parse, instead of failing the token's other fields. [`TokenInfo`] mirrors
//! cryptoki's type (same accessor names, the same three-way [`Limit`]), with
//! [`TokenInfo::utc_time`] as that raw string. Once cryptoki reads such tokens, the
//! agent can go back to `get_token_info` and this crate can go.
//!
//! # Usage rules
//!
//! [`read`] opens the module by its path, which gives the library the process has
//! already loaded (the dynamic loader counts references and returns the same instance),
//! and calls its `C_GetTokenInfo`. It never calls `C_Initialize` or `C_Finalize`: the
//! module must already be initialised by its owner in this process (for the agent,
//! cryptoki's `Pkcs11`), which must keep it loaded while this runs. Otherwise the
//! module answers `CKR_CRYPTOKI_NOT_INITIALIZED` and [`read`] returns that as an
//! [`Error::TokenInfo`]. The library handle taken here is released when [`read`] returns;
//! that only drops this reference.

use std::{fmt, path::Path};

use cryptoki_sys::{
    CK_EFFECTIVELY_INFINITE, CK_FLAGS, CK_FUNCTION_LIST, CK_RV, CK_SLOT_ID, CK_TOKEN_INFO,
    CK_ULONG, CK_UNAVAILABLE_INFORMATION, CKF_CLOCK_ON_TOKEN, CKF_TOKEN_INITIALIZED,
    CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED,
    CKF_USER_PIN_TO_BE_CHANGED, CKR_OK,
};

/// The information of the token in `slot` of the PKCS#11 module at `module`, which this
/// process has loaded and initialised (see the crate's usage rules). Blocking.
pub fn read(module: &Path, slot: CK_SLOT_ID) -> Result<TokenInfo, Error> {
    // SAFETY: loading a shared library runs its initialisers. The path is the PKCS#11
    // module the caller has already loaded and initialised, so this finds that loaded
    // instance and runs nothing new; a module that was not loaded is one the caller
    // chose to use as a PKCS#11 module anyway.
    let library = unsafe { libloading::Library::new(module) }.map_err(Error::Load)?;
    // SAFETY: every PKCS#11 module exports C_GetFunctionList with this signature (PKCS#11
    // 2.40, section 5.4); the symbol is not used beyond `library`'s life.
    let get_function_list = unsafe {
        library.get::<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV>(
            b"C_GetFunctionList\0",
        )
    }
    .map_err(Error::Load)?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer for the one pointer the function writes; the
    // call may be made before C_Initialize.
    let rv = unsafe { get_function_list(&mut list) };
    if rv != CKR_OK {
        return Err(Error::FunctionList(rv));
    }
    // SAFETY: the module answered CKR_OK, so a non-null `list` points to its function
    // list, which it keeps for as long as it is loaded (`library` holds it here). The
    // list is plain data: a version and function pointers, copied out.
    let functions = unsafe { list.as_ref() }
        .copied()
        .ok_or(Error::Missing("the function list"))?;
    let get_token_info = functions
        .C_GetTokenInfo
        .ok_or(Error::Missing("C_GetTokenInfo"))?;
    let mut info = CK_TOKEN_INFO::default();
    // SAFETY: the function pointer comes from the module's own list, `library` keeps the
    // module loaded during the call, and `info` is a CK_TOKEN_INFO the module may write
    // whole. C_GetTokenInfo takes no session and changes nothing; on a module its owner
    // initialised for threads (the agent passes CKF_OS_LOCKING_OK) any thread may call
    // it, and on one not initialised it answers CKR_CRYPTOKI_NOT_INITIALIZED.
    let rv = unsafe { get_token_info(slot, &mut info) };
    drop(library);
    if rv != CKR_OK {
        return Err(Error::TokenInfo(rv));
    }
    Ok(TokenInfo::from_raw(&info))
}

/// A token's information, its text fields trimmed of the blank padding PKCS#11 puts
/// after them. Text that is not UTF-8 is decoded lossily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    label: String,
    manufacturer: String,
    model: String,
    serial_number: String,
    flags: CK_FLAGS,
    max_session_count: Limit,
    utc_time: Option<String>,
}

/// A limit the token reports, such as its maximum session count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many.
    Max(u64),
    /// The token does not say (`CK_UNAVAILABLE_INFORMATION`).
    Unavailable,
    /// No practical limit (`CK_EFFECTIVELY_INFINITE`).
    Infinite,
}

impl TokenInfo {
    /// The token's label (`label`), as it was initialised with.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The token's manufacturer (`manufacturerID`).
    pub fn manufacturer(&self) -> &str {
        &self.manufacturer
    }

    /// The token's model (`model`).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The token's serial number (`serialNumber`).
    pub fn serial_number(&self) -> &str {
        &self.serial_number
    }

    /// All of the token's flags (`CKF_*`), for the ones without a method here.
    pub fn flags(&self) -> CK_FLAGS {
        self.flags
    }

    /// Whether the token has been initialised (`CKF_TOKEN_INITIALIZED`).
    pub fn token_initialized(&self) -> bool {
        self.flags & CKF_TOKEN_INITIALIZED != 0
    }

    /// Whether a wrong user PIN was entered since the last good one
    /// (`CKF_USER_PIN_COUNT_LOW`).
    pub fn user_pin_count_low(&self) -> bool {
        self.flags & CKF_USER_PIN_COUNT_LOW != 0
    }

    /// Whether one more wrong user PIN locks the token (`CKF_USER_PIN_FINAL_TRY`).
    pub fn user_pin_final_try(&self) -> bool {
        self.flags & CKF_USER_PIN_FINAL_TRY != 0
    }

    /// Whether the user PIN is locked (`CKF_USER_PIN_LOCKED`).
    pub fn user_pin_locked(&self) -> bool {
        self.flags & CKF_USER_PIN_LOCKED != 0
    }

    /// Whether the user PIN must be changed before use (`CKF_USER_PIN_TO_BE_CHANGED`).
    pub fn user_pin_to_be_changed(&self) -> bool {
        self.flags & CKF_USER_PIN_TO_BE_CHANGED != 0
    }

    /// How many sessions the token allows at once (`ulMaxSessionCount`).
    pub fn max_session_count(&self) -> Limit {
        self.max_session_count
    }

    /// The token's clock (`utcTime`) as the token wrote it, when it has one
    /// (`CKF_CLOCK_ON_TOKEN`). Not parsed: PKCS#11 says `YYYYMMDDhhmmss00`, but some
    /// tokens write other forms (opencryptoki 3.8: `HH:MM:SS`).
    pub fn utc_time(&self) -> Option<&str> {
        self.utc_time.as_deref()
    }

    fn from_raw(info: &CK_TOKEN_INFO) -> TokenInfo {
        TokenInfo {
            label: padded_text(&info.label),
            manufacturer: padded_text(&info.manufacturerID),
            model: padded_text(&info.model),
            serial_number: padded_text(&info.serialNumber),
            flags: info.flags,
            max_session_count: limit(info.ulMaxSessionCount),
            utc_time: (info.flags & CKF_CLOCK_ON_TOKEN != 0).then(|| padded_text(&info.utcTime)),
        }
    }
}

/// A fixed-size text field: blank padded by the standard, NUL padded by some modules.
fn padded_text(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

#[allow(
    clippy::useless_conversion,
    reason = "CK_ULONG is u64 here, but 32 bits on Windows"
)]
fn limit(value: CK_ULONG) -> Limit {
    match value {
        CK_UNAVAILABLE_INFORMATION => Limit::Unavailable,
        CK_EFFECTIVELY_INFINITE => Limit::Infinite,
        max => Limit::Max(max.into()),
    }
}

/// Why a token's information could not be read.
#[derive(Debug)]
pub enum Error {
    /// The module could not be opened, or exports no `C_GetFunctionList`.
    Load(libloading::Error),
    /// `C_GetFunctionList` answered this return value, never `CKR_OK`.
    FunctionList(CK_RV),
    /// The module gave no function list, or its list has no such function.
    Missing(&'static str),
    /// `C_GetTokenInfo` answered this return value, never `CKR_OK`: the slot has no
    /// token, the module is not initialised (`CKR_CRYPTOKI_NOT_INITIALIZED`), ...
    TokenInfo(CK_RV),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Load(error) => write!(f, "cannot open the PKCS#11 module: {error}"),
            Error::FunctionList(rv) => write!(f, "C_GetFunctionList answered {rv:#010x}"),
            Error::Missing(what) => write!(f, "the PKCS#11 module has no {what}"),
            Error::TokenInfo(rv) => write!(f, "C_GetTokenInfo answered {rv:#010x}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Load(error) => Some(error),
            Error::FunctionList(_) | Error::Missing(_) | Error::TokenInfo(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        reason = "a test that cannot go on should fail loudly"
    )]

    use cryptoki_sys::{CKF_LOGIN_REQUIRED, CKR_CRYPTOKI_NOT_INITIALIZED};

    use super::*;

    fn field<const N: usize>(text: &[u8], pad: u8) -> [u8; N] {
        let mut field = [pad; N];
        field[..text.len()].copy_from_slice(text);
        field
    }

    /// opencryptoki 3.8's soft token, as it answers on Debian 12.
    fn opencryptoki_soft_token() -> CK_TOKEN_INFO {
        CK_TOKEN_INFO {
            label: field(b"grant-agent-test", b' '),
            manufacturerID: field(b"IBM Corp.", b' '),
            model: field(b"IBM SoftTok", b' '),
            serialNumber: field(b"123", b' '),
            flags: CKF_TOKEN_INITIALIZED | CKF_CLOCK_ON_TOKEN | CKF_LOGIN_REQUIRED,
            ulMaxSessionCount: CK_ULONG::MAX - 1,
            utcTime: field(b"03:05:18", b' '),
            ..CK_TOKEN_INFO::default()
        }
    }

    #[test]
    fn a_clock_in_another_form_leaves_the_other_fields_readable() {
        let info = TokenInfo::from_raw(&opencryptoki_soft_token());
        assert_eq!(
            info,
            TokenInfo {
                label: "grant-agent-test".into(),
                manufacturer: "IBM Corp.".into(),
                model: "IBM SoftTok".into(),
                serial_number: "123".into(),
                flags: CKF_TOKEN_INITIALIZED | CKF_CLOCK_ON_TOKEN | CKF_LOGIN_REQUIRED,
                max_session_count: Limit::Max(u64::MAX - 1),
                utc_time: Some("03:05:18".into()),
            }
        );
        assert!(info.token_initialized());
        assert!(!info.user_pin_locked() && !info.user_pin_final_try());
    }

    #[test]
    fn padding_is_trimmed_and_inner_spaces_kept() {
        assert_eq!(padded_text(&field::<32>(b"my token", b' ')), "my token");
        assert_eq!(padded_text(&field::<16>(b"0a1b", b'\0')), "0a1b");
        assert_eq!(padded_text(&field::<16>(b" lead", b' ')), " lead");
        assert_eq!(padded_text(&[b' '; 16]), "");
        assert_eq!(padded_text(&field::<8>(b"t\xffx", b' ')), "t\u{fffd}x");
    }

    #[test]
    fn session_limits_name_the_special_values() {
        assert_eq!(limit(CK_UNAVAILABLE_INFORMATION), Limit::Unavailable);
        assert_eq!(limit(CK_EFFECTIVELY_INFINITE), Limit::Infinite);
        assert_eq!(limit(16), Limit::Max(16));
    }

    #[test]
    fn the_clock_is_absent_without_clock_on_token_and_pin_flags_read() {
        let raw = CK_TOKEN_INFO {
            flags: CKF_TOKEN_INITIALIZED | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_COUNT_LOW,
            ..opencryptoki_soft_token()
        };
        let info = TokenInfo::from_raw(&raw);
        assert_eq!(info.utc_time(), None);
        assert!(info.user_pin_final_try() && info.user_pin_count_low());
        assert!(!info.user_pin_locked() && !info.user_pin_to_be_changed());
    }

    #[test]
    fn a_module_that_cannot_be_opened_is_an_error() {
        let e = read(Path::new("/nonexistent/libpkcs11.so"), 0).expect_err("no module");
        assert!(matches!(e, Error::Load(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("cannot open the PKCS#11 module: ")
        );
        assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
    }

    /// The whole C path against a real module (SoftHSM, where Debian or Ubuntu put it,
    /// unless `TEST_PKCS11_MODULE` names another), which nothing has initialised here:
    /// the module's own answer comes back.
    #[test]
    fn an_uninitialised_module_answers_not_initialised() {
        let module = std::env::var("TEST_PKCS11_MODULE").unwrap_or_else(|_| {
            [
                "/usr/lib/softhsm/libsofthsm2.so".to_owned(),
                format!(
                    "/usr/lib/{}-linux-gnu/softhsm/libsofthsm2.so",
                    std::env::consts::ARCH
                ),
            ]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("SoftHSM (softhsm/setup.sh installs it), or TEST_PKCS11_MODULE")
        });
        let e = read(Path::new(&module), 0).expect_err("not initialised");
        assert!(
            matches!(e, Error::TokenInfo(CKR_CRYPTOKI_NOT_INITIALIZED)),
            "{e}"
        );
        assert_eq!(e.to_string(), "C_GetTokenInfo answered 0x00000190");
    }
}
