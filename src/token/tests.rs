//! The token module's tests: MP codes and the retry backoff.

use super::*;

#[test]
fn mp_codes_come_from_the_uri_or_the_description() {
    let mut e = OAuthError {
        error: "invalid_grant".into(),
        description: "Invalid assertion (trace_id: 1f)".into(),
        uri: "https://docs.digdir.no/maskinporten/errors/MP-130".into(),
    };
    assert_eq!(e.mp_code(), Some("MP-130"));
    assert!(e.hint().is_some_and(|h| h.contains("NTP")));
    e.uri.clear();
    assert_eq!(e.mp_code(), None);
    e.description = "MP-251: no delegation".into();
    assert_eq!(e.mp_code(), Some("MP-251"));
    for code in [
        "MP-011", "MP-012", "MP-100", "MP-110", "MP-120", "MP-121", "MP-122", "MP-123", "MP-124",
        "MP-130", "MP-200", "MP-201", "MP-250", "MP-251", "MP-301", "MP-302", "MP-303",
    ] {
        e.uri = format!("https://x/errors/{code}");
        assert!(e.hint().is_some(), "{code} has a hint");
    }
    assert_eq!(
        e.to_string(),
        "invalid_grant: MP-251: no delegation (error_uri https://x/errors/MP-303)"
    );
    // MP-124 is an invalid signature: an expired certificate as much as the wrong
    // environment's.
    e.uri = "https://x/errors/MP-124".into();
    let hint = e.hint().unwrap_or_default();
    assert!(
        hint.contains("signature") && hint.contains("expired"),
        "{hint}"
    );
    assert!(hint.contains("other environment"), "{hint}");
    e.uri = "https://x/errors/MP-303".into();
    assert!(e.hint().is_some_and(|h| h.contains("system register")));
}

#[test]
fn backoff_grows_is_capped_and_jittered() {
    for attempt in 1..10 {
        let full = Duration::from_millis(200 << (attempt - 1).min(4)).min(Duration::from_secs(3));
        let b = backoff(attempt);
        assert!(b >= full / 2 && b <= full, "{attempt}: {b:?}");
    }
}
