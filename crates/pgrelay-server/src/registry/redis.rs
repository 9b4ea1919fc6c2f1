//! The registry shared by several nodes: one Redis key per client
//! (`<prefix>client:<id>`, a JSON record) with the TTL as its expiry.
//! Compare-and-set steps run as Lua scripts, so a node never removes or
//! overwrites the record of a session that replaced its own.

use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};

use super::resp::{Redis, Reply};
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

pub(crate) struct RedisRegistry {
    redis: Redis,
    prefix: String,
    ttl: Duration,
}

impl RedisRegistry {
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<RedisRegistry, RegistryError> {
        Ok(RedisRegistry {
            redis: Redis::new(url)?,
            prefix: prefix.to_owned(),
            ttl,
        })
    }

    fn key(&self, client_id: &str) -> Vec<u8> {
        format!("{}client:{client_id}", self.prefix).into_bytes()
    }

    fn ttl(&self) -> Vec<u8> {
        ttl_secs(self.ttl).to_string().into_bytes()
    }

    async fn list_all(&self) -> Result<Vec<ClientRecord>, RegistryError> {
        let pattern = format!("{}client:*", glob_escape(&self.prefix)).into_bytes();
        let mut cursor = b"0".to_vec();
        let mut keys = Vec::new();
        loop {
            let reply = self
                .redis
                .command(vec![
                    b"SCAN".to_vec(),
                    cursor.clone(),
                    b"MATCH".to_vec(),
                    pattern.clone(),
                    b"COUNT".to_vec(),
                    b"1000".to_vec(),
                ])
                .await?;
            let Reply::Array(mut parts) = reply else {
                return Err(RegistryError::Redis("SCAN answered oddly".into()));
            };
            let found = parts.pop();
            cursor = parts
                .pop()
                .and_then(Reply::into_bulk)
                .ok_or_else(|| RegistryError::Redis("SCAN without a cursor".into()))?;
            if let Some(Reply::Array(found)) = found {
                keys.extend(found.into_iter().filter_map(Reply::into_bulk));
            }
            if cursor == b"0" {
                break;
            }
        }
        let mut records = Vec::with_capacity(keys.len());
        for batch in keys.chunks(LIST_BATCH) {
            let mut args = vec![b"MGET".to_vec()];
            args.extend(batch.iter().cloned());
            if let Reply::Array(values) = self.redis.command(args).await? {
                for value in values.into_iter().filter_map(Reply::into_bulk) {
                    records.push(parse(&value)?);
                }
            }
        }
        records.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(records)
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

fn eval(script: &str, key: Vec<u8>, args: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut command = vec![
        b"EVAL".to_vec(),
        script.as_bytes().to_vec(),
        b"1".to_vec(),
        key,
    ];
    command.extend(args);
    command
}

impl Registry for RedisRegistry {
    fn register<'a>(
        &'a self,
        record: &'a ClientRecord,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        async move {
            self.redis
                .command(vec![
                    b"SET".to_vec(),
                    self.key(&record.client_id),
                    json(record),
                    b"EX".to_vec(),
                    self.ttl(),
                ])
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn refresh<'a>(
        &'a self,
        records: &'a [ClientRecord],
    ) -> BoxFuture<'a, Result<Vec<String>, RegistryError>> {
        async move {
            let commands: Vec<Vec<Vec<u8>>> = records
                .iter()
                .map(|r| {
                    eval(
                        REFRESH,
                        self.key(&r.client_id),
                        vec![json(r), r.session.clone().into_bytes(), self.ttl()],
                    )
                })
                .collect();
            let replies = self.redis.pipeline(&commands).await?;
            Ok(records
                .iter()
                .zip(replies)
                .filter(|(_, reply)| *reply == Reply::Int(0))
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
            let command = eval(
                UNREGISTER,
                self.key(client_id),
                vec![session.as_bytes().to_vec()],
            );
            self.redis.command(command).await.map(|_| ())
        }
        .boxed()
    }

    fn forget<'a>(&'a self, client_id: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        async move {
            let reply = self
                .redis
                .command(vec![b"DEL".to_vec(), self.key(client_id)])
                .await?;
            Ok(reply == Reply::Int(1))
        }
        .boxed()
    }

    fn get<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClientRecord>, RegistryError>> {
        async move {
            let reply = self
                .redis
                .command(vec![b"GET".to_vec(), self.key(client_id)])
                .await?;
            reply.into_bulk().map(|b| parse(&b)).transpose()
        }
        .boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ClientRecord>, RegistryError>> {
        self.list_all().boxed()
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
