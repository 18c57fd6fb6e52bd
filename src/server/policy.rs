//! The caller policy: default deny; a caller may make a request when a rule for one of
//! its identities allows every part of it (key, client_id, each scope, environment,
//! consumer_org, each authorization_details type), and within that rule's rate. A refusal names the part of the request
//! that was not allowed, never another caller's rules or the allowed values.

use std::{num::NonZeroU32, sync::RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Pattern, PolicyRule};

use super::caller::Caller;

/// A request as the policy sees it, with the defaults resolved.
pub(crate) struct Ask<'a> {
    pub(crate) key: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) environment: &'a str,
    pub(crate) consumer_org: &'a str,
    /// The `type` of each authorization_details entry.
    pub(crate) authorization_types: &'a [String],
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
    /// The caller is over its rate.
    #[error("caller {caller} is over its limit of {rate} requests per second")]
    RateLimited { caller: String, rate: u32 },
}

struct Rule {
    config: PolicyRule,
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

    /// Allows the request, counting it against the rate of the rule that allows it.
    pub(crate) fn authorize(&self, caller: &Caller, ask: &Ask<'_>) -> Result<(), Refusal> {
        let rules = self.current();
        let mut first_refusal = None;
        for rule in rules
            .iter()
            .filter(|r| caller.identities.contains(&r.config.caller))
        {
            match refusal(&rule.config, ask) {
                None => {
                    return match rule.limiter.check_key(&rule.config.caller) {
                        Ok(()) => Ok(()),
                        Err(_) => Err(Refusal::RateLimited {
                            caller: rule.config.caller.clone(),
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
    None
}
