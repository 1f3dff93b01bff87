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
//!  AwaitHello --Hello--> AwaitLayout --Layout ok--> AwaitJoins --all joined-->
//!  Receiving --RoundDone, all RoundEnd--> Receiving (ack sent)
//!  Receiving --VerifyRequest--> Receiving (hashes sent)
//!  Receiving --DeviceState*--> HaveState --Commit--> Committed (resumed, acked)
//!  any state --Abort / error / peer gone--> Discarded
//! ```
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
//! # Versioning and compatibility
//!
//! Every stream starts with [`MAGIC`] and the sender's [`VERSION`] (u16 LE),
//! so a stray client or an incompatible peer is refused on its first bytes.
//! `Hello` carries the range of versions the source speaks; the destination
//! picks the highest both speak and says so in `Welcome`. Feature bits (e.g.
//! [`FEATURE_ZSTD`]) announce optional encodings. All integers are little
//! endian. Frame kinds unknown to a version are errors, never skipped.

mod batch;
mod codec;

use std::io;

pub use batch::{
    BatchHeader, BatchRun, MAX_BATCH_BYTES, MAX_BATCH_RUNS, RunKind, decode_batch_header,
    encode_batch_header, is_zero_page,
};
pub use codec::{
    FrameHeader, HEADER_LEN, check_seed, read_frame_header, read_message, read_payload,
    read_preamble, write_frame, write_message, write_preamble,
};

use crate::memory::{MemoryLayout, PageSize, RegionLayout};

/// First bytes of every stream.
pub const MAGIC: [u8; 6] = *b"LIVMIG";
/// The protocol version this build speaks (and the highest it accepts).
pub const VERSION: u16 = 1;
/// The lowest version this build accepts.
pub const MIN_VERSION: u16 = 1;
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

/// Frame kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome = 2,
    /// [`Message::Layout`].
    Layout = 3,
    /// [`Message::LayoutAccepted`].
    LayoutAccepted = 4,
    /// [`Message::Join`].
    Join = 5,
    /// A page batch (see [`BatchHeader`]).
    Pages = 6,
    /// [`Message::RoundEnd`].
    RoundEnd = 7,
    /// [`Message::RoundDone`].
    RoundDone = 8,
    /// [`Message::RoundAck`].
    RoundAck = 9,
    /// [`Message::VerifyRequest`].
    VerifyRequest = 10,
    /// [`Message::PageHashes`].
    PageHashes = 11,
    /// [`Message::DeviceState`].
    DeviceState = 12,
    /// [`Message::Commit`].
    Commit = 13,
    /// [`Message::Committed`].
    Committed = 14,
    /// [`Message::Abort`].
    Abort = 15,
    /// [`Message::Refused`].
    Refused = 16,
    /// [`Message::RdmaConnect`].
    RdmaConnect = 17,
    /// [`Message::RdmaAccept`].
    RdmaAccept = 18,
    /// [`Message::ZeroPages`].
    ZeroPages = 19,
}

impl Kind {
    /// The kind of a wire byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Welcome,
            3 => Layout,
            4 => LayoutAccepted,
            5 => Join,
            6 => Pages,
            7 => RoundEnd,
            8 => RoundDone,
            9 => RoundAck,
            10 => VerifyRequest,
            11 => PageHashes,
            12 => DeviceState,
            13 => Commit,
            14 => Committed,
            15 => Abort,
            16 => Refused,
            17 => RdmaConnect,
            18 => RdmaAccept,
            19 => ZeroPages,
            _ => return None,
        })
    }
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
}

impl RefusalCode {
    fn from_u16(v: u16) -> RefusalCode {
        match v {
            1 => RefusalCode::Version,
            2 => RefusalCode::Layout,
            3 => RefusalCode::Setup,
            4 => RefusalCode::Protocol,
            5 => RefusalCode::DeviceState,
            _ => RefusalCode::Other,
        }
    }
}

/// Every message except page batches (which are streamed, see [`BatchHeader`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source → destination, first on the control stream.
    Hello {
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
    Welcome {
        /// Version both speak.
        version: u16,
        /// Features both support.
        features: u64,
    },
    /// Source → destination: the guest memory layout.
    Layout(MemoryLayout),
    /// Destination → source: layouts match.
    LayoutAccepted,
    /// First message on a data stream.
    Join {
        /// The session from `Hello`.
        session: u64,
        /// Stream index, `0..data_streams`.
        index: u16,
    },
    /// Data stream: all batches of `round` on this stream were sent.
    RoundEnd {
        /// Round number.
        round: u32,
        /// Batches sent on this stream in this round.
        batches: u64,
    },
    /// Control: every data stream finished `round`.
    RoundDone {
        /// Round number.
        round: u32,
        /// Whether this is the last round (guest paused).
        last: bool,
    },
    /// Destination → source: every page of `round` landed.
    RoundAck {
        /// Round number.
        round: u32,
        /// Pages whose batch failed its check: send again.
        suspect: Vec<PageRange>,
    },
    /// Source → destination: send page hashes of all memory.
    VerifyRequest,
    /// Destination → source: xxh3 of `hashes.len()` pages from `first`.
    PageHashes {
        /// Region index.
        region: u32,
        /// First page.
        first: u64,
        /// One hash per page.
        hashes: Vec<u64>,
    },
    /// Source → destination: a chunk of the opaque device state.
    DeviceState {
        /// Whether this is the last chunk.
        last: bool,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Source → destination: the destination owns the guest now.
    Commit,
    /// Destination → source: device state loaded and guest resumed.
    Committed,
    /// Either side: the migration is off.
    Abort {
        /// Why.
        reason: String,
    },
    /// Destination → source: refused at setup.
    Refused {
        /// Category.
        code: RefusalCode,
        /// Human-readable reason.
        message: String,
    },
    /// Source → destination (RDMA): the source's queue pairs.
    RdmaConnect {
        /// One per queue pair.
        qps: Vec<QpEndpoint>,
    },
    /// Destination → source (RDMA): its queue pairs and every guest-memory
    /// region registered for remote write, in region order.
    RdmaAccept {
        /// One per queue pair, in the order of `RdmaConnect`.
        qps: Vec<QpEndpoint>,
        /// One per guest-memory region.
        regions: Vec<RemoteRegion>,
    },
    /// Source → destination, before `RoundDone`, for transports that do not
    /// carry zero pages in their data plane (RDMA): zero these pages.
    ZeroPages {
        /// Round number.
        round: u32,
        /// The pages.
        ranges: Vec<PageRange>,
    },
}

impl Message {
    /// The frame kind carrying this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Welcome { .. } => Kind::Welcome,
            Message::Layout(_) => Kind::Layout,
            Message::LayoutAccepted => Kind::LayoutAccepted,
            Message::Join { .. } => Kind::Join,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::RoundDone { .. } => Kind::RoundDone,
            Message::RoundAck { .. } => Kind::RoundAck,
            Message::VerifyRequest => Kind::VerifyRequest,
            Message::PageHashes { .. } => Kind::PageHashes,
            Message::DeviceState { .. } => Kind::DeviceState,
            Message::Commit => Kind::Commit,
            Message::Committed => Kind::Committed,
            Message::Abort { .. } => Kind::Abort,
            Message::Refused { .. } => Kind::Refused,
            Message::RdmaConnect { .. } => Kind::RdmaConnect,
            Message::RdmaAccept { .. } => Kind::RdmaAccept,
            Message::ZeroPages { .. } => Kind::ZeroPages,
        }
    }

    /// Encode the payload (without frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        match self {
            Message::Hello {
                min_version,
                max_version,
                session,
                data_streams,
                features,
            } => {
                put16(&mut w, *min_version);
                put16(&mut w, *max_version);
                put64(&mut w, *session);
                put16(&mut w, *data_streams);
                put64(&mut w, *features);
            }
            Message::Welcome { version, features } => {
                put16(&mut w, *version);
                put64(&mut w, *features);
            }
            Message::Layout(layout) => {
                put32(&mut w, layout.regions.len() as u32);
                for r in &layout.regions {
                    put64(&mut w, r.gpa);
                    put64(&mut w, r.len);
                    put32(&mut w, r.page_size.bytes() as u32);
                }
            }
            Message::LayoutAccepted
            | Message::VerifyRequest
            | Message::Commit
            | Message::Committed => {}
            Message::Join { session, index } => {
                put64(&mut w, *session);
                put16(&mut w, *index);
            }
            Message::RoundEnd { round, batches } => {
                put32(&mut w, *round);
                put64(&mut w, *batches);
            }
            Message::RoundDone { round, last } => {
                put32(&mut w, *round);
                w.push(*last as u8);
            }
            Message::RoundAck {
                round,
                suspect: ranges,
            }
            | Message::ZeroPages { round, ranges } => {
                put32(&mut w, *round);
                put32(&mut w, ranges.len() as u32);
                for r in ranges {
                    put32(&mut w, r.region);
                    put64(&mut w, r.first);
                    put32(&mut w, r.count);
                }
            }
            Message::RdmaConnect { qps } => put_qps(&mut w, qps),
            Message::RdmaAccept { qps, regions } => {
                put_qps(&mut w, qps);
                put32(&mut w, regions.len() as u32);
                for r in regions {
                    put64(&mut w, r.addr);
                    put32(&mut w, r.rkey);
                    put64(&mut w, r.len);
                }
            }
            Message::PageHashes {
                region,
                first,
                hashes,
            } => {
                put32(&mut w, *region);
                put64(&mut w, *first);
                put32(&mut w, hashes.len() as u32);
                for h in hashes {
                    put64(&mut w, *h);
                }
            }
            Message::DeviceState { last, bytes } => {
                w.push(*last as u8);
                w.extend_from_slice(bytes);
            }
            Message::Abort { reason } => w.extend_from_slice(reason.as_bytes()),
            Message::Refused { code, message } => {
                put16(&mut w, *code as u16);
                w.extend_from_slice(message.as_bytes());
            }
        }
        w
    }

    /// Decode a payload of frame kind `kind`.
    ///
    /// # Errors
    /// [`ProtocolError::Malformed`] for a payload that is short, long, or
    /// holds impossible values; never panics, never allocates more than the
    /// payload's own size.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut r = Cursor { buf: payload, kind };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                session: r.u64()?,
                data_streams: r.u16()?,
                features: r.u64()?,
            },
            Kind::Welcome => Message::Welcome {
                version: r.u16()?,
                features: r.u64()?,
            },
            Kind::Layout => {
                let n = r.count(20)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let gpa = r.u64()?;
                    let len = r.u64()?;
                    let ps = r.u32()?;
                    let page_size = PageSize::from_bytes(ps as usize)
                        .ok_or_else(|| r.bad(format!("page size {ps}")))?;
                    regions.push(RegionLayout {
                        gpa,
                        len,
                        page_size,
                    });
                }
                Message::Layout(MemoryLayout { regions })
            }
            Kind::LayoutAccepted => Message::LayoutAccepted,
            Kind::Join => Message::Join {
                session: r.u64()?,
                index: r.u16()?,
            },
            Kind::RoundEnd => Message::RoundEnd {
                round: r.u32()?,
                batches: r.u64()?,
            },
            Kind::RoundDone => Message::RoundDone {
                round: r.u32()?,
                last: r.bool()?,
            },
            Kind::RoundAck | Kind::ZeroPages => {
                let round = r.u32()?;
                let n = r.count(16)?;
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push(PageRange {
                        region: r.u32()?,
                        first: r.u64()?,
                        count: r.u32()?,
                    });
                }
                if kind == Kind::RoundAck {
                    Message::RoundAck {
                        round,
                        suspect: ranges,
                    }
                } else {
                    Message::ZeroPages { round, ranges }
                }
            }
            Kind::RdmaConnect => Message::RdmaConnect { qps: r.qps()? },
            Kind::RdmaAccept => {
                let qps = r.qps()?;
                let n = r.count(20)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push(RemoteRegion {
                        addr: r.u64()?,
                        rkey: r.u32()?,
                        len: r.u64()?,
                    });
                }
                Message::RdmaAccept { qps, regions }
            }
            Kind::VerifyRequest => Message::VerifyRequest,
            Kind::PageHashes => {
                let region = r.u32()?;
                let first = r.u64()?;
                let n = r.count(8)?;
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.u64()?);
                }
                Message::PageHashes {
                    region,
                    first,
                    hashes,
                }
            }
            Kind::DeviceState => Message::DeviceState {
                last: r.bool()?,
                bytes: r.rest().to_vec(),
            },
            Kind::Commit => Message::Commit,
            Kind::Committed => Message::Committed,
            Kind::Abort => Message::Abort {
                reason: String::from_utf8_lossy(r.rest()).into_owned(),
            },
            Kind::Refused => Message::Refused {
                code: RefusalCode::from_u16(r.u16()?),
                message: String::from_utf8_lossy(r.rest()).into_owned(),
            },
            Kind::Pages => return Err(r.bad("page batch decoded as a message".into())),
        };
        if !r.buf.is_empty() {
            return Err(r.bad(format!("{} trailing bytes", r.buf.len())));
        }
        Ok(msg)
    }
}

/// How the destination's layout differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutMismatch {
    /// Different numbers of regions.
    #[error("source has {source_regions} memory regions, destination has {destination_regions}")]
    RegionCount {
        /// Regions on the source.
        source_regions: usize,
        /// Regions on the destination.
        destination_regions: usize,
    },
    /// One region differs.
    #[error(
        "region {index} differs: source GPA {:#x} length {:#x} pages {}, \
         destination GPA {:#x} length {:#x} pages {}",
        source_region.gpa, source_region.len, source_region.page_size,
        destination_region.gpa, destination_region.len, destination_region.page_size
    )]
    Region {
        /// Region index.
        index: usize,
        /// The source's region.
        source_region: RegionLayout,
        /// The destination's region.
        destination_region: RegionLayout,
    },
}

/// Compare layouts; the error names the first difference.
///
/// # Errors
/// [`LayoutMismatch`] naming the differing region or count.
pub fn check_layout(
    source: &MemoryLayout,
    destination: &MemoryLayout,
) -> Result<(), LayoutMismatch> {
    if source.regions.len() != destination.regions.len() {
        return Err(LayoutMismatch::RegionCount {
            source_regions: source.regions.len(),
            destination_regions: destination.regions.len(),
        });
    }
    for (index, (s, d)) in source.regions.iter().zip(&destination.regions).enumerate() {
        if s != d {
            return Err(LayoutMismatch::Region {
                index,
                source_region: *s,
                destination_region: *d,
            });
        }
    }
    Ok(())
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
        kind: Kind,
        /// Check in the header.
        expected: u64,
        /// Check of the bytes received.
        found: u64,
    },
    /// A payload that does not decode.
    #[error("malformed {kind:?} frame: {detail}")]
    Malformed {
        /// Frame kind.
        kind: Kind,
        /// What is wrong.
        detail: String,
    },
    /// A message that is valid but not expected now.
    #[error("unexpected {got:?} while waiting for {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What the state machine waited for.
        expected: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0})")]
    Truncated(&'static str),
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
            ProtocolError::Truncated(_) => true,
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

fn put_qps(w: &mut Vec<u8>, qps: &[QpEndpoint]) {
    put32(w, qps.len() as u32);
    for q in qps {
        put32(w, q.qpn);
        put32(w, q.psn);
        w.extend_from_slice(&q.gid);
    }
}

fn put16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

/// Bounds-checked little-endian reads from a payload.
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) kind: Kind,
}

impl<'a> Cursor<'a> {
    pub(crate) fn bad(&self, detail: String) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            detail,
        }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        if self.buf.len() < N {
            return Err(self.bad(format!("short payload: needed {N} more bytes")));
        }
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        Ok(head.try_into().expect("split at N"))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.take().map(u16::from_le_bytes)
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
    fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.bad(format!("bool byte {b}"))),
        }
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
    fn qps(&mut self) -> Result<Vec<QpEndpoint>, ProtocolError> {
        let n = self.count(24)?;
        if n == 0 || n > MAX_RDMA_QPS {
            return Err(self.bad(format!("{n} queue pairs (1..={MAX_RDMA_QPS} allowed)")));
        }
        let mut qps = Vec::with_capacity(n);
        for _ in 0..n {
            qps.push(QpEndpoint {
                qpn: self.u32()?,
                psn: self.u32()?,
                gid: self.take()?,
            });
        }
        Ok(qps)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests;
