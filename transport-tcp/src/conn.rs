//! A connection after its handshake: plain TCP, or TLS over it, usable
//! from several threads at once like a `TcpStream` (the control connection
//! has a reader thread and writers; a data connection is shut down from
//! another thread when the migration is killed).
//!
//! Under TLS, each direction has its own record state behind its own lock:
//! sealed or opened here ([`crate::record`]) or by the kernel
//! ([`crate::ktls`]). A reader blocked on the socket never stalls a writer,
//! and the heartbeat writer never waits for the engine's reader. Writers
//! hold the send lock until their records are on the socket, so records
//! leave in the order they were sealed.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::ktls::{KernelRx, KernelTx};
use crate::record::{Opener, Sealer};

/// A connection after its handshake: plain TCP, or TLS over it. Clones
/// share the connection; reads and writes may happen from different
/// threads at once (one reader and one writer at a time each), as with a
/// `TcpStream`.
#[derive(Debug, Clone)]
pub(crate) enum Conn {
    Plain(Arc<TcpStream>),
    Tls(Arc<TlsConn>),
}

pub(crate) struct TlsConn {
    sock: TcpStream,
    /// The sending direction; held until the records are on the socket.
    send: Mutex<Sending>,
    /// The receiving direction; serializes readers.
    recv: Mutex<Receiving>,
}

/// Who seals what this end sends.
pub(crate) enum Sending {
    User(Sealer),
    Kernel(KernelTx),
}

/// Who opens what this end receives.
pub(crate) enum Receiving {
    User(Opener),
    Kernel(KernelRx),
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn").field("sock", &self.sock).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn {
    /// The TCP socket (for timeouts, shutdown, addresses).
    pub(crate) fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }

    /// Whether an AEAD seals this connection's records (TLS).
    pub(crate) fn sealed(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    pub(crate) fn shutdown(&self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }

    /// End this end's stream cleanly: TLS `close_notify` (so the peer
    /// can tell the end from a cut), then the socket's sending side.
    pub(crate) fn close(&self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown(Shutdown::Write),
            Conn::Tls(t) => t.close(),
        }
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.socket().read_timeout().ok().flatten()
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        self.socket().write_timeout().ok().flatten()
    }
}

impl Read for &Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&**s).read(out),
            Conn::Tls(t) => t.read(out),
        }
    }

    /// Plain TCP: one `readv` straight into the caller's buffers (guest
    /// pages); TLS: the opened records' plaintext copied into them.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&**s).read_vectored(bufs),
            Conn::Tls(t) => t.read_vectored(bufs),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&**s).write_vectored(bufs),
            Conn::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => (&**s).flush(),
            // Every write leaves sealed and sent.
            Conn::Tls(_) => Ok(()),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        (&*self).read(out)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl TlsConn {
    /// A connection over `sock` whose directions are sealed by `send` and
    /// opened by `recv`.
    pub(crate) fn new(sock: TcpStream, send: Sending, recv: Receiving) -> Self {
        Self {
            sock,
            send: Mutex::new(send),
            recv: Mutex::new(recv),
        }
    }

    /// The TCP socket under the records.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn socket(&self) -> &TcpStream {
        &self.sock
    }

    pub(crate) fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [io::IoSliceMut::new(out)])
    }

    pub(crate) fn read_vectored(&self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match &mut *lock(&self.recv) {
            Receiving::User(o) => o.read_vectored(&mut &self.sock, bufs),
            Receiving::Kernel(k) => k.read_vectored(&self.sock, bufs),
        }
    }

    pub(crate) fn write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut *lock(&self.send) {
            Sending::User(s) => s.write_vectored(&mut &self.sock, bufs),
            Sending::Kernel(k) => k.write_vectored(&self.sock, bufs),
        }
    }

    /// End this end's stream with `close_notify` and shut the socket's
    /// sending side: the peer's reads end cleanly.
    pub(crate) fn close(&self) -> io::Result<()> {
        match &mut *lock(&self.send) {
            Sending::User(s) => s.close_notify(&mut &self.sock)?,
            Sending::Kernel(k) => k.close_notify(&self.sock)?,
        }
        self.sock.shutdown(Shutdown::Write)
    }

    /// Update the sending key every `records` records (tests).
    #[cfg(test)]
    pub(crate) fn key_update_every(&self, records: u64) {
        match &mut *lock(&self.send) {
            Sending::User(s) => s.key_update_every(records),
            Sending::Kernel(k) => k.key_update_every(records),
        }
    }

    /// Key updates sent and received so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn key_updates(&self) -> (u64, u64) {
        let sent = match &*lock(&self.send) {
            Sending::User(s) => s.updates,
            Sending::Kernel(k) => k.updates,
        };
        let received = match &*lock(&self.recv) {
            Receiving::User(o) => o.updates,
            Receiving::Kernel(k) => k.updates,
        };
        (sent, received)
    }
}
