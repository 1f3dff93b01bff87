//! The source half: one batch of pages into a frame and the buffers that
//! follow it.

use std::io::IoSlice;

use crate::checksum::{xxh3_64, xxh3_64_with_seed};
use crate::dirty::PageRun;
use crate::memory::{GuestMemory, GuestRegion, PageSize, sparse_words};
use crate::protocol::wire::{
    BatchRun, FLAG_UNHASHED, FLAG_ZSTD, FrameHeader, HEADER_LEN, MAX_BATCH_BYTES, MAX_SPARSE_WORDS,
    RunKind, check_seed, encode_batch_header, encode_sparse_page,
};
use crate::protocol::{FEATURE_SPARSE, FEATURE_UNHASHED, FEATURE_ZSTD, Features, FrameKind};
use crate::transport::{DestinationPages, RoundSent, TransportError};

/// How page bytes are encoded on one connection, as both ends agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// zstd at this level.
    pub compress: Option<i32>,
    /// 4 KiB pages with few non-zero words go as those words.
    pub sparse: bool,
    /// Each page carries its xxh3 hash. Off only where both ends agreed
    /// ([`FEATURE_UNHASHED`]) and an AEAD seals the connection: its tag
    /// already authenticates every byte.
    pub hashed: bool,
}

impl Encoding {
    /// What the agreed `features` allow on a connection that is `sealed`
    /// (or not), compressing at `level`.
    pub fn agreed(features: Features, level: i32, sealed: bool) -> Self {
        Self {
            compress: features.has(FEATURE_ZSTD).then_some(level),
            sparse: features.has(FEATURE_SPARSE),
            hashed: !(features.has(FEATURE_UNHASHED) && sealed),
        }
    }
}

/// What one page of a batch becomes.
#[derive(Clone, Copy, PartialEq)]
enum Class {
    /// Its bytes.
    Data,
    /// Its few non-zero words.
    Sparse,
    /// A zero marker.
    Zero,
    /// Nothing: a zero page the destination already reads as zeros.
    Skip,
}

/// One encoded batch: write `iov` as it is (empty: nothing to send).
#[derive(Debug)]
pub struct EncodedBatch<'a> {
    /// Frame header and table, then the page bytes (straight from guest
    /// memory, or the compressed copy).
    pub iov: Vec<IoSlice<'a>>,
    /// Pages and wire bytes of this batch.
    pub sent: RoundSent,
}

/// Encodes batches, keeping its buffers from one batch to the next.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    runs: Vec<BatchRun>,
    hashes: Vec<u64>,
    /// The Data pages' hashes in page order, taken as each page is
    /// classified (uncompressed batches only).
    data_hashes: Vec<u64>,
    raw: Vec<u8>,
    compressed: Vec<u8>,
    /// The Sparse pages' encodings, in page order, and their hashes.
    sparse: Vec<u8>,
    sparse_hashes: Vec<u64>,
    words: Vec<(u16, u64)>,
    head: Vec<u8>,
}

impl BatchEncoder {
    /// Encode the pages of `pieces` for `round`: data pages as views of
    /// guest memory (or zstd-compressed), pages with few non-zero words as
    /// those words (when agreed), zero pages as markers where the
    /// destination may hold something else (`dest`), else not at all.
    ///
    /// # Errors
    /// [`TransportError::Io`] when zstd fails.
    pub fn encode<'a>(
        &'a mut self,
        mem: &'a GuestMemory,
        round: u32,
        pieces: &[PageRun],
        enc: Encoding,
        dest: &DestinationPages,
    ) -> Result<EncodedBatch<'a>, TransportError> {
        let mut sent = RoundSent::default();
        self.runs.clear();
        self.sparse.clear();
        self.sparse_hashes.clear();
        self.data_hashes.clear();
        let mut data: Vec<IoSlice<'a>> = Vec::new();
        for piece in pieces.iter().filter(|p| p.count > 0) {
            self.classify(mem, piece, enc, dest, &mut data, &mut sent);
        }
        if self.runs.is_empty() {
            return Ok(EncodedBatch {
                iov: Vec::new(),
                sent,
            });
        }
        let data_len: usize = data.iter().map(|d| d.len()).sum();
        debug_assert!(data_len <= MAX_BATCH_BYTES);
        let raw_len = data_len + self.sparse.len();
        let compressed = match enc.compress {
            Some(level) if raw_len > 0 => self.compress(&data, level)?,
            _ => false,
        };
        let wire_len = if compressed {
            self.compressed.len()
        } else {
            raw_len
        };
        if enc.hashed {
            self.hash_pages(mem, &data, compressed);
        } else {
            self.hashes.clear();
        }
        let flags =
            (if enc.hashed { 0 } else { FLAG_UNHASHED }) | if compressed { FLAG_ZSTD } else { 0 };
        self.frame(round, flags, wire_len, raw_len);
        sent.wire_bytes = (self.head.len() + wire_len) as u64;
        let this: &'a Self = self;
        let mut iov = vec![IoSlice::new(&this.head)];
        if compressed {
            iov.push(IoSlice::new(&this.compressed));
        } else {
            iov.extend(data);
            iov.push(IoSlice::new(&this.sparse));
        }
        Ok(EncodedBatch { iov, sent })
    }

    /// Classify each page of `piece` once, in order, into runs: a Sparse
    /// page's words are taken here, and its hash is of their encoding (a
    /// guest write racing the scan dirties the page: it goes again next
    /// round).
    fn classify<'a>(
        &mut self,
        mem: &'a GuestMemory,
        piece: &PageRun,
        enc: Encoding,
        dest: &DestinationPages,
        data: &mut Vec<IoSlice<'a>>,
        sent: &mut RoundSent,
    ) {
        let region = &mem.regions()[piece.region];
        let end = piece.first + piece.count;
        let mut p = piece.first;
        let mut next = self.class(region, piece.region, p, enc, dest);
        while p < end {
            let (kind, start) = (next, p);
            p += 1;
            // A run's bytes are one slice: of one mapping (see
            // `GuestRegion::map_read_view`).
            let view = region.reads_through_view(start);
            while p < end {
                next = self.class(region, piece.region, p, enc, dest);
                if next != kind || region.reads_through_view(p) != view {
                    break;
                }
                p += 1;
            }
            let count = p - start;
            let run = |kind| BatchRun {
                region: piece.region as u32,
                first: start as u64,
                count: count as u32,
                kind,
            };
            match kind {
                Class::Data => {
                    sent.normal_pages += count as u64;
                    dest.sent_data(piece.region, start, count);
                    self.runs.push(run(RunKind::Data));
                    data.push(region.io_slice(start, count));
                }
                Class::Sparse => {
                    sent.normal_pages += count as u64;
                    sent.sparse_pages += count as u64;
                    dest.sent_data(piece.region, start, count);
                    self.runs.push(run(RunKind::Sparse));
                }
                Class::Zero => {
                    sent.zero_pages += count as u64;
                    self.runs.push(run(RunKind::Zero));
                }
                Class::Skip => sent.zero_pages += count as u64,
            }
        }
    }

    /// What page `p` of `region` (index `ri`) becomes. Everything this
    /// batch reads of the page it reads here, while the page is in the
    /// cache: the zero test, the sparse test, and (uncompressed) a Data
    /// page's hash. Taking the hash in a later pass over the batch cost a
    /// second trip to memory for the lines the sparse test had read alone,
    /// a line at a time (an all-random 1 GiB guest's first pass: 68 ms of
    /// the senders' CPU in the sparse test, 2026-12-07).
    fn class(
        &mut self,
        region: &GuestRegion,
        ri: usize,
        p: usize,
        enc: Encoding,
        dest: &DestinationPages,
    ) -> Class {
        if region.is_zero_page(p) {
            return match dest.zero_needs_sending(ri, p) {
                true => Class::Zero,
                false => Class::Skip,
            };
        }
        let page = region.io_slice(p, 1);
        if enc.sparse && region.page_size() == PageSize::Small {
            self.words.clear();
            if sparse_words(&page, MAX_SPARSE_WORDS, &mut self.words) {
                let at = self.sparse.len();
                encode_sparse_page(&self.words, &mut self.sparse);
                if enc.hashed {
                    self.sparse_hashes.push(xxh3_64(&self.sparse[at..]));
                }
                return Class::Sparse;
            }
        }
        if enc.hashed && enc.compress.is_none() {
            self.data_hashes.push(xxh3_64(&page));
        }
        Class::Data
    }

    /// Compress the batch's bytes into `compressed`; whether that is worth
    /// sending (smaller than raw). Compression copies anyway: copy once,
    /// then hash and compress the same stable bytes (`raw`).
    fn compress(&mut self, data: &[IoSlice<'_>], level: i32) -> Result<bool, TransportError> {
        self.raw.clear();
        data.iter().for_each(|d| self.raw.extend_from_slice(d));
        self.raw.extend_from_slice(&self.sparse);
        let raw_len = self.raw.len();
        self.compressed
            .resize(zstd::zstd_safe::compress_bound(raw_len), 0);
        let n = zstd::bulk::compress_to_buffer(&self.raw, &mut self.compressed[..], level)
            .map_err(|source| TransportError::Io {
                op: "zstd compress",
                source,
            })?;
        self.compressed.truncate(n);
        Ok(n < raw_len)
    }

    /// One hash per page, in run order, from the bytes that go out (a
    /// write racing the send makes only that page suspect): uncompressed
    /// Data pages' as [`class`](Self::class) took them, compressed ones'
    /// from the stable copy that was compressed.
    fn hash_pages(&mut self, mem: &GuestMemory, data: &[IoSlice<'_>], compressed: bool) {
        self.hashes.clear();
        let (mut off, mut datas, mut sparse_hashes) = (0, data.iter(), self.sparse_hashes.iter());
        let mut data_hashes = self.data_hashes.iter();
        for run in &self.runs {
            match run.kind {
                // Taken by `class` (never for a batch that may compress).
                RunKind::Data if !self.data_hashes.is_empty() => {
                    debug_assert!(!compressed);
                    self.hashes
                        .extend(data_hashes.by_ref().take(run.count as usize));
                }
                RunKind::Data => {
                    let Some(d) = datas.next() else { break };
                    let ps = mem.regions()[run.region as usize].page_size().bytes();
                    let bytes: &[u8] = if compressed {
                        &self.raw[off..off + d.len()]
                    } else {
                        d
                    };
                    off += d.len();
                    self.hashes.extend(bytes.chunks(ps).map(xxh3_64));
                }
                RunKind::Sparse => self
                    .hashes
                    .extend(sparse_hashes.by_ref().take(run.count as usize)),
                RunKind::Zero => {}
            }
        }
    }

    /// The frame header and the batch's table into `head`.
    fn frame(&mut self, round: u32, flags: u8, wire_len: usize, raw_len: usize) {
        let table = encode_batch_header(
            round,
            &self.runs,
            wire_len as u32,
            raw_len as u32,
            &self.hashes,
        );
        let len = (table.len() + wire_len) as u32;
        let header = FrameHeader {
            kind: FrameKind::Pages,
            flags,
            len,
            check: xxh3_64_with_seed(&table, check_seed(FrameKind::Pages, flags, len)),
        };
        self.head.clear();
        self.head.reserve(HEADER_LEN + table.len());
        self.head.extend_from_slice(&header.to_bytes());
        self.head.extend_from_slice(&table);
    }
}
