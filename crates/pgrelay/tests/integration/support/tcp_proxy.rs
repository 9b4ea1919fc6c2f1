//! A TCP relay between a pgrelay node and PostgreSQL that can freeze every
//! connection through it: nothing passes either way and no socket closes,
//! a network cut neither end notices; released, traffic flows again.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub addr: SocketAddr,
    frozen: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, watch) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (c_read, c_write) = client.into_split();
                let (s_read, s_write) = server.into_split();
                tokio::spawn(pipe(c_read, s_write, watch.clone()));
                tokio::spawn(pipe(s_read, c_write, watch.clone()));
            }
        });
        TcpProxy { addr, frozen }
    }

    /// Stops every byte, both ways, on every connection.
    pub fn freeze(&self) {
        let _ = self.frozen.send(true);
    }

    pub fn release(&self) {
        let _ = self.frozen.send(false);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Not even read while frozen: the bytes wait in the kernel.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
