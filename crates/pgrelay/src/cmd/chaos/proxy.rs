//! The run's own TCP proxies, one per link (each node's clients, each
//! node's PostgreSQL connections): they pass bytes both ways and, on
//! command, cut every connection (and refuse new ones for a while), delay
//! every chunk, or freeze (nothing passes, nothing closes: a cut neither
//! end notices).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link does to the bytes through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    Open,
    /// Every connection closed, new ones refused.
    Cut,
    /// Each chunk waits this long before it is passed on.
    Delayed(Duration),
    /// Nothing passes either way; no socket closes.
    Frozen,
}

pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = Arc::new(Mutex::new(upstream));
        let (link, watch) = watch::channel(Link::Open);
        let target = Arc::clone(&upstream);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watch.borrow() == Link::Cut {
                    drop(client);
                    continue;
                }
                let to = *target.lock().unwrap_or_else(|e| e.into_inner());
                tokio::spawn(relay(client, to, watch.clone()));
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            link,
            task,
        })
    }

    /// Where new connections go (a restarted node listens elsewhere).
    pub(crate) fn point_at(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    pub(crate) fn set(&self, link: Link) {
        let _ = self.link.send(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.link.send(Link::Cut);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, link: watch::Receiver<Link>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (c_read, c_write) = client.into_split();
    let (s_read, s_write) = server.into_split();
    let mut there = tokio::spawn(pipe(c_read, s_write, link.clone()));
    let mut back = tokio::spawn(pipe(s_read, c_write, link.clone()));
    // When one direction ends, the other ends too: a half-open relay
    // would keep a connection neither end can use.
    tokio::select! {
        _ = &mut there => back.abort(),
        _ = &mut back => there.abort(),
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !passable(&mut link).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            changed = link.changed() => {
                if changed.is_err() || *link.borrow() == Link::Cut {
                    return;
                }
                continue;
            }
        };
        let delay = match *link.borrow() {
            Link::Delayed(d) => d,
            _ => Duration::ZERO,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !passable(&mut link).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Waits while the link is frozen; `false` once it is cut (the connection
/// must close).
async fn passable(link: &mut watch::Receiver<Link>) -> bool {
    match link.wait_for(|l| *l != Link::Frozen).await {
        Ok(l) => *l != Link::Cut,
        Err(_) => false,
    }
}
