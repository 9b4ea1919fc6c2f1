//! What a connection may make the server hold before it is trusted: a
//! byte count on the TCP stream under hyper and the WebSocket (whose
//! unfinished fragmented messages are buffered out of our sight), per
//! connection and in total, until a sync session's hello is accepted; and
//! reading ahead under the WebSocket's small read buffer while a large
//! frame streams in (see [`Metered`]).
//! Written by hand: neither hyper nor tungstenite can change a socket's
//! limits after the upgrade, and neither counts across connections.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a connection may send on `/api/sync` before its hello is accepted
/// (the upgrade request's head is read before and not counted): a hello
/// with a generous token fits many times over.
pub(crate) const PER_CONNECTION_BYTES: usize = 64 << 10;

/// Bytes all untrusted connections together may have sent, at most.
pub(crate) const TOTAL_BYTES: usize = 32 << 20;

/// The total across connections; one per server.
#[derive(Default)]
pub(crate) struct Budget {
    used: AtomicUsize,
}

/// One connection's account: counting while closed, free once opened.
pub(crate) struct Gate {
    budget: Arc<Budget>,
    open: AtomicBool,
    used: AtomicUsize,
}

impl Gate {
    pub(crate) fn new(budget: Arc<Budget>) -> Arc<Gate> {
        Arc::new(Gate {
            budget,
            open: AtomicBool::new(false),
            used: AtomicUsize::new(0),
        })
    }

    /// Stops counting: a plain HTTP request (bounded by hyper's limits and
    /// the routes' body limits) or a session whose hello was accepted.
    pub(crate) fn open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            let used = self.used.swap(0, Ordering::AcqRel);
            self.budget.used.fetch_sub(used, Ordering::AcqRel);
        }
    }

    /// Counts from here: a request for a sync session, whose socket stays
    /// untrusted until its hello is accepted.
    pub(crate) fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// Takes `n` more bytes from the account; `Err` when over a bound.
    fn take(&self, n: usize) -> io::Result<()> {
        if self.open.load(Ordering::Acquire) {
            return Ok(());
        }
        let used = self.used.fetch_add(n, Ordering::AcqRel) + n;
        let total = self.budget.used.fetch_add(n, Ordering::AcqRel) + n;
        if used > PER_CONNECTION_BYTES {
            // "too long": the session answers `frame_too_large`.
            return Err(io::Error::other(format!(
                "message too long: over {PER_CONNECTION_BYTES} bytes sent before the hello was accepted"
            )));
        }
        if total > TOTAL_BYTES {
            return Err(io::Error::other(
                "message too long: connections not yet logged in hold the server's limit of unread bytes",
            ));
        }
        Ok(())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if !*self.open.get_mut() {
            self.budget
                .used
                .fetch_sub(*self.used.get_mut(), Ordering::AcqRel);
        }
    }
}

/// Bytes read from the socket at once while a large frame streams in.
const READ_AHEAD_BYTES: usize = 32 << 10;

/// A stream whose reads are charged to a [`Gate`], and which reads ahead
/// while a large frame streams in: the WebSocket above asks for its small
/// read buffer's worth at a time (kept small so that idle connections are
/// cheap), and would otherwise make one system call per few hundred bytes.
/// The read-ahead buffer exists only while data keeps arriving: it is freed
/// when drained with nothing more waiting, so an idle connection holds none.
pub(crate) struct Metered<S> {
    inner: S,
    gate: Arc<Gate>,
    /// Read ahead, not yet passed up: `ahead[start..end]`.
    ahead: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled the caller's buffer: more is probably waiting.
    streaming: bool,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, gate: Arc<Gate>) -> Metered<S> {
        Metered {
            inner,
            gate,
            ahead: Vec::new(),
            start: 0,
            end: 0,
            streaming: false,
        }
    }

    /// Passes up what was read ahead; frees the buffer once it is drained
    /// and the stream has stopped for now.
    fn pass_ahead(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.end - self.start);
        buf.put_slice(&self.ahead[self.start..self.start + n]);
        self.start += n;
        if self.start == self.end && !self.streaming {
            self.release();
        }
    }

    fn release(&mut self) {
        self.ahead = Vec::new();
        self.start = 0;
        self.end = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start < this.end {
            this.pass_ahead(buf);
            return Poll::Ready(Ok(()));
        }
        if this.streaming && buf.remaining() < READ_AHEAD_BYTES {
            if this.ahead.is_empty() {
                this.ahead = vec![0; READ_AHEAD_BYTES];
            }
            let mut ahead = ReadBuf::new(&mut this.ahead);
            let result = Pin::new(&mut this.inner).poll_read(cx, &mut ahead);
            let read = ahead.filled().len();
            match result {
                Poll::Pending => {
                    // Nothing waiting: the frame is in; hold no buffer.
                    this.streaming = false;
                    this.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {}
            }
            this.gate.take(read)?;
            this.streaming = read == READ_AHEAD_BYTES;
            this.start = 0;
            this.end = read;
            this.pass_ahead(buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let asked = buf.remaining();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = buf.filled().len() - before;
            this.gate.take(read)?;
            this.streaming = asked > 0 && read == asked;
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A large frame after an idle period arrives whole through small
    /// reads, and the read-ahead buffer is gone once it is read.
    #[tokio::test]
    async fn a_large_read_after_idle_arrives_whole_and_the_buffer_is_freed() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let gate = Gate::new(Arc::new(Budget::default()));
        gate.open();
        let mut metered = Metered::new(server, gate);
        client.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 256];
        let n = metered.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello");
        assert!(metered.ahead.capacity() == 0, "idle: no read-ahead buffer");
        let large: Vec<u8> = (0..300_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        client.write_all(&large).await.unwrap();
        let mut received = Vec::new();
        while received.len() < large.len() {
            let n = metered.read(&mut small).await.unwrap();
            assert!(n > 0);
            received.extend_from_slice(&small[..n]);
        }
        assert!(received == large, "every byte, in order");
        // Drained, with nothing more waiting: the next read finds nothing
        // and the buffer is released.
        let waiting = futures_util::FutureExt::now_or_never(metered.read(&mut small));
        assert!(waiting.is_none(), "nothing more was sent");
        assert!(
            metered.ahead.capacity() == 0,
            "the read-ahead buffer is freed"
        );
        client.write_all(b"again").await.unwrap();
        let n = metered.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"again");
    }

    #[test]
    fn bytes_are_counted_until_open_and_given_back() {
        let budget = Arc::new(Budget::default());
        let a = Gate::new(Arc::clone(&budget));
        assert!(a.take(PER_CONNECTION_BYTES).is_ok());
        assert!(a.take(1).is_err());
        a.open();
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
        assert!(a.take(10 * PER_CONNECTION_BYTES).is_ok());
        let b = Gate::new(Arc::clone(&budget));
        assert!(b.take(100).is_ok());
        drop(b);
        assert_eq!(budget.used.load(Ordering::Acquire), 0);
        let many: Vec<_> = (0..TOTAL_BYTES / PER_CONNECTION_BYTES)
            .map(|_| {
                let g = Gate::new(Arc::clone(&budget));
                g.take(PER_CONNECTION_BYTES).unwrap();
                g
            })
            .collect();
        let late = Gate::new(Arc::clone(&budget));
        assert!(late.take(1).is_err(), "the total is bounded");
        drop(many);
    }
}
