//! What `pgrelay serve` decides for the LiveStore backend: who may use
//! which store (the server's JWT check, one shared token, or anyone) and
//! the server's connection and message rates, built from the row sync's
//! own token verifier and rate limiter so both endpoints behave alike;
//! and its flags (`EventLogArgs`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use pgrelay_eventlog::{
    payload_token, store_matches, AccessRefusal, Admission, FrameBudget, StoreAccess,
};
use pgrelay_server::{AuthConfig, ClaimsVerifier, IpLimiter, TokenBucket};
use secrecy::SecretString;
use serde_json::Value;

/// Who may use the event-log endpoints (`--eventlog-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventLogAuth {
    /// Anyone who reaches the port uses any store.
    None,
    /// `payload.authToken` must be `--eventlog-auth-token`.
    Token,
    /// `payload.authToken` must be a JWT the server accepts (`--auth jwt`),
    /// whose claim `claim` names the store (a pattern or a list of them).
    Jwt { claim: String },
}

/// `--eventlog-auth jwt`: a valid token whose store claim matches the store id.
pub struct JwtStoreAccess {
    verifier: ClaimsVerifier,
    claim: String,
}

impl JwtStoreAccess {
    pub fn new(config: &AuthConfig, claim: String) -> Result<JwtStoreAccess, String> {
        Ok(JwtStoreAccess {
            verifier: ClaimsVerifier::new(config)?,
            claim,
        })
    }
}

impl StoreAccess for JwtStoreAccess {
    fn check(&self, store_id: &str, payload: Option<&Value>) -> Result<(), AccessRefusal> {
        let token = payload_token(payload).ok_or_else(|| {
            AccessRefusal::Unauthorized(
                "this server needs a JWT, give it as payload.authToken (syncPayload: { authToken })"
                    .to_owned(),
            )
        })?;
        let claims = self
            .verifier
            .verify(Some(token))
            .map_err(|why| AccessRefusal::Unauthorized(format!("payload.authToken: {why}")))?;
        let patterns: Vec<&str> = match claims.get(&self.claim) {
            Some(Value::String(one)) => vec![one.as_str()],
            Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if patterns.is_empty() {
            return Err(AccessRefusal::Forbidden(format!(
                "the token has no {:?} claim naming the stores it may use",
                self.claim
            )));
        }
        if patterns.iter().any(|p| store_matches(p, store_id)) {
            Ok(())
        } else {
            Err(AccessRefusal::Forbidden(format!(
                "the token's {:?} claim does not allow store {store_id:?}",
                self.claim
            )))
        }
    }
}

/// `--connect-rate`/`--connect-burst` per client address and
/// `--message-rate`/`--message-burst` per socket, for the event-log
/// endpoints (their own buckets, with the row sync's settings).
pub struct ServerLimits {
    connects: IpLimiter,
    connect_rate: f64,
    connect_burst: u32,
    message_rate: f64,
    message_burst: u32,
}

impl ServerLimits {
    pub fn new(
        connect_rate: f64,
        connect_burst: u32,
        message_rate: f64,
        message_burst: u32,
    ) -> ServerLimits {
        ServerLimits {
            connects: IpLimiter::new(connect_rate, connect_burst),
            connect_rate,
            connect_burst,
            message_rate,
            message_burst,
        }
    }
}

impl Admission for ServerLimits {
    fn connect(&self, ip: IpAddr) -> Result<(), String> {
        if self.connects.allow(ip) {
            Ok(())
        } else {
            Err(format!(
                "more than {} connection attempts a second from {ip} (burst {}); retry with backoff",
                self.connect_rate, self.connect_burst
            ))
        }
    }

    fn frames(&self) -> Box<dyn FrameBudget> {
        Box::new(Frames {
            bucket: TokenBucket::full(self.message_burst, Instant::now()),
            rate: self.message_rate,
            burst: self.message_burst,
        })
    }
}

struct Frames {
    bucket: TokenBucket,
    rate: f64,
    burst: u32,
}

impl FrameBudget for Frames {
    fn take(&mut self) -> Result<(), String> {
        if self.bucket.take(self.rate, self.burst, Instant::now()) {
            Ok(())
        } else {
            Err(format!(
                "rate_limited: more than {} messages a second (burst {})",
                self.rate, self.burst
            ))
        }
    }
}

/// The LiveStore event-log backend (`/livestore`, `/websocket`).
#[derive(Args, Debug)]
pub struct EventLogArgs {
    /// Where LiveStore event logs live: `sqlite` (the --eventlog-db file) or
    /// `postgres` (the --database-url database, schema pgrelay).
    #[arg(long, env = "PGRELAY_EVENTLOG_STORE", default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    pub eventlog_store: String,
    /// The SQLite file of the event logs.
    #[arg(
        long,
        env = "PGRELAY_EVENTLOG_DB",
        default_value = "./pgrelay-events.sqlite"
    )]
    pub eventlog_db: PathBuf,
    /// SQLite `synchronous` for event logs: `full` syncs each acknowledged
    /// push to disk (survives power loss); `normal` survives a crash of
    /// pgrelay but not of the machine, and is much faster on slow disks.
    #[arg(long, env = "PGRELAY_EVENTLOG_SYNC", default_value = "full", value_parser = ["full", "normal"])]
    pub eventlog_sync: String,
    /// Require LiveStore clients to send this token as `payload.authToken`
    /// (`makeWsSync` with `syncPayload: { authToken }`).
    #[arg(long, env = "PGRELAY_EVENTLOG_AUTH_TOKEN", hide_env_values = true)]
    pub eventlog_auth_token: Option<SecretString>,
    /// Who may use /livestore and /websocket: `jwt` (payload.authToken is a
    /// token --auth jwt accepts, whose --eventlog-store-claim names the
    /// store), `token` (--eventlog-auth-token) or `none` (anyone). Default:
    /// `jwt` under --auth jwt, `token` with --eventlog-auth-token, else `none`.
    #[arg(long, env = "PGRELAY_EVENTLOG_AUTH", value_parser = ["jwt", "token", "none"])]
    pub eventlog_auth: Option<String>,
    /// The JWT claim naming the stores a token may use: a store id or
    /// pattern (`*` for any run of characters), or a list of them.
    #[arg(
        long,
        env = "PGRELAY_EVENTLOG_STORE_CLAIM",
        default_value = "livestore_stores"
    )]
    pub eventlog_store_claim: String,
    /// Stores held in memory at most; past it the least recently used idle
    /// ones are evicted and reloaded from storage on their next use.
    #[arg(long, env = "PGRELAY_EVENTLOG_MAX_STORES", default_value_t = 10_000)]
    pub eventlog_max_stores: usize,
    /// Store ids clients may use, comma-separated patterns (`todos-*`);
    /// others are refused before a store is created. Default: any.
    #[arg(long, env = "PGRELAY_EVENTLOG_ALLOW_STORES", value_delimiter = ',')]
    pub eventlog_allow_stores: Vec<String>,
}
