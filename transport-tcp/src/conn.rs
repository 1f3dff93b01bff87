//! A connection after its handshake: plain TCP, or TLS over it, usable
//! from several threads at once like a `TcpStream` (the control connection
//! has a reader thread and writers; a data connection is shut down from
//! another thread when the migration is killed).
//!
//! Under TLS, each direction has its own sealed-record state
//! ([`crate::record`]) behind its own lock: a reader blocked on the socket
//! never stalls a writer, and the heartbeat writer never waits for the
//! engine's reader. Writers hold the send lock until their records are on
//! the socket, so records leave in the order they were sealed.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
    send: Mutex<Sealer>,
    /// The receiving direction; serializes readers.
    recv: Mutex<Opener>,
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
            Conn::Tls(t) => lock(&t.recv).read_vectored(&mut &t.sock, bufs),
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
    pub(crate) fn new(sock: TcpStream, send: Sealer, recv: Opener) -> Self {
        Self {
            sock,
            send: Mutex::new(send),
            recv: Mutex::new(recv),
        }
    }

    pub(crate) fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        lock(&self.recv).read_vectored(&mut &self.sock, &mut [io::IoSliceMut::new(out)])
    }

    pub(crate) fn write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        lock(&self.send).write_vectored(&mut &self.sock, bufs)
    }
}
