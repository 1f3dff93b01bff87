//! The TLS 1.3 handshake, driven through rustls' unbuffered API over a
//! blocking socket, ending in the session's traffic secrets.
//!
//! **Sequence.**
//! ```text
//! source (client)                          destination (server)
//!   ClientHello ───────────────────────────▶
//!             ◀─────────── ServerHello … CertificateRequest, Certificate,
//!                                          CertificateVerify, Finished
//!   Certificate, CertificateVerify,
//!   Finished ──────────────────────────────▶ (allow-list checked)
//!             ◀─────────────────────────── READY (one application record)
//!   ═════════ records sealed from the extracted secrets (crate::record,
//!             or the kernel's TLS) from here on ═════════
//! ```
//! Both ends read the peer's records one at a time (header, then exactly
//! its body), so when the source has read READY nothing of what follows is
//! inside rustls or a buffer of ours: the socket stands at a record
//! boundary both ways, which is what handing the secrets to the kernel
//! needs. The source learns at READY, not later, that its certificate was
//! refused.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, CommonState, ServerConfig};

use crate::record::{Ratchet, Secret};

/// The byte of the application record that confirms the session.
const READY: u8 = 0x5a;
/// The longest TLS record body (RFC 8446 §5.2).
const MAX_TLS_RECORD: usize = (1 << 14) + 256;

/// A session after its handshake: each direction's keys (with the next
/// record's sequence number) and the ratchet for key updates.
pub(crate) struct Session {
    /// What this end sends.
    pub(crate) tx: Secret,
    /// What this end receives.
    pub(crate) rx: Secret,
    pub(crate) ratchet: Box<dyn Ratchet>,
    /// This end is the TLS client (the source).
    pub(crate) is_client: bool,
}

/// A failed handshake: the socket's error, or rustls' (wrapped, with
/// [`io::ErrorKind::InvalidData`]).
fn tls_error(e: impl Into<rustls::Error>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.into())
}

/// rustls' two unbuffered connection kinds, driven alike.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &CommonState;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// The socket and the bytes in flight either way.
struct Wire<'a> {
    sock: &'a TcpStream,
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
    out_len: usize,
}

impl Wire<'_> {
    /// Read exactly one more record onto `incoming`.
    fn read_record(&mut self) -> io::Result<()> {
        let mut header = [0u8; 5];
        (&mut self.sock).read_exact(&mut header)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_TLS_RECORD {
            return Err(tls_error(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::MessageTooLarge,
            )));
        }
        let need = self.used + 5 + len;
        if self.incoming.len() < need {
            self.incoming.resize(need, 0);
        }
        self.incoming[self.used..self.used + 5].copy_from_slice(&header);
        (&mut self.sock).read_exact(&mut self.incoming[self.used + 5..need])?;
        self.used = need;
        Ok(())
    }

    fn discard(&mut self, n: usize) {
        self.incoming.copy_within(n..self.used, 0);
        self.used -= n;
    }
}

/// What [`drive`] is to do once the handshake is complete.
enum Goal<'a> {
    /// Nothing more: return.
    Complete,
    /// Send these bytes as one application record.
    Send(&'a [u8]),
    /// Receive one application record and return its bytes.
    Receive,
}

/// Run `conn` until the handshake is complete and `goal` is met.
fn drive<C: Unbuffered>(conn: &mut C, wire: &mut Wire<'_>, goal: Goal<'_>) -> io::Result<Vec<u8>> {
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut wire.incoming[..wire.used]);
        let mut read = false;
        let mut received = None;
        let mut done = false;
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                send_alert(conn, wire);
                return Err(tls_error(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut e) => loop {
                match e.encode(&mut wire.outgoing[wire.out_len..]) {
                    Ok(n) => {
                        wire.out_len += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => {
                        wire.outgoing.resize(wire.out_len + s.required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
                }
            },
            ConnectionState::TransmitTlsData(t) => {
                wire.sock.write_all(&wire.outgoing[..wire.out_len])?;
                wire.out_len = 0;
                t.done();
            }
            ConnectionState::BlockedHandshake => read = true,
            ConnectionState::ReadTraffic(mut r) => {
                if let Some(record) = r.next_record() {
                    received = Some(record.map_err(tls_error)?.payload.to_vec());
                }
            }
            ConnectionState::WriteTraffic(mut w) => match goal {
                Goal::Complete => done = true,
                Goal::Receive => read = true,
                Goal::Send(data) => {
                    let n = loop {
                        match w.encrypt(data, &mut wire.outgoing[wire.out_len..]) {
                            Ok(n) => break n,
                            Err(EncryptError::InsufficientSize(s)) => {
                                wire.outgoing.resize(wire.out_len + s.required_size, 0);
                            }
                            Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
                        }
                    };
                    wire.sock
                        .write_all(&wire.outgoing[wire.out_len..wire.out_len + n])?;
                    return Ok(Vec::new());
                }
            },
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS session during the handshake",
                ));
            }
            other => {
                return Err(io::Error::other(format!(
                    "TLS: unexpected state {other:?} during the handshake"
                )));
            }
        }
        wire.discard(discard);
        if done {
            return Ok(Vec::new());
        }
        if let Some(bytes) = received {
            // Nothing follows the record just read (one record per read).
            wire.used = 0;
            return Ok(bytes);
        }
        if read {
            wire.read_record()?;
        }
    }
}

/// After a failed step, the alert rustls queued (a refused certificate,
/// a bad message), so the peer learns why; best effort.
fn send_alert<C: Unbuffered>(conn: &mut C, wire: &Wire<'_>) {
    let mut nothing = [0u8; 0];
    if let Ok(ConnectionState::EncodeTlsData(mut e)) = conn.process(&mut nothing).state {
        let mut buf = [0u8; 256];
        if let Ok(n) = e.encode(&mut buf) {
            let _ = (&mut &*wire.sock).write_all(&buf[..n]);
        }
    }
}

fn wire(sock: &TcpStream) -> Wire<'_> {
    Wire {
        sock,
        incoming: vec![0; 4096],
        used: 0,
        outgoing: vec![0; 4096],
        out_len: 0,
    }
}

/// The session's secrets from rustls.
fn extract(
    (secrets, ratchet): (rustls::ExtractedSecrets, impl Ratchet + 'static),
    is_client: bool,
) -> io::Result<Session> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    Ok(Session {
        tx: Secret::new(tx_seq, &tx)?,
        rx: Secret::new(rx_seq, &rx)?,
        ratchet: Box::new(ratchet),
        is_client,
    })
}

/// The source's handshake, up to and including the destination's READY.
/// `common` sees the finished handshake (the cipher suite).
pub(crate) fn client(
    sock: &TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<Session> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut wire = wire(sock);
    let ready = drive(&mut conn, &mut wire, Goal::Receive)?;
    if ready != [READY] {
        return Err(io::Error::other(
            "the destination did not confirm the TLS session",
        ));
    }
    extract(
        conn.dangerous_into_kernel_connection().map_err(tls_error)?,
        true,
    )
}

/// The destination's handshake: `admit` decides on the finished handshake
/// (the source's certificate) before READY is sent.
pub(crate) fn server<E: From<io::Error>>(
    sock: &TcpStream,
    config: Arc<ServerConfig>,
    admit: impl FnOnce(&CommonState) -> Result<(), E>,
) -> Result<Session, E> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut wire = wire(sock);
    drive(&mut conn, &mut wire, Goal::Complete)?;
    admit(conn.common())?;
    drive(&mut conn, &mut wire, Goal::Send(&[READY]))?;
    Ok(extract(
        conn.dangerous_into_kernel_connection().map_err(tls_error)?,
        false,
    )?)
}
