//! Accepting connections so that no client holds up the others: each new
//! connection's handshake (preamble, and for a data stream its `Join`) runs
//! on its own thread with a short deadline, and the first to finish is
//! served. At most [`MAX_PENDING`] run at once: a new connection beyond
//! that closes the oldest one still saying nothing (a real peer finishes in
//! a millisecond, so a flood of silent clients evicts itself). A client that
//! connects and says nothing costs one thread for a few seconds, not the
//! listener.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use migrate_core::transport::TransportError;

use crate::control::io;

/// Handshakes in progress at most; a new connection beyond closes the
/// oldest.
pub(crate) const MAX_PENDING: usize = 16;
/// How long a new connection may take to say who it is.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes running beside a listener, and their results.
#[derive(Debug)]
pub(crate) struct Handshakes<T> {
    tx: Sender<Result<T, TransportError>>,
    rx: Receiver<Result<T, TransportError>>,
    /// The connections still in their handshake, oldest first.
    pending: Arc<Mutex<VecDeque<(u64, TcpStream)>>>,
    /// Handshake threads that have not sent their result yet.
    running: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl<T: Send + 'static> Handshakes<T> {
    pub(crate) fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Self {
            tx,
            rx,
            pending: Arc::default(),
            running: Arc::default(),
            next_id: AtomicU64::new(0),
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
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= MAX_PENDING
                && let Some((_, oldest)) = pending.pop_front()
            {
                tracing::warn!(%peer, "too many connections saying nothing: closed the oldest");
                let _ = oldest.shutdown(Shutdown::Both);
            }
            if let Ok(clone) = stream.try_clone() {
                pending.push_back((id, clone));
            }
        }
        let (tx, pending) = (self.tx.clone(), Arc::clone(&self.pending));
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("tcp-handshake".into())
            .spawn(move || {
                // Stops counting when the thread ends, a panic included
                // (else `next` would poll for ever).
                let _counted = Counted(running);
                let result = handshake(stream);
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(i, _)| *i != id);
                // Send, then stop counting: `next` waits in `accept` only
                // when nothing runs and no result is queued.
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
            return Err(io("spawn a handshake thread")(e));
        }
        Ok(())
    }
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
