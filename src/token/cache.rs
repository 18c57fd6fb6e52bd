//! The access token cache: one entry per distinct request, single flight per entry, and
//! refresh ahead of expiry.
//!
//! An entry holds the last token and, while Maskinporten is being asked, the one flight
//! in progress. Every request for the entry that arrives meanwhile waits for that flight
//! instead of starting its own, so a burst of identical requests costs one call. The
//! flight runs in its own task: a caller that gives up does not cancel it for the others.
//!
//! Freshness uses the monotonic clock from when the answer arrived, so a wall-clock jump
//! neither keeps a dead token nor throws away a good one. That clock is tokio's
//! [`Instant`]: the monotonic clock itself, except in tests with paused time, which move
//! it with `tokio::time::advance` instead of sleeping.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use super::{AccessToken, TokenError, lock};

/// What a flight ends with, shared by everyone waiting for it.
pub(super) type Outcome = Result<Arc<AccessToken>, Arc<TokenError>>;

/// Identifies equal requests: the resolved key and environment, and the claims that
/// decide what the token may do. Scopes and resources are sorted, since their order
/// changes nothing at Maskinporten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CacheKey {
    pub(super) key: String,
    pub(super) client_id: String,
    pub(super) scopes: Vec<String>,
    pub(super) resources: Vec<String>,
    pub(super) consumer_org: String,
    pub(super) environment: String,
    pub(super) authorization_details: String,
    /// SHA-256 of the pid (empty without one): a person-restricted token is only for
    /// that person, and the number itself stays out of anything printable.
    pub(super) pid_sha256: Vec<u8>,
    pub(super) iss_onbehalfof: String,
}

struct Entry {
    token: Option<Arc<AccessToken>>,
    flight: Option<watch::Receiver<Option<Outcome>>>,
    used: Instant,
}

impl Entry {
    /// The flight in progress, unless its task ended without reporting (it panicked).
    fn live_flight(&self) -> Option<watch::Receiver<Option<Outcome>>> {
        self.flight
            .as_ref()
            .filter(|rx| rx.has_changed().is_ok())
            .cloned()
    }
}

/// A flight this request must run: fetch a token, then [`TokenCache::land`] it.
pub(super) struct Flight {
    key: CacheKey,
    report: watch::Sender<Option<Outcome>>,
}

/// What the cache says about a request.
pub(super) enum Lookup {
    /// A fresh token; with a flight to start in the background when it is due a refresh.
    Fresh(Arc<AccessToken>, Option<Flight>),
    /// Another request is fetching this entry: wait for it.
    Wait(watch::Receiver<Option<Outcome>>),
    /// Nothing usable: run this flight and wait for it like everyone else.
    Fetch(Flight, watch::Receiver<Option<Outcome>>),
}

/// The cache. Operations hold its lock only to look and to store, never across a call.
pub(super) struct TokenCache {
    entries: Mutex<HashMap<CacheKey, Entry>>,
    capacity: usize,
    margin: Duration,
    refresh_ahead: Duration,
}

impl TokenCache {
    pub(super) fn new(capacity: usize, margin: Duration, refresh_ahead: Duration) -> Self {
        TokenCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            margin,
            refresh_ahead,
        }
    }

    /// Looks `key` up; `force` skips the cached token (but joins a flight in progress,
    /// which brings a new token anyway).
    pub(super) fn lookup(&self, key: &CacheKey, force: bool) -> Lookup {
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        if !entries.contains_key(key) && entries.len() >= self.capacity {
            evict(&mut entries, now, self);
        }
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            token: None,
            flight: None,
            used: now,
        });
        entry.used = now;
        let flight = entry.live_flight();
        if !force && let Some(token) = entry.token.clone() {
            let stale_at = token.stale_at(self.margin);
            if now < stale_at {
                let due = now + token.capped(self.refresh_ahead) >= stale_at;
                let refresh = (due && flight.is_none()).then(|| start(entry, key).0);
                return Lookup::Fresh(token, refresh);
            }
        }
        match flight {
            Some(rx) => Lookup::Wait(rx),
            None => {
                let (flight, rx) = start(entry, key);
                Lookup::Fetch(flight, rx)
            }
        }
    }

    /// Ends a flight: stores a new token (a failure keeps the old one, which may still
    /// serve others) and wakes everyone waiting.
    pub(super) fn land(&self, flight: Flight, outcome: Outcome) {
        {
            let mut entries = lock(&self.entries);
            if let Some(entry) = entries.get_mut(&flight.key) {
                if let Ok(token) = &outcome {
                    entry.token = Some(Arc::clone(token));
                }
                entry.flight = None;
            }
        }
        let _ = flight.report.send_replace(Some(outcome));
    }

    /// Entries now, for tests and metrics.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

fn start(entry: &mut Entry, key: &CacheKey) -> (Flight, watch::Receiver<Option<Outcome>>) {
    let (report, rx) = watch::channel(None);
    entry.flight = Some(rx.clone());
    (
        Flight {
            key: key.clone(),
            report,
        },
        rx,
    )
}

/// Makes room for one entry: first every entry with nothing fresh and nothing in
/// flight, then, if none was, the least recently used idle entry.
fn evict(entries: &mut HashMap<CacheKey, Entry>, now: Instant, cache: &TokenCache) {
    let before = entries.len();
    entries.retain(|_, e| {
        e.live_flight().is_some()
            || e.token
                .as_ref()
                .is_some_and(|t| now < t.stale_at(cache.margin))
    });
    if entries.len() < before {
        return;
    }
    let oldest = entries
        .iter()
        .filter(|(_, e)| e.live_flight().is_none())
        .min_by_key(|(_, e)| e.used)
        .map(|(k, _)| k.clone());
    if let Some(key) = oldest {
        let _ = entries.remove(&key);
    }
}

/// Waits for a flight's outcome until `deadline`; `None` when the deadline came first.
pub(super) async fn wait(
    mut rx: watch::Receiver<Option<Outcome>>,
    deadline: impl Into<Instant>,
) -> Option<Outcome> {
    let waited = tokio::time::timeout_at(deadline.into(), rx.wait_for(Option::is_some)).await;
    match waited {
        Ok(Ok(outcome)) => outcome.clone(),
        // The flight's task ended without a word; report it as a failed flight.
        Ok(Err(_)) => Some(Err(Arc::new(TokenError::BadAnswer(
            "the token request ended without an answer".into(),
        )))),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str) -> CacheKey {
        CacheKey {
            key: "default".into(),
            client_id: client.into(),
            scopes: vec!["a:b".into()],
            resources: vec![],
            consumer_org: String::new(),
            environment: "test".into(),
            authorization_details: String::new(),
            pid_sha256: Vec::new(),
            iss_onbehalfof: String::new(),
        }
    }

    fn token(lifetime: u64) -> Arc<AccessToken> {
        Arc::new(AccessToken::new(
            "secret".to_owned().into(),
            "Bearer".into(),
            "a:b".into(),
            Duration::from_secs(lifetime),
        ))
    }

    #[test]
    fn one_flight_per_entry_then_hits() {
        let cache = TokenCache::new(10, Duration::from_secs(30), Duration::from_secs(60));
        let Lookup::Fetch(flight, _) = cache.lookup(&key("a"), false) else {
            panic!("the first lookup fetches");
        };
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Wait(_)));
        assert!(matches!(cache.lookup(&key("a"), true), Lookup::Wait(_)));
        cache.land(flight, Ok(token(3600)));
        assert!(matches!(
            cache.lookup(&key("a"), false),
            Lookup::Fresh(_, None)
        ));
        assert!(matches!(cache.lookup(&key("a"), true), Lookup::Fetch(..)));
    }

    #[test]
    fn a_failed_flight_is_shared_and_not_cached() {
        let cache = TokenCache::new(10, Duration::ZERO, Duration::ZERO);
        let Lookup::Fetch(flight, rx) = cache.lookup(&key("a"), false) else {
            panic!("fetch");
        };
        let Lookup::Wait(rx2) = cache.lookup(&key("a"), false) else {
            panic!("wait");
        };
        cache.land(flight, Err(Arc::new(TokenError::Deadline { attempts: 1 })));
        for rx in [rx, rx2] {
            assert!(matches!(&*rx.borrow(), Some(Err(_))));
        }
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Fetch(..)));
    }

    #[test]
    fn margin_and_refresh_ahead_are_at_most_a_quarter_of_the_lifetime() {
        // A 8 s token: margin min(30, 2) = 2 s, refresh ahead min(60, 2) = 2 s; so it is
        // fresh and not due at first.
        let cache = TokenCache::new(10, Duration::from_secs(30), Duration::from_secs(60));
        let Lookup::Fetch(flight, _) = cache.lookup(&key("a"), false) else {
            panic!("fetch");
        };
        cache.land(flight, Ok(token(8)));
        assert!(matches!(
            cache.lookup(&key("a"), false),
            Lookup::Fresh(_, None)
        ));
        let t = token(8);
        assert_eq!(
            t.stale_at(Duration::from_secs(30)) - t.received,
            Duration::from_secs(6)
        );
        assert_eq!(t.capped(Duration::from_secs(1)), Duration::from_secs(1));
    }

    #[test]
    fn a_dead_flight_does_not_block_the_entry() {
        let cache = TokenCache::new(10, Duration::ZERO, Duration::ZERO);
        let Lookup::Fetch(flight, _) = cache.lookup(&key("a"), false) else {
            panic!("fetch");
        };
        drop(flight);
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Fetch(..)));
    }

    #[test]
    fn size_is_bounded_evicting_idle_entries() {
        let cache = TokenCache::new(3, Duration::ZERO, Duration::ZERO);
        let mut flights = Vec::new();
        for client in ["a", "b", "c"] {
            let Lookup::Fetch(flight, _) = cache.lookup(&key(client), false) else {
                panic!("fetch");
            };
            flights.push(flight);
        }
        // All three in flight: nothing can go, so the cache grows by one rather than
        // drop a flight someone waits for.
        let Lookup::Fetch(d, _) = cache.lookup(&key("d"), false) else {
            panic!("fetch");
        };
        assert_eq!(cache.len(), 4);
        for flight in flights {
            cache.land(flight, Ok(token(3600)));
        }
        cache.land(d, Ok(token(3600)));
        let _ = cache.lookup(&key("e"), false);
        assert_eq!(cache.len(), 4, "the least recently used entry made room");
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Fetch(..)));
    }

    /// Runs `key`'s first flight and lands `token` from it.
    fn cached(cache: &TokenCache, client: &str, token: Arc<AccessToken>) {
        let Lookup::Fetch(flight, _) = cache.lookup(&key(client), false) else {
            panic!("{client}: the first lookup fetches");
        };
        cache.land(flight, Ok(token));
    }

    fn holds(cache: &TokenCache, client: &str) -> bool {
        lock(&cache.entries).contains_key(&key(client))
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_fresh_until_its_lifetime_less_the_margin() {
        let cache = TokenCache::new(10, Duration::from_secs(30), Duration::ZERO);
        cached(&cache, "a", token(3600));
        tokio::time::advance(Duration::from_millis(3_569_999)).await;
        assert!(matches!(
            cache.lookup(&key("a"), false),
            Lookup::Fresh(_, None)
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            matches!(cache.lookup(&key("a"), false), Lookup::Fetch(..)),
            "stale 30 s before the token expires"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_margin_is_at_most_a_quarter_of_a_short_lifetime() {
        // An 8 s token with a 30 s margin would never be served; its margin is 2 s.
        let cache = TokenCache::new(10, Duration::from_secs(30), Duration::ZERO);
        cached(&cache, "a", token(8));
        tokio::time::advance(Duration::from_millis(5_999)).await;
        assert!(matches!(
            cache.lookup(&key("a"), false),
            Lookup::Fresh(_, None)
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Fetch(..)));
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_starts_exactly_one_flight_when_due() {
        // Stale at 3570 s; due a refresh 60 s before that.
        let cache = TokenCache::new(10, Duration::from_secs(30), Duration::from_secs(60));
        let old = token(3600);
        cached(&cache, "a", Arc::clone(&old));
        tokio::time::advance(Duration::from_millis(3_509_999)).await;
        assert!(matches!(
            cache.lookup(&key("a"), false),
            Lookup::Fresh(_, None)
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        let Lookup::Fresh(served, Some(refresh)) = cache.lookup(&key("a"), false) else {
            panic!("due: the old token is served and a refresh starts");
        };
        assert!(Arc::ptr_eq(&served, &old));
        for _ in 0..3 {
            assert!(
                matches!(cache.lookup(&key("a"), false), Lookup::Fresh(_, None)),
                "one refresh at a time"
            );
        }
        assert!(
            matches!(cache.lookup(&key("a"), true), Lookup::Wait(_)),
            "a forced refresh joins the flight under way"
        );
        let new = token(3600);
        cache.land(refresh, Ok(Arc::clone(&new)));
        // Past the old token's staleness, the new one is served and not due.
        tokio::time::advance(Duration::from_secs(61)).await;
        let Lookup::Fresh(served, None) = cache.lookup(&key("a"), false) else {
            panic!("the refreshed token is fresh");
        };
        assert!(Arc::ptr_eq(&served, &new));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_entry_is_fetched_again_and_its_token_not_served() {
        let cache = TokenCache::new(10, Duration::ZERO, Duration::ZERO);
        cached(&cache, "a", token(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        let Lookup::Fetch(flight, _) = cache.lookup(&key("a"), false) else {
            panic!("a stale token is fetched again");
        };
        assert!(
            matches!(cache.lookup(&key("a"), false), Lookup::Wait(_)),
            "others wait for the new token rather than get the stale one"
        );
        let new = token(60);
        cache.land(flight, Ok(Arc::clone(&new)));
        let Lookup::Fresh(served, None) = cache.lookup(&key("a"), false) else {
            panic!("fresh again");
        };
        assert!(Arc::ptr_eq(&served, &new));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_takes_stale_and_empty_entries_before_fresh_ones() {
        let cache = TokenCache::new(4, Duration::ZERO, Duration::ZERO);
        cached(&cache, "old", token(3600));
        cached(&cache, "short", token(10));
        cached(&cache, "fresh", token(3600));
        let Lookup::Fetch(failed, _) = cache.lookup(&key("failed"), false) else {
            panic!("fetch");
        };
        cache.land(failed, Err(Arc::new(TokenError::Deadline { attempts: 1 })));
        tokio::time::advance(Duration::from_secs(10)).await;
        // Full: "short" is stale and "failed" has nothing; both go, though "old" was
        // used least recently.
        let Lookup::Fetch(_new, _) = cache.lookup(&key("new"), false) else {
            panic!("fetch");
        };
        assert!(!holds(&cache, "short"));
        assert!(!holds(&cache, "failed"));
        assert!(holds(&cache, "old"));
        assert!(holds(&cache, "fresh"));
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn among_fresh_idle_entries_the_least_recently_used_goes() {
        let cache = TokenCache::new(3, Duration::ZERO, Duration::ZERO);
        // "flying" is the oldest entry, but a flight is never dropped.
        let Lookup::Fetch(_flying, _) = cache.lookup(&key("flying"), false) else {
            panic!("fetch");
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        cached(&cache, "a", token(3600));
        tokio::time::advance(Duration::from_secs(1)).await;
        cached(&cache, "b", token(3600));
        tokio::time::advance(Duration::from_secs(1)).await;
        // "a" was stored before "b" but used since.
        assert!(matches!(cache.lookup(&key("a"), false), Lookup::Fresh(..)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let _ = cache.lookup(&key("c"), false);
        assert!(!holds(&cache, "b"), "the least recently used idle entry");
        assert!(holds(&cache, "a"));
        assert!(holds(&cache, "flying"));
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flight_whose_task_died_is_reported_failed_to_its_waiters() {
        let cache = TokenCache::new(10, Duration::ZERO, Duration::ZERO);
        let Lookup::Fetch(flight, rx) = cache.lookup(&key("a"), false) else {
            panic!("fetch");
        };
        let Lookup::Wait(rx2) = cache.lookup(&key("a"), false) else {
            panic!("wait");
        };
        let start = Instant::now();
        // The flight's task ends without landing (it panicked): its report sender goes.
        drop(flight);
        for rx in [rx, rx2] {
            let outcome = wait(rx, start + Duration::from_secs(5)).await;
            let Some(Err(error)) = outcome else {
                panic!("a failed flight, not a deadline: {outcome:?}");
            };
            assert!(matches!(&*error, TokenError::BadAnswer(m)
                if m == "the token request ended without an answer"));
        }
        assert_eq!(Instant::now(), start, "at once, not at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_gives_none_at_its_deadline_and_the_outcome_before_it() {
        let cache = TokenCache::new(10, Duration::ZERO, Duration::ZERO);
        let Lookup::Fetch(flight, rx) = cache.lookup(&key("a"), false) else {
            panic!("fetch");
        };
        let start = Instant::now();
        assert!(
            wait(rx.clone(), start + Duration::from_secs(5))
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), start + Duration::from_secs(5));

        // A flight that lands 4 s into a 5 s wait is what the wait returns.
        let cache = Arc::new(cache);
        let landing = Arc::clone(&cache);
        let lands = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            landing.land(flight, Ok(token(60)));
        });
        let start = Instant::now();
        let outcome = wait(rx, start + Duration::from_secs(5)).await;
        assert!(matches!(outcome, Some(Ok(_))), "{outcome:?}");
        assert_eq!(Instant::now(), start + Duration::from_secs(4));
        lands.await.expect("the landing task");
    }
}
