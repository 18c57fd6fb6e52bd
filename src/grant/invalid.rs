//! Why a request cannot be signed, by the field at fault: typed, so that the gRPC
//! message and the command line's flag both come from the field, never from its text.

/// A field of a grant request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantField {
    /// `client_id`.
    ClientId,
    /// `scopes`.
    Scopes,
    /// `environment`.
    Environment,
    /// `resources`.
    Resources,
    /// `consumer_org`.
    ConsumerOrg,
    /// `lifetime_seconds`.
    LifetimeSeconds,
    /// `authorization_details_json`.
    AuthorizationDetails,
    /// `pid`.
    Pid,
    /// `iss_onbehalfof`.
    IssOnBehalfOf,
}

impl GrantField {
    /// The field's path in the gRPC request, so a caller can find the mistake without
    /// reading our code.
    pub(crate) fn path(self) -> &'static str {
        match self {
            GrantField::ClientId => "grant.client_id",
            GrantField::Scopes => "grant.scopes",
            GrantField::Environment => "grant.environment",
            GrantField::Resources => "grant.resources",
            GrantField::ConsumerOrg => "grant.consumer_org",
            GrantField::LifetimeSeconds => "grant.lifetime_seconds",
            GrantField::AuthorizationDetails => "grant.authorization_details_json",
            GrantField::Pid => "grant.pid",
            GrantField::IssOnBehalfOf => "grant.iss_onbehalfof",
        }
    }
}

/// A request that cannot be signed, naming the field and the place in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{at}: {reason}", field.path())]
pub struct InvalidGrant {
    /// The field at fault.
    pub field: GrantField,
    /// Where in a list field: `[2]`, or `[0].type`; empty for the field as a whole.
    pub(crate) at: String,
    /// What is wrong, without echoing secrets (the request holds none).
    pub reason: String,
}

impl InvalidGrant {
    /// `field` as a whole is wrong.
    pub(crate) fn new(field: GrantField, reason: impl Into<String>) -> Self {
        InvalidGrant {
            field,
            at: String::new(),
            reason: reason.into(),
        }
    }

    /// The entry `at` of a list field is wrong.
    pub(crate) fn at(field: GrantField, at: String, reason: impl Into<String>) -> Self {
        InvalidGrant {
            field,
            at,
            reason: reason.into(),
        }
    }
}
