//! Work-request rate of the RDMA data path: two connected RC queue pairs on
//! one device (rxe over loopback in the SoftRoCE VM), RDMA WRITEs posted the
//! way the transport posts them — chains of 16, only the last signaled, a
//! bounded number of chains in flight.
//!
//! - `post_only`: time inside `ibv_post_send` alone (completions are reaped
//!   outside the timed part): what posting costs the sender's CPU.
//! - `post_and_complete`: from the first post to the last completion: the
//!   rate the device sustains at that size.
//!
//! Needs an RDMA device: run it in the VM (`scripts/bench.sh` does). Without
//! one it says so and measures nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;

use migrate_core::memory::{GuestMemory, GuestRegion};
use transport_rdma::verbs::{
    Device, QueuePair, RegisteredMemory, Remote, VerbsError, WriteRequest,
};

const CHAIN: usize = 16;
const CHAINS_IN_FLIGHT: usize = 16;
const WRS_PER_ITER: usize = 1024;

struct Pair {
    src: QueuePair,
    _dst: QueuePair,
    src_mem: RegisteredMemory,
    dst_mem: RegisteredMemory,
    len: usize,
}

fn buffer(len: usize, fill: u8) -> Arc<GuestMemory> {
    let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, len).expect("map")]).expect("memory");
    mem.write(0, &vec![fill; len]).expect("fill");
    Arc::new(mem)
}

fn setup(buf_len: usize) -> Result<Pair, VerbsError> {
    let dev = Device::open(None, None, None)?;
    let src_mem = dev.register(&buffer(buf_len, 0x5a), false)?;
    let dst_mem = dev.register(&buffer(buf_len, 0), true)?;
    let mut src = dev.queue_pair((CHAIN * CHAINS_IN_FLIGHT + 16) as u32, 16, Remote::None)?;
    let mut dst = dev.queue_pair(16, 16, Remote::Write)?;
    let (a, b) = (src.local, dst.local);
    src.connect(&b)?;
    dst.connect(&a)?;
    Ok(Pair {
        src,
        _dst: dst,
        src_mem,
        dst_mem,
        len: buf_len,
    })
}

/// Post `WRS_PER_ITER` WRITEs of `size` bytes; returns the time spent
/// posting and the time until the last completion.
fn round(p: &mut Pair, size: usize) -> (Duration, Duration) {
    let slots = p.len / size;
    let remote = p.dst_mem.remote(0);
    let mut posting = Duration::ZERO;
    let mut inflight = 0usize;
    let mut done = Vec::new();
    let start = Instant::now();
    let mut next = 0usize;
    for c in 0..WRS_PER_ITER / CHAIN {
        while inflight >= CHAINS_IN_FLIGHT {
            done.clear();
            p.src.poll_send(&mut done).expect("completion");
            inflight -= done.len();
        }
        let writes: Vec<WriteRequest> = (0..CHAIN)
            .map(|_| {
                let off = (next % slots * size) as u64;
                next += 1;
                WriteRequest {
                    region: 0,
                    offset: off,
                    len: size as u32,
                    remote_addr: remote.addr + off,
                    rkey: remote.rkey,
                }
            })
            .collect();
        let t = Instant::now();
        p.src
            .post_writes(&p.src_mem, black_box(&writes), true, c as u64)
            .expect("post");
        posting += t.elapsed();
        inflight += 1;
    }
    while inflight > 0 {
        done.clear();
        p.src.poll_send(&mut done).expect("completion");
        inflight -= done.len();
    }
    (posting, start.elapsed())
}

fn post_rate(c: &mut Criterion) {
    let mut pair = match setup(16 << 20) {
        Ok(p) => p,
        Err(e) => {
            fixtures::skip(
                "rdma_post",
                fixtures::Need::Rdma,
                &format!("no usable RDMA device here ({e}); run it in the SoftRoCE VM"),
            );
            return;
        }
    };
    let mut g = c.benchmark_group("rdma_write_wr");
    g.throughput(Throughput::Elements(WRS_PER_ITER as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for size in [4096usize, 64 << 10] {
        g.bench_with_input(BenchmarkId::new("post_only", size), &size, |b, &size| {
            b.iter_custom(|iters| (0..iters).map(|_| round(&mut pair, size).0).sum())
        });
        g.bench_with_input(
            BenchmarkId::new("post_and_complete", size),
            &size,
            |b, &size| b.iter_custom(|iters| (0..iters).map(|_| round(&mut pair, size).1).sum()),
        );
    }
    g.finish();
    // The bytes did land (a real check, not a timing): the first slot.
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    pair.src_mem.memory().read(0, &mut a).expect("read");
    pair.dst_mem.memory().read(0, &mut b).expect("read");
    assert_eq!(a, b);
}

criterion_group!(benches, post_rate);
criterion_main!(benches);
