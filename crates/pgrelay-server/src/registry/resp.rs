//! A minimal Redis client: one connection, RESP2 requests and replies,
//! reopened after a failure. The registry needs a handful of commands
//! (`SET`, `GET`, `DEL`, `SCAN`, `EVAL`), which does not justify a driver
//! and its dependency tree.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::RegistryError;

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest bulk reply accepted; registry values are a few hundred bytes.
const MAX_BULK: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Nil,
    Status(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
}

impl Reply {
    pub(crate) fn into_bulk(self) -> Option<Vec<u8>> {
        match self {
            Reply::Bulk(bytes) => Some(bytes),
            _ => None,
        }
    }
}

pub(crate) struct Redis {
    addr: String,
    db: u32,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

impl Redis {
    /// Parses `redis://host:port[/db]`; connects on first use.
    pub(crate) fn new(url: &str) -> Result<Redis, RegistryError> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| RegistryError::Url(url.to_owned()))?;
        let (host, db) = match rest.split_once('/') {
            Some((host, "")) => (host, 0),
            Some((host, db)) => (
                host,
                db.parse().map_err(|_| RegistryError::Url(url.to_owned()))?,
            ),
            None => (rest, 0),
        };
        if host.is_empty() || host.contains('@') {
            // Credentials would need AUTH; not supported yet.
            return Err(RegistryError::Url(url.to_owned()));
        }
        let addr = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:6379")
        };
        Ok(Redis {
            addr,
            db,
            conn: Mutex::new(None),
        })
    }

    /// Sends every command and reads every reply, in order, on one
    /// connection (a pipeline). Drops the connection on any failure.
    pub(crate) async fn pipeline(
        &self,
        commands: &[Vec<Vec<u8>>],
    ) -> Result<Vec<Reply>, RegistryError> {
        // One exchange at a time on the connection; holding this async lock
        // across the exchange is what keeps replies paired with requests.
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let result = match guard.as_mut() {
            Some(conn) => tokio::time::timeout(IO_TIMEOUT, exchange(conn, commands))
                .await
                .unwrap_or_else(|_| Err(RegistryError::Io("Redis did not answer in time".into()))),
            None => Err(RegistryError::Io("no connection".into())),
        };
        if result.is_err() {
            *guard = None;
        }
        result
    }

    pub(crate) async fn command(&self, args: Vec<Vec<u8>>) -> Result<Reply, RegistryError> {
        let mut replies = self.pipeline(&[args]).await?;
        replies
            .pop()
            .ok_or_else(|| RegistryError::Io("no reply".into()))
    }

    async fn connect(&self) -> Result<BufReader<TcpStream>, RegistryError> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| RegistryError::Io(format!("connecting to {} timed out", self.addr)))?
            .map_err(|e| RegistryError::Io(format!("connecting to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let mut conn = BufReader::new(stream);
        if self.db != 0 {
            let select = vec![b"SELECT".to_vec(), self.db.to_string().into_bytes()];
            exchange(&mut conn, &[select]).await?;
        }
        Ok(conn)
    }
}

async fn exchange(
    conn: &mut BufReader<TcpStream>,
    commands: &[Vec<Vec<u8>>],
) -> Result<Vec<Reply>, RegistryError> {
    let mut out = Vec::new();
    for args in commands {
        encode(args, &mut out);
    }
    conn.get_mut().write_all(&out).await.map_err(io)?;
    let mut replies = Vec::with_capacity(commands.len());
    let mut failure = None;
    for _ in commands {
        match read_reply(conn).await? {
            Ok(reply) => replies.push(reply),
            // Read the rest so the connection stays in step, then report.
            Err(message) => {
                failure.get_or_insert(message);
                replies.push(Reply::Nil);
            }
        }
    }
    match failure {
        Some(message) => Err(RegistryError::Redis(message)),
        None => Ok(replies),
    }
}

pub(crate) fn encode(args: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A reply, or the message of an error reply, read from the connection.
type ReplyRead<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Result<Reply, String>, RegistryError>> + Send + 'a>,
>;

/// One reply; an error reply is `Ok(Err(message))`. Boxed: arrays nest.
fn read_reply(conn: &mut BufReader<TcpStream>) -> ReplyRead<'_> {
    Box::pin(async move {
        let mut line = Vec::new();
        conn.read_until(b'\n', &mut line).await.map_err(io)?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(RegistryError::Io("connection closed mid-reply".into()));
        }
        let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || {
            body.parse::<i64>()
                .map_err(|_| RegistryError::Io(format!("bad RESP length {body:?}")))
        };
        Ok(Ok(match line[0] {
            b'+' => Reply::Status(body),
            b'-' => return Ok(Err(body)),
            b':' => Reply::Int(number()?),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    Reply::Nil
                } else {
                    let len = len as usize;
                    if len > MAX_BULK {
                        return Err(RegistryError::Io(format!("reply of {len} bytes")));
                    }
                    let mut bytes = vec![0; len + 2];
                    conn.read_exact(&mut bytes).await.map_err(io)?;
                    bytes.truncate(len);
                    Reply::Bulk(bytes)
                }
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    Reply::Nil
                } else {
                    let mut items = Vec::with_capacity((len as usize).min(1024));
                    for _ in 0..len {
                        match read_reply(conn).await? {
                            Ok(item) => items.push(item),
                            Err(message) => return Ok(Err(message)),
                        }
                    }
                    Reply::Array(items)
                }
            }
            other => {
                return Err(RegistryError::Io(format!(
                    "unexpected RESP type byte {other:#x}"
                )))
            }
        }))
    })
}

fn io(e: std::io::Error) -> RegistryError {
    RegistryError::Io(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&[b"GET".to_vec(), b"k".to_vec()], &mut out);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    #[test]
    fn urls() {
        assert_eq!(
            Redis::new("redis://127.0.0.1:6379").unwrap().addr,
            "127.0.0.1:6379"
        );
        assert_eq!(Redis::new("redis://cache/2").unwrap().db, 2);
        assert_eq!(Redis::new("redis://cache").unwrap().addr, "cache:6379");
        assert!(Redis::new("http://x").is_err());
        assert!(Redis::new("redis://user:pw@host").is_err());
    }
}
