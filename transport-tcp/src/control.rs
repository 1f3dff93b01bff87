//! The control connection, and its liveness.
//!
//! Both ends of a control connection whose peer speaks protocol version 2
//! or later send a `Heartbeat` frame at least once a second (a quarter of
//! the I/O timeout when that is shorter), from the first frame after the
//! preamble until the connection closes, and a reader thread on each end
//! reads every frame as it arrives. A round may last as long as it takes on
//! a healthy link; a peer from which nothing arrives — not even a heartbeat
//! — for the I/O timeout is dead, frozen or cut off: the reader reports it
//! once, and trips the [`KillSwitch`], which shuts every connection of the
//! migration so that blocked data-stream reads and writes fail at once with
//! that reason instead of waiting out their own timeouts.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use migrate_core::protocol::wire::{read_message, read_preamble, write_message, write_preamble};
use migrate_core::protocol::{Message, ProtocolError};
use migrate_core::transport::{ControlChannel, ControlSender, TransportError};

use crate::TcpConfig;
use crate::conn::Conn;
use crate::tls::secure;

/// Bytes buffered per connection for headers and run tables; page bytes
/// beyond what is buffered are read straight into guest memory.
const READ_BUFFER: usize = 16 << 10;
/// The first protocol version whose control streams carry heartbeats.
const HEARTBEAT_VERSION: u16 = 2;
/// Heartbeats come at least this often.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Drops every connection of a migration from another thread, as the death
/// of its process would (tests, a VMM that gives up), or because the peer
/// fell silent; later reads and writes fail with the reason.
#[derive(Debug, Clone, Default)]
pub struct KillSwitch(Arc<KillState>);

#[derive(Debug, Default)]
struct KillState {
    streams: Mutex<(bool, Vec<TcpStream>)>,
    /// The peer fell silent for this many seconds (the only reason a
    /// kill is given).
    silent_secs: OnceLock<f64>,
    /// Why the control connection's reader stopped (the peer closed it,
    /// reset it, fell silent, or sent a bad frame), once it has.
    control_ended: OnceLock<String>,
}

impl KillSwitch {
    /// Shut down every connection, now and any opened later.
    pub fn kill(&self) {
        let mut g = self.0.streams.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = true;
        for s in &g.1 {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Kill because the peer fell silent for `secs`, which the failures
    /// this causes report instead of their own (the first reason wins).
    pub(crate) fn kill_silent(&self, secs: f64) {
        let _ = self.0.silent_secs.set(secs);
        self.kill();
    }

    /// Why the connections were killed, if a reason was given.
    pub(crate) fn reason(&self) -> Option<TransportError> {
        let secs = *self.0.silent_secs.get()?;
        Some(TransportError::PeerSilent { secs })
    }

    /// Why the control connection ended, once its reader has stopped on
    /// an error: a data plane that does not run over these connections
    /// (RDMA's queue pairs) asks it while it waits, so a destination whose
    /// process died is noticed when its socket closes, not only after a
    /// timeout of the fabric.
    pub fn control_ended(&self) -> Option<&str> {
        self.0.control_ended.get().map(String::as_str)
    }

    pub(crate) fn register(&self, s: &TcpStream) {
        let mut g = self.0.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(c) = s.try_clone() {
            if g.0 {
                let _ = c.shutdown(Shutdown::Both);
            }
            g.1.push(c);
        }
    }
}

/// Messages over one TCP connection.
#[derive(Debug)]
pub struct TcpControl {
    stream: Conn,
    inbound: Inbound,
    /// One frame at a time from the engine and the heartbeat thread.
    write_lock: Arc<Mutex<()>>,
    /// Dropped with the connection: stops the heartbeat thread.
    _stop_heartbeats: Option<Sender<()>>,
    /// What [`ControlChannel::peer_gone`] took from the reader thread ahead
    /// of [`ControlChannel::recv`].
    peeked: Option<Box<Result<Message, TransportError>>>,
}

#[derive(Debug)]
enum Inbound {
    /// Read on the caller's thread (data streams, peers without heartbeats).
    Direct(BufReader<Conn>),
    /// A reader thread reads every frame, drops heartbeats and reports
    /// silence.
    Watched(Receiver<Result<Message, TransportError>>),
    /// Handed over with [`TcpControl::into_parts`].
    Taken,
}

impl TcpControl {
    /// Set up a connected data stream: timeouts, no Nagle, preamble sent and
    /// the peer's checked (so a stray client or server fails on its first
    /// bytes). Reads happen on the caller's thread.
    pub(crate) fn open(stream: TcpStream, cfg: &TcpConfig) -> Result<Self, TransportError> {
        let (stream, reader, _) = handshake(stream, cfg)?;
        Ok(Self {
            stream,
            inbound: Inbound::Direct(reader),
            write_lock: Arc::default(),
            _stop_heartbeats: None,
            peeked: None,
        })
    }

    /// As [`open`](Self::open), for the control connection: with a peer
    /// that speaks heartbeats, start sending them and watching for the
    /// peer's; silence trips `kill`.
    pub(crate) fn open_control(
        stream: TcpStream,
        cfg: &TcpConfig,
        kill: &KillSwitch,
    ) -> Result<Self, TransportError> {
        let (stream, reader, peer_version) = handshake(stream, cfg)?;
        kill.register(stream.socket());
        let write_lock = Arc::<Mutex<()>>::default();
        if peer_version < HEARTBEAT_VERSION {
            // The Hello exchange refuses such a peer with a version error.
            return Ok(Self {
                stream,
                inbound: Inbound::Direct(reader),
                write_lock,
                _stop_heartbeats: None,
                peeked: None,
            });
        }
        let interval =
            (cfg.io_timeout / 4).clamp(Duration::from_millis(10), MAX_HEARTBEAT_INTERVAL);
        let stop = spawn_heartbeats(&stream, &write_lock, interval)?;
        let rx = spawn_reader(reader, cfg.io_timeout, kill.clone())?;
        Ok(Self {
            stream,
            inbound: Inbound::Watched(rx),
            write_lock,
            _stop_heartbeats: Some(stop),
            peeked: None,
        })
    }

    /// The underlying socket (under TLS when the migration uses it).
    pub fn stream(&self) -> &TcpStream {
        self.stream.socket()
    }

    /// The connection, plain or TLS.
    pub(crate) fn conn(&self) -> &Conn {
        &self.stream
    }

    /// Close both directions (wakes a peer blocked on reading).
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }

    /// The socket and its reader, for a data stream (read on the caller's
    /// thread).
    pub(crate) fn into_parts(mut self) -> Option<(Conn, BufReader<Conn>)> {
        if !matches!(self.inbound, Inbound::Direct(_)) {
            return None;
        }
        let stream = self.stream.clone();
        match std::mem::replace(&mut self.inbound, Inbound::Taken) {
            Inbound::Direct(reader) => Some((stream, reader)),
            _ => None,
        }
    }
}

impl Drop for TcpControl {
    fn drop(&mut self) {
        if matches!(self.inbound, Inbound::Watched(_)) {
            // The reader thread holds the socket too: closing both
            // directions ends it (and tells the peer's), instead of
            // heartbeats keeping two idle threads and their sockets alive.
            self.stream.shutdown();
        }
    }
}

/// Writes one frame at a time to a control connection, beside the engine
/// and the heartbeat thread.
struct TcpSender {
    stream: Conn,
    write_lock: Arc<Mutex<()>>,
}

impl ControlSender for TcpSender {
    fn send(&self, msg: &Message) -> Result<(), TransportError> {
        send_frame(&self.stream, &self.write_lock, msg)
    }
}

fn send_frame(stream: &Conn, lock: &Mutex<()>, msg: &Message) -> Result<(), TransportError> {
    let _one_frame = lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut w = stream;
    write_message(&mut w, msg)?;
    w.flush().map_err(io("flush control"))
}

impl ControlChannel for TcpControl {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        send_frame(&self.stream, &self.write_lock, msg)
    }

    fn sender(&self) -> Option<Box<dyn ControlSender>> {
        Some(Box::new(TcpSender {
            stream: self.stream.clone(),
            write_lock: Arc::clone(&self.write_lock),
        }))
    }

    fn recv(&mut self) -> Result<Message, TransportError> {
        if let Some(early) = self.peeked.take() {
            return *early;
        }
        match &mut self.inbound {
            Inbound::Direct(reader) => Ok(read_message(reader)?),
            Inbound::Watched(rx) => rx.recv().unwrap_or_else(|_| Err(closed())),
            Inbound::Taken => Err(TransportError::Closed {
                what: "control connection (handed over)",
            }),
        }
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, TransportError> {
        if let Some(early) = self.peeked.take() {
            return (*early).map(Some);
        }
        match &mut self.inbound {
            Inbound::Watched(rx) => match rx.recv_timeout(timeout) {
                Ok(item) => item.map(Some),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(closed()),
            },
            _ => self.recv().map(Some),
        }
    }

    fn peer_gone(&mut self) -> Option<TransportError> {
        match self.peek()? {
            Err(_) => match self.peeked.replace(Box::new(Err(closed()))).map(|b| *b) {
                Some(Err(e)) => Some(e),
                _ => None,
            },
            Ok(_) => None,
        }
    }
}

impl TcpControl {
    /// Wait until `deadline` for the peer's first message, kept for the
    /// next [`ControlChannel::recv`]: a connection that finishes its
    /// handshake and then says nothing is not handed on (a source coming
    /// back says `Resume` at once).
    ///
    /// # Errors
    /// A timed-out [`TransportError::Io`], or the channel's error.
    pub(crate) fn await_first_message(&mut self, deadline: Instant) -> Result<(), TransportError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Io {
                    op: "wait for the first message after the handshake",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            if let Some(m) = self.recv_timeout(left)? {
                self.peeked = Some(Box::new(Ok(m)));
                return Ok(());
            }
        }
    }

    /// The reader thread's verdict so far, without waiting (see
    /// [`ControlChannel::peer_gone`]).
    fn peek(&mut self) -> Option<&Result<Message, TransportError>> {
        let Inbound::Watched(rx) = &self.inbound else {
            return None;
        };
        if self.peeked.is_none() {
            self.peeked = match rx.try_recv() {
                Ok(item) => Some(Box::new(item)),
                Err(crossbeam_channel::TryRecvError::Empty) => None,
                Err(crossbeam_channel::TryRecvError::Disconnected) => Some(Box::new(Err(closed()))),
            };
        }
        self.peeked.as_deref()
    }
}

fn closed() -> TransportError {
    TransportError::Closed {
        what: "control connection",
    }
}

/// Options, TLS when configured, preambles both ways; returns the peer's
/// protocol version. Nothing of the migration crosses the connection before
/// the peer is authenticated.
fn handshake(
    stream: TcpStream,
    cfg: &TcpConfig,
) -> Result<(Conn, BufReader<Conn>, u16), TransportError> {
    prepare(&stream, cfg)?;
    if cfg.tls.is_none() && !cfg.any_local_user {
        crate::local_peer::check_same_user(&stream)?;
    }
    // A peer says who it is at once; one that does not is not ours.
    let say_who = cfg.io_timeout.min(crate::accept::HANDSHAKE_TIMEOUT);
    stream
        .set_read_timeout(Some(say_who))
        .map_err(io("set read timeout"))?;
    let conn = secure(stream, cfg.tls.as_ref())?;
    let mut w = &conn;
    write_preamble(&mut w)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, conn.clone());
    let version = read_preamble(&mut reader).map_err(|e| match e {
        ProtocolError::Io { op, source } => ProtocolError::Io {
            op,
            source: timed_out(source, Some(say_who)),
        },
        e => e,
    })?;
    conn.set_read_timeout(Some(cfg.io_timeout))
        .map_err(io("set read timeout"))?;
    Ok((conn, reader, version))
}

/// A thread that writes a heartbeat every `interval` until the returned
/// sender is dropped or the connection fails.
fn spawn_heartbeats(
    stream: &Conn,
    write_lock: &Arc<Mutex<()>>,
    interval: Duration,
) -> Result<Sender<()>, TransportError> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let stream = stream.clone();
    let write_lock = Arc::clone(write_lock);
    std::thread::Builder::new()
        .name("tcp-heartbeat".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let _one_frame = write_lock.lock().unwrap_or_else(|p| p.into_inner());
                let mut w = &stream;
                if write_message(&mut w, &Message::Heartbeat).is_err() {
                    // The connection is gone; the reader reports it.
                    return;
                }
            }
        })
        .map_err(io("spawn the heartbeat thread"))?;
    Ok(stop)
}

/// A thread that reads every frame: heartbeats prove the peer alive, the
/// rest goes to the engine. The first error (silence for `timeout`, the
/// peer closing, a bad frame) ends it; silence also trips `kill`.
fn spawn_reader(
    mut reader: BufReader<Conn>,
    timeout: Duration,
    kill: KillSwitch,
) -> Result<Receiver<Result<Message, TransportError>>, TransportError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("tcp-control-reader".into())
        .spawn(move || {
            loop {
                let err = match read_message(&mut reader) {
                    Ok(Message::Heartbeat) => continue,
                    Ok(m) => {
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) if is_timeout(&e) => {
                        let silent = TransportError::PeerSilent {
                            secs: timeout.as_secs_f64(),
                        };
                        tracing::error!(error = %silent, "peer declared dead");
                        kill.kill_silent(timeout.as_secs_f64());
                        silent
                    }
                    Err(e) => kill.reason().unwrap_or(e.into()),
                };
                let _ = kill.0.control_ended.set(err.to_string());
                let _ = tx.send(Err(err));
                return;
            }
        })
        .map_err(io("spawn the control reader"))?;
    Ok(rx)
}

fn is_timeout(e: &migrate_core::protocol::ProtocolError) -> bool {
    matches!(
        e,
        migrate_core::protocol::ProtocolError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

/// A socket timeout (`EAGAIN`, "os error 11") as what it means: no
/// progress for the timeout. Other errors pass unchanged.
pub(crate) fn timed_out(e: std::io::Error, timeout: Option<Duration>) -> std::io::Error {
    match (e.kind(), timeout) {
        (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no progress for {:.1} s: the peer is dead, frozen or cut off",
                    t.as_secs_f64()
                ),
            )
        }
        _ => e,
    }
}

pub(crate) fn prepare(stream: &TcpStream, cfg: &TcpConfig) -> Result<(), TransportError> {
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(cfg.io_timeout))
        .map_err(io("set read timeout"))?;
    stream
        .set_write_timeout(Some(cfg.io_timeout))
        .map_err(io("set write timeout"))
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}
