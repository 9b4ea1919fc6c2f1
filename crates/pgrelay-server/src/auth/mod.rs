//! Authentication and tenant isolation: tokens checked on connect and on
//! `POST /api/changes`, row rules bound to each token's claims (a scope),
//! and the audit trail.

pub(crate) mod audit;
mod error;
pub(crate) mod owners;
mod rules;
mod scope;
mod token;

use std::sync::Arc;
use std::time::SystemTime;

use pgrelay_protocol::TableSchema;

pub use audit::{Action, Audit};
pub use error::AuthError;
pub use scope::Scope;
pub(crate) use scope::SNAPSHOT_SETTINGS_SQL;
pub use token::{AuthConfig, ClaimsVerifier, JwtKey};

pub(crate) use rules::Bound;
pub(crate) use rules::Rules;
pub(crate) use token::TokenRefusal;

/// A verified token: who, until when, and what it may see.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub(crate) subject: Option<String>,
    /// The owner claim's value: whose client ids this token may use.
    pub(crate) owner: Option<String>,
    pub(crate) expires: SystemTime,
    pub(crate) scope: Arc<Scope>,
}

pub(crate) struct Auth {
    verifier: token::TokenVerifier,
    scopes: scope::Scopes,
    owner_claim: String,
}

impl Auth {
    /// Builds the verifier and parses the rules, checking them against the
    /// synced tables.
    pub(crate) fn new(config: &AuthConfig, tables: &[TableSchema]) -> Result<Auth, String> {
        let verifier = token::TokenVerifier::new(config)?;
        let rules = match &config.rules {
            Some(text) => Rules::parse(text)?,
            None => Rules::allow_all(),
        };
        rules.check(tables)?;
        Ok(Auth {
            verifier,
            scopes: scope::Scopes::new(rules),
            owner_claim: config.owner_claim.clone(),
        })
    }

    pub(crate) fn rules(&self) -> &Rules {
        self.scopes.rules()
    }

    pub(crate) fn authenticate(&self, token: Option<&str>) -> Result<Principal, TokenRefusal> {
        let verified = self.verifier.verify(token)?;
        let owner = verified
            .claims
            .get(&self.owner_claim)
            .and_then(rules::claim_text);
        Ok(Principal {
            owner,
            subject: verified.subject,
            expires: verified.expires,
            scope: self.scopes.scope(&verified.claims),
        })
    }

    /// Distinct scopes in use now.
    pub(crate) fn live_scopes(&self) -> usize {
        self.scopes.live()
    }
}
