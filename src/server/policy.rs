//! The caller policy: default deny; a caller may make a request when a rule for one of
//! its identities allows every part of it (key, client_id, each scope, environment, each
//! resource, consumer_org, each authorization_details type, a pid, iss_onbehalfof), and
//! within that rule's rate.
//! The rate is counted per caller identity ([`Caller::name`]), so every uid matched by one
//! `gid:` rule has a bucket of its own with the rule's quota. A refusal names the part of
//! the request that was not allowed, never another caller's rules or the allowed values.

use std::{num::NonZeroU32, sync::RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;

use crate::config::{Pattern, PolicyRule};

use super::caller::Caller;

/// A request as the policy sees it, with the defaults resolved; the audit line of a
/// decision carries it as it is.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Ask<'a> {
    pub(crate) key: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) environment: &'a str,
    pub(crate) resources: &'a [String],
    pub(crate) consumer_org: &'a str,
    /// The `type` of each authorization_details entry (the details themselves may name
    /// people or systems, and stay out of the policy and the trail).
    pub(crate) authorization_types: &'a [String],
    /// Whether the request restricts the token to a person (the pid itself is personal
    /// data: not the policy's business, never in a refusal or an audit line).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) pid: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(crate) iss_onbehalfof: &'a str,
}

/// Why the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No rule names the caller.
    #[error("caller {0} is not in the policy")]
    UnknownCaller(String),
    /// A rule names the caller but not this part of the request.
    #[error("caller {caller} may not use {what}")]
    NotAllowed { caller: String, what: String },
    /// The caller (by its own identity, not the rule's) is over its rate.
    #[error("caller {caller} is over its limit of {rate} requests per second")]
    RateLimited { caller: String, rate: u32 },
}

struct Rule {
    config: PolicyRule,
    /// One bucket per caller identity ([`Caller::name`]) that this rule allowed.
    limiter: DefaultKeyedRateLimiter<String>,
}

/// The rules in force; replaced whole on reload (rate counters start afresh).
pub(crate) struct Policy {
    rules: RwLock<std::sync::Arc<Vec<Rule>>>,
}

impl Policy {
    pub(crate) fn new(rules: &[PolicyRule]) -> Self {
        Policy {
            rules: RwLock::new(std::sync::Arc::new(build(rules))),
        }
    }

    pub(crate) fn replace(&self, rules: &[PolicyRule]) {
        let rules = std::sync::Arc::new(build(rules));
        match self.rules.write() {
            Ok(mut current) => *current = rules,
            Err(poisoned) => *poisoned.into_inner() = rules,
        }
    }

    fn current(&self) -> std::sync::Arc<Vec<Rule>> {
        match self.rules.read() {
            Ok(rules) => std::sync::Arc::clone(&rules),
            Err(poisoned) => std::sync::Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Whether the caller is named by any rule (enough to list keys).
    pub(crate) fn knows(&self, caller: &Caller) -> Result<(), Refusal> {
        let rules = self.current();
        if rules
            .iter()
            .any(|r| caller.identities.contains(&r.config.caller))
        {
            Ok(())
        } else {
            Err(Refusal::UnknownCaller(caller.name().to_owned()))
        }
    }

    /// The client_id a caller may use when its rules allow exactly one, written out (not a
    /// pattern): what a texas-shaped request, which names no client_id, is signed for.
    pub(crate) fn sole_client_id(&self, caller: &Caller) -> Option<String> {
        let rules = self.current();
        let mut allowed = rules
            .iter()
            .filter(|r| caller.identities.contains(&r.config.caller))
            .flat_map(|r| r.config.client_ids.iter());
        let first = allowed.next()?;
        if allowed.any(|other| other != first) {
            return None;
        }
        first.exact().map(str::to_owned)
    }

    /// Allows the request, counting it against the caller's own bucket in the rule that
    /// allows it.
    pub(crate) fn authorize(&self, caller: &Caller, ask: &Ask<'_>) -> Result<(), Refusal> {
        let rules = self.current();
        let mut first_refusal = None;
        for rule in rules
            .iter()
            .filter(|r| caller.identities.contains(&r.config.caller))
        {
            match refusal(&rule.config, ask) {
                None => {
                    let name = caller.name();
                    return match rule.limiter.check_key(&name.to_owned()) {
                        Ok(()) => Ok(()),
                        Err(_) => Err(Refusal::RateLimited {
                            caller: name.to_owned(),
                            rate: rule.config.requests_per_second,
                        }),
                    };
                }
                Some(what) => {
                    let _ = first_refusal.get_or_insert(Refusal::NotAllowed {
                        caller: rule.config.caller.clone(),
                        what,
                    });
                }
            }
        }
        Err(first_refusal.unwrap_or_else(|| Refusal::UnknownCaller(caller.name().to_owned())))
    }
}

fn build(rules: &[PolicyRule]) -> Vec<Rule> {
    rules
        .iter()
        .map(|config| {
            let rate = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(config.burst).unwrap_or(rate);
            Rule {
                config: config.clone(),
                limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            }
        })
        .collect()
}

/// The first part of `ask` the rule does not allow, described for the caller.
fn refusal(rule: &PolicyRule, ask: &Ask<'_>) -> Option<String> {
    let any = |patterns: &[Pattern], value: &str| patterns.iter().any(|p| p.matches(value));
    if !any(&rule.keys, ask.key) {
        return Some(format!("key {:?}", ask.key));
    }
    if !any(&rule.client_ids, ask.client_id) {
        return Some(format!("client_id {:?}", ask.client_id));
    }
    if let Some(scope) = ask.scopes.iter().find(|s| !any(&rule.scopes, s)) {
        return Some(format!("scope {scope:?}"));
    }
    if !any(&rule.environments, ask.environment) {
        return Some(format!("environment {:?}", ask.environment));
    }
    if let Some(resource) = ask.resources.iter().find(|r| !any(&rule.resources, r)) {
        return Some(format!("resource {resource:?}"));
    }
    if !ask.consumer_org.is_empty() && !any(&rule.consumer_orgs, ask.consumer_org) {
        return Some(format!("consumer_org {:?}", ask.consumer_org));
    }
    if let Some(t) = ask
        .authorization_types
        .iter()
        .find(|t| !any(&rule.authorization_types, t))
    {
        return Some(format!("authorization_details type {t:?}"));
    }
    if ask.pid && !rule.allow_pid {
        return Some("pid (person-restricted tokens; allow_pid)".into());
    }
    if !ask.iss_onbehalfof.is_empty() && !any(&rule.iss_onbehalfof, ask.iss_onbehalfof) {
        return Some(format!("iss_onbehalfof {:?}", ask.iss_onbehalfof));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The policy of a config whose only rule is `rule` (or whose rules are, with
    /// `[[policy]]` between them).
    fn policy(rule: &str) -> Policy {
        Policy::new(&rules(rule))
    }

    fn rules(rule: &str) -> Vec<PolicyRule> {
        let text = format!(
            "unix_socket = \"/run/agent.sock\"\n\
             [pkcs11]\nmodule = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"/pin\"\n\
             [[keys]]\nname = \"default\"\nlabel = \"k\"\ncertificate = \"token\"\n\
             [[policy]]\n{rule}"
        );
        let config = Config::from_toml_str(&text, "agent.toml").expect("valid config");
        config.access.policy
    }

    fn caller(identities: &[&str]) -> Caller {
        Caller {
            identities: identities.iter().map(|&i| i.to_owned()).collect(),
        }
    }

    fn ask<'a>(scopes: &'a [String], resources: &'a [String]) -> Ask<'a> {
        Ask {
            key: "default",
            client_id: "c",
            scopes,
            environment: "test",
            resources,
            consumer_org: "",
            authorization_types: &[],
            pid: false,
            iss_onbehalfof: "",
        }
    }

    const ANYTHING: &str =
        "keys = [\"*\"]\nclient_ids = [\"*\"]\nscopes = [\"*\"]\nenvironments = [\"*\"]\n";

    #[test]
    fn callers_matched_by_one_gid_rule_each_get_their_own_burst() {
        let policy = policy(&format!(
            "caller = \"gid:100\"\n{ANYTHING}requests_per_second = 1\nburst = 3\n"
        ));
        let scopes = ["a:b".to_owned()];
        let (alice, bob) = (
            caller(&["uid:1000", "gid:100"]),
            caller(&["uid:1001", "gid:100"]),
        );
        for _ in 0..3 {
            assert_eq!(policy.authorize(&alice, &ask(&scopes, &[])), Ok(()));
        }
        assert_eq!(
            policy.authorize(&alice, &ask(&scopes, &[])),
            Err(Refusal::RateLimited {
                caller: "uid:1000".into(),
                rate: 1
            })
        );
        assert_eq!(
            policy
                .authorize(&alice, &ask(&scopes, &[]))
                .map_err(|r| r.to_string()),
            Err("caller uid:1000 is over its limit of 1 requests per second".into())
        );
        // Alice's spent burst is not Bob's.
        for _ in 0..3 {
            assert_eq!(policy.authorize(&bob, &ask(&scopes, &[])), Ok(()));
        }
        assert!(matches!(
            policy.authorize(&bob, &ask(&scopes, &[])),
            Err(Refusal::RateLimited { caller, .. }) if caller == "uid:1001"
        ));
    }

    #[test]
    fn every_resource_must_match_and_none_is_fine() {
        let policy = policy(&format!(
            "caller = \"uid:1000\"\n{ANYTHING}resources = [\"https://api.example.no/*\"]\n"
        ));
        let me = caller(&["uid:1000", "gid:100"]);
        let scopes = ["a:b".to_owned()];
        assert_eq!(policy.authorize(&me, &ask(&scopes, &[])), Ok(()));
        let allowed = ["https://api.example.no/v1".to_owned()];
        assert_eq!(policy.authorize(&me, &ask(&scopes, &allowed)), Ok(()));
        let mixed = [
            "https://api.example.no/v1".to_owned(),
            "https://evil.example/".to_owned(),
        ];
        assert_eq!(
            policy
                .authorize(&me, &ask(&scopes, &mixed))
                .map_err(|r| r.to_string()),
            Err("caller uid:1000 may not use resource \"https://evil.example/\"".into())
        );
        // A rule without resources allows none.
        let strict = self::policy(&format!("caller = \"uid:1000\"\n{ANYTHING}"));
        assert!(matches!(
            strict.authorize(&me, &ask(&scopes, &allowed)),
            Err(Refusal::NotAllowed { what, .. }) if what == "resource \"https://api.example.no/v1\""
        ));
    }

    #[test]
    fn pid_and_iss_onbehalfof_are_refused_unless_a_rule_allows_them() {
        let me = caller(&["uid:1000"]);
        let scopes = ["a:b".to_owned()];
        let with = |pid: bool, iss_onbehalfof: &'static str| Ask {
            pid,
            iss_onbehalfof,
            ..ask(&scopes, &[])
        };
        let strict = policy(&format!("caller = \"uid:1000\"\n{ANYTHING}"));
        assert_eq!(
            strict
                .authorize(&me, &with(true, ""))
                .map_err(|r| r.to_string()),
            Err("caller uid:1000 may not use pid (person-restricted tokens; allow_pid)".into())
        );
        assert_eq!(
            strict
                .authorize(&me, &with(false, "kunde-1"))
                .map_err(|r| r.to_string()),
            Err("caller uid:1000 may not use iss_onbehalfof \"kunde-1\"".into())
        );
        let open = policy(&format!(
            "caller = \"uid:1000\"\n{ANYTHING}allow_pid = true\niss_onbehalfof = [\"kunde-*\"]\n"
        ));
        assert_eq!(open.authorize(&me, &with(true, "kunde-1")), Ok(()));
        assert!(open.authorize(&me, &with(false, "other")).is_err());
    }

    fn scopes(values: &[&str]) -> Vec<String> {
        values.iter().map(|&v| v.to_owned()).collect()
    }

    #[test]
    fn a_caller_no_rule_names_is_refused() {
        let empty = Policy::new(&[]);
        let me = caller(&["uid:1000", "gid:100"]);
        let wanted = scopes(&["a:b"]);
        assert_eq!(
            empty.authorize(&me, &ask(&wanted, &[])),
            Err(Refusal::UnknownCaller("uid:1000".into()))
        );
        assert_eq!(
            empty.knows(&me),
            Err(Refusal::UnknownCaller("uid:1000".into()))
        );

        let policy = policy(&format!("caller = \"uid:1000\"\n{ANYTHING}"));
        let stranger = caller(&["uid:2000", "gid:200"]);
        assert_eq!(
            policy
                .authorize(&stranger, &ask(&wanted, &[]))
                .map_err(|r| r.to_string()),
            Err("caller uid:2000 is not in the policy".into())
        );
        assert!(policy.knows(&stranger).is_err());
        assert_eq!(policy.knows(&me), Ok(()));
        assert_eq!(
            policy.authorize(&caller(&[]), &ask(&wanted, &[])),
            Err(Refusal::UnknownCaller("unidentified".into()))
        );
    }

    #[test]
    fn a_rule_for_another_caller_does_not_apply() {
        let policy = policy(&format!(
            "caller = \"uid:1001\"\n{ANYTHING}\n\
             [[policy]]\ncaller = \"gid:200\"\n{ANYTHING}\n\
             [[policy]]\ncaller = \"uid:1000\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\n\
             scopes = [\"a:*\"]\nenvironments = [\"*\"]\n"
        ));
        let me = caller(&["uid:1000", "gid:100"]);
        assert_eq!(policy.authorize(&me, &ask(&scopes(&["a:b"]), &[])), Ok(()));
        assert_eq!(
            policy.authorize(&me, &ask(&scopes(&["x:y"]), &[])),
            Err(Refusal::NotAllowed {
                caller: "uid:1000".into(),
                what: "scope \"x:y\"".into()
            }),
            "uid:1001's and gid:200's rules would allow it"
        );
        // A caller named only by identities other rules list.
        let other = caller(&["uid:1002", "gid:100"]);
        assert_eq!(
            policy.authorize(&other, &ask(&scopes(&["x:y"]), &[])),
            Err(Refusal::UnknownCaller("uid:1002".into()))
        );
    }

    #[test]
    fn any_rule_naming_the_caller_may_allow_and_a_refusal_names_the_first() {
        // A request is allowed when one rule allows all of it, by the caller's uid or gid;
        // the rules are not combined part by part.
        let policy = policy(
            "caller = \"uid:1000\"\nkeys = [\"default\"]\nclient_ids = [\"c\"]\n\
             scopes = [\"a:*\"]\nenvironments = [\"test\"]\n\
             [[policy]]\ncaller = \"gid:100\"\nkeys = [\"default\"]\nclient_ids = [\"c\"]\n\
             scopes = [\"b:*\"]\nenvironments = [\"test\"]\n",
        );
        let me = caller(&["uid:1000", "gid:100"]);
        assert_eq!(policy.authorize(&me, &ask(&scopes(&["a:1"]), &[])), Ok(()));
        assert_eq!(policy.authorize(&me, &ask(&scopes(&["b:1"]), &[])), Ok(()));
        assert_eq!(
            policy.authorize(&me, &ask(&scopes(&["a:1", "b:1"]), &[])),
            Err(Refusal::NotAllowed {
                caller: "uid:1000".into(),
                what: "scope \"b:1\"".into()
            }),
            "no one rule allows both scopes"
        );
        // Only the gid rule names this caller: its refusal names the rule's caller.
        let colleague = caller(&["uid:1001", "gid:100"]);
        assert_eq!(
            policy
                .authorize(&colleague, &ask(&scopes(&["a:1"]), &[]))
                .map_err(|r| r.to_string()),
            Err("caller gid:100 may not use scope \"a:1\"".into())
        );
        assert_eq!(
            policy.authorize(&colleague, &ask(&scopes(&["b:1"]), &[])),
            Ok(())
        );
        // The first refusal is of the first part a rule does not allow, in request order.
        let wanted = scopes(&["a:1"]);
        assert_eq!(
            policy.authorize(
                &me,
                &Ask {
                    key: "other",
                    environment: "prod",
                    ..ask(&wanted, &[])
                }
            ),
            Err(Refusal::NotAllowed {
                caller: "uid:1000".into(),
                what: "key \"other\"".into()
            })
        );
    }

    #[test]
    fn a_pattern_ending_in_a_star_is_a_prefix_and_any_other_is_exact() {
        let policy = policy(
            "caller = \"uid:1000\"\nkeys = [\"default\"]\nclient_ids = [\"client-*\"]\n\
             scopes = [\"nav:*\", \"skatt:read\"]\nenvironments = [\"test\"]\n",
        );
        let me = caller(&["uid:1000"]);
        let allowed = |client_id: &str, scope: &str, key: &str| {
            let wanted = scopes(&[scope]);
            policy
                .authorize(
                    &me,
                    &Ask {
                        key,
                        client_id,
                        ..ask(&wanted, &[])
                    },
                )
                .is_ok()
        };
        for scope in ["nav:", "nav:a", "nav:a/b.c", "skatt:read"] {
            assert!(allowed("client-1", scope, "default"), "{scope}");
        }
        for scope in [
            "nav",
            "navx:a",
            "Nav:a",
            "skatt:",
            "skatt:readwrite",
            "skatt:rea",
        ] {
            assert!(!allowed("client-1", scope, "default"), "{scope}");
        }
        assert!(allowed("client-", "nav:a", "default"));
        assert!(!allowed("client", "nav:a", "default"));
        assert!(!allowed("my-client-1", "nav:a", "default"));
        assert!(!allowed("client-1", "nav:a", "default-2"), "keys are exact");
    }

    #[test]
    fn the_rate_is_counted_in_the_rule_that_allowed_and_starts_afresh_on_reload() {
        let rules = "caller = \"uid:1000\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\n\
             scopes = [\"a:*\"]\nenvironments = [\"*\"]\nrequests_per_second = 1\n\
             [[policy]]\ncaller = \"uid:1000\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\n\
             scopes = [\"b:*\"]\nenvironments = [\"*\"]\nrequests_per_second = 2\n";
        let policy = policy(rules);
        let me = caller(&["uid:1000"]);
        let (a, b) = (scopes(&["a:1"]), scopes(&["b:1"]));
        assert_eq!(policy.authorize(&me, &ask(&a, &[])), Ok(()));
        let over = |rate| {
            Err(Refusal::RateLimited {
                caller: "uid:1000".into(),
                rate,
            })
        };
        assert_eq!(policy.authorize(&me, &ask(&a, &[])), over(1));
        // The b: rule's bucket is its own: two (its burst is its rate), then no more.
        assert_eq!(policy.authorize(&me, &ask(&b, &[])), Ok(()));
        assert_eq!(policy.authorize(&me, &ask(&b, &[])), Ok(()));
        assert_eq!(policy.authorize(&me, &ask(&b, &[])), over(2));
        policy.replace(&self::rules(rules));
        assert_eq!(policy.authorize(&me, &ask(&a, &[])), Ok(()), "reloaded");
        assert_eq!(policy.authorize(&me, &ask(&a, &[])), over(1));
    }
}
