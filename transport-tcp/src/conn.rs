//! A connection after its handshake: plain TCP, or TLS over it, usable
//! from several threads at once like a `TcpStream` (the control connection
//! has a reader thread and writers; a data connection is shut down from
//! another thread when the migration is killed).
//!
//! Under TLS, one rustls state serves both directions. A reader holds it
//! only to feed in ciphertext it has read and take plaintext out; a writer
//! only to seal plaintext; neither holds it across a socket call, so a
//! reader blocked on the socket never stalls a writer. Writers take the
//! send lock before the state and keep it until their ciphertext is on the
//! socket, so records leave in the order they were sealed.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::Connection;

/// Ciphertext read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

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
    /// rustls' state of both directions; held only to move bytes in or out
    /// of it, never across a socket call.
    state: Mutex<Connection>,
    /// Serializes writers: taken before `state`, held until the ciphertext
    /// is on the socket, so records leave in the order they were sealed.
    send: Mutex<Vec<u8>>,
    /// Serializes readers, and holds ciphertext read but not yet fed in.
    recv: Mutex<RecvBuf>,
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn").field("sock", &self.sock).finish()
    }
}

struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// rustls errors as I/O errors that keep the cause.
fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Conn {
    /// The TCP socket (for timeouts, shutdown, addresses).
    pub(crate) fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
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
    /// pages); TLS decrypts into them one at a time.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => (&**s).read_vectored(bufs),
            Conn::Tls(t) => {
                let first = bufs.iter_mut().find(|b| !b.is_empty());
                first.map_or(Ok(0), |b| t.read(b))
            }
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
    /// A connection whose handshake `state` has completed over `sock`.
    pub(crate) fn new(sock: TcpStream, state: Connection) -> Self {
        Self {
            sock,
            state: Mutex::new(state),
            send: Mutex::new(Vec::new()),
            recv: Mutex::new(RecvBuf {
                buf: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
            }),
        }
    }

    /// Keying material exported from the session (RFC 8446 §7.5).
    pub(crate) fn export(&self, out: &mut [u8], label: &[u8]) -> Result<(), rustls::Error> {
        lock(&self.state)
            .export_keying_material(out, label, None)
            .map(|_| ())
    }

    pub(crate) fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rb = lock(&self.recv);
        loop {
            let (fed, wants_write) = {
                let mut state = lock(&self.state);
                match state.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                let mut fed = false;
                if rb.start < rb.end {
                    let RecvBuf { buf, start, end } = &mut *rb;
                    let n = state.read_tls(&mut &buf[*start..*end])?;
                    *start += n;
                    state.process_new_packets().map_err(tls_io)?;
                    fed = n > 0;
                }
                (fed, state.wants_write())
            };
            if wants_write {
                // An alert or a key update to answer.
                self.flush_sealed()?;
            }
            if fed {
                // Plaintext may have come of it.
                continue;
            }
            if rb.start < rb.end {
                // rustls took none of the ciphertext it has not seen.
                return Err(io::Error::other("TLS: received data not accepted"));
            }
            if rb.start == rb.end {
                rb.start = 0;
                let n = (&self.sock).read(&mut rb.buf)?;
                rb.end = n;
                if n == 0 {
                    // The peer closed: rustls tells a clean close
                    // (close_notify: 0) from a truncation (an error).
                    let mut state = lock(&self.state);
                    state.read_tls(&mut io::empty())?;
                    state.process_new_packets().map_err(tls_io)?;
                    return match state.reader().read(out) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        other => other,
                    };
                }
            }
        }
    }

    pub(crate) fn write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut sealed = lock(&self.send);
        let n = {
            let mut state = lock(&self.state);
            let n = state.writer().write_vectored(bufs)?;
            sealed.clear();
            while state.wants_write() {
                state.write_tls(&mut *sealed)?;
            }
            n
        };
        (&self.sock).write_all(&sealed)?;
        Ok(n)
    }

    /// Send whatever rustls has sealed (alerts, answers): a write of no
    /// plaintext.
    fn flush_sealed(&self) -> io::Result<()> {
        self.write_vectored(&[]).map(drop)
    }
}
