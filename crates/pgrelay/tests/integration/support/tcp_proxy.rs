//! A TCP relay between a pgrelay node and PostgreSQL (or Redis) that can
//! freeze every connection through it: nothing passes either way and no
//! socket closes, a network cut neither end notices; released, traffic
//! flows again. It can also cut: every connection is closed and new ones
//! are closed as soon as they arrive, a server that went away; restored,
//! new connections go through again.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Flowing,
    Frozen,
    Cut,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, watch) = watch::channel(Mode::Flowing);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watch.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (c_read, c_write) = client.into_split();
                let (s_read, s_write) = server.into_split();
                tokio::spawn(pipe(c_read, s_write, watch.clone()));
                tokio::spawn(pipe(s_read, c_write, watch.clone()));
            }
        });
        TcpProxy { addr, mode }
    }

    /// Stops every byte, both ways, on every connection.
    pub fn freeze(&self) {
        let _ = self.mode.send(Mode::Frozen);
    }

    /// Closes every connection, and every new one as it arrives.
    pub fn cut(&self) {
        let _ = self.mode.send(Mode::Cut);
    }

    /// Traffic flows again (after a freeze, on the same connections).
    pub fn release(&self) {
        let _ = self.mode.send(Mode::Flowing);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Not even read while frozen: the bytes wait in the kernel.
        match mode.wait_for(|m| *m != Mode::Frozen).await.map(|m| *m) {
            Ok(Mode::Flowing) => {}
            _ => break,
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = mode.wait_for(|m| *m == Mode::Cut) => break,
        };
        match mode.wait_for(|m| *m != Mode::Frozen).await.map(|m| *m) {
            Ok(Mode::Flowing) => {}
            _ => break,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
