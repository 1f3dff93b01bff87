//! Accepting connections so that no client holds up the others: each new
//! connection's handshake (TLS and PSK proofs, the preamble, and for a data
//! stream its `Join`) runs on its own thread, and the first to finish is
//! served. Three bounds keep strangers from holding the listener:
//!
//! - **A total deadline.** A handshake has [`HANDSHAKE_TIMEOUT`] from its
//!   accept, whatever the peer trickles (a per-read timeout alone lets a
//!   byte every few seconds last for ever): a watchdog closes it then.
//! - **Silent ones go first.** At most [`MAX_PENDING`] run at once; a new
//!   connection beyond closes the one whose peer has sent the fewest bytes
//!   (the kernel counts them: `TCP_INFO`), the oldest among equals. A real
//!   source mid-TLS has sent a kilobyte or more; a flood of connections
//!   that say nothing evicts itself, never the source once it spoke (and
//!   there is room for it to speak: see [`MAX_PENDING`]).
//! - **Per peer address.** One address holds at most its share
//!   ([`Handshakes::per_address`]) of the pending handshakes; beyond, its
//!   own least-advanced one is closed.
//!
//! A client that connects and says nothing costs one thread for at most
//! [`HANDSHAKE_TIMEOUT`], not the listener. The same pool serves the first
//! connection, the data streams' joins and a resume after a lost
//! connection (pre-copy and post-copy recovery alike).

use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use migrate_core::transport::TransportError;

use crate::control::io;

/// Handshakes in progress at most; a new connection beyond closes the
/// least advanced. Room enough that under a flood of N silent connections
/// a second a connection lives `MAX_PENDING_PER_ADDRESS / N` seconds before
/// it can be evicted: a real peer, which speaks one round trip after it
/// connected, gets to say its first bytes (and from then on outranks every
/// silent one) unless the flood from its own address tops ~1000 a second
/// per 100 ms of round trip.
pub(crate) const MAX_PENDING: usize = 512;
/// Handshakes in progress from one peer address at most, by default.
pub(crate) const MAX_PENDING_PER_ADDRESS: usize = 128;
/// A handshake thread's stack: a TLS handshake needs far less than the
/// default 2 MiB, and hundreds may wait at once.
const HANDSHAKE_STACK: usize = 512 << 10;
/// How long a new connection may take, from its accept, to finish its
/// handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection in its handshake.
#[derive(Debug)]
struct Pending {
    id: u64,
    address: IpAddr,
    accepted: Instant,
    /// A second descriptor of the connection, to close it from outside.
    stream: TcpStream,
    /// Set when the watchdog or an eviction closed it (its error says so).
    closed: Arc<AtomicBool>,
}

impl Pending {
    /// How far the peer got: the bytes it has sent (the kernel's count,
    /// read or not), then when it came (the older of two equals is closer
    /// to its deadline and goes first).
    fn progress(&self) -> (u64, Instant) {
        let bytes = crate::sys::bytes_received(&self.stream).unwrap_or(0);
        (bytes, self.accepted)
    }

    fn close(&self, why: &str) {
        tracing::warn!(address = %self.address, "{why}: closed a connection in its handshake");
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The connections in their handshakes, shared with their threads and the
/// watchdog.
type PendingSet = Arc<Mutex<Vec<Pending>>>;

/// Handshakes running beside a listener, and their results.
#[derive(Debug)]
pub(crate) struct Handshakes<T> {
    tx: Sender<Result<T, TransportError>>,
    rx: Receiver<Result<T, TransportError>>,
    pending: PendingSet,
    /// Handshake threads that have not sent their result yet.
    running: Arc<AtomicUsize>,
    next_id: AtomicU64,
    per_address: usize,
}

/// Close every pending handshake older than [`HANDSHAKE_TIMEOUT`], every
/// 50 ms, until the pool is gone.
fn spawn_watchdog(pending: Weak<Mutex<Vec<Pending>>>) {
    let spawned = std::thread::Builder::new()
        .name("tcp-handshake-watchdog".into())
        .spawn(move || {
            while let Some(pending) = pending.upgrade() {
                {
                    let mut set = pending.lock().unwrap_or_else(|p| p.into_inner());
                    set.retain(|p| {
                        let late = p.accepted.elapsed() >= HANDSHAKE_TIMEOUT;
                        if late {
                            p.close("no handshake within its deadline");
                        }
                        !late
                    });
                }
                drop(pending);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    if let Err(e) = spawned {
        // Per-read timeouts still bound each step.
        tracing::warn!(error = %e, "no handshake watchdog");
    }
}

impl<T: Send + 'static> Handshakes<T> {
    pub(crate) fn new() -> Self {
        Self::per_address(MAX_PENDING_PER_ADDRESS)
    }

    /// A pool where one peer address holds at most `limit` pending
    /// handshakes (at least the streams a source opens at once).
    pub(crate) fn per_address(limit: usize) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pending = PendingSet::default();
        spawn_watchdog(Arc::downgrade(&pending));
        Self {
            tx,
            rx,
            pending,
            running: Arc::default(),
            next_id: AtomicU64::new(0),
            per_address: limit.clamp(1, MAX_PENDING),
        }
    }

    /// The next handshake to finish, well or not, accepting connections
    /// from `listener` meanwhile and running `handshake` on each; `None`
    /// once `deadline` passes.
    ///
    /// # Errors
    /// [`TransportError::Io`] when the listener itself fails.
    pub(crate) fn next<F>(
        &self,
        listener: &TcpListener,
        deadline: Option<Instant>,
        handshake: F,
    ) -> Result<Option<Result<T, TransportError>>, TransportError>
    where
        F: Fn(TcpStream) -> Result<T, TransportError> + Clone + Send + 'static,
    {
        loop {
            if let Ok(done) = self.rx.try_recv() {
                return Ok(Some(done));
            }
            // Whatever keeps arriving, the deadline holds.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            if self.idle() {
                // Nothing in progress can finish (a handshake thread sends
                // its result before it stops counting), so wait in `accept`
                // itself: a connection is served the moment it arrives.
                if let Ok(done) = self.rx.try_recv() {
                    return Ok(Some(done));
                }
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left.is_some_and(|l| l.is_zero()) {
                    return Ok(None);
                }
                listener
                    .set_nonblocking(false)
                    .map_err(io("listener blocking"))?;
                accept_timeout(listener, left).map_err(io("listener timeout"))?;
                match listener.accept() {
                    Ok((stream, peer)) => self.start(stream, peer, handshake.clone())?,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(io("accept")(e)),
                }
                continue;
            }
            listener
                .set_nonblocking(true)
                .map_err(io("listener non-blocking"))?;
            match listener.accept() {
                Ok((stream, peer)) => self.start(stream, peer, handshake.clone())?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    match self.rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(done) => return Ok(Some(done)),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Ok(None),
                    }
                }
                Err(e) => return Err(io("accept")(e)),
            }
        }
    }

    /// No handshake in progress.
    fn idle(&self) -> bool {
        self.running.load(Ordering::SeqCst) == 0
    }

    fn start<F>(
        &self,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        handshake: F,
    ) -> Result<(), TransportError>
    where
        F: FnOnce(TcpStream) -> Result<T, TransportError> + Send + 'static,
    {
        stream
            .set_nonblocking(false)
            .map_err(io("connection blocking"))?;
        tracing::debug!(%peer, "connection accepted");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let address = peer.ip();
            let same = pending.iter().filter(|p| p.address == address).count();
            let victim = if same >= self.per_address {
                least_advanced(pending.iter().filter(|p| p.address == address))
                    .map(|v| (v, "too many handshakes from one address"))
            } else if pending.len() >= MAX_PENDING {
                least_advanced(pending.iter()).map(|v| (v, "too many handshakes at once"))
            } else {
                None
            };
            if let Some((victim, why)) = victim {
                if let Some(i) = pending.iter().position(|p| p.id == victim) {
                    pending.swap_remove(i).close(why);
                }
            }
            if let Ok(clone) = stream.try_clone() {
                pending.push(Pending {
                    id,
                    address,
                    accepted: Instant::now(),
                    stream: clone,
                    closed: Arc::clone(&closed),
                });
            }
        }
        let (tx, pending) = (self.tx.clone(), Arc::clone(&self.pending));
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("tcp-handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || {
                // Stops counting when the thread ends, a panic included
                // (else `next` would poll for ever).
                let _counted = Counted(running);
                let result = handshake(stream).map_err(|e| {
                    if closed.load(Ordering::SeqCst) {
                        TransportError::Io {
                            op: "handshake (closed: past its deadline, or evicted)",
                            source: std::io::ErrorKind::TimedOut.into(),
                        }
                    } else {
                        e
                    }
                });
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|p| p.id != id);
                // Send, then stop counting: `next` waits in `accept` only
                // when nothing runs and no result is queued.
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|p| p.id != id);
            return Err(io("spawn a handshake thread")(e));
        }
        Ok(())
    }
}

/// The pending handshake whose peer got least far (see
/// [`Pending::progress`]).
fn least_advanced<'a>(candidates: impl Iterator<Item = &'a Pending>) -> Option<u64> {
    candidates.min_by_key(|p| p.progress()).map(|p| p.id)
}

/// One running handshake thread, counted until dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Make a blocking `accept` on `listener` give up after `timeout` (none:
/// wait for ever): `SO_RCVTIMEO`, which Linux applies to `accept`, set
/// through a second descriptor of the same socket (std sets it only on
/// streams).
fn accept_timeout(listener: &TcpListener, timeout: Option<Duration>) -> std::io::Result<()> {
    let same_socket = TcpStream::from(std::os::fd::OwnedFd::from(listener.try_clone()?));
    // A zero timeout means "none" to the kernel and is refused by std.
    same_socket.set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
}
