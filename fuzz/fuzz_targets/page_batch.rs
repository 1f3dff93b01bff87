//! A data stream's page batch: frame header, fixed part, run table and page
//! hashes, validated against a guest layout (a 4 KiB-page region and a
//! 2 MiB-page region) before any byte could land; then, for an uncompressed
//! batch, the Sparse pages' encodings after the Data bytes, decoded as a
//! receiver would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate_core::memory::{MemoryLayout, PageSize, RegionLayout};
use migrate_core::protocol::wire::{
    RunKind, decode_batch_header, decode_sparse_page, read_frame_header, read_message,
    read_preamble,
};

fuzz_target!(|data: &[u8]| {
    let layout = MemoryLayout {
        regions: vec![
            RegionLayout {
                gpa: 0,
                len: 1 << 20,
                page_size: PageSize::Small,
            },
            RegionLayout {
                gpa: 1 << 32,
                len: 4 << 20,
                page_size: PageSize::Huge2M,
            },
        ],
    };
    // A data stream: the preamble and its Join, then batches (a corpus
    // entry may also start at a batch).
    let mut r = data;
    if read_preamble(&mut r).is_ok() {
        let _ = read_message(&mut r);
    } else {
        r = data;
    }
    for _ in 0..64 {
        let Ok(h) = read_frame_header(&mut r) else {
            return;
        };
        let Ok(b) = decode_batch_header(&mut r, &h, &layout) else {
            return;
        };
        // Every run it accepted lies inside the layout.
        for run in &b.runs {
            let region = &layout.regions[run.region as usize];
            let pages = region.len / region.page_size.bytes() as u64;
            assert!(run.first + run.count as u64 <= pages);
        }
        // Page bytes: the Data runs' bytes, then (uncompressed) the Sparse
        // encodings, each decoded into a page as a receiver would.
        let skip = (b.wire_len as usize).min(r.len());
        if !b.compressed {
            let sparse = r
                .get(b.data_len as usize..skip)
                .unwrap_or_default();
            let pages: u32 = b
                .runs
                .iter()
                .filter(|run| run.kind == RunKind::Sparse)
                .map(|run| run.count)
                .sum();
            let (mut at, mut words) = (0, Vec::new());
            // Every decoded word lies inside a 4 KiB page, ascending.
            for _ in 0..pages {
                match sparse.get(at..).map(|s| decode_sparse_page(s, &mut words)) {
                    Some(Ok(took)) => {
                        assert!(words.windows(2).all(|w| w[0].0 < w[1].0));
                        assert!(words.iter().all(|w| w.0 < 512));
                        at += took;
                    }
                    _ => break,
                }
            }
        }
        r = &r[skip..];
    }
});
