//! The registry shared by several nodes: one Redis key per client
//! (`<prefix>client:<id>`, a JSON record) with the TTL as its expiry.
//! Compare-and-set steps run as Lua scripts, so a node never removes or
//! overwrites the record of a session that replaced its own. Spoken through
//! the `redis` crate's connection manager (credentials from the URL,
//! reconnects after a failure, TLS with the `redis-tls` feature).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Value};
use tokio::sync::OnceCell;

use super::health::{HealthReport, RegistryHealth};
use super::relay::{channel_of, message, Relayed};
use super::{ttl_secs, ClientRecord, Registry, RegistryError};

/// Writes the record unless another session holds the key; 0 if it does.
const REFRESH: &str = r#"
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).session ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1"#;

/// Deletes the key if `ARGV[1]` is the session holding it.
const UNREGISTER: &str = r#"
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).session == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"#;

/// Keys fetched per MGET when listing.
const LIST_BATCH: usize = 500;

/// Connecting and each answer: a registry call never waits longer.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct RedisRegistry {
    client: redis::Client,
    /// Opened on first use (so a server starts while Redis is down); it
    /// reconnects by itself after a failure.
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    ttl: Duration,
    health: Arc<RegistryHealth>,
}

impl RedisRegistry {
    /// Parses `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` with the `redis-tls` feature); connects on first use.
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<RedisRegistry, RegistryError> {
        // The error names what is wrong, never the URL (it may hold a password).
        let client = redis::Client::open(url).map_err(|e| RegistryError::Url(e.to_string()))?;
        Ok(RedisRegistry {
            client,
            conn: OnceCell::new(),
            prefix: prefix.to_owned(),
            ttl,
            health: Arc::new(RegistryHealth::new("redis")),
        })
    }

    /// The connection, opened now if it is not yet. Its handle is a cheap
    /// clone of a multiplexed connection: calls do not wait for each other.
    async fn conn(&self) -> Result<ConnectionManager, RegistryError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(IO_TIMEOUT)
            .set_response_timeout(IO_TIMEOUT)
            .set_number_of_retries(1);
        self.conn
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(failed)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RegistryError> {
        self.health.record(self.query_once(cmd).await)
    }

    async fn query_once<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RegistryError> {
        let mut conn = self.conn().await?;
        cmd.query_async(&mut conn).await.map_err(failed)
    }

    pub(super) fn client(&self) -> &redis::Client {
        &self.client
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn health_handle(&self) -> Arc<RegistryHealth> {
        Arc::clone(&self.health)
    }

    fn key(&self, client_id: &str) -> String {
        format!("{}client:{client_id}", self.prefix)
    }

    fn ttl(&self) -> u64 {
        ttl_secs(self.ttl)
    }

    async fn list_all(&self) -> Result<Vec<ClientRecord>, RegistryError> {
        let pattern = format!("{}client:*", glob_escape(&self.prefix));
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, found): (u64, Vec<String>) = self.query(&scan).await?;
            keys.extend(found);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut records = Vec::with_capacity(keys.len());
        for batch in keys.chunks(LIST_BATCH) {
            let mut mget = redis::cmd("MGET");
            mget.arg(batch);
            let values: Vec<Option<Vec<u8>>> = self.query(&mget).await?;
            for value in values.into_iter().flatten() {
                records.push(parse(&value)?);
            }
        }
        records.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(records)
    }
}

/// Whether the connection failed (`Io`, worth retrying) or Redis refused.
pub(super) fn failed(e: redis::RedisError) -> RegistryError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        RegistryError::Io(e.to_string())
    } else {
        RegistryError::Redis(e.to_string())
    }
}

fn parse(bytes: &[u8]) -> Result<ClientRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Record(e.to_string()))
}

fn json(record: &ClientRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// Escapes Redis glob characters in a literal prefix.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `EVAL script 1 key args...`: the script text goes with every call, as
/// the scripts are tiny and this needs no `SCRIPT LOAD` bookkeeping.
fn eval(script: &str, key: String) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key);
    cmd
}

impl Registry for RedisRegistry {
    fn register<'a>(
        &'a self,
        record: &'a ClientRecord,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        async move {
            let mut set = redis::cmd("SET");
            set.arg(self.key(&record.client_id))
                .arg(json(record))
                .arg("EX")
                .arg(self.ttl());
            self.query::<Value>(&set).await.map(|_| ())
        }
        .boxed()
    }

    fn refresh<'a>(
        &'a self,
        records: &'a [ClientRecord],
    ) -> BoxFuture<'a, Result<Vec<String>, RegistryError>> {
        async move {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            // One round trip for all of them.
            let mut pipe = redis::pipe();
            for r in records {
                let mut call = eval(REFRESH, self.key(&r.client_id));
                call.arg(json(r)).arg(&r.session).arg(self.ttl());
                pipe.add_command(call);
            }
            let written: Vec<i64> = self.health.record(
                async {
                    let mut conn = self.conn().await?;
                    pipe.query_async(&mut conn).await.map_err(failed)
                }
                .await,
            )?;
            Ok(records
                .iter()
                .zip(written)
                .filter(|(_, written)| *written == 0)
                .map(|(r, _)| r.client_id.clone())
                .collect())
        }
        .boxed()
    }

    fn unregister<'a>(
        &'a self,
        client_id: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        async move {
            let mut call = eval(UNREGISTER, self.key(client_id));
            call.arg(session);
            self.query::<Value>(&call).await.map(|_| ())
        }
        .boxed()
    }

    fn forget<'a>(&'a self, client_id: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            let mut del = redis::cmd("DEL");
            del.arg(self.key(client_id));
            let deleted: i64 = self.query(&del).await?;
            Ok(deleted == 1)
        }
        .boxed()
    }

    fn get<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClientRecord>, RegistryError>> {
        async move {
            let mut get = redis::cmd("GET");
            get.arg(self.key(client_id));
            let value: Option<Vec<u8>> = self.query(&get).await?;
            value.map(|b| parse(&b)).transpose()
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ClientRecord>, RegistryError>> {
        self.list_all().boxed()
    }

    fn relay<'a>(
        &'a self,
        record: &'a ClientRecord,
        signal: Relayed,
    ) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            let Some(channel) = channel_of(&self.prefix, record) else {
                return Ok(false);
            };
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(channel).arg(message(record, signal));
            let receivers: i64 = self.query(&publish).await?;
            Ok(receivers > 0)
        }
        .boxed()
    }

    fn health(&self) -> HealthReport {
        self.health.report()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(glob_escape("a*b?[c]"), r"a\*b\?\[c\]");
    }
}
