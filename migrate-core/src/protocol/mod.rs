//! The migration wire protocol: every message, its encoding, the version.
//!
//! Transports move these bytes; they do not invent messages. A migration uses
//! one **control** stream (handshake, layout, round markers, verification,
//! device state, commit) and one or more **data** streams (page batches).
//!
//! # Sequence
//!
//! ```text
//!  source                                              destination
//!    | control: MAGIC+version, Hello{session, conns}  ->  |  check magic, version
//!    |                       <-  Welcome{version}         |
//!    | Layout{regions}                                 ->  |  compare with own memory
//!    |                       <-  LayoutAccepted           |  (or Refused{why}: stop)
//!    |                 <-  DestinationMemory{reads_zero}  |  (FEATURE_ZERO_SKIP only)
//!    | data i: MAGIC+version, Join{session, i}         ->  |  (TCP: i = 0..conns)
//!    | RdmaConnect{qps}                                ->  |  (RDMA instead: register
//!    |            <-  RdmaAccept{qps, regions: addr,rkey}  |   all memory, connect QPs)
//!    |                                                     |
//!    |  round 0: every page; rounds 1..: dirty pages       |
//!    | data: Pages{round, runs, bytes} ...             ->  |  land in guest memory,
//!    | data: RoundEnd{round, batches}                  ->  |  check each batch
//!    |   (RDMA: WRITEs straight into the registered memory, then per QP a
//!    |    WRITE_WITH_IMM(round) fence; control: ZeroPages{round, ranges})
//!    | control: RoundDone{round}                       ->  |  wait for every data stream
//!    |                       <-  RoundAck{round, suspect}  |  (suspect: failed checks)
//!    |   ... until the rest fits the downtime budget       |
//!    | (pause guest) last round, as above              ->  |
//!    | VerifyRequest (optional)                        ->  |
//!    |                       <-  PageHashes{...} ...      |  source compares
//!    | DeviceState{chunk, last} ...                    ->  |
//!    | Commit                                          ->  |  load state, resume guest
//!    |                       <-  Committed                |
//!    | (source guest stays paused: done)                   |
//!
//!  Either side may send Abort{reason} (or Refused) before Commit; the
//!  destination then discards what it received and the source resumes.
//! ```
//!
//! # Receiver (destination) state machine
//!
//! ```text
//!  AwaitHello --Hello--> AwaitLayout --Layout ok (LayoutAccepted, and with
//!      FEATURE_ZERO_SKIP DestinationMemory sent)--> AwaitJoins --all joined-->
//!  Receiving --RoundDone(live), all RoundEnd--> Receiving (ack sent)
//!  Receiving / FinalRetry --ZeroPages--> same state (pages zeroed)
//!  Receiving / FinalRetry --RoundDone(last), all RoundEnd, every page checked-->
//!      Complete (ack sent; the data plane is done)
//!  Receiving / FinalRetry --RoundDone(last), some pages failed--> FinalRetry
//!      (ack names them; the source sends them again, paused)
//!  Complete --VerifyRequest--> Complete (hashes sent)
//!  Complete --DeviceState(last: false)--> DeviceState --DeviceState...-->
//!  Complete / DeviceState --DeviceState(last)--> HaveState
//!  HaveState --Commit--> Committed (state loaded, guest resumed, Committed sent)
//!  any other state --Commit--> Discarded (Refused: incomplete migration)
//!  any state --Abort / error / peer gone--> Discarded
//!  any state --any other message--> Discarded (ProtocolError::Unexpected)
//! ```
//!
//! `IncomingMigration::accept` runs the first two steps; the rest is one
//! transition function over an explicit state type
//! (`destination::ReceiverState`), so an illegal transition is a typed error
//! in one place. Both sides receive through one helper that turns the peer's
//! `Abort`/`Refused` into errors and "the next message must be X" into
//! `ProtocolError::Unexpected` otherwise.
//!
//! # Messages
//!
//! Each message is defined once, in the table at [`Message`]: its kind byte,
//! its fields in wire order, and (generated from the same table) its byte
//! layout in its doc; encoding and decoding follow from the fields' codecs.
//!
//! A page batch never crosses a round; a `RoundEnd` on a data stream counts
//! the batches sent on it, so a lost or extra batch is an error.
//!
//! # Integrity
//!
//! Every frame carries an xxh3-64 check, seeded with its kind, flags and
//! length (so a flipped header bit fails it too); a mismatch is fatal. For
//! page batches the check covers the run table and one xxh3-64 per page,
//! which the source computes from live guest memory just before sending. A
//! guest write racing that send changes the page (and marks it dirty), so a
//! page that fails its own hash in a live round is expected now and then: the
//! destination lists it as *suspect* in its `RoundAck` and the source sends it
//! again. A suspect page in the last (paused) round is real corruption: the
//! source retries a bounded number of times, then aborts.
//!
//! On a connection whose records an AEAD seals (TLS), both ends offering
//! [`FEATURE_UNHASHED`] send and take page batches without the per-page
//! hashes: the record tags authenticate every byte with a key instead of a
//! checksum, and a racing guest write is left to the dirty tracker (as for
//! compressed pages). A destination refuses such a batch on a plaintext
//! connection.
//!
//! # Versioning and compatibility
//!
//! Every stream starts with [`MAGIC`] and the sender's [`VERSION`] (u16 LE),
//! so a stray client or an incompatible peer is refused on its first bytes.
//! `Hello` carries the range of versions the source speaks; the destination
//! picks the highest both speak and says so in `Welcome`. Feature bits (e.g.
//! [`FEATURE_ZSTD`]) announce optional encodings. All integers are little
//! endian. Frame kinds unknown to a version are errors, never skipped.
//! Version 2 added `Heartbeat`; version 1 peers are refused.
//!
//! # Liveness
//!
//! From the preamble on, both ends of the control stream send `Heartbeat`
//! at least once a second, and each reads the stream continuously: a round
//! may last as long as the link needs, and a peer from which nothing at all
//! arrives for the I/O timeout is dead, frozen or cut off, in any phase.
//! Heartbeats never reach the state machines below; the transport drops
//! them (`transport-tcp`'s control module).
//!
//! # Resuming after a lost connection
//!
//! ```text
//!  source                                              destination
//!    |  ... round r: connection lost (cut, reset, silent peer)    |
//!    |  guest runs, tracker keeps recording       keeps its memory, state
//!    | (new control connection) MAGIC+version          ->  |  Receiving
//!    | Resume{session}                                 ->  |  same session?
//!    |                       <-  Resumed                  |  (else Refused)
//!    | data i: MAGIC+version, Join{session, i}         ->  |
//!    |  round r+1: round r's pages again, and all dirtied since   |
//! ```
//!
//! Only before the switch-over (the guest runs on the source), and within
//! both sides' grace periods; after them, the usual failure: the source
//! runs its guest, the destination discards. Pages of rounds the
//! destination acknowledged are not sent again unless dirtied since.

mod batch;
mod codec;

use std::io;

/// The codec that transport authors need: frames, preambles, page
/// batches. A VMM never touches it; it sees [`Message`] only through the
/// engine.
pub mod wire {
    pub use super::batch::{
        BatchHeader, BatchRun, FLAG_UNHASHED, FLAG_ZSTD, MAX_BATCH_BYTES, MAX_BATCH_RUNS,
        MAX_SPARSE_WORDS, RunKind, decode_batch_header, decode_sparse_page, encode_batch_header,
        encode_sparse_page,
    };
    pub use super::codec::{
        FrameHeader, HEADER_LEN, check_seed, read_frame_header, read_message, read_payload,
        read_preamble, write_frame, write_message, write_preamble,
    };
}

use crate::memory::{MemoryLayout, PageSize, RegionLayout};

/// First bytes of every stream.
pub const MAGIC: [u8; 6] = *b"LIVMIG";
/// The protocol version this build speaks (and the highest it accepts).
/// Version 2 added heartbeats on the control stream.
pub const VERSION: u16 = 2;
/// The lowest version this build accepts: peers without heartbeats cannot
/// tell a long round from a dead link.
pub const MIN_VERSION: u16 = 2;
/// Largest frame payload accepted: decoding never allocates more.
pub const MAX_FRAME: u32 = 16 << 20;
/// Largest device-state chunk per frame.
pub const DEVICE_STATE_CHUNK: usize = 4 << 20;
/// Page hashes per `PageHashes` frame.
pub const HASHES_PER_FRAME: usize = 1 << 20;

/// Feature bit: page batches may be zstd-compressed.
pub const FEATURE_ZSTD: u64 = 1 << 0;
/// Feature bit: pages travel by RDMA WRITE (the side has an RDMA device).
pub const FEATURE_RDMA: u64 = 1 << 1;
/// Feature bit: right after `LayoutAccepted` the destination says whether
/// its memory reads as zeros (`DestinationMemory`). If it does, the source
/// sends a zero page only where it sent data before: a fresh destination
/// never touches (allocates) the pages that stay zero.
pub const FEATURE_ZERO_SKIP: u64 = 1 << 2;
/// Feature bit: page batches may carry Sparse runs (4 KiB pages sent as
/// their few non-zero words; see the batch layout in `wire`).
pub const FEATURE_SPARSE: u64 = 1 << 3;
/// Feature bit: the destination can take the guest before all of its
/// memory arrived (post-copy: it fetches missing pages on first touch).
pub const FEATURE_POSTCOPY: u64 = 1 << 4;
/// Feature bit: on a connection whose records an AEAD seals (TLS), page
/// batches may leave out their per-page hashes (`FLAG_UNHASHED`): the
/// record tags authenticate every byte already.
pub const FEATURE_UNHASHED: u64 = 1 << 5;
/// Feature bit: the source protects its guest instead of migrating it
/// (continuous mirroring, [`crate::mirror`]): pre-copy, then epochs that
/// the destination (a standby) stages and applies whole, and no commit. A
/// destination that is no standby does not offer it, and a standby takes
/// nothing without it.
pub const FEATURE_MIRROR: u64 = 1 << 6;
/// Feature bit (TCP): in post-copy the destination's fault handler may ask
/// for its pages on a connection of its own (`PageFetchOffer`): a
/// requested page then never waits behind pushed ones, nor for the control
/// connection's reader threads.
pub const FEATURE_FETCH: u64 = 1 << 7;
/// The `Join` index of the post-copy fetch connection (`PageFetchOffer`);
/// data streams are numbered from 0 and never reach it.
pub const FETCH_STREAM: u16 = u16::MAX;
/// A set of `FEATURE_*` bits: what an end offers, or what both agreed on
/// (`Hello`/`Welcome` carry the bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u64);

impl Features {
    /// No feature.
    pub const NONE: Features = Features(0);

    /// These bits.
    pub const fn new(bits: u64) -> Self {
        Self(bits)
    }

    /// The bits, as the wire carries them.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `feature` (a `FEATURE_*` constant) is set.
    pub const fn has(self, feature: u64) -> bool {
        self.0 & feature == feature
    }

    /// Both sets' common features.
    #[must_use]
    pub const fn and(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// These features and `feature`'s bits.
    #[must_use]
    pub const fn with(self, feature: u64) -> Features {
        Features(self.0 | feature)
    }

    /// [`FEATURE_POSTCOPY`].
    pub const fn postcopy(self) -> bool {
        self.has(FEATURE_POSTCOPY)
    }

    /// [`FEATURE_ZERO_SKIP`].
    pub const fn zero_skip(self) -> bool {
        self.has(FEATURE_ZERO_SKIP)
    }
}

/// Page ranges per `PostcopyStart` or `PageRequest` frame.
pub const RANGES_PER_FRAME: usize = 1 << 16;
/// Most queue pairs an RDMA migration may use.
pub const MAX_RDMA_QPS: usize = 64;

/// One RC queue pair's address, for the peer to connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// GID.
    pub gid: [u8; 16],
}

/// A destination memory region the source may WRITE into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address in the destination's address space.
    pub addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Length.
    pub len: u64,
}

/// A range of pages in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// Region index.
    pub region: u32,
    /// First page in the region.
    pub first: u64,
    /// Number of pages.
    pub count: u32,
}

/// Why a destination refused a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefusalCode {
    /// No protocol version in common.
    Version = 1,
    /// The memory layouts differ.
    Layout = 2,
    /// The destination could not set up (memory, registration, ...).
    Setup = 3,
    /// Something arrived out of order.
    Protocol = 4,
    /// Device state could not be loaded.
    DeviceState = 5,
    /// Anything else.
    Other = 6,
    /// The destination requires authentication (mutual TLS or a pre-shared
    /// key) that this source did not offer.
    Auth = 7,
}

impl RefusalCode {
    /// The code of a wire value; unknown values read as [`RefusalCode::Other`].
    pub fn from_u16(v: u16) -> RefusalCode {
        match v {
            1 => RefusalCode::Version,
            2 => RefusalCode::Layout,
            3 => RefusalCode::Setup,
            4 => RefusalCode::Protocol,
            5 => RefusalCode::DeviceState,
            7 => RefusalCode::Auth,
            _ => RefusalCode::Other,
        }
    }
}

/// Declares [`Message`] and [`FrameKind`] from one table: each message
/// once, with its kind byte and its fields in wire order. Encoding and
/// decoding follow from the fields' [`Field`] codecs, and each variant's doc
/// ends with its byte layout, generated from the same table.
macro_rules! messages {
    (
        $(
            $(#[doc = $doc:literal])*
            $name:ident = $code:literal $({
                $( $(#[doc = $fdoc:literal])* $field:ident : $ty:ty ),* $(,)?
            })?
        ),* $(,)?
    ) => {
        /// Every message except page batches (which are streamed, see
        /// [`wire::BatchHeader`]).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message {
            $(
                $(#[doc = $doc])*
                #[doc = ""]
                #[doc = concat!(
                    "Wire: kind ", stringify!($code), "; payload `",
                    $($( stringify!($field), ": ", stringify!($ty), " | ", )*)?
                    "`."
                )]
                $name $({ $( $(#[doc = $fdoc])* $field: $ty ),* })?,
            )*
        }

        /// Frame kinds on the wire: one per [`Message`], plus page batches.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum FrameKind {
            /// A page batch (see [`wire::BatchHeader`]).
            Pages = 6,
            $(
                #[doc = concat!("[`Message::", stringify!($name), "`].")]
                $name = $code,
            )*
        }

        impl FrameKind {
            /// The kind of a wire byte.
            pub fn from_u8(b: u8) -> Option<FrameKind> {
                match b {
                    6 => Some(FrameKind::Pages),
                    $( $code => Some(FrameKind::$name), )*
                    _ => None,
                }
            }
        }

        impl Message {
            /// The frame kind carrying this message.
            pub fn kind(&self) -> FrameKind {
                match self {
                    $( Message::$name { .. } => FrameKind::$name, )*
                }
            }

            /// Encode the payload (without frame header).
            pub fn encode(&self) -> Vec<u8> {
                let mut w = Vec::new();
                match self {
                    $(
                        #[allow(unused_variables)]
                        Message::$name { $($($field),*)? } => {
                            $($( Field::put($field, &mut w); )*)?
                        }
                    )*
                }
                w
            }

            /// Decode a payload of frame kind `kind`.
            ///
            /// # Errors
            /// [`ProtocolError::Malformed`] for a payload that is short,
            /// long, or holds impossible values; never panics, never
            /// allocates more than the payload's own size.
            pub fn decode(kind: FrameKind, payload: &[u8]) -> Result<Message, ProtocolError> {
                #[allow(unused_mut)]
                let mut r = Cursor { buf: payload, kind };
                let msg = match kind {
                    $(
                        FrameKind::$name => Message::$name {
                            $($( $field: <$ty as Field>::get(&mut r)? ),*)?
                        },
                    )*
                    FrameKind::Pages => return Err(r.bad("page batch decoded as a message".into())),
                };
                if !r.buf.is_empty() {
                    return Err(r.bad(format!("{} trailing bytes", r.buf.len())));
                }
                Ok(msg)
            }
        }
    };
}

messages! {
    /// Source → destination, first on the control stream.
    Hello = 1 {
        /// Lowest version the source speaks.
        min_version: u16,
        /// Highest version the source speaks.
        max_version: u16,
        /// Random id tying data streams to this migration.
        session: u64,
        /// Number of data streams that will join.
        data_streams: u16,
        /// Feature bits the source may use.
        features: u64,
    },
    /// Destination → source: the version and features chosen.
    Welcome = 2 {
        /// Version both speak.
        version: u16,
        /// Features both support.
        features: u64,
    },
    /// Source → destination: the guest memory layout.
    Layout = 3 {
        /// Regions in GPA order.
        layout: MemoryLayout,
    },
    /// Destination → source: layouts match.
    LayoutAccepted = 4,
    /// First message on a data stream.
    Join = 5 {
        /// The session from `Hello`.
        session: u64,
        /// Stream index, `0..data_streams`.
        index: u16,
    },
    /// Data stream: all batches of `round` on this stream were sent.
    RoundEnd = 7 {
        /// Round number.
        round: u32,
        /// Batches sent on this stream in this round.
        batches: u64,
    },
    /// Control: every data stream finished `round`.
    RoundDone = 8 {
        /// Round number.
        round: u32,
        /// Whether this is the last round (guest paused).
        last: bool,
    },
    /// Destination → source: every page of `round` landed.
    RoundAck = 9 {
        /// Round number.
        round: u32,
        /// Pages whose batch failed its check: send again.
        suspect: Vec<PageRange>,
    },
    /// Source → destination: send page hashes of all memory.
    VerifyRequest = 10,
    /// Destination → source: xxh3 of `hashes.len()` pages from `first`.
    PageHashes = 11 {
        /// Region index.
        region: u32,
        /// First page.
        first: u64,
        /// One hash per page.
        hashes: Vec<u64>,
    },
    /// Source → destination: a chunk of the opaque device state.
    DeviceState = 12 {
        /// Whether this is the last chunk.
        last: bool,
        /// The bytes (the rest of the payload).
        bytes: Vec<u8>,
    },
    /// Source → destination: the destination owns the guest now.
    Commit = 13,
    /// Destination → source: device state loaded and guest resumed.
    Committed = 14,
    /// Either side: the migration is off.
    Abort = 15 {
        /// Why (the rest of the payload, UTF-8).
        reason: String,
    },
    /// Destination → source: refused at setup.
    Refused = 16 {
        /// Category.
        code: RefusalCode,
        /// Human-readable reason (the rest of the payload, UTF-8).
        message: String,
    },
    /// Source → destination (RDMA): the source's queue pairs.
    RdmaConnect = 17 {
        /// One per queue pair (1..=[`MAX_RDMA_QPS`]).
        qps: Vec<QpEndpoint>,
    },
    /// Destination → source (RDMA): its queue pairs and every guest-memory
    /// region registered for remote write, in region order.
    RdmaAccept = 18 {
        /// One per queue pair, in the order of `RdmaConnect`.
        qps: Vec<QpEndpoint>,
        /// One per guest-memory region.
        regions: Vec<RemoteRegion>,
    },
    /// Source → destination, before `RoundDone`, for transports that do not
    /// carry zero pages in their data plane (RDMA): zero these pages.
    ZeroPages = 19 {
        /// Round number.
        round: u32,
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Either side, on the control stream, at least once a second from the
    /// preamble on (version 2): "still here". Never reaches the engine.
    Heartbeat = 20,
    /// Source → destination, first on a new control connection after the
    /// old one was lost before the switch-over: continue migration
    /// `session`.
    Resume = 21 {
        /// The session from `Hello`.
        session: u64,
    },
    /// Destination → source: it kept what it received; data streams may
    /// join again and rounds go on.
    Resumed = 22,
    /// Destination → source, right after `LayoutAccepted` when both offered
    /// [`FEATURE_ZERO_SKIP`]: what its memory holds before any page lands.
    DestinationMemory = 23 {
        /// Every byte reads as zero (fresh memory): zero pages need not be
        /// sent until data was.
        reads_zero: bool,
    },
    /// Source → destination, with the guest paused, when both offered
    /// [`FEATURE_POSTCOPY`]: instead of a last round, the pages whose latest
    /// version the destination lacks. It drops them and will fetch each on
    /// first touch; the device state and `Commit` follow at once.
    PostcopyStart = 24 {
        /// Whether this is the last chunk of the set.
        last: bool,
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Destination → source, during post-copy: the guest touched these
    /// pages; send them first.
    PageRequest = 25 {
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Source → destination, during post-copy: whole pages from `first`
    /// (the bytes are a multiple of the region's page size), sent once each.
    PostcopyPages = 26 {
        /// Region index.
        region: u32,
        /// First page.
        first: u64,
        /// Whether a `PageRequest` asked for them (else pushed).
        demand: bool,
        /// The pages' bytes (the rest of the payload).
        bytes: Vec<u8>,
    },
    /// Destination → source: every page of the post-copy set is in place;
    /// the source may let its memory go. Carries the destination's view of
    /// the faults its guest waited on.
    PostcopyDone = 27 {
        /// Faults on pages that had not arrived.
        faults: u64,
        /// Median wait of those faults, microseconds.
        p50_us: u64,
        /// 99th percentile wait, microseconds.
        p99_us: u64,
        /// Longest wait, microseconds.
        max_us: u64,
        /// Pages the guest's faults brought (asked for, or read by RDMA).
        demand_pages: u64,
        /// Pages placed as the source pushed them.
        pushed_pages: u64,
    },
    /// Destination → source, right after `Resumed` when the connection was
    /// lost during post-copy: the pages of the set not placed yet (some
    /// the source sent may have been lost with the connection).
    PostcopyMissing = 28 {
        /// Whether this is the last chunk.
        last: bool,
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Source → destination, after the last `PostcopyStart` (RDMA): read
    /// the pages your guest faults on yourself, with RDMA READ from this
    /// queue pair's side and these keys (the source's guest memory,
    /// registered for remote read; sent only over the authenticated
    /// control channel).
    RdmaReadOffer = 29 {
        /// The source's queue pair for the reads (one).
        qps: Vec<QpEndpoint>,
        /// Every region of the source's guest memory, in region order.
        regions: Vec<RemoteRegion>,
    },
    /// Destination → source: connect to this queue pair; reads follow.
    RdmaReadAccept = 30 {
        /// The destination's queue pair (one).
        qps: Vec<QpEndpoint>,
    },
    /// Destination → source: no RDMA READ (or fetch connection, after a
    /// `PageFetchOffer`) here; faults ask over the control connection.
    RdmaReadDeclined = 31 {
        /// Why (the rest of the payload, UTF-8).
        reason: String,
    },
    /// Destination → source, after the last `PostcopyStart`: its memory is
    /// registered for missing-page faults and the set dropped; the source
    /// may hand over (else `Refused{Setup}`, and the source's guest runs on).
    PostcopyAccepted = 32,
    /// Source → destination, with the guest still running, once it chose
    /// post-copy: the pages it knows the destination will have to fetch
    /// (dirtied since sent). The destination registers its memory and
    /// drops them now, outside the downtime; `PostcopyStart` then adds the
    /// last ones.
    PostcopyPrepare = 33 {
        /// Whether this is the last chunk.
        last: bool,
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Destination → source: prepared (else `Refused{Setup}`); the source
    /// may pause its guest.
    PostcopyPrepared = 34,
    /// Primary → standby ([`FEATURE_MIRROR`]), after an epoch's batches:
    /// the pages the epoch carries (the standby applies exactly these from
    /// its staging memory once the epoch is complete).
    EpochPages = 35 {
        /// Epoch number (the data streams' round).
        epoch: u32,
        /// Whether this is the last chunk of the epoch's pages.
        last: bool,
        /// The pages.
        ranges: Vec<PageRange>,
    },
    /// Primary → standby: a chunk of the output the guest produced in the
    /// epoch, held by the primary's output gate until the epoch is applied.
    EpochOutput = 36 {
        /// Whether this is the last chunk.
        last: bool,
        /// The bytes (the rest of the payload).
        bytes: Vec<u8>,
    },
    /// Primary → standby: the epoch is whole (pages, device state, output);
    /// check and apply it, then acknowledge.
    EpochEnd = 37 {
        /// Epoch number.
        epoch: u32,
        /// Whether the epoch was captured with the guest paused (a state
        /// the standby may resume); the initial sync's epochs are not.
        checkpoint: bool,
    },
    /// Standby → primary: the epoch is applied to the standby's image; its
    /// output may be released.
    EpochApplied = 38 {
        /// Epoch number.
        epoch: u32,
    },
    /// Standby → primary: the epoch failed its checks and was not applied;
    /// the standby stays at its last applied epoch.
    EpochRefused = 39 {
        /// Epoch number.
        epoch: u32,
        /// Why (the rest of the payload, UTF-8).
        reason: String,
    },
    /// Primary → standby: protection ends cleanly; the standby discards its
    /// image and never takes over.
    ProtectEnd = 40,
    /// Standby → primary: released.
    ProtectEnded = 41,
    /// Primary or standby → witness: may I run the guest of protection
    /// `session`? (first asker wins, once per session).
    WitnessClaim = 42 {
        /// The protection session (the primary's `Hello` session).
        session: u64,
        /// 1: the primary (to go on unprotected), 2: the standby (to take
        /// over).
        claimant: u16,
    },
    /// Witness → claimant: the verdict.
    WitnessVerdict = 43 {
        /// Whether the claimant holds the run right.
        granted: bool,
    },
    /// Source → destination, after the last `PostcopyStart`, when both
    /// offered [`FEATURE_FETCH`] (TCP): once accepted, the source opens one
    /// more connection (`Join{session, FETCH_STREAM}`) on which the
    /// destination's fault handler sends `PageRequest`s of one page and
    /// waits for each page's `PostcopyPages{demand}` there, while the push
    /// goes on over the control connection.
    PageFetchOffer = 44,
    /// Destination → source: take it; the source connects now (the guest's
    /// faults ask over the control connection until it has joined).
    PageFetchAccept = 45,
}

/// Why bytes from a peer could not be understood.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The stream does not start with [`MAGIC`]: not a migration peer.
    #[error("not a migration peer: stream starts with {found:02x?}")]
    BadMagic {
        /// The first bytes received.
        found: [u8; 6],
    },
    /// No version in common.
    #[error(
        "protocol version mismatch: we speak {ours_min}..={ours_max}, peer speaks {theirs_min}..={theirs_max}"
    )]
    Version {
        /// Our lowest.
        ours_min: u16,
        /// Our highest.
        ours_max: u16,
        /// Their lowest.
        theirs_min: u16,
        /// Their highest.
        theirs_max: u16,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame larger than [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A control frame whose check does not match: corrupted in transit.
    #[error("corrupt {kind:?} frame: check {found:#x}, expected {expected:#x}")]
    Corrupt {
        /// Frame kind.
        kind: FrameKind,
        /// Check in the header.
        expected: u64,
        /// Check of the bytes received.
        found: u64,
    },
    /// A payload that does not decode.
    #[error("malformed {kind:?} frame: {detail}")]
    Malformed {
        /// Frame kind.
        kind: FrameKind,
        /// What is wrong.
        detail: String,
    },
    /// A message that is valid but not expected now.
    #[error("unexpected {got:?} while waiting for {expected}")]
    Unexpected {
        /// What arrived.
        got: FrameKind,
        /// What the state machine waited for.
        expected: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0})")]
    Truncated(&'static str),
    /// The peer closed the stream where a frame could begin: nothing was
    /// cut, and what happens next is the other connections' to say.
    #[error("the peer closed the stream between frames ({0})")]
    Closed(&'static str),
    /// An I/O error while reading or writing frames.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl ProtocolError {
    /// Whether the peer closed the stream or the link is gone (as opposed to
    /// sending something wrong).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Truncated(_) | ProtocolError::Closed(_) => true,
            ProtocolError::Io { source, .. } => is_disconnect_kind(source.kind()),
            _ => false,
        }
    }
}

/// Whether an I/O error kind means the peer or the link is gone (closed,
/// reset, timed out: a socket read timeout reports `WouldBlock`).
pub fn is_disconnect_kind(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
    )
}

/// Bounds-checked little-endian reads from a payload.
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) kind: FrameKind,
}

impl<'a> Cursor<'a> {
    pub(crate) fn bad(&self, detail: String) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            detail,
        }
    }
    pub(crate) fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(self.bad(format!("short payload: needed {N} more bytes")));
        };
        self.buf = rest;
        Ok(*head)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.take().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.take().map(u64::from_le_bytes)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.take::<1>().map(|b| b[0])
    }
    /// A u32 element count, checked against the bytes left so that a hostile
    /// count cannot make us allocate more than the payload.
    pub(crate) fn count(&mut self, elem: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(elem) > self.buf.len() {
            return Err(self.bad(format!(
                "count {n} needs {} bytes, {} left",
                n.saturating_mul(elem),
                self.buf.len()
            )));
        }
        Ok(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// A message field's wire codec. Integers are little endian; lists are a
/// u32 count, checked against the bytes left, then their elements; `bytes`
/// and text take the rest of the payload, so they come last.
trait Field: Sized {
    fn put(&self, w: &mut Vec<u8>);
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError>;
}

macro_rules! int_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn put(&self, w: &mut Vec<u8>) {
                w.extend_from_slice(&self.to_le_bytes());
            }
            fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
                r.take().map(<$t>::from_le_bytes)
            }
        }
    )*};
}
int_field!(u16, u32, u64);

impl Field for bool {
    fn put(&self, w: &mut Vec<u8>) {
        w.push(*self as u8);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(r.bad(format!("bool byte {b}"))),
        }
    }
}

impl Field for RefusalCode {
    fn put(&self, w: &mut Vec<u8>) {
        (*self as u16).put(w);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        u16::get(r).map(RefusalCode::from_u16)
    }
}

/// The rest of the payload.
impl Field for Vec<u8> {
    fn put(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(self);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(r.rest().to_vec())
    }
}

/// The rest of the payload, as UTF-8 (invalid bytes replaced: it is only
/// ever shown to people).
impl Field for String {
    fn put(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(self.as_bytes());
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(String::from_utf8_lossy(r.rest()).into_owned())
    }
}

/// An element of a counted list, with its fixed wire size (for the count
/// check that keeps a hostile count from allocating).
trait Element: Sized {
    const SIZE: usize;
    fn put(&self, w: &mut Vec<u8>);
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError>;
}

fn put_list<T: Element>(items: &[T], w: &mut Vec<u8>) {
    (items.len() as u32).put(w);
    for i in items {
        i.put(w);
    }
}

fn get_list<T: Element>(r: &mut Cursor<'_>) -> Result<Vec<T>, ProtocolError> {
    let n = r.count(T::SIZE)?;
    (0..n).map(|_| T::get(r)).collect()
}

macro_rules! list_field {
    ($($t:ty),*) => {$(
        impl Field for Vec<$t> {
            fn put(&self, w: &mut Vec<u8>) {
                put_list(self, w)
            }
            fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
                get_list(r)
            }
        }
    )*};
}
list_field!(PageRange, RemoteRegion);

/// Page hashes: a counted list of u64.
impl Field for Vec<u64> {
    fn put(&self, w: &mut Vec<u8>) {
        (self.len() as u32).put(w);
        for h in self {
            h.put(w);
        }
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        let n = r.count(8)?;
        (0..n).map(|_| u64::get(r)).collect()
    }
}

/// `region u32 | first u64 | count u32`.
impl Element for PageRange {
    const SIZE: usize = 16;
    fn put(&self, w: &mut Vec<u8>) {
        self.region.put(w);
        self.first.put(w);
        self.count.put(w);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(PageRange {
            region: u32::get(r)?,
            first: u64::get(r)?,
            count: u32::get(r)?,
        })
    }
}

/// `addr u64 | rkey u32 | len u64`.
impl Element for RemoteRegion {
    const SIZE: usize = 20;
    fn put(&self, w: &mut Vec<u8>) {
        self.addr.put(w);
        self.rkey.put(w);
        self.len.put(w);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(RemoteRegion {
            addr: u64::get(r)?,
            rkey: u32::get(r)?,
            len: u64::get(r)?,
        })
    }
}

/// `qpn u32 | psn u32 | gid [u8; 16]`.
impl Element for QpEndpoint {
    const SIZE: usize = 24;
    fn put(&self, w: &mut Vec<u8>) {
        self.qpn.put(w);
        self.psn.put(w);
        w.extend_from_slice(&self.gid);
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(QpEndpoint {
            qpn: u32::get(r)?,
            psn: u32::get(r)?,
            gid: r.take()?,
        })
    }
}

/// Queue pairs: a counted list of 1..=[`MAX_RDMA_QPS`].
impl Field for Vec<QpEndpoint> {
    fn put(&self, w: &mut Vec<u8>) {
        put_list(self, w)
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        let qps: Vec<QpEndpoint> = get_list(r)?;
        if qps.is_empty() || qps.len() > MAX_RDMA_QPS {
            return Err(r.bad(format!(
                "{} queue pairs (1..={MAX_RDMA_QPS} allowed)",
                qps.len()
            )));
        }
        Ok(qps)
    }
}

/// `count u32`, then per region `gpa u64 | len u64 | page_size u32`.
impl Field for MemoryLayout {
    fn put(&self, w: &mut Vec<u8>) {
        (self.regions.len() as u32).put(w);
        for r in &self.regions {
            r.gpa.put(w);
            r.len.put(w);
            (r.page_size.bytes() as u32).put(w);
        }
    }
    fn get(r: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        let n = r.count(20)?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            let gpa = u64::get(r)?;
            let len = u64::get(r)?;
            let ps = u32::get(r)?;
            let page_size = PageSize::from_bytes(ps as usize)
                .ok_or_else(|| r.bad(format!("page size {ps}")))?;
            regions.push(RegionLayout {
                gpa,
                len,
                page_size,
            });
        }
        Ok(MemoryLayout { regions })
    }
}

#[cfg(test)]
mod tests;
