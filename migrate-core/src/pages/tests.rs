//! The page-batch layer over real memory: what one end encodes, the other
//! lands byte for byte.

use std::io::Read;

use super::*;
use crate::memory::{FreshPages, GuestRegion};
use crate::protocol::PageRange;
use crate::protocol::wire::{HEADER_LEN, read_frame_header};
use crate::transport::DestinationPages;

fn memory(pages: usize) -> GuestMemory {
    GuestMemory::new(vec![
        GuestRegion::anonymous(0, pages * 4096).unwrap(),
        GuestRegion::anonymous(1 << 30, 3 * 4096).unwrap(),
    ])
    .unwrap()
}

/// Dense, sparse and zero pages side by side.
fn fill(mem: &GuestMemory) {
    let r = &mem.regions()[0];
    for p in 0..r.pages() {
        match p % 4 {
            0 => r.write_bytes(p * 4096, &[(p as u8) | 1; 4096]),
            1 => r.write_bytes(p * 4096 + 8 * (p % 512), &(p as u64 + 1).to_le_bytes()),
            2 => {}
            _ => {
                let text: Vec<u8> = (0..4096).map(|i| b"abcdefgh"[(i + p) % 8]).collect();
                r.write_bytes(p * 4096, &text);
            }
        }
    }
    mem.regions()[1].write_bytes(4096, &[7; 4096]);
}

fn all_runs(mem: &GuestMemory) -> Vec<PageRun> {
    (0..mem.regions().len())
        .map(|region| PageRun {
            region,
            first: 0,
            count: mem.regions()[region].pages(),
        })
        .collect()
}

/// Encode every page of `src` into one byte stream.
fn encode_all(src: &GuestMemory, enc: Encoding, reads_zero: bool) -> Vec<u8> {
    let dest = DestinationPages::new(src, reads_zero);
    let queue = BatchQueue::new(src, &all_runs(src));
    let mut encoder = BatchEncoder::default();
    let mut wire = Vec::new();
    while let Some(batch) = queue.take() {
        let b = encoder.encode(src, 3, batch, enc, &dest).unwrap();
        let len: usize = b.iov.iter().map(|s| s.len()).sum();
        assert_eq!(len as u64, b.sent.wire_bytes);
        b.iov.iter().for_each(|s| wire.extend_from_slice(s));
    }
    wire
}

/// Land every batch of `wire` into `dst`; the suspect pages.
fn land_all(dst: &GuestMemory, mut wire: &[u8], unhashed_ok: bool) -> Vec<PageRange> {
    let fresh = FreshPages::new(dst);
    let mut lander = BatchLander::new(dst, &fresh, unhashed_ok);
    let mut suspect = Vec::new();
    while !wire.is_empty() {
        let h = read_frame_header(&mut wire).unwrap();
        let landed = lander.land(&mut wire, &h).unwrap();
        assert_eq!(landed.round, 3);
        suspect.extend(landed.suspect);
    }
    suspect
}

fn same(a: &GuestMemory, b: &GuestMemory) {
    for (ra, rb) in a.regions().iter().zip(b.regions()) {
        for p in 0..ra.pages() {
            assert_eq!(ra.hash_page(p), rb.hash_page(p), "page {p}");
        }
    }
}

#[test]
fn every_encoding_lands_byte_for_byte() {
    let src = memory(300);
    fill(&src);
    for compress in [None, Some(1)] {
        for sparse in [false, true] {
            for hashed in [true, false] {
                let enc = Encoding {
                    compress,
                    sparse,
                    hashed,
                };
                // A destination holding other bytes: zero pages must go as
                // markers.
                let dst = memory(300);
                dst.regions()[0].write_bytes(2 * 4096, &[9; 4096]);
                let wire = encode_all(&src, enc, false);
                assert!(land_all(&dst, &wire, !hashed).is_empty(), "{enc:?}");
                same(&src, &dst);
            }
        }
    }
}

#[test]
fn a_fresh_destination_is_sent_no_zero_page_and_sparse_pages_go_small() {
    let src = memory(300);
    fill(&src);
    let enc = Encoding {
        compress: None,
        sparse: true,
        hashed: true,
    };
    let wire = encode_all(&src, enc, true);
    let dst = memory(300);
    assert!(land_all(&dst, &wire, false).is_empty());
    same(&src, &dst);
    // 150 dense pages and one in region 1 go whole; 75 sparse ones in a
    // dozen bytes; zero pages not at all.
    let dense = 151 * 4096;
    assert!(
        wire.len() > dense && wire.len() < dense + 75 * 20 + (16 << 10),
        "{}",
        wire.len()
    );
}

#[test]
fn a_page_changed_on_the_wire_is_suspect_and_only_it() {
    let src = memory(300);
    fill(&src);
    let enc = Encoding {
        compress: None,
        sparse: false,
        hashed: true,
    };
    let mut wire = encode_all(&src, enc, true);
    // The last byte of the first frame is its last data page's.
    let first = read_frame_header(&mut &wire[..]).unwrap();
    let end = HEADER_LEN + first.len as usize;
    wire[end - 1] ^= 0x40;
    let dst = memory(300);
    let suspect = land_all(&dst, &wire, false);
    assert_eq!(suspect.len(), 1, "{suspect:?}");
    assert_eq!(suspect[0].count, 1);
}

#[test]
fn an_unhashed_batch_is_refused_where_nothing_seals_the_connection() {
    let src = memory(8);
    fill(&src);
    let enc = Encoding {
        compress: None,
        sparse: false,
        hashed: false,
    };
    let wire = encode_all(&src, enc, true);
    let dst = memory(8);
    let fresh = FreshPages::new(&dst);
    let mut lander = BatchLander::new(&dst, &fresh, false);
    let mut r = &wire[..];
    let h = read_frame_header(&mut r).unwrap();
    let e = lander.land(&mut r, &h).unwrap_err();
    assert!(e.to_string().contains("without page hashes"), "{e}");
}

#[test]
fn a_cut_inside_the_page_bytes_is_truncation() {
    let src = memory(8);
    fill(&src);
    let enc = Encoding {
        compress: None,
        sparse: false,
        hashed: true,
    };
    let wire = encode_all(&src, enc, true);
    let dst = memory(8);
    let fresh = FreshPages::new(&dst);
    let mut lander = BatchLander::new(&dst, &fresh, false);
    let mut r = &wire[..wire.len() - 100];
    let h = read_frame_header(&mut r).unwrap();
    let e = lander.land(&mut r.take(u64::MAX), &h).unwrap_err();
    assert!(e.to_string().contains("stream ended inside a frame"), "{e}");
}

#[test]
fn batches_cover_every_page_once_within_the_target() {
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(0, 1000 * 4096).unwrap(),
        GuestRegion::anonymous(1 << 30, 3 * 4096).unwrap(),
    ])
    .unwrap();
    let runs = vec![
        PageRun {
            region: 0,
            first: 5,
            count: 300,
        },
        PageRun {
            region: 0,
            first: 400,
            count: 1,
        },
        PageRun {
            region: 1,
            first: 0,
            count: 3,
        },
    ];
    let batches = plan_batches(&mem, &runs);
    let mut covered = Vec::new();
    for b in &batches {
        let bytes: usize = b.iter().map(|r| r.count * 4096).sum();
        assert!(bytes <= BATCH_TARGET, "{bytes}");
        for r in b {
            covered.extend((r.first..r.first + r.count).map(|p| (r.region, p)));
        }
    }
    let mut expected: Vec<_> = (5..305).map(|p| (0, p)).collect();
    expected.push((0, 400));
    expected.extend((0..3).map(|p| (1, p)));
    assert_eq!(covered, expected);
    assert_eq!(batches.len(), 3);
}
