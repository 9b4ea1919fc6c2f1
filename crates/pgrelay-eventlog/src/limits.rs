//! The host's limits on event-log clients: connection attempts per
//! address and frames per socket. The binary fills these in with the
//! server's `--connect-rate` and `--message-rate` buckets, so this crate
//! keeps no rate-limiting code of its own. (`--max-connections` needs
//! nothing here: a socket holds its upgrade request's extensions, where
//! the host keeps the connection's place.)

use std::net::IpAddr;

/// Decides whether a client may connect, and how many frames a socket may send.
pub trait Admission: Send + Sync + 'static {
    /// Whether a connection attempt (a socket, or an HTTP transport
    /// request) from `ip` may go on now; the refusal's message otherwise.
    fn connect(&self, ip: IpAddr) -> Result<(), String>;
    /// The frame budget of a new socket.
    fn frames(&self) -> Box<dyn FrameBudget>;
}

/// One socket's allowance of frames.
pub trait FrameBudget: Send {
    /// Takes one frame; `Err` with the reason when the socket is over its rate.
    fn take(&mut self) -> Result<(), String>;
}

/// No limits (embedding, tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unlimited;

impl Admission for Unlimited {
    fn connect(&self, _ip: IpAddr) -> Result<(), String> {
        Ok(())
    }

    fn frames(&self) -> Box<dyn FrameBudget> {
        Box::new(Unlimited)
    }
}

impl FrameBudget for Unlimited {
    fn take(&mut self) -> Result<(), String> {
        Ok(())
    }
}
