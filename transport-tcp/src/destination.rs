//! Destination side: accept the control and data connections, land page
//! batches straight into guest memory.

use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use migrate_core::memory::{FreshPages, GuestMemory};
use migrate_core::pages::BatchLander;
use migrate_core::protocol::wire::{HEADER_LEN, read_frame_header, read_payload};
use migrate_core::protocol::{
    FEATURE_FETCH, FEATURE_SPARSE, FEATURE_UNHASHED, FEATURE_ZSTD, Features, FrameKind, Message,
    PageRange, ProtocolError,
};
use migrate_core::transport::{
    ControlChannel, DataEvent, DestinationTransport, Landed, PageFetcher, RoundSent, TransportError,
};

use crate::TcpConfig;
use crate::accept::Handshakes;
use crate::conn::Conn;
use crate::control::{KillSwitch, TcpControl, io};

/// A listening socket for incoming migrations. Connections are served
/// concurrently while they say who they are (see `accept.rs`): a silent or
/// slow client does not hold up a real source.
#[derive(Debug)]
pub struct TcpMigrationListener {
    listener: TcpListener,
    cfg: TcpConfig,
    handshakes: Handshakes<(TcpControl, KillSwitch)>,
}

impl TcpMigrationListener {
    /// Listen on `addr` (host:port; port 0 picks one).
    ///
    /// # Errors
    /// [`TransportError::Io`] when the address cannot be bound.
    pub fn bind(addr: &str, cfg: TcpConfig) -> Result<Self, TransportError> {
        let sa: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(io("resolve listen address"))?
            .collect();
        let listener = crate::mark::listen(&sa, cfg.dscp).map_err(io("bind"))?;
        Ok(Self {
            listener,
            cfg,
            handshakes: Handshakes::new(),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// [`TransportError::Io`] from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener.local_addr().map_err(io("local address"))
    }

    /// Wait for a source's control connection: the next connection to
    /// finish its preamble exchange. A client that is not a migration source
    /// (wrong first bytes, or none within a few seconds) fails here with a
    /// protocol or I/O error; call again to keep listening.
    ///
    /// # Errors
    /// [`TransportError`] from accept or the preamble exchange.
    pub fn accept(&self) -> Result<TcpDestination, TransportError> {
        let cfg = self.cfg.clone();
        let handshake = move |stream| {
            let kill = KillSwitch::default();
            TcpControl::open_control(stream, &cfg, &kill).map(|c| (c, kill))
        };
        let (control, kill) = loop {
            if let Some(done) = self
                .handshakes
                .next(&self.listener, None, handshake.clone())?
            {
                break done?;
            }
        };
        Ok(TcpDestination {
            listener: self.listener.try_clone().map_err(io("clone listener"))?,
            cfg: self.cfg.clone(),
            control,
            receivers: Vec::new(),
            kill,
            resumes: None,
            landed: Arc::default(),
            session: None,
        })
    }
}

/// One incoming migration over TCP.
#[derive(Debug)]
pub struct TcpDestination {
    listener: TcpListener,
    cfg: TcpConfig,
    control: TcpControl,
    receivers: Vec<JoinHandle<()>>,
    kill: KillSwitch,
    /// The handshakes of connections that may be the source coming back,
    /// kept across [`DestinationTransport::reaccept`]'s calls (the engine
    /// waits in slices: a handshake in progress must outlive a slice).
    resumes: Option<Box<Handshakes<(TcpControl, KillSwitch)>>>,
    /// What the data streams have landed, every round, counted per batch.
    landed: Arc<Landed>,
    /// The migration's session, once its data plane opened.
    session: Option<u64>,
}

impl TcpDestination {
    /// This end's address of the control connection.
    ///
    /// # Errors
    /// [`TransportError::Io`] from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.control
            .stream()
            .local_addr()
            .map_err(io("local address"))
    }

    /// A switch that drops all of this migration's connections.
    pub fn kill_switch(&self) -> KillSwitch {
        self.kill.clone()
    }
}

impl DestinationTransport for TcpDestination {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn authenticated(&self) -> bool {
        self.cfg.tls.is_some()
    }

    fn features(&self) -> Features {
        Features::new(
            FEATURE_ZSTD
                | FEATURE_FETCH
                | if self.cfg.sparse { FEATURE_SPARSE } else { 0 }
                | if self.cfg.tls.is_some() {
                    FEATURE_UNHASHED
                } else {
                    0
                },
        )
    }

    fn control(&mut self) -> &mut dyn ControlChannel {
        &mut self.control
    }

    fn open_data(
        &mut self,
        mem: &Arc<GuestMemory>,
        session: u64,
        streams: u16,
        features: Features,
    ) -> Result<Receiver<DataEvent>, TransportError> {
        self.session = Some(session);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut joined: Vec<Option<(Conn, BufReader<Conn>)>> = (0..streams).map(|_| None).collect();
        let deadline = Instant::now() + self.cfg.connect_timeout;
        // Joins run concurrently: a stray connection that says nothing does
        // not hold up the streams of this migration. The source opens them
        // all at once from one address.
        let handshakes = Handshakes::per_address(
            usize::from(streams).max(crate::accept::MAX_PENDING_PER_ADDRESS),
        );
        let cfg = self.cfg.clone();
        let handshake = move |stream| join(stream, &cfg, session);
        while joined.iter().any(Option::is_none) {
            let Some(result) =
                handshakes.next(&self.listener, Some(deadline), handshake.clone())?
            else {
                let missing = joined.iter().filter(|j| j.is_none()).count();
                return Err(TransportError::DataPlane {
                    detail: format!("{missing} of {streams} data connections did not join in time"),
                });
            };
            // A stray or foreign connection is dropped; we keep waiting.
            match result {
                Ok((index, parts))
                    if (index as usize) < joined.len() && joined[index as usize].is_none() =>
                {
                    joined[index as usize] = Some(parts);
                }
                Ok((index, _)) => {
                    tracing::warn!(index, "dropped a duplicate or out-of-range data connection")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dropped a connection that is not a data stream of this migration")
                }
            }
        }
        // The pages not allocated yet, shared by the streams: each run of
        // them is allocated in one call before its bytes are read in.
        let fresh = Arc::new(FreshPages::new(mem));
        for (index, parts) in joined.into_iter().enumerate() {
            let Some((stream, reader)) = parts else {
                return Err(TransportError::Stream {
                    stream: index as u16,
                    detail: "did not join".into(),
                });
            };
            self.kill.register(stream.socket());
            // Batches without page hashes only where both ends agreed and
            // an AEAD seals this connection.
            let unhashed_ok = features.has(FEATURE_UNHASHED) && stream.sealed();
            let (mem, tx) = (Arc::clone(mem), tx.clone());
            let (kill, fresh) = (self.kill.clone(), Arc::clone(&fresh));
            let landed = Arc::clone(&self.landed);
            let handle = std::thread::Builder::new()
                .name(format!("tcp-recv-{index}"))
                .spawn(move || {
                    let lander = BatchLander::new(&mem, &fresh, unhashed_ok);
                    receive_stream(index as u16, reader, lander, (&tx, &landed), &kill)
                })
                .map_err(io("spawn receiver"))?;
            self.receivers.push(handle);
        }
        Ok(rx)
    }

    fn landed(&self) -> Option<Arc<Landed>> {
        Some(Arc::clone(&self.landed))
    }

    fn postcopy_fetcher(
        &mut self,
        _mem: &Arc<GuestMemory>,
        offer: &Message,
    ) -> Result<(Message, Box<dyn PageFetcher>), TransportError> {
        let (Message::PageFetchOffer, Some(session)) = (offer, self.session) else {
            return Err(TransportError::Unavailable {
                reason: format!("the tcp transport takes no {:?} offer", offer.kind()),
            });
        };
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let fetcher =
            crate::fetch::accept(&self.listener, &self.cfg, &self.kill, session, deadline)?;
        Ok((Message::PageFetchAccept, Box::new(fetcher)))
    }

    fn reaccept(&mut self, deadline: Instant) -> Result<(), TransportError> {
        // The old connections are dead: close what is left, end their
        // receiver threads, then wait for the source.
        self.kill.kill();
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
        self.accept_control(deadline)
    }
}

impl TcpDestination {
    /// The next connection to finish its handshake (TLS, preamble), until
    /// `deadline`; anything else is dropped. Handshakes run in the guarded
    /// pool (`accept.rs`): a stranger that trickles or floods neither holds
    /// up the source nor stretches the deadline.
    fn accept_control(&mut self, deadline: Instant) -> Result<(), TransportError> {
        let cfg = self.cfg.clone();
        let handshake = move |stream| {
            let said_who = Instant::now() + crate::accept::HANDSHAKE_TIMEOUT;
            let kill = KillSwitch::default();
            let mut control = TcpControl::open_control(stream, &cfg, &kill)?;
            // Only a connection that says something comes out of the pool:
            // strangers that finish a handshake and fall silent cannot
            // queue up in front of the source, each costing a wait.
            control.await_first_message(said_who)?;
            Ok((control, kill))
        };
        let resumes = self
            .resumes
            .get_or_insert_with(|| Box::new(Handshakes::new()));
        loop {
            match resumes.next(&self.listener, Some(deadline), handshake.clone())? {
                None => {
                    return Err(TransportError::Io {
                        op: "wait for the source to reconnect",
                        source: std::io::ErrorKind::TimedOut.into(),
                    });
                }
                Some(Ok((control, kill))) => {
                    self.control = control;
                    self.kill = kill;
                    return Ok(());
                }
                Some(Err(e)) => tracing::warn!(error = %e, "dropped a connection while resuming"),
            }
        }
    }
}

impl Drop for TcpDestination {
    fn drop(&mut self) {
        // Closing every connection ends the receiver threads.
        self.kill.kill();
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
    }
}

fn join(
    stream: TcpStream,
    cfg: &TcpConfig,
    session: u64,
) -> Result<(u16, (Conn, BufReader<Conn>)), TransportError> {
    stream
        .set_nonblocking(false)
        .map_err(io("data connection blocking"))?;
    let mut c = TcpControl::open(stream, cfg)?;
    match c.recv()? {
        Message::Join { session: s, index } if s == session => {
            // Keep the reader that read the Join: it may already hold the
            // first page bytes (dropping its buffer would desync the stream).
            c.into_parts()
                .map(|parts| (index, parts))
                .ok_or(TransportError::Stream {
                    stream: index,
                    detail: "a data stream opened as a control connection".into(),
                })
        }
        Message::Join { index, .. } => Err(TransportError::Stream {
            stream: index,
            detail: "join for another session".into(),
        }),
        other => Err(ProtocolError::Unexpected {
            got: other.kind(),
            expected: "Join",
        }
        .into()),
    }
}

/// Per-round counters of one stream.
#[derive(Default)]
struct StreamRound {
    batches: u64,
    suspect: Vec<PageRange>,
    received: RoundSent,
}

fn receive_stream(
    stream: u16,
    mut reader: BufReader<Conn>,
    mut lander: BatchLander<'_>,
    (tx, landed): (&Sender<DataEvent>, &Landed),
    kill: &KillSwitch,
) {
    let mut round = StreamRound::default();
    // The next frame may be long in coming, inside a round as between
    // rounds: the source waits for a round's acknowledgement, a
    // protection's epochs come every few ms or seconds, and a batch of
    // pages this end already reads as zeros sends no frame at all (a
    // mostly-zero guest of some hundred GiB is minutes of zero tests
    // without a frame). The control connection's heartbeats watch the
    // peer meanwhile, and its silence kills this stream; a source whose
    // writes stall fails on its own write timeout. Once a frame has begun,
    // it must make progress within the I/O timeout.
    loop {
        let next = next_frame(&mut reader)
            .and_then(|()| next_event(stream, &mut reader, &mut lander, &mut round, landed));
        let event = match next {
            Ok(None) => continue,
            Ok(Some(e)) => e,
            Err(error) => {
                // A silent peer tripped the kill: report that, the cause;
                // else a socket timeout as what it means.
                let error = kill
                    .reason()
                    .unwrap_or_else(|| explain_timeout(error, &reader));
                let detail = error.to_string();
                if tx.send(DataEvent::Failed { stream, error }).is_ok() {
                    // The engine may be blocked on the control channel:
                    // closing everything makes it look at this failure now.
                    tracing::error!(stream, error = %detail, "data stream failed");
                    kill.kill();
                } else {
                    // Nobody listens: the migration is over (peer closed).
                    tracing::debug!(stream, error = %detail, "data stream closed");
                }
                return;
            }
        };
        // The engine has finished (or gone) when nobody listens any more.
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Wait, however long, until the next frame's first bytes arrive (or the
/// connection ends: the peer closed it, or the kill switch shut it).
fn next_frame(reader: &mut BufReader<Conn>) -> Result<(), TransportError> {
    use std::io::BufRead;
    loop {
        match reader.fill_buf() {
            Ok([]) => {
                return Err(ProtocolError::Closed("waiting for a frame").into());
            }
            Ok(_) => return Ok(()),
            // A timeout, or a wait cut short by a signal (a process
            // stopped and continued sees EINTR on a read with a timeout).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(crate::control::io("read frame header")(e)),
        }
    }
}

/// Read one frame: a batch lands (no event), the end of a round is the
/// round's event.
fn next_event(
    stream: u16,
    reader: &mut BufReader<Conn>,
    lander: &mut BatchLander<'_>,
    round: &mut StreamRound,
    landed: &Landed,
) -> Result<Option<DataEvent>, TransportError> {
    let h = read_frame_header(reader)?;
    if h.kind == FrameKind::Pages {
        let b = lander.land(reader, &h)?;
        round.batches += 1;
        round.received.wire_bytes += b.wire_bytes;
        round.received.normal_pages += b.normal_pages;
        round.received.zero_pages += b.zero_pages;
        landed.add(b.wire_bytes, b.normal_pages, b.zero_pages);
        if !b.suspect.is_empty() {
            // Normal in live rounds (a guest write raced the send); the
            // source decides whether it matters.
            tracing::debug!(
                stream,
                round = b.round,
                pages = b.suspect.len(),
                "pages failed their check"
            );
        }
        round.suspect.extend(b.suspect);
        return Ok(None);
    }
    match read_payload(reader, &h)? {
        Message::RoundEnd { round: r, batches } => {
            let mut done = std::mem::take(round);
            // The marker is on the wire too, as the source counts.
            let bytes = (HEADER_LEN as u64) + u64::from(h.len);
            done.received.wire_bytes += bytes;
            landed.add(bytes, 0, 0);
            Ok(Some(DataEvent::RoundEnd {
                stream,
                round: r,
                batches_sent: batches,
                batches_received: done.batches,
                suspect: done.suspect,
                received: done.received,
            }))
        }
        other => Err(ProtocolError::Unexpected {
            got: other.kind(),
            expected: "a page batch or the end of a round",
        }
        .into()),
    }
}

/// A read timeout ("os error 11") as "no progress for N s".
fn explain_timeout(error: TransportError, reader: &BufReader<Conn>) -> TransportError {
    let timeout = reader.get_ref().read_timeout();
    match error {
        TransportError::Io { op, source } => TransportError::Io {
            op,
            source: crate::control::timed_out(source, timeout),
        },
        TransportError::Protocol(ProtocolError::Io { op, source }) => {
            TransportError::Protocol(ProtocolError::Io {
                op,
                source: crate::control::timed_out(source, timeout),
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_core::protocol::wire::{write_message, write_preamble};
    use std::io::{Read, Write};

    /// Bytes that arrive in the same segment as the Join (the first page
    /// batch, sent at once by a fast source) must not be lost.
    #[test]
    fn bytes_after_the_join_are_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut all = Vec::new();
            write_preamble(&mut all).unwrap();
            write_message(
                &mut all,
                &Message::Join {
                    session: 7,
                    index: 0,
                },
            )
            .unwrap();
            all.extend_from_slice(b"first batch bytes");
            s.write_all(&all).unwrap();
            let mut sink = [0u8; 8];
            s.read_exact(&mut sink).unwrap(); // the destination's preamble
            s
        });
        let (server, _) = listener.accept().unwrap();
        // Let the whole segment arrive before the Join is read.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (index, (_s, mut reader)) = join(server, &TcpConfig::default(), 7).unwrap();
        assert_eq!(index, 0);
        let mut rest = [0u8; 17];
        reader.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"first batch bytes");
        drop(client.join().unwrap());
    }
}
