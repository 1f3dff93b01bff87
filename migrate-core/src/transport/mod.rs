//! The transport seam: what the engine needs from TCP, RDMA or anything else.
//!
//! A transport gives the engine a [`ControlChannel`] for [`Message`]s and,
//! once the layout is agreed, a data plane: a [`PageSender`] on the source,
//! and on the destination a stream of [`DataEvent`]s saying which rounds have
//! landed. The engine (handshake, rounds, switch-over, commit) is the same
//! for every transport; every transport passes one conformance suite
//! (`fixtures::transport_suite!`, which compares memories page for page).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::CancelToken;
use crate::dirty::PageRun;
use crate::memory::GuestMemory;
use crate::protocol::{Features, Message, PageRange};

mod error;
mod zero;
pub use error::TransportError;
pub use zero::DestinationPages;

/// Messages between source and destination, in order, reliably.
pub trait ControlChannel: Send {
    /// Send one message.
    ///
    /// # Errors
    /// [`TransportError`] when the channel is broken.
    fn send(&mut self, msg: &Message) -> Result<(), TransportError>;

    /// Receive the next message, waiting at most the transport's I/O timeout.
    ///
    /// # Errors
    /// [`TransportError`] when the channel is broken, times out, or the peer
    /// sends bytes that do not decode.
    fn recv(&mut self) -> Result<Message, TransportError>;

    /// Without waiting: the error that already ended the channel (the peer
    /// closed it, or fell silent), if one did. A message that arrived
    /// meanwhile stays for [`recv`](Self::recv). The source asks just before
    /// `Commit`: a destination known to be gone cannot commit, so the guest
    /// runs again instead of staying paused on an unknown outcome. By
    /// default `None` (a channel that cannot tell without waiting).
    fn peer_gone(&mut self) -> Option<TransportError> {
        None
    }

    /// As [`recv`](Self::recv), but `Ok(None)` when nothing arrived within
    /// `timeout`, so the caller can look at other things (a cancel) between
    /// waits. By default it waits as `recv` does (a channel that cannot
    /// wait less).
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, TransportError> {
        let _ = timeout;
        self.recv().map(Some)
    }

    /// A sending half for another thread, if the channel has one (post-copy
    /// needs it on the destination). By default `None`.
    fn sender(&self) -> Option<Box<dyn ControlSender>> {
        None
    }
}

/// The sending half of a [`ControlChannel`], for another thread: during
/// post-copy the destination's fault handler asks for pages while the
/// engine's thread receives them. Frames from both never interleave.
pub trait ControlSender: Send {
    /// Send one message.
    ///
    /// # Errors
    /// [`TransportError`] when the channel is broken.
    fn send(&self, msg: &Message) -> Result<(), TransportError>;
}

/// Gets pages from the source by itself during post-copy (RDMA READ: no
/// source CPU in the path; TCP: a connection of its own, so a page never
/// waits behind pushed ones). Used by the destination's fault handler, one
/// page at a time.
pub trait PageFetcher: Send {
    /// Whether it can fetch now; until then the handler asks over the
    /// control connection (a fetcher still connecting). By default `true`.
    fn ready(&mut self) -> bool {
        true
    }

    /// Read page `page` of region `region` of the source's guest memory
    /// into `out` (exactly one page), waiting for it.
    ///
    /// # Errors
    /// [`TransportError`] when the read fails (the handler then asks over
    /// the control connection).
    fn fetch(&mut self, region: usize, page: usize, out: &mut [u8]) -> Result<(), TransportError>;
}

/// What a round cost on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RoundSent {
    /// Bytes written to the wire (headers, page bytes, markers).
    pub wire_bytes: u64,
    /// Pages sent with their bytes (whole, or as their few non-zero words).
    pub normal_pages: u64,
    /// Of those, pages sent as their non-zero words (Sparse runs).
    pub sparse_pages: u64,
    /// Zero pages: sent as zero markers, or not at all where the
    /// destination already reads zeros.
    pub zero_pages: u64,
    /// `wire_bytes` by data stream (index = stream; TCP connection or RDMA
    /// queue pair), so an operator sees whether the streams share the load.
    pub stream_bytes: Vec<u64>,
    /// Zero pages the data plane did not carry: the engine sends them as
    /// `ZeroPages` on the control channel (RDMA; TCP carries them in-band).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub zero_ranges: Vec<PageRange>,
}

impl RoundSent {
    /// Add another round's (or stream's) figures.
    pub fn add(&mut self, o: &RoundSent) {
        self.wire_bytes += o.wire_bytes;
        self.normal_pages += o.normal_pages;
        self.sparse_pages += o.sparse_pages;
        self.zero_pages += o.zero_pages;
        add_by_stream(&mut self.stream_bytes, &o.stream_bytes);
    }

    /// Add one batch's figures (its own `stream_bytes` aside), its bytes
    /// counted on data stream `stream`; allocates only when a stream is
    /// seen for the first time.
    pub fn add_batch(&mut self, stream: usize, b: &RoundSent) {
        self.wire_bytes += b.wire_bytes;
        self.normal_pages += b.normal_pages;
        self.sparse_pages += b.sparse_pages;
        self.zero_pages += b.zero_pages;
        if self.stream_bytes.len() <= stream {
            self.stream_bytes.resize(stream + 1, 0);
        }
        self.stream_bytes[stream] += b.wire_bytes;
    }

    /// These figures, all of them counted on data stream `stream`.
    #[must_use]
    pub fn on_stream(mut self, stream: u16) -> Self {
        let mut by_stream = vec![0; usize::from(stream) + 1];
        by_stream[usize::from(stream)] = self.wire_bytes;
        self.stream_bytes = by_stream;
        self
    }
}

/// Add `other` to `total` stream by stream (`total` grows to the longer).
fn add_by_stream(total: &mut Vec<u64>, other: &[u64]) {
    if total.len() < other.len() {
        total.resize(other.len(), 0);
    }
    for (t, o) in total.iter_mut().zip(other) {
        *t += o;
    }
}

/// Shared by the engine and a sender's threads while a round is sent.
pub struct RoundContext<'a> {
    /// Set when the migration is cancelled: stop as soon as possible.
    pub cancel: &'a CancelToken,
    /// Bandwidth cap shared by all streams.
    pub limiter: &'a RateLimiter,
    /// Called as each batch goes out, from any thread, with the data
    /// stream it went on and what it carried (pages by kind, wire bytes;
    /// its `stream_bytes` and `zero_ranges` are not looked at): the
    /// engine's live figures, per stream, between round ends.
    pub progress: &'a (dyn Fn(usize, &RoundSent) + Sync),
    /// What the destination's pages may hold: a zero page goes out (as a
    /// marker) only where [`DestinationPages::zero_needs_sending`] says so,
    /// and every data page sent is recorded with
    /// [`DestinationPages::sent_data`].
    pub dest_pages: &'a DestinationPages,
}

/// The source's data plane.
pub trait PageSender: Send {
    /// Send every page of `runs` (from the source's guest memory) as round
    /// `round`, then the round's end marker on every data stream. Returns when
    /// all of it has been handed to the transport.
    ///
    /// # Errors
    /// [`TransportError`] when a stream breaks, or
    /// [`TransportError::Cancelled`].
    fn send_round(
        &mut self,
        round: u32,
        runs: &[PageRun],
        ctx: &RoundContext<'_>,
    ) -> Result<RoundSent, TransportError>;

    /// The last round is sent: end every data stream cleanly, so the
    /// destination can tell the end from a cut (TLS: `close_notify`). By
    /// default nothing.
    fn finish(&mut self) {}
}

/// What a destination's data plane has landed so far, all rounds, counted
/// as each batch lands (shared with the engine, which reads it for live
/// figures between round ends; [`DataEvent::RoundEnd`] stays the count a
/// round is checked against).
#[derive(Debug, Default)]
pub struct Landed {
    wire_bytes: std::sync::atomic::AtomicU64,
    normal_pages: std::sync::atomic::AtomicU64,
    zero_pages: std::sync::atomic::AtomicU64,
}

impl Landed {
    /// Count a batch (or a round's end marker): its bytes on the wire and
    /// its pages.
    pub fn add(&self, wire_bytes: u64, normal_pages: u64, zero_pages: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.wire_bytes.fetch_add(wire_bytes, Relaxed);
        self.normal_pages.fetch_add(normal_pages, Relaxed);
        self.zero_pages.fetch_add(zero_pages, Relaxed);
    }

    /// The figures so far: wire bytes, pages with bytes, zero pages.
    pub fn get(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.wire_bytes.load(Relaxed),
            self.normal_pages.load(Relaxed),
            self.zero_pages.load(Relaxed),
        )
    }
}

/// What a destination's data plane reports.
#[derive(Debug)]
pub enum DataEvent {
    /// A data stream received the end marker of a round.
    RoundEnd {
        /// Stream index.
        stream: u16,
        /// Round.
        round: u32,
        /// Batches the source said it sent on this stream.
        batches_sent: u64,
        /// Batches that arrived.
        batches_received: u64,
        /// Pages of batches whose check failed.
        suspect: Vec<PageRange>,
        /// Bytes and pages received in this round on this stream.
        received: RoundSent,
    },
    /// A data stream failed; the migration cannot complete.
    Failed {
        /// Stream index.
        stream: u16,
        /// Why.
        error: TransportError,
    },
}

/// A connected source-side transport.
pub trait SourceTransport: Send {
    /// `"tcp"`, `"rdma"`, ...
    fn name(&self) -> &'static str;
    /// Whether pages are read from a registered (pinned) copy of the guest
    /// memory rather than through the process's mapping (RDMA): a page the
    /// VMM discards then stays pinned with its old bytes while the guest
    /// goes on in a new one, so the engine fails the migration on a
    /// discard. By default no.
    fn pins_memory(&self) -> bool {
        false
    }
    /// Number of data streams it will open.
    fn data_streams(&self) -> u16;
    /// Protocol features it may use (e.g. zstd).
    fn features(&self) -> Features;
    /// The control channel.
    fn control(&mut self) -> &mut dyn ControlChannel;
    /// Take the guest memory this migration moves: RDMA registers (pins)
    /// it for the NIC, TCP keeps it to send from. Called once, by
    /// [`SourceMigration::bind`](crate::SourceMigration::bind), before any
    /// message and before dirty tracking starts; every data plane opened
    /// later reads this memory.
    ///
    /// # Errors
    /// [`TransportError`] when the memory cannot be registered (e.g.
    /// RLIMIT_MEMLOCK too small).
    fn bind(&mut self, mem: &Arc<GuestMemory>) -> Result<(), TransportError>;
    /// Open the data plane for the bound memory, once the destination
    /// accepted the layout. `features` are the ones both sides agreed on.
    ///
    /// # Errors
    /// [`TransportError`] when streams cannot be opened, or no memory was
    /// bound.
    fn open_data(
        &mut self,
        session: u64,
        features: Features,
    ) -> Result<Box<dyn PageSender>, TransportError>;

    /// At the switch to post-copy: a message offering the destination to
    /// read the pages its guest faults on by itself (RDMA: a queue pair and
    /// the keys of this side's memory, registered for remote read; TCP: a
    /// connection of its own for its requests), if this transport can. By default `None`: faults ask over the control
    /// connection.
    ///
    /// # Errors
    /// [`TransportError`] when the offer cannot be made.
    fn postcopy_offer(&mut self) -> Result<Option<Message>, TransportError> {
        Ok(None)
    }

    /// The destination accepted the offer with `answer`
    /// ([`Message::RdmaReadAccept`], [`Message::PageFetchAccept`]): connect.
    ///
    /// # Errors
    /// [`TransportError`]; by default [`TransportError::Unavailable`].
    fn postcopy_accepted(&mut self, answer: &Message) -> Result<(), TransportError> {
        let _ = answer;
        Err(TransportError::Unavailable {
            reason: format!("the {} transport made no post-copy offer", self.name()),
        })
    }

    /// After the connection to the destination was lost: open a new control
    /// connection to it (the data plane is opened again with
    /// [`open_data`](Self::open_data)). One attempt; the engine retries
    /// within its grace period while the error
    /// [may pass](TransportError::may_pass).
    ///
    /// # Errors
    /// [`TransportError`]; by default [`TransportError::Unavailable`]: this
    /// transport cannot resume.
    fn reconnect(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Unavailable {
            reason: format!("the {} transport cannot resume a migration", self.name()),
        })
    }
}

/// A connected destination-side transport.
pub trait DestinationTransport: Send {
    /// `"tcp"`, `"rdma"`, ...
    fn name(&self) -> &'static str;
    /// Whether the source proved who it is (mutual TLS, a pre-shared key)
    /// before anything of the migration crossed. An unauthenticated source
    /// learns nothing about this side it does not need: a refusal tells it
    /// that the layouts differ, not this side's layout.
    fn authenticated(&self) -> bool {
        false
    }
    /// Features it supports.
    fn features(&self) -> Features;
    /// The control channel.
    fn control(&mut self) -> &mut dyn ControlChannel;
    /// Accept `streams` data streams of `session` and land their pages in
    /// `mem`, reporting round ends and failures.
    ///
    /// # Errors
    /// [`TransportError`] when streams do not join in time.
    fn open_data(
        &mut self,
        mem: &Arc<GuestMemory>,
        session: u64,
        streams: u16,
        features: Features,
    ) -> Result<crossbeam_channel::Receiver<DataEvent>, TransportError>;

    /// What the data plane has landed so far, counted as batches land, if
    /// this transport sees them land (TCP does; RDMA WRITEs land without
    /// this side's CPU, so its figures move at round ends). By default
    /// `None`.
    fn landed(&self) -> Option<Arc<Landed>> {
        None
    }

    /// The source's post-copy offer (`RdmaReadOffer`, `PageFetchOffer`): a
    /// fetcher getting pages of `mem`'s layout from the source, and the
    /// answer to send.
    ///
    /// # Errors
    /// [`TransportError`] (the destination declines; faults ask over the
    /// control connection); by default [`TransportError::Unavailable`].
    fn postcopy_fetcher(
        &mut self,
        mem: &Arc<GuestMemory>,
        offer: &Message,
    ) -> Result<(Message, Box<dyn PageFetcher>), TransportError> {
        let _ = (mem, offer);
        Err(TransportError::Unavailable {
            reason: format!("the {} transport cannot read pages", self.name()),
        })
    }

    /// `Commit` arrived and the data plane has no more to carry: release
    /// what it holds. The engine calls it before the guest resumes here, so
    /// nothing of the source writes into memory the guest runs on (RDMA:
    /// deregister the guest memory, which invalidates the keys and, in
    /// post-copy, unpins the dropped pages). By default nothing.
    fn data_done(&mut self) {}

    /// After the connection to the source was lost: wait until `deadline`
    /// for a new control connection, which becomes [`control`](Self::control)
    /// (the data plane is opened again with [`open_data`](Self::open_data)).
    ///
    /// # Errors
    /// [`TransportError`] when none came in time; by default
    /// [`TransportError::Unavailable`]: this transport cannot resume.
    fn reaccept(&mut self, deadline: std::time::Instant) -> Result<(), TransportError> {
        let _ = deadline;
        Err(TransportError::Unavailable {
            reason: format!("the {} transport cannot resume a migration", self.name()),
        })
    }
}

/// A token bucket shared by all data streams: the migration's bandwidth cap,
/// which may change while it runs ([`set`](Self::set) takes effect at once).
#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0: no cap.
    bytes_per_sec: std::sync::atomic::AtomicU64,
    state: std::sync::Mutex<(Instant, f64)>,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (None: unlimited).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec: std::sync::atomic::AtomicU64::new(bytes_per_sec.unwrap_or(0)),
            state: std::sync::Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Change the cap (None: unlimited), from now on.
    pub fn set(&self, bytes_per_sec: Option<u64>) {
        self.bytes_per_sec.store(
            bytes_per_sec.unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The cap in bytes per second, if there is one.
    pub fn rate(&self) -> Option<u64> {
        Some(
            self.bytes_per_sec
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .filter(|&b| b > 0)
    }

    /// Take `bytes` from the bucket, sleeping while it is empty. The bucket
    /// holds at most 50 ms of budget, so bursts stay short.
    pub fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Take `bytes` from the bucket without sleeping: how long the caller
    /// should wait before sending more (it may do other work meanwhile,
    /// such as serving a post-copy request).
    pub fn reserve(&self, bytes: u64) -> Duration {
        let Some(rate) = self.rate() else {
            return Duration::ZERO;
        };
        let rate = rate as f64;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.0).as_secs_f64() * rate;
        s.0 = now;
        s.1 = (s.1 + refill).min(rate * 0.05) - bytes as f64;
        if s.1 < 0.0 {
            Duration::from_secs_f64(-s.1 / rate)
        } else {
            Duration::ZERO
        }
    }
}
