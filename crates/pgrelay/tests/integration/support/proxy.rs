//! A WebSocket relay between clients and the server that puts a client at
//! a known point of a race: it can hold the server's snapshot chunks until
//! released (the session is then hydrating, whatever else happens), and it
//! can drop `schema` frames (a client that missed an announcement), and it
//! can replace the first snapshot chunks with ones that lie about their
//! size (a man in the middle aiming at the client's memory).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::ServerMessage;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::wait_for;

/// What the relay does to frames from the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meddle {
    /// Holds every binary (snapshot chunk) frame until [`Proxy::release`].
    HoldSnapshot,
    /// Drops every `schema` frame.
    DropSchema,
    /// Replaces the first [`BOMBS`] snapshot chunks with 200 MiB of zeros
    /// compressed into a few KiB, whose frame announces 1,000 bytes.
    InflateChunks,
}

/// Chunks replaced under [`Meddle::InflateChunks`].
pub const BOMBS: usize = 2;

/// A chunk frame with `frame`'s header and a payload that lies.
fn bomb(frame: &[u8]) -> Vec<u8> {
    let mut payload = zstd::bulk::compress(&vec![0u8; 200 << 20], 3).unwrap();
    // Magic (4 bytes), frame header descriptor (a 4-byte content size
    // after a window descriptor byte for this size), then the size.
    assert_eq!(payload[4] >> 6, 2);
    payload[6..10].copy_from_slice(&1000u32.to_le_bytes());
    let mut out = frame[..pgrelay_protocol::CHUNK_HEADER_BYTES].to_vec();
    out.extend_from_slice(&payload);
    out
}

pub struct Proxy {
    pub addr: SocketAddr,
    release: watch::Sender<bool>,
    /// Snapshot chunks that arrived while held.
    held: Arc<AtomicUsize>,
    /// `schema` frames dropped.
    pub dropped: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, meddle: Meddle) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = watch::channel(false);
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (held_count, dropped_count) = (Arc::clone(&held), Arc::clone(&dropped));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let released = released.clone();
                let held = Arc::clone(&held_count);
                let dropped = Arc::clone(&dropped_count);
                tokio::spawn(async move {
                    let Ok(client) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let Ok((server, _)) =
                        tokio_tungstenite::connect_async(format!("ws://{upstream}/api/sync")).await
                    else {
                        return;
                    };
                    let (mut c_tx, mut c_rx) = client.split();
                    let (mut s_tx, mut s_rx) = server.split();
                    let up = async move {
                        while let Some(Ok(m)) = c_rx.next().await {
                            if s_tx.send(m).await.is_err() {
                                break;
                            }
                        }
                        let _ = s_tx.close().await;
                    };
                    let down = async move {
                        let mut released = released;
                        let mut bombs = 0;
                        while let Some(Ok(mut m)) = s_rx.next().await {
                            match (&m, meddle) {
                                (Message::Binary(frame), Meddle::InflateChunks)
                                    if bombs < BOMBS =>
                                {
                                    bombs += 1;
                                    m = Message::Binary(bomb(frame).into());
                                }
                                (Message::Binary(_), Meddle::HoldSnapshot)
                                    if !*released.borrow() =>
                                {
                                    held.fetch_add(1, Ordering::SeqCst);
                                    let _ = released.wait_for(|r| *r).await;
                                }
                                (Message::Text(text), Meddle::DropSchema)
                                    if matches!(
                                        serde_json::from_str::<ServerMessage>(text),
                                        Ok(ServerMessage::Schema { .. })
                                    ) =>
                                {
                                    dropped.fetch_add(1, Ordering::SeqCst);
                                    continue;
                                }
                                _ => {}
                            }
                            if c_tx.send(m).await.is_err() {
                                break;
                            }
                        }
                        let _ = c_tx.close().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Proxy {
            addr,
            release,
            held,
            dropped,
        }
    }

    /// Waits until a snapshot chunk is being held: the session behind it is
    /// hydrating and stays so until [`Proxy::release`].
    pub async fn wait_held(&self) {
        wait_for(
            "a snapshot chunk to hold",
            Duration::from_secs(30),
            || async { (self.held.load(Ordering::SeqCst) > 0).then_some(()) },
        )
        .await;
    }

    /// Lets held frames through, and every later one.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }
}
