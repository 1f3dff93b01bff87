//! Post-copy's fetch connection
//! ([`FEATURE_FETCH`](migrate_core::protocol::FEATURE_FETCH)): the destination's
//! fault handler asks for each page its guest touches on a connection of
//! its own and waits for the answer there.
//!
//! Over the control connection a requested page waits behind the pushed
//! frames already written to it (64 KiB each, hashed, read and placed one
//! after another) and passes two reader threads and their queues, one per
//! end. On its own connection it does not: the source answers it from a
//! thread that does nothing else, from the paused guest's memory, and the
//! handler reads the answer itself, as RDMA READ's handler does.
//!
//! ```text
//!  source                                              destination
//!    | PageFetchOffer (after PostcopyAccepted)         ->  |
//!    |                       <-  PageFetchAccept          |  a thread accepts
//!    | fetch: MAGIC+version, Join{session, FETCH_STREAM} ->|  the join (TLS as
//!    |                                                     |  every connection)
//!    | ... Commit: the guest runs at the destination ...    |
//!    |             <-  fetch: PageRequest{one page}       |  fault handler
//!    | fetch: PostcopyPages{page, demand}              ->  |  places it
//! ```
//!
//! The handshake runs while the guest already runs at the destination (the
//! offer costs the downtime one round trip, not a handshake): faults ask
//! over the control connection until the join is done. A fetch that fails
//! (connection cut, source gone, a wrong answer) ends the fetch connection
//! for good: the handler asks over the control connection from then on,
//! which also carries resumption after a lost link. Either end's kill
//! switch closes it with the migration's other connections.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};
use migrate_core::memory::GuestMemory;
use migrate_core::protocol::{FETCH_STREAM, FrameKind, Message, PageRange, ProtocolError};
use migrate_core::transport::{ControlChannel, PageFetcher, TransportError};

use crate::TcpConfig;
use crate::accept::Handshakes;
use crate::control::{KillSwitch, TcpControl, io, prepare};

/// The source's side: a thread that connects, joins as the fetch stream
/// of `session` and answers requests from `mem` until the destination
/// closes the connection or `kill` trips.
///
/// # Errors
/// [`TransportError::Io`] when the thread cannot be started.
pub(crate) fn serve(
    addr: SocketAddr,
    cfg: TcpConfig,
    kill: KillSwitch,
    mem: Arc<GuestMemory>,
    session: u64,
) -> Result<JoinHandle<()>, TransportError> {
    std::thread::Builder::new()
        .name("tcp-fetch-serve".into())
        .spawn(move || {
            let answered = connect(addr, &cfg, &kill, session).and_then(|c| answer(c, &mem));
            match answered {
                Ok(pages) => tracing::debug!(pages, "post-copy fetch connection closed"),
                Err(e) => tracing::warn!(error = %e, "post-copy fetch connection ended"),
            }
        })
        .map_err(io("spawn the post-copy fetch server"))
}

fn connect(
    addr: SocketAddr,
    cfg: &TcpConfig,
    kill: &KillSwitch,
    session: u64,
) -> Result<TcpControl, TransportError> {
    let stream = crate::mark::connect(&addr, cfg.connect_timeout, cfg.dscp).map_err(|source| {
        TransportError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    // Killed with the migration's other connections, also mid-handshake.
    kill.register(&stream);
    prepare(&stream, cfg)?;
    let mut c = TcpControl::open(stream, cfg)?;
    c.send(&Message::Join {
        session,
        index: FETCH_STREAM,
    })?;
    // Requests come when the guest faults, which may be seldom: the
    // connection ends when the destination closes it or the kill switch
    // trips, not when it is quiet.
    c.conn()
        .set_read_timeout(None)
        .map_err(io("fetch connection without read timeout"))?;
    Ok(c)
}

/// Answer each `PageRequest` with its pages; the pages answered once the
/// destination closed the connection.
fn answer(mut c: TcpControl, mem: &GuestMemory) -> Result<u64, TransportError> {
    let mut answered = 0u64;
    let mut buf = Vec::new();
    loop {
        let ranges = match c.recv() {
            Ok(Message::PageRequest { ranges }) => ranges,
            Ok(other) => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    expected: "PageRequest",
                }
                .into());
            }
            // The destination closed it (every page placed, or its fetcher
            // gave up), or the kill switch did: nothing more to answer.
            Err(e) if e.is_disconnect() || matches!(e, TransportError::Closed { .. }) => {
                return Ok(answered);
            }
            Err(e) => return Err(e),
        };
        for r in ranges {
            let region = mem
                .regions()
                .get(r.region as usize)
                .filter(|g| r.first.saturating_add(u64::from(r.count)) <= g.pages() as u64)
                .ok_or_else(|| ProtocolError::Malformed {
                    kind: FrameKind::PageRequest,
                    detail: format!(
                        "pages {}+{} of region {} are outside the layout",
                        r.first, r.count, r.region
                    ),
                })?;
            let ps = region.page_size().bytes();
            buf.resize(r.count as usize * ps, 0);
            region.read_bytes(r.first as usize * ps, &mut buf);
            let msg = Message::PostcopyPages {
                region: r.region,
                first: r.first,
                demand: true,
                bytes: std::mem::take(&mut buf),
            };
            c.send(&msg)?;
            if let Message::PostcopyPages { bytes, .. } = msg {
                buf = bytes;
            }
            answered += u64::from(r.count);
        }
    }
}

/// The destination's side: a thread accepts the source's fetch connection
/// on `listener` until `deadline`; the fetcher is ready once it has.
pub(crate) fn accept(
    listener: &TcpListener,
    cfg: &TcpConfig,
    kill: &KillSwitch,
    session: u64,
    deadline: Instant,
) -> Result<TcpFetcher, TransportError> {
    let listener = listener
        .try_clone()
        .map_err(io("listener for the fetch connection"))?;
    let (cfg, kill) = (cfg.clone(), kill.clone());
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("tcp-fetch-accept".into())
        .spawn(move || {
            let joined = accept_join(&listener, &cfg, session, deadline);
            if let Ok(c) = &joined {
                kill.register(c.stream());
            }
            let _ = tx.send(joined);
        })
        .map_err(io("spawn the fetch connection's acceptor"))?;
    Ok(TcpFetcher {
        state: State::Joining(rx),
    })
}

fn accept_join(
    listener: &TcpListener,
    cfg: &TcpConfig,
    session: u64,
    deadline: Instant,
) -> Result<TcpControl, TransportError> {
    // The source opens this one connection, right after the accept. The
    // pool's usual limits: with one pending handshake per address, a
    // stranger connecting from the source's address (a NAT, a proxy, the
    // same host) evicted the source's own join while it was on its way and
    // was then dropped for its wrong session, leaving post-copy's faults to
    // the control connection (found by `postcopy_fetch.rs`' stranger).
    let handshakes = Handshakes::new();
    let cfg = cfg.clone();
    let handshake = move |stream: TcpStream| -> Result<TcpControl, TransportError> {
        let mut c = TcpControl::open(stream, &cfg)?;
        match c.recv()? {
            Message::Join { session: s, index } if s == session && index == FETCH_STREAM => Ok(c),
            Message::Join { index, .. } => Err(TransportError::Stream {
                stream: index,
                detail: "not the fetch connection of this migration".into(),
            }),
            other => Err(ProtocolError::Unexpected {
                got: other.kind(),
                expected: "Join",
            }
            .into()),
        }
    };
    loop {
        match handshakes.next(listener, Some(deadline), handshake.clone())? {
            None => {
                return Err(TransportError::Io {
                    op: "wait for the source's fetch connection",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            Some(Ok(c)) => return Ok(c),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "dropped a connection while waiting for the fetch connection");
            }
        }
    }
}

/// Asks the source for one page at a time on the fetch connection.
pub(crate) struct TcpFetcher {
    state: State,
}

enum State {
    /// The acceptor thread has not answered yet.
    Joining(Receiver<Result<TcpControl, TransportError>>),
    Ready(TcpControl),
    /// The join failed: the next fetch says why, and the handler stops
    /// using this fetcher.
    Failed(String),
}

impl PageFetcher for TcpFetcher {
    fn ready(&mut self) -> bool {
        if let State::Joining(rx) = &self.state {
            self.state = match rx.try_recv() {
                Ok(Ok(c)) => {
                    tracing::debug!("post-copy fetch connection joined");
                    State::Ready(c)
                }
                Ok(Err(e)) => State::Failed(e.to_string()),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => {
                    State::Failed("its acceptor thread ended without an answer".into())
                }
            };
        }
        true
    }

    fn fetch(&mut self, region: usize, page: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let c = match &mut self.state {
            State::Ready(c) => c,
            State::Failed(why) => {
                return Err(TransportError::Unavailable {
                    reason: format!("the post-copy fetch connection did not join: {why}"),
                });
            }
            State::Joining(_) => {
                return Err(TransportError::Unavailable {
                    reason: "the post-copy fetch connection has not joined yet".into(),
                });
            }
        };
        c.send(&Message::PageRequest {
            ranges: vec![PageRange {
                region: region as u32,
                first: page as u64,
                count: 1,
            }],
        })?;
        match c.recv()? {
            Message::PostcopyPages {
                region: r,
                first,
                demand: true,
                bytes,
            } if r as usize == region && first == page as u64 && bytes.len() == out.len() => {
                out.copy_from_slice(&bytes);
                Ok(())
            }
            Message::PostcopyPages {
                region: r,
                first,
                bytes,
                ..
            } => Err(ProtocolError::Malformed {
                kind: FrameKind::PostcopyPages,
                detail: format!(
                    "asked for page {page} of region {region}, got {} bytes from page {first} of \
                     region {r}",
                    bytes.len()
                ),
            }
            .into()),
            other => Err(ProtocolError::Unexpected {
                got: other.kind(),
                expected: "PostcopyPages",
            }
            .into()),
        }
    }
}
