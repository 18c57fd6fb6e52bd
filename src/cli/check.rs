//! `grant-agent cert check --config FILE`: every key's certificate as Maskinporten will
//! judge it (dates, chain to a trusted root, revocation), printed for an operator before
//! a rollout. It opens the token as the agent does (the certificates may live there) and
//! checks revocation once, over the token exchange's client and proxy.

use std::path::Path;

use grant_agent::{
    agent::{Agent, KeyReport, rfc3339, unix_now},
    config::Config,
};

use crate::Failure;

/// Runs the check; fails (exit 1) when a key name has no version that can sign now.
pub(crate) fn check(config_path: &Path) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let agent = Agent::start(&config)?;
    let checked =
        crate::runtime()?.block_on(grant_agent::server::check_certificates(&agent, &config));
    let now = unix_now();
    let reports = agent.report(now);
    let closed = agent.close();
    checked?;
    closed?;
    let mut unusable = Vec::new();
    for report in &reports {
        print!("{}", describe(report, now));
        if report.active || reports.iter().any(|r| r.name == report.name && r.active) {
            continue;
        }
        if !unusable.contains(&report.name) {
            unusable.push(report.name.clone());
        }
    }
    let names = reports
        .iter()
        .map(|r| r.name.as_str())
        .collect::<std::collections::BTreeSet<_>>();
    if unusable.is_empty() {
        println!(
            "verdict: {} key name(s), each has a certificate that can sign now",
            names.len()
        );
        Ok(())
    } else {
        Err(format!(
            "verdict: {} of {} key name(s) cannot sign now: {}",
            unusable.len(),
            names.len(),
            unusable.join(", ")
        )
        .into())
    }
}

/// One key version, one fact a line.
fn describe(r: &KeyReport, now: i64) -> String {
    let mut flags = vec![if r.active { "signs now" } else { "not signing" }];
    if r.is_default {
        flags.push("default");
    }
    let mut text = format!("key {:?} ({})\n", r.name, flags.join(", "));
    if !r.kid.is_empty() {
        text.push_str(&format!("  kid          {}\n", r.kid));
        return text;
    }
    let left = r.not_after - now;
    let expiry = if left < 0 {
        "EXPIRED".to_owned()
    } else if r.expires_soon {
        format!("{} days left: RENEW SOON", r.days_to_expiry)
    } else {
        format!("{} days left", r.days_to_expiry)
    };
    text.push_str(&format!("  subject      {}\n", r.subject));
    text.push_str(&format!("  issuer       {}\n", r.issuer));
    text.push_str(&format!("  sha256       {}\n", r.certificate_sha256));
    text.push_str(&format!("  environment  {}\n", r.environment));
    text.push_str(&format!(
        "  valid        {} to {} ({expiry})\n",
        rfc3339(r.not_before),
        rfc3339(r.not_after)
    ));
    text.push_str(&format!(
        "  chain        {}: {}\n",
        r.chain_status, r.chain_detail
    ));
    text.push_str(&format!("  revocation   {}\n", r.revocation_detail));
    text
}
