//! Page batches: a run table, a hash per data page, then page bytes.
//!
//! ```text
//! payload = round u32 | nruns u32 | wire_len u32 | raw_len u32
//!         | nruns × (region u32 | count u32 | first u64 | kind u8 | 7 × 0)
//!         | one xxh3-64 per page of the Data and Sparse runs, in run order
//!           (of a Data page's bytes; of a Sparse page's encoding)
//!         | wire_len bytes (zstd if flagged) of raw_len bytes:
//!             the Data runs' pages in order,
//!             then one encoding per page of the Sparse runs, in order:
//!             n u16 | n × (word u16 | value u64), words ascending
//! check   = seeded xxh3-64 of everything before the page bytes
//! ```
//!
//! A Sparse page (only with [`FEATURE_SPARSE`](super::FEATURE_SPARSE), only
//! 4 KiB pages) holds at most [`MAX_SPARSE_WORDS`] non-zero 8-byte words
//! and travels as those words: the destination checks the encoding against
//! its hash, zeroes the page and writes them. Freshly touched memory, page
//! tables and counters (a guest sweeping a byte per page) move at a few
//! bytes a page, with no compressor in the path and no 4 KiB hashed or
//! copied on either side. A guest write racing the source's scan of such a
//! page is caught by the dirty tracker, as for a compressed page: the page
//! goes again in the next round (and in the paused last round nothing
//! races).
//!
//! The frame check guards the table and the page hashes: if it fails, the
//! batch is corrupt and nothing of it is trusted. Each page is then checked
//! against its own hash, so a guest write racing the send of one page makes
//! only that page suspect (it is dirty anyway and goes again).
//!
//! **Unhashed batches** ([`FLAG_UNHASHED`], only with
//! [`FEATURE_UNHASHED`](super::FEATURE_UNHASHED), only on a connection
//! whose records an AEAD seals) carry no page hashes: the record's tag
//! already authenticates every byte between the source's read of the page
//! and the destination's, with a cryptographic key rather than a checksum,
//! so a second hash on each side proves nothing more and cost the TLS
//! first pass a fifth of its throughput (on the source it is the first
//! read of each page from memory). A guest write racing the send is caught
//! by the dirty tracker, as for compressed and Sparse pages.
//!
//! Zero runs carry no bytes: the destination zeroes those pages (a page that
//! became zero in a later round must not keep stale bytes).

use std::io::Read;

use crate::checksum::xxh3_64_with_seed;

use super::codec::{FrameHeader, check_seed};
use super::{Cursor, FrameKind, ProtocolError};
use crate::memory::MemoryLayout;

/// Most runs in one batch.
pub const MAX_BATCH_RUNS: usize = 1024;
/// Most raw page bytes in one batch (room for two 2 MiB pages).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Frame flag: the page bytes are one zstd frame.
pub const FLAG_ZSTD: u8 = 1;
/// Frame flag: the batch has no page hashes (sealed connections only; see
/// the module docs).
pub const FLAG_UNHASHED: u8 = 2;
/// Fixed part of a batch payload.
pub const BATCH_FIXED: usize = 16;
/// One run-table entry.
pub const RUN_ENTRY: usize = 24;

/// Most non-zero words a Sparse page may carry (beyond that, a page goes
/// whole: 64 words take 642 bytes of its 4096).
pub const MAX_SPARSE_WORDS: usize = 64;

/// Whether a run carries bytes or stands for zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RunKind {
    /// Page bytes follow.
    Data = 0,
    /// All-zero pages, no bytes.
    Zero = 1,
    /// 4 KiB pages sent as their non-zero words (after the Data bytes).
    Sparse = 2,
}

/// One run of pages in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRun {
    /// Region index.
    pub region: u32,
    /// First page in the region.
    pub first: u64,
    /// Pages.
    pub count: u32,
    /// Data or zero.
    pub kind: RunKind,
}

/// A decoded (and validated) batch header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Round the batch belongs to.
    pub round: u32,
    /// Runs, in the order their bytes follow.
    pub runs: Vec<BatchRun>,
    /// Page bytes on the wire (compressed size when compressed).
    pub wire_len: u32,
    /// Raw page bytes (sum of the Data runs).
    pub raw_len: u32,
    /// Whether the bytes are zstd.
    pub compressed: bool,
    /// Bytes of the Data runs' pages (the rest of `raw_len` encodes the
    /// Sparse pages).
    pub data_len: u32,
    /// xxh3-64 of each page of the Data and Sparse runs, in run order;
    /// empty when `unhashed`.
    pub page_hashes: Vec<u64>,
    /// The batch carries no page hashes ([`FLAG_UNHASHED`]): only a
    /// connection whose records an AEAD seals may take it.
    pub unhashed: bool,
}

/// Append the encoding of one Sparse page (its non-zero words, ascending).
pub fn encode_sparse_page(words: &[(u16, u64)], out: &mut Vec<u8>) {
    out.extend_from_slice(&(words.len() as u16).to_le_bytes());
    for (i, v) in words {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Decode the Sparse page encoding at the front of `bytes`: its words
/// into `words` (cleared first, ascending, each inside a 4 KiB page);
/// returns the bytes it took.
///
/// # Errors
/// [`ProtocolError::Malformed`] for a truncated encoding, too many words,
/// words out of the page or not ascending.
pub fn decode_sparse_page(
    bytes: &[u8],
    words: &mut Vec<(u16, u64)>,
) -> Result<usize, ProtocolError> {
    let bad = |detail: String| ProtocolError::Malformed {
        kind: FrameKind::Pages,
        detail,
    };
    words.clear();
    let n = bytes
        .first_chunk::<2>()
        .map(|b| u16::from_le_bytes(*b) as usize)
        .ok_or_else(|| bad("sparse page truncated".into()))?;
    if n > MAX_SPARSE_WORDS {
        return Err(bad(format!("sparse page of {n} words")));
    }
    let len = 2 + 10 * n;
    let body = bytes
        .get(2..len)
        .ok_or_else(|| bad("sparse page truncated".into()))?;
    for e in body.chunks_exact(10) {
        let (i, v) = e.split_at(2);
        let i = u16::from_le_bytes([i[0], i[1]]);
        if usize::from(i) >= 4096 / 8 {
            return Err(bad(format!("sparse word {i} outside the page")));
        }
        if words.last().is_some_and(|&(l, _)| i <= l) {
            return Err(bad("sparse words not ascending".into()));
        }
        let v = v.first_chunk::<8>().map_or(0, |v| u64::from_le_bytes(*v));
        words.push((i, v));
    }
    Ok(len)
}

/// Encode everything of a batch before its page bytes: fixed part, run
/// table, page hashes (the part the frame check covers).
pub fn encode_batch_header(
    round: u32,
    runs: &[BatchRun],
    wire_len: u32,
    raw_len: u32,
    page_hashes: &[u64],
) -> Vec<u8> {
    let mut w = Vec::with_capacity(BATCH_FIXED + RUN_ENTRY * runs.len() + 8 * page_hashes.len());
    w.extend_from_slice(&round.to_le_bytes());
    w.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    w.extend_from_slice(&wire_len.to_le_bytes());
    w.extend_from_slice(&raw_len.to_le_bytes());
    for r in runs {
        w.extend_from_slice(&r.region.to_le_bytes());
        w.extend_from_slice(&r.count.to_le_bytes());
        w.extend_from_slice(&r.first.to_le_bytes());
        w.push(r.kind as u8);
        w.extend_from_slice(&[0; 7]);
    }
    for h in page_hashes {
        w.extend_from_slice(&h.to_le_bytes());
    }
    w
}

/// Read and validate a batch's fixed part, run table and page hashes from
/// `r`, after its frame header `h`, and check them against the frame check.
/// Every run is checked against `layout` before any byte lands anywhere; the
/// page bytes are left on the stream.
///
/// # Errors
/// [`ProtocolError::Malformed`] for counts or sizes that disagree, runs
/// outside guest memory, or more than the batch limits;
/// [`ProtocolError::Corrupt`] when the table or hashes fail the check.
pub fn decode_batch_header(
    r: &mut impl Read,
    h: &FrameHeader,
    layout: &MemoryLayout,
) -> Result<BatchHeader, ProtocolError> {
    if h.flags & !(FLAG_ZSTD | FLAG_UNHASHED) != 0 {
        return Err(bad(format!("unknown flags {:#x}", h.flags)));
    }
    let mut fixed = [0u8; BATCH_FIXED];
    read_header_bytes(r, &mut fixed)?;
    let f = Fixed::decode(&fixed, h)?;
    let table_len = BATCH_FIXED + RUN_ENTRY * f.nruns as usize;
    let mut table = vec![0u8; table_len];
    table[..BATCH_FIXED].copy_from_slice(&fixed);
    read_header_bytes(r, &mut table[BATCH_FIXED..])?;
    let (runs, sums) = decode_runs(&table[BATCH_FIXED..], f.nruns, layout)?;
    let hashed = f.check_sizes(h, &sums, table_len)?;
    // Bounded above: at most MAX_BATCH_BYTES / 4096 hashes.
    table.resize(table_len + 8 * hashed as usize, 0);
    read_header_bytes(r, &mut table[table_len..])?;
    let found = xxh3_64_with_seed(&table, check_seed(h.kind, h.flags, h.len));
    // Fuzzing (cargo fuzz sets `cfg(fuzzing)`) skips the check so that
    // random bytes reach the decoders behind it.
    if found != h.check && !cfg!(fuzzing) {
        return Err(ProtocolError::Corrupt {
            kind: FrameKind::Pages,
            expected: h.check,
            found,
        });
    }
    let page_hashes = table[table_len..]
        .chunks_exact(8)
        .filter_map(|c| c.first_chunk().copied().map(u64::from_le_bytes))
        .collect();
    Ok(BatchHeader {
        round: f.round,
        runs,
        wire_len: f.wire_len,
        raw_len: f.raw_len,
        compressed: f.compressed,
        data_len: sums.data_bytes as u32,
        page_hashes,
        unhashed: f.unhashed,
    })
}

fn bad(detail: String) -> ProtocolError {
    ProtocolError::Malformed {
        kind: FrameKind::Pages,
        detail,
    }
}

fn read_header_bytes(r: &mut dyn Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated("page batch header"),
        _ => ProtocolError::Io {
            op: "read page batch header",
            source: e,
        },
    })
}

/// A batch's fixed part, checked on its own and against its frame.
struct Fixed {
    round: u32,
    nruns: u32,
    wire_len: u32,
    raw_len: u32,
    compressed: bool,
    unhashed: bool,
}

impl Fixed {
    fn decode(fixed: &[u8; BATCH_FIXED], h: &FrameHeader) -> Result<Self, ProtocolError> {
        let mut c = Cursor {
            buf: fixed,
            kind: FrameKind::Pages,
        };
        let (round, nruns, wire_len, raw_len) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
        if nruns as usize > MAX_BATCH_RUNS || nruns == 0 {
            return Err(bad(format!("{nruns} runs (1..={MAX_BATCH_RUNS} allowed)")));
        }
        if raw_len as usize > MAX_BATCH_BYTES {
            return Err(bad(format!("{raw_len} raw bytes exceed {MAX_BATCH_BYTES}")));
        }
        let compressed = h.flags & FLAG_ZSTD != 0;
        if (!compressed && wire_len != raw_len) || wire_len > raw_len {
            return Err(bad(format!(
                "{wire_len} wire bytes for {raw_len} raw bytes"
            )));
        }
        let table_len = BATCH_FIXED + RUN_ENTRY * nruns as usize;
        if (h.len as u64) < table_len as u64 + wire_len as u64 {
            return Err(bad(format!(
                "frame length {} is shorter than its run table and bytes",
                h.len
            )));
        }
        Ok(Self {
            round,
            nruns,
            wire_len,
            raw_len,
            compressed,
            unhashed: h.flags & FLAG_UNHASHED != 0,
        })
    }

    /// Check the raw length against the runs and the frame length against
    /// the table, the hashes and the bytes; the number of page hashes.
    fn check_sizes(
        &self,
        h: &FrameHeader,
        sums: &RunSums,
        table_len: usize,
    ) -> Result<u64, ProtocolError> {
        // Sparse encodings take 2 to 2 + 10 × MAX_SPARSE_WORDS bytes each.
        let sparse_len = u64::from(self.raw_len).checked_sub(sums.data_bytes);
        let n = sums.sparse_pages;
        let fits = |len: u64| (2 * n..=(2 + 10 * MAX_SPARSE_WORDS as u64) * n).contains(&len);
        if !sparse_len.is_some_and(fits) {
            return Err(bad(format!(
                "data runs hold {} bytes and {n} sparse pages, header says {}",
                sums.data_bytes, self.raw_len
            )));
        }
        // One hash per page with bytes: never more than a batch of 4 KiB
        // pages.
        let hashed = sums.data_pages + sums.sparse_pages;
        if hashed > (MAX_BATCH_BYTES / 4096) as u64 {
            return Err(bad(format!("{hashed} pages with bytes in one batch")));
        }
        let hashed = if self.unhashed { 0 } else { hashed };
        let expected_len = table_len as u64 + 8 * hashed + u64::from(self.wire_len);
        if u64::from(h.len) != expected_len {
            return Err(bad(format!(
                "frame length {} does not match its run table ({expected_len})",
                h.len
            )));
        }
        Ok(hashed)
    }
}

/// What a batch's runs add up to.
#[derive(Default)]
struct RunSums {
    data_bytes: u64,
    data_pages: u64,
    sparse_pages: u64,
}

/// Decode and check the run table (after the fixed part) against `layout`.
fn decode_runs(
    buf: &[u8],
    nruns: u32,
    layout: &MemoryLayout,
) -> Result<(Vec<BatchRun>, RunSums), ProtocolError> {
    let mut c = Cursor {
        buf,
        kind: FrameKind::Pages,
    };
    let mut runs = Vec::with_capacity(nruns as usize);
    let mut sums = RunSums::default();
    for _ in 0..nruns {
        let run = decode_run(&mut c)?;
        let reg = layout
            .regions
            .get(run.region as usize)
            .ok_or_else(|| bad(format!("region {} does not exist", run.region)))?;
        let pages = reg.len / reg.page_size.bytes() as u64;
        if run.count == 0
            || run
                .first
                .checked_add(u64::from(run.count))
                .is_none_or(|end| end > pages)
        {
            return Err(bad(format!(
                "run of {} pages at page {} outside region {} ({pages} pages)",
                run.count, run.first, run.region
            )));
        }
        match run.kind {
            RunKind::Data => {
                sums.data_bytes += u64::from(run.count) * reg.page_size.bytes() as u64;
                sums.data_pages += u64::from(run.count);
            }
            RunKind::Sparse if reg.page_size.bytes() != 4096 => {
                return Err(bad(format!(
                    "sparse run in region {} of huge pages",
                    run.region
                )));
            }
            RunKind::Sparse => sums.sparse_pages += u64::from(run.count),
            RunKind::Zero => {}
        }
        runs.push(run);
    }
    Ok((runs, sums))
}

/// One run-table entry, its padding checked.
fn decode_run(c: &mut Cursor<'_>) -> Result<BatchRun, ProtocolError> {
    let region = c.u32()?;
    let count = c.u32()?;
    let first = c.u64()?;
    let kind = match c.u8()? {
        0 => RunKind::Data,
        1 => RunKind::Zero,
        2 => RunKind::Sparse,
        k => return Err(bad(format!("run kind {k}"))),
    };
    for _ in 0..7 {
        if c.u8()? != 0 {
            return Err(bad("run padding is not zero".into()));
        }
    }
    Ok(BatchRun {
        region,
        first,
        count,
        kind,
    })
}
