//! grant-agent: a gRPC signing agent for Maskinporten JWT grants, with the
//! virksomhetssertifikat key kept inside a PKCS#11 token.
//!
//! A service asks over gRPC for a grant; the agent builds it, has the token sign it, and
//! returns the compact JWS. The private key never leaves the token.
//!
//! # Modules
//! The public modules hold what the `grant-agent` binary, the benches, the integration
//! tests and the local Maskinporten (`mock-maskinporten/`) use, and nothing else: every
//! other item is `pub(crate)`, so that what the library promises stays small
//! (`tests/layers.rs` keeps the modules' dependency direction).
//! - [`config`]: the TOML configuration, validated before anything starts.
//! - [`grant`]: claims, request validation and JWS encoding; no PKCS#11.
//! - [`cert`]: the certificate chain and what the agent reads from it.
//! - [`client`]: connecting to a running agent (Unix socket, TCP, mutual TLS), and a file
//!   kept holding a fresh access token.
//! - `hex`: lowercase hex of ids and fingerprints; imports nothing, so any layer may use it.
//! - [`maskinporten`]: Maskinporten's protocol facts: environments, grant type, claims,
//!   time limits, MP error codes; imports nothing, so any layer may use it.
//! - [`hsm`]: the PKCS#11 token: login, session pool, key lookup, signing, provisioning.
//! - [`admin`]: key management commands: generate, CSR, certificate import, JWK, list.
//! - [`agent`]: keys bound to certificates, and `sign_grant`, which ties the above together.
//! - `metrics`: Prometheus metrics on their own address.
//! - [`token`]: access tokens: grant exchange at Maskinporten, cache, retries, error hints.
//! - [`server`]: the gRPC services (GrantAgent, health, reflection) and status mapping.
//! - [`dev`]: the development SoftHSM token behind `grant-agent dev`.
//! - `p12`: reading a PKCS#12 (.p12/.pfx) file into its RSA key parts and certificate chain.
//! - [`process`]: hardening the agent's own process: not dumpable, no core files, the
//!   open files limit.
//! - [`revocation`]: whether the CA has revoked a certificate (OCSP, CRL as fallback).
//! - [`telemetry`]: log output.
//! - [`proto`]: the generated `grantagent.v1` types, server and client.
//!
//! A request flows `server` → `agent` → `grant` (claims) → `hsm` (C_Sign on a pooled
//! session, on a blocking thread) → `grant` (compact JWS) → `server`.

pub mod admin;
pub mod agent;
pub mod cert;
pub mod client;
pub mod config;
pub mod dev;
mod fetch;
pub mod grant;
mod hex;
pub mod hsm;
pub mod maskinporten;
mod metrics;
mod p12;
pub mod process;
pub mod revocation;
pub mod server;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod token;

/// Generated from `proto/grantagent/v1/agent.proto`.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_results,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub mod proto {
    tonic::include_proto!("grantagent.v1");

    /// Like the derived Debug, except for `pid`: a person's national identity number
    /// must not reach a log line, an error or a panic message through a `{:?}`.
    impl std::fmt::Debug for GrantParameters {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GrantParameters")
                .field("key", &self.key)
                .field("client_id", &self.client_id)
                .field("scopes", &self.scopes)
                .field("environment", &self.environment)
                .field("resources", &self.resources)
                .field("consumer_org", &self.consumer_org)
                .field("lifetime_seconds", &self.lifetime_seconds)
                .field(
                    "authorization_details_json",
                    &self.authorization_details_json,
                )
                .field(
                    "pid",
                    &if self.pid.is_empty() {
                        ""
                    } else {
                        "[redacted]"
                    },
                )
                .field("iss_onbehalfof", &self.iss_onbehalfof)
                .finish()
        }
    }

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/grantagent_descriptor.bin"));
}
