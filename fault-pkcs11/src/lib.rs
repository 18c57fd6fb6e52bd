//! A PKCS#11 module for tests that behaves like the network HSMs the agent meets in
//! production, which the test machines cannot install. It loads a real module (SoftHSM),
//! passes every call through, and injects faults on command.
//!
//! Set `FAULT_PKCS11_MODULE` to the real module's path, and `FAULT_PKCS11_CONTROL` to a
//! control file, read again whenever it changes, with `key = value` lines:
//!
//! | key | effect | models |
//! |---|---|---|
//! | `sign_latency_ms = 2` | every `C_Sign` that signs (not the length query before it) takes this long first, waited with 1 ns of timer slack as a socket read would wait | a network HSM's round trip (Luna, CloudHSM) |
//! | `sign_errors = DEVICE_ERROR 3` | the next 3 `C_Sign` calls after the file changed fail with that return value (`DEVICE_ERROR`, `GENERAL_ERROR`, `SESSION_HANDLE_INVALID`, `DEVICE_REMOVED`, `USER_NOT_LOGGED_IN`); `sign_errors = SESSION_HANDLE_INVALID every 50` fails every 50th instead. After GENERAL_ERROR or SESSION_HANDLE_INVALID that session is dead: every later call on it answers SESSION_HANDLE_INVALID until it is closed. USER_NOT_LOGGED_IN logs the application out for real (C_Logout), so every session stays logged out until someone logs in again | CloudHSM throttling (DEVICE_ERROR), Luna's GENERAL_ERROR after which only a new context helps, a session the HSM dropped, a network HSM that reconnected without the login |
//! | `per_session_handles = true` | object handles are valid only in the session that found them: `C_FindObjects` answers handles of its own session, and any other session gets KEY_HANDLE_INVALID (`C_SignInit`) or OBJECT_HANDLE_INVALID (`C_GetAttributeValue`) for them | AWS CloudHSM Client SDK 5 |
//! | `max_sessions = 8` | `C_OpenSession` fails with SESSION_COUNT past 8 open sessions, and `C_GetTokenInfo` says so | YubiHSM 2 (16 sessions), appliance session caps |
//! | `token = absent` | the token is gone: `C_GetSlotList` lists no token, and calls on its sessions and objects fail with DEVICE_REMOVED | an HSM restart, a re-provisioned or removed token |
//! | `pin_flags = final_try` (or `locked`) | `C_GetTokenInfo` reports CKF_USER_PIN_FINAL_TRY (or CKF_USER_PIN_LOCKED) | a token after wrong PINs: one more locks it (or it is locked) |
//! | `instant_sign = true` | `C_SignInit`/`C_Sign` answer at once with a fixed 256-byte signature (not valid), with no call to the real module; with `sign_latency_ms`, after that wait | a fast HSM, to measure the agent's own ceiling; with a latency, a network HSM whose signing costs the agent no CPU |
//!
//! The module never unloads (it is linked with `-z nodelete`), like many vendor modules:
//! an agent that drops it and loads it again after a token loss meets the same instance,
//! so it must finalize it before trying again.
//!
//! Nothing here is meant for production: it exists so the suite can prove how the agent
//! handles each fault. With `pkcs11-token-info` (one C call the agent needs), it is one of
//! the two crates of the project with `unsafe` code.

use std::{
    path::PathBuf,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use cryptoki_sys::{
    CK_BBOOL, CK_BYTE_PTR, CK_FLAGS, CK_FUNCTION_LIST, CK_FUNCTION_LIST_PTR_PTR, CK_MECHANISM_PTR,
    CK_NOTIFY, CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_SESSION_HANDLE_PTR, CK_SLOT_ID,
    CK_SLOT_ID_PTR, CK_TOKEN_INFO_PTR, CK_ULONG, CK_ULONG_PTR, CK_VOID_PTR, CKR_ARGUMENTS_BAD,
    CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_FUNCTION_FAILED, CKR_GENERAL_ERROR,
    CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID, CKR_OK, CKR_SESSION_COUNT,
    CKR_SESSION_HANDLE_INVALID, CKR_USER_NOT_LOGGED_IN,
};

/// Length of the fixed signature of `instant_sign` (an RSA-2048 signature's).
const INSTANT_SIGNATURE_LEN: usize = 256;

/// The real module, loaded once and kept loaded for the life of the process.
struct Real {
    _library: libloading::Library,
    functions: CK_FUNCTION_LIST,
}

/// The faults in force, as the control file last said.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Faults {
    sign_latency: Duration,
    sign_errors: Option<(CK_RV, Schedule)>,
    per_session_handles: bool,
    max_sessions: Option<u64>,
    token_absent: bool,
    instant_sign: bool,
    pin_flags: CK_FLAGS,
}

/// Which `C_Sign` calls fail.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Schedule {
    /// The next n after the control file changed.
    Next(u64),
    /// Every nth.
    Every(u64),
}

/// The control file's faults, and when it was read.
struct Control {
    path: Option<PathBuf>,
    modified: Option<SystemTime>,
    faults: Faults,
}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();
static OURS: OnceLock<CK_FUNCTION_LIST> = OnceLock::new();
static CONTROL: Mutex<Option<Control>> = Mutex::new(None);
/// `sign_errors` still to inject since the control file last changed.
static ERRORS_LEFT: AtomicU64 = AtomicU64::new(0);
/// `C_Sign` calls since the control file last changed, for `sign_errors = RV every N`.
static SIGNS: AtomicU64 = AtomicU64::new(0);
static OPEN_SESSIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The faults this thread's last `C_SignInit` read, and its session. The `C_Sign` calls
    /// of that operation (cryptoki makes two: the length, then the signature) use them
    /// instead of reading the control file again: faults change between operations, and
    /// with `instant_sign` the file's `stat` would be most of what a sign costs.
    static OPERATION: std::cell::Cell<Option<(CK_SESSION_HANDLE, Faults)>> =
        const { std::cell::Cell::new(None) };
}
/// Sessions a failure killed: the real module's session is still open (so closing it
/// frees it), but every other call on it fails.
static DEAD_SESSIONS: Mutex<Vec<CK_SESSION_HANDLE>> = Mutex::new(Vec::new());

fn dead_sessions() -> std::sync::MutexGuard<'static, Vec<CK_SESSION_HANDLE>> {
    match DEAD_SESSIONS.lock() {
        Ok(dead) => dead,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Why a call on `session` fails before it reaches the real module: the token is gone,
/// or a failure killed the session.
fn refusal(faults: &Faults, session: CK_SESSION_HANDLE) -> Option<CK_RV> {
    if faults.token_absent {
        Some(CKR_DEVICE_REMOVED)
    } else if dead_sessions().contains(&session) {
        Some(CKR_SESSION_HANDLE_INVALID)
    } else {
        None
    }
}

fn real() -> Option<&'static CK_FUNCTION_LIST> {
    REAL.get_or_init(load_real)
        .as_ref()
        .ok()
        .map(|r| &r.functions)
}

fn load_real() -> Result<Real, String> {
    let path = std::env::var_os("FAULT_PKCS11_MODULE")
        .ok_or("FAULT_PKCS11_MODULE is not set: name the real PKCS#11 module")?;
    // SAFETY: loading a PKCS#11 module runs its initialisers; the path is the test's own
    // choice of a real module (SoftHSM), which is what a PKCS#11 consumer does too.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
    let get: libloading::Symbol<'_, unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| e.to_string())?;
    // SAFETY: `list` is a valid out-pointer; the module fills it with a pointer to its
    // static function list, which lives as long as the library (kept in `Real`).
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("C_GetFunctionList of the real module: {rv:#x}"));
    }
    // SAFETY: checked non-null above; the list is plain data (version and pointers).
    let functions = unsafe { *list };
    Ok(Real {
        _library: library,
        functions,
    })
}

/// The faults in force now: the control file is read again when its mtime changes, and a
/// change re-arms `sign_errors`.
fn faults() -> Faults {
    let mut control = match CONTROL.lock() {
        Ok(control) => control,
        Err(poisoned) => poisoned.into_inner(),
    };
    let control = control.get_or_insert_with(|| Control {
        path: std::env::var_os("FAULT_PKCS11_CONTROL").map(PathBuf::from),
        modified: None,
        faults: Faults::default(),
    });
    if let Some(path) = &control.path {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified != control.modified {
            control.modified = modified;
            control.faults = std::fs::read_to_string(path)
                .map(|text| parse(&text))
                .unwrap_or_default();
            let left = match control.faults.sign_errors {
                Some((_, Schedule::Next(n))) => n,
                _ => 0,
            };
            ERRORS_LEFT.store(left, Ordering::SeqCst);
            SIGNS.store(0, Ordering::SeqCst);
        }
    }
    control.faults
}

fn parse(text: &str) -> Faults {
    let mut faults = Faults::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "sign_latency_ms" => {
                faults.sign_latency = Duration::from_millis(value.parse().unwrap_or(0));
            }
            "sign_errors" => {
                let mut words = value.split_whitespace();
                let rv = match words.next() {
                    Some("DEVICE_ERROR") => Some(CKR_DEVICE_ERROR),
                    Some("GENERAL_ERROR") => Some(CKR_GENERAL_ERROR),
                    Some("SESSION_HANDLE_INVALID") => Some(CKR_SESSION_HANDLE_INVALID),
                    Some("DEVICE_REMOVED") => Some(CKR_DEVICE_REMOVED),
                    Some("USER_NOT_LOGGED_IN") => Some(CKR_USER_NOT_LOGGED_IN),
                    _ => None,
                };
                let schedule = match (words.next(), words.next()) {
                    (Some("every"), Some(n)) => {
                        n.parse().ok().filter(|n| *n > 0).map(Schedule::Every)
                    }
                    (Some(n), None) => n.parse().ok().map(Schedule::Next),
                    (None, _) => Some(Schedule::Next(1)),
                    _ => None,
                };
                faults.sign_errors = rv.zip(schedule);
            }
            "max_sessions" => faults.max_sessions = value.parse().ok(),
            "token" => faults.token_absent = value == "absent",
            "instant_sign" => faults.instant_sign = value == "true",
            "per_session_handles" => faults.per_session_handles = value == "true",
            "pin_flags" => {
                faults.pin_flags = match value {
                    "final_try" => cryptoki_sys::CKF_USER_PIN_FINAL_TRY,
                    "locked" => cryptoki_sys::CKF_USER_PIN_LOCKED,
                    _ => 0,
                }
            }
            _ => {}
        }
    }
    faults
}

/// The module's entry point: the real module's functions, with ours in front where a
/// fault can apply.
///
/// # Safety
/// `list` must be a valid pointer to write the list's address to, as PKCS#11 requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let Some(real) = real() else {
        return CKR_GENERAL_ERROR;
    };
    let ours = OURS.get_or_init(|| CK_FUNCTION_LIST {
        C_GetFunctionList: Some(C_GetFunctionList),
        C_GetSlotList: Some(get_slot_list),
        C_GetTokenInfo: Some(get_token_info),
        C_OpenSession: Some(open_session),
        C_CloseSession: Some(close_session),
        C_CloseAllSessions: Some(close_all_sessions),
        C_SignInit: Some(sign_init),
        C_Sign: Some(sign),
        C_GetAttributeValue: Some(get_attribute_value),
        C_FindObjectsInit: Some(find_objects_init),
        C_FindObjects: Some(find_objects),
        ..*real
    });
    // SAFETY: checked non-null; PKCS#11 callers treat the list as read-only, so handing
    // out a pointer to the shared static is what every module does.
    unsafe { *list = std::ptr::from_ref(ours).cast_mut() };
    CKR_OK
}

/// Calls the real module's `name`, or fails when it has none.
macro_rules! forward {
    ($name:ident ( $($arg:expr),* )) => {
        match real().and_then(|r| r.$name) {
            // SAFETY: the arguments are the caller's, passed on unchanged to the
            // function the caller meant to call.
            Some(f) => unsafe { f($($arg),*) },
            None => CKR_FUNCTION_FAILED,
        }
    };
}

unsafe extern "C" fn get_slot_list(
    token_present: CK_BBOOL,
    list: CK_SLOT_ID_PTR,
    count: CK_ULONG_PTR,
) -> CK_RV {
    if token_present != 0 && faults().token_absent {
        if count.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        // SAFETY: checked non-null; the caller gives room for the count.
        unsafe { *count = 0 };
        return CKR_OK;
    }
    forward!(C_GetSlotList(token_present, list, count))
}

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: CK_TOKEN_INFO_PTR) -> CK_RV {
    let rv = forward!(C_GetTokenInfo(slot, info));
    if rv == CKR_OK && !info.is_null() {
        let faults = faults();
        // SAFETY: the real module filled `info`, a valid CK_TOKEN_INFO, just now.
        let info = unsafe { &mut *info };
        if let Some(max) = faults.max_sessions {
            info.ulMaxSessionCount = max;
        }
        info.flags |= faults.pin_flags;
    }
    rv
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: CK_VOID_PTR,
    notify: CK_NOTIFY,
    session: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    let faults = faults();
    if faults.token_absent {
        return cryptoki_sys::CKR_TOKEN_NOT_PRESENT;
    }
    if let Some(max) = faults.max_sessions
        && OPEN_SESSIONS.load(Ordering::SeqCst) >= max
    {
        return CKR_SESSION_COUNT;
    }
    let rv = forward!(C_OpenSession(slot, flags, application, notify, session));
    if rv == CKR_OK {
        let _ = OPEN_SESSIONS.fetch_add(1, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn close_session(session: CK_SESSION_HANDLE) -> CK_RV {
    dead_sessions().retain(|s| *s != session);
    let rv = forward!(C_CloseSession(session));
    if rv == CKR_OK {
        let _ = OPEN_SESSIONS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            Some(n.saturating_sub(1))
        });
    }
    rv
}

unsafe extern "C" fn close_all_sessions(slot: CK_SLOT_ID) -> CK_RV {
    let rv = forward!(C_CloseAllSessions(slot));
    if rv == CKR_OK {
        OPEN_SESSIONS.store(0, Ordering::SeqCst);
        dead_sessions().clear();
    }
    rv
}

unsafe extern "C" fn sign_init(
    session: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_PTR,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    let faults = faults();
    if let Some(rv) = refusal(&faults, session) {
        return rv;
    }
    let Some(key) = own_handle(&faults, session, key) else {
        return CKR_KEY_HANDLE_INVALID;
    };
    OPERATION.set(Some((session, faults)));
    if faults.instant_sign {
        return CKR_OK;
    }
    forward!(C_SignInit(session, mechanism, key))
}

unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: CK_BYTE_PTR,
    data_len: CK_ULONG,
    signature: CK_BYTE_PTR,
    signature_len: CK_ULONG_PTR,
) -> CK_RV {
    let faults = match OPERATION.get() {
        Some((started, faults)) if started == session => faults,
        _ => faults(),
    };
    if !signature.is_null() {
        // The call that signs ends the operation (as does any failure, below).
        OPERATION.set(None);
    }
    if let Some(rv) = refusal(&faults, session) {
        OPERATION.set(None);
        return rv;
    }
    if let Some((rv, schedule)) = faults.sign_errors
        && injected(schedule)
    {
        // A C_Sign that fails ends its operation (PKCS#11 2.40, 5.11); end the real
        // module's too, as a real HSM's failure would, so the failure is the only fault.
        if !faults.instant_sign {
            let mut scratch = [0u8; 4096];
            let mut scratch_len = scratch.len() as CK_ULONG;
            let _ = forward!(C_Sign(
                session,
                data,
                data_len,
                scratch.as_mut_ptr(),
                &mut scratch_len
            ));
        }
        if rv == CKR_GENERAL_ERROR || rv == CKR_SESSION_HANDLE_INVALID {
            dead_sessions().push(session);
        }
        if rv == CKR_USER_NOT_LOGGED_IN {
            let _ = forward!(C_Logout(session));
        }
        OPERATION.set(None);
        return rv;
    }
    // The round trip is the signing call's: a length query (no buffer) answers at once,
    // as a client library answers it from the key size it knows, so one sign costs one
    // round trip, not two (cryptoki asks for the length first).
    if !faults.sign_latency.is_zero() && !signature.is_null() {
        round_trip(faults.sign_latency);
    }
    if faults.instant_sign {
        if signature_len.is_null() {
            return CKR_ARGUMENTS_BAD;
        }
        if !signature.is_null() {
            // SAFETY: the caller says `signature` has `*signature_len` bytes; we write
            // only when that is enough, as C_Sign's contract requires.
            unsafe {
                if (*signature_len as usize) < INSTANT_SIGNATURE_LEN {
                    *signature_len = INSTANT_SIGNATURE_LEN as CK_ULONG;
                    return cryptoki_sys::CKR_BUFFER_TOO_SMALL;
                }
                std::ptr::write_bytes(signature, 0x5a, INSTANT_SIGNATURE_LEN);
            }
        }
        // SAFETY: checked non-null above.
        unsafe { *signature_len = INSTANT_SIGNATURE_LEN as CK_ULONG };
        return CKR_OK;
    }
    forward!(C_Sign(session, data, data_len, signature, signature_len))
}

/// Waits `latency` as a network HSM's client library waits for the appliance's reply.
///
/// That library blocks on its socket and wakes when the reply arrives. A timer sleep also
/// waits out the thread's timer slack (50 µs by default), which no reply would, and which
/// would be charged to the agent in the bench's network-HSM figure. So the sleep runs with
/// a slack of 1 ns, and the calling thread's own slack is put back after it. What is left
/// over the configured latency is the kernel's wake-up, as for a reply.
fn round_trip(latency: Duration) {
    // SAFETY: PR_GET_TIMERSLACK takes no argument and only reads the calling thread's
    // slack (in ns, as the return value).
    let previous = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK) };
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long; it changes only this thread's slack.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    std::thread::sleep(latency);
    if let Ok(previous) = libc::c_ulong::try_from(previous)
        && previous > 0
    {
        // SAFETY: as above; `previous` is the slack the thread had.
        let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, previous) };
    }
}

unsafe extern "C" fn get_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: cryptoki_sys::CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    let faults = faults();
    if let Some(rv) = refusal(&faults, session) {
        return rv;
    }
    let Some(object) = own_handle(&faults, session, object) else {
        return CKR_OBJECT_HANDLE_INVALID;
    };
    forward!(C_GetAttributeValue(session, object, template, count))
}

unsafe extern "C" fn find_objects_init(
    session: CK_SESSION_HANDLE,
    template: cryptoki_sys::CK_ATTRIBUTE_PTR,
    count: CK_ULONG,
) -> CK_RV {
    if let Some(rv) = refusal(&faults(), session) {
        return rv;
    }
    forward!(C_FindObjectsInit(session, template, count))
}

unsafe extern "C" fn find_objects(
    session: CK_SESSION_HANDLE,
    objects: cryptoki_sys::CK_OBJECT_HANDLE_PTR,
    max: CK_ULONG,
    found: CK_ULONG_PTR,
) -> CK_RV {
    let faults = faults();
    if let Some(rv) = refusal(&faults, session) {
        return rv;
    }
    let rv = forward!(C_FindObjects(session, objects, max, found));
    if rv == CKR_OK && faults.per_session_handles && !objects.is_null() && !found.is_null() {
        // SAFETY: the real module wrote `*found` (at most `max`) handles to `objects`.
        let handles = unsafe { std::slice::from_raw_parts_mut(objects, *found as usize) };
        for handle in handles {
            *handle |= session << SESSION_SHIFT;
        }
    }
    rv
}

/// Where `per_session_handles` puts the session in a handle (SoftHSM's handles and
/// session handles are small numbers).
const SESSION_SHIFT: u32 = 32;

/// The real module's handle for `handle` used in `session`, or `None` when
/// `per_session_handles` is on and the handle belongs to another session (or was found
/// before the fault was turned on, which is another session's too).
fn own_handle(
    faults: &Faults,
    session: CK_SESSION_HANDLE,
    handle: CK_OBJECT_HANDLE,
) -> Option<CK_OBJECT_HANDLE> {
    if !faults.per_session_handles {
        return Some(handle);
    }
    (handle >> SESSION_SHIFT == session).then_some(handle & ((1 << SESSION_SHIFT) - 1))
}

/// Whether this `C_Sign` is one `sign_errors` fails.
fn injected(schedule: Schedule) -> bool {
    match schedule {
        Schedule::Next(_) => ERRORS_LEFT
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok(),
        Schedule::Every(n) => (SIGNS.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_file_is_parsed() {
        let faults = parse(
            "sign_latency_ms = 2\nsign_errors = DEVICE_ERROR 3\nmax_sessions = 8\ntoken = absent\ninstant_sign = true\nper_session_handles = true\npin_flags = locked\nunknown = 1\n",
        );
        assert_eq!(
            faults,
            Faults {
                sign_latency: Duration::from_millis(2),
                sign_errors: Some((CKR_DEVICE_ERROR, Schedule::Next(3))),
                per_session_handles: true,
                max_sessions: Some(8),
                token_absent: true,
                instant_sign: true,
                pin_flags: cryptoki_sys::CKF_USER_PIN_LOCKED,
            }
        );
        assert_eq!(parse(""), Faults::default());
        assert_eq!(parse("sign_errors = NOPE 2").sign_errors, None);
        assert_eq!(
            parse("sign_errors = SESSION_HANDLE_INVALID every 50").sign_errors,
            Some((CKR_SESSION_HANDLE_INVALID, Schedule::Every(50)))
        );
        assert_eq!(
            parse("sign_errors = DEVICE_ERROR every 0").sign_errors,
            None
        );
        assert_eq!(
            parse("sign_errors = USER_NOT_LOGGED_IN").sign_errors,
            Some((CKR_USER_NOT_LOGGED_IN, Schedule::Next(1)))
        );
    }
}
