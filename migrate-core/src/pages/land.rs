//! The destination half: one batch read from a stream into guest memory.

use std::io::Read;

use crate::checksum::xxh3_64;
use crate::memory::{FreshPages, GuestMemory, GuestRegion, MemoryLayout};
use crate::protocol::wire::{
    BatchHeader, BatchRun, FrameHeader, HEADER_LEN, RunKind, decode_batch_header,
    decode_sparse_page,
};
use crate::protocol::{FrameKind, PageRange, ProtocolError};
use crate::transport::TransportError;

/// What one landed batch held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandedBatch {
    /// The round it belongs to.
    pub round: u32,
    /// Pages that failed their own hash: a guest write raced their send
    /// (normal in live rounds), and the source sends them again.
    pub suspect: Vec<PageRange>,
    /// Pages with bytes (Data and Sparse).
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// The frame's bytes on the wire, header included.
    pub wire_bytes: u64,
}

/// Lands batches, keeping its buffers from one batch to the next.
#[derive(Debug)]
pub struct BatchLander<'m> {
    mem: &'m GuestMemory,
    fresh: &'m FreshPages,
    layout: MemoryLayout,
    /// Batches without page hashes are taken (both ends agreed, and an
    /// AEAD seals this connection).
    unhashed_ok: bool,
    compressed: Vec<u8>,
    /// What is not read straight into guest memory: everything when
    /// compressed, else the Sparse encodings after the Data bytes.
    raw: Vec<u8>,
    words: Vec<(u16, u64)>,
}

fn malformed(detail: String) -> TransportError {
    ProtocolError::Malformed {
        kind: FrameKind::Pages,
        detail,
    }
    .into()
}

fn read_err(e: std::io::Error) -> TransportError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtocolError::Truncated("page bytes").into()
    } else {
        TransportError::Io {
            op: "receive pages",
            source: e,
        }
    }
}

impl<'m> BatchLander<'m> {
    /// A lander into `mem`, allocating its `fresh` pages by run.
    pub fn new(mem: &'m GuestMemory, fresh: &'m FreshPages, unhashed_ok: bool) -> Self {
        Self {
            mem,
            fresh,
            layout: mem.layout(),
            unhashed_ok,
            compressed: Vec::new(),
            raw: Vec::new(),
            words: Vec::new(),
        }
    }

    /// Read the batch whose frame header `h` was just read from `r`, and
    /// land its pages. Every run is checked against the memory's layout
    /// before any byte lands.
    ///
    /// # Errors
    /// [`ProtocolError`] for a malformed, corrupt or truncated batch;
    /// [`TransportError::Io`] when the stream or an allocation fails.
    pub fn land(
        &mut self,
        r: &mut impl Read,
        h: &FrameHeader,
    ) -> Result<LandedBatch, TransportError> {
        let bh = decode_batch_header(r, h, &self.layout)?;
        if bh.unhashed && !self.unhashed_ok {
            return Err(malformed(
                "a batch without page hashes on a connection that is not sealed".into(),
            ));
        }
        self.read_bytes(r, &bh)?;
        let suspect = self.write_pages(&bh)?;
        let (mut normal_pages, mut zero_pages) = (0, 0);
        for run in &bh.runs {
            match run.kind {
                RunKind::Data | RunKind::Sparse => normal_pages += u64::from(run.count),
                RunKind::Zero => zero_pages += u64::from(run.count),
            }
        }
        Ok(LandedBatch {
            round: bh.round,
            suspect,
            normal_pages,
            zero_pages,
            wire_bytes: HEADER_LEN as u64 + u64::from(h.len),
        })
    }

    /// Allocate the batch's fresh pages by run (no fault per page), then
    /// read its bytes: uncompressed Data straight into guest memory, the
    /// rest into `raw`.
    fn read_bytes(&mut self, r: &mut impl Read, bh: &BatchHeader) -> Result<(), TransportError> {
        for run in bh.runs.iter().filter(|r| r.kind != RunKind::Zero) {
            self.fresh
                .allocate(
                    self.mem,
                    run.region as usize,
                    run.first as usize,
                    run.count as usize,
                )
                .map_err(|source| TransportError::Io {
                    op: "allocate guest memory for received pages",
                    source,
                })?;
        }
        if bh.compressed {
            self.compressed.resize(bh.wire_len as usize, 0);
            r.read_exact(&mut self.compressed).map_err(read_err)?;
            self.raw.resize(bh.raw_len as usize, 0);
            let n = zstd::bulk::decompress_to_buffer(&self.compressed, &mut self.raw[..])
                .map_err(|e| malformed(format!("zstd: {e}")))?;
            if n != bh.raw_len as usize {
                return Err(malformed(format!(
                    "zstd gave {n} bytes, expected {}",
                    bh.raw_len
                )));
            }
        } else {
            let data: Vec<(usize, usize, usize)> = bh
                .runs
                .iter()
                .filter(|r| r.kind == RunKind::Data)
                .map(|r| (r.region as usize, r.first as usize, r.count as usize))
                .collect();
            self.mem.read_runs_from(&data, r).map_err(read_err)?;
            self.raw.resize((bh.raw_len - bh.data_len) as usize, 0);
            r.read_exact(&mut self.raw).map_err(read_err)?;
        }
        Ok(())
    }

    /// Write what is not in guest memory yet (compressed Data, Sparse and
    /// Zero pages) and check every page against its hash; returns the
    /// suspect pages.
    fn write_pages(&mut self, bh: &BatchHeader) -> Result<Vec<PageRange>, TransportError> {
        let mut pos = Positions {
            data: 0,
            sparse: if bh.compressed {
                bh.data_len as usize
            } else {
                0
            },
        };
        let mut suspect: Vec<PageRange> = Vec::new();
        let mut hashes = bh.page_hashes.iter();
        for run in &bh.runs {
            // The run was validated against this memory's layout; each page
            // belongs to one batch per round.
            let region = &self.mem.regions()[run.region as usize];
            match run.kind {
                RunKind::Zero => {
                    for p in run.first as usize..(run.first + u64::from(run.count)) as usize {
                        region.zero_page(p);
                    }
                }
                RunKind::Data | RunKind::Sparse => {
                    for (i, found) in self.write_run(region, run, bh, &mut pos)? {
                        if hashes.next().copied() != Some(found) {
                            add_page(&mut suspect, run.region, run.first + i as u64);
                        }
                    }
                }
            }
        }
        if pos.sparse != self.raw.len() {
            return Err(malformed(format!(
                "sparse pages took {} of {} bytes",
                pos.sparse,
                self.raw.len()
            )));
        }
        Ok(suspect)
    }

    /// Write one Data or Sparse run where it is not in memory yet; each
    /// page's index in the run and hash as found (none when unhashed:
    /// sealed records' AEAD checked every byte).
    fn write_run(
        &mut self,
        region: &GuestRegion,
        run: &BatchRun,
        bh: &BatchHeader,
        pos: &mut Positions,
    ) -> Result<Vec<(usize, u64)>, TransportError> {
        let (first, count) = (run.first as usize, run.count as usize);
        let ps = region.page_size().bytes();
        if run.kind == RunKind::Data && bh.compressed {
            let len = count * ps;
            region.write_bytes(first * ps, &self.raw[pos.data..pos.data + len]);
            pos.data += len;
        }
        let mut found = Vec::with_capacity(if bh.unhashed { 0 } else { count });
        for i in 0..count {
            let p = first + i;
            if run.kind == RunKind::Sparse {
                // Checked as encoded, then zeroed and written.
                let enc = &self.raw[pos.sparse..];
                let took = decode_sparse_page(enc, &mut self.words)?;
                region.zero_page(p);
                for &(w, v) in &self.words {
                    region.write_bytes(p * ps + usize::from(w) * 8, &v.to_le_bytes());
                }
                if !bh.unhashed {
                    found.push((i, xxh3_64(&enc[..took])));
                }
                pos.sparse += took;
            } else if !bh.unhashed {
                found.push((i, region.hash_page(p)));
            }
        }
        Ok(found)
    }
}

/// Where the next compressed Data page and the next Sparse encoding start
/// in `raw`.
struct Positions {
    data: usize,
    sparse: usize,
}

/// Add page `p` of `region` to `ranges`, joining the last range when
/// adjacent.
fn add_page(ranges: &mut Vec<PageRange>, region: u32, p: u64) {
    match ranges.last_mut() {
        Some(l) if l.region == region && l.first + u64::from(l.count) == p => l.count += 1,
        _ => ranges.push(PageRange {
            region,
            first: p,
            count: 1,
        }),
    }
}
