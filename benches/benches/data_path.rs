//! Per-page costs on the data path, on the fixture page mixes: zero-page
//! detection, the per-page xxh3 hash, the batch header encode/decode, and
//! zstd (level 1) compression. Throughput is in guest bytes per second, so
//! each row reads as "how fast could a sender feed the wire".

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fixtures::{PageMix, fill_memory};
use migrate_core::memory::{
    GuestMemory, GuestRegion, MemoryLayout, PageSize, RegionLayout, is_zero_page,
};
use migrate_core::protocol::FrameKind;
use migrate_core::protocol::wire::{
    BatchRun, FrameHeader, RunKind, check_seed, decode_batch_header, encode_batch_header,
};

const PAGES: usize = 4096; // 16 MiB per mix

fn image(mix: PageMix) -> Vec<u8> {
    let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, PAGES * 4096).unwrap()]).unwrap();
    fill_memory(&mem, mix, 11).unwrap();
    let mut v = vec![0u8; PAGES * 4096];
    mem.read(0, &mut v).unwrap();
    v
}

fn mixes() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("realistic-40-30-30", image(PageMix::REALISTIC)),
        ("all-random", image(PageMix::ALL_RANDOM)),
        ("all-zero", image(PageMix::ALL_ZERO)),
    ]
}

fn per_page(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_page");
    g.throughput(Throughput::Bytes((PAGES * 4096) as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(2));
    for (name, img) in mixes() {
        g.bench_with_input(BenchmarkId::new("zero_detect", name), &img, |b, img| {
            b.iter(|| {
                img.chunks(4096)
                    .filter(|p| is_zero_page(black_box(p)))
                    .count()
            })
        });
        g.bench_with_input(BenchmarkId::new("xxh3_page_hash", name), &img, |b, img| {
            b.iter(|| {
                img.chunks(4096)
                    .map(|p| migrate_core::checksum::xxh3_64(black_box(p)))
                    .fold(0u64, |a, h| a ^ h)
            })
        });
        g.bench_with_input(BenchmarkId::new("zstd1_compress", name), &img, |b, img| {
            let mut out = vec![0u8; zstd::zstd_safe::compress_bound(512 << 10)];
            b.iter(|| {
                img.chunks(512 << 10)
                    .map(|c| zstd::bulk::compress_to_buffer(c, &mut out[..], 1).unwrap())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

fn batch_header(c: &mut Criterion) {
    // A worst-case 512 KiB batch: 128 single-page runs alternating data/zero.
    let runs: Vec<BatchRun> = (0..128)
        .map(|i| BatchRun {
            region: 0,
            first: 2 * i,
            count: 1,
            kind: if i % 2 == 0 {
                RunKind::Data
            } else {
                RunKind::Zero
            },
        })
        .collect();
    let hashes = vec![7u64; 64];
    let layout = MemoryLayout {
        regions: vec![RegionLayout {
            gpa: 0,
            len: 1 << 30,
            page_size: PageSize::Small,
        }],
    };
    let raw = 64 * 4096;
    let table = encode_batch_header(1, &runs, raw, raw, &hashes);
    let len = table.len() as u32 + raw;
    let header = FrameHeader {
        kind: FrameKind::Pages,
        flags: 0,
        len,
        check: migrate_core::checksum::xxh3_64_with_seed(
            &table,
            check_seed(FrameKind::Pages, 0, len),
        ),
    };
    let mut g = c.benchmark_group("batch_header_128_runs");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("encode", |b| {
        b.iter(|| encode_batch_header(1, black_box(&runs), raw, raw, &hashes))
    });
    g.bench_function("decode_and_check", |b| {
        b.iter(|| decode_batch_header(&mut &table[..], black_box(&header), &layout).unwrap())
    });
    g.finish();
}

criterion_group!(benches, per_page, batch_header);
criterion_main!(benches);
