//! RDMA WRITE of guest memory into pre-registered guest memory, over real
//! verbs (SoftRoCE in the emulated VM: `scripts/test-rdma.sh`). Without an
//! RDMA device the tests say SKIP, unless `MIGRATE_REQUIRE_RDMA` is set (as
//! inside the VM), where a missing device fails them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixtures::transport_suite::first_difference;
use fixtures::{PageMix, fill_memory};
use migrate_core::memory::{GuestMemory, GuestRegion};
use transport_rdma::verbs::{Device, QueuePair, Remote, VerbsError, WriteRequest, device_names};

fn device_or_skip(test: &str) -> Option<Device> {
    if device_names().is_empty() {
        fixtures::skip(
            test,
            fixtures::Need::Rdma,
            "no RDMA device here (run scripts/test-rdma.sh)",
        );
        return None;
    }
    Some(Device::open(None, None, None).expect("open RDMA device"))
}

fn memory() -> Arc<GuestMemory> {
    Arc::new(
        GuestMemory::new(vec![
            GuestRegion::anonymous(0, 4 << 20).unwrap(),
            GuestRegion::memfd(1 << 32, 2 << 20, "rdma-test").unwrap(),
        ])
        .unwrap(),
    )
}

fn connected_pair(dev: &Device) -> (QueuePair, QueuePair) {
    let mut a = dev.queue_pair(256, 16, Remote::None).unwrap();
    let mut b = dev.queue_pair(16, 256, Remote::Write).unwrap();
    let (ea, eb) = (a.local, b.local);
    a.connect(&eb).unwrap();
    b.connect(&ea).unwrap();
    (a, b)
}

fn wait_send(qp: &QueuePair, want: usize) -> Result<Vec<u64>, VerbsError> {
    let mut done = Vec::new();
    let start = Instant::now();
    while done.len() < want {
        qp.poll_send(&mut done)?;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "send completions timed out"
        );
    }
    Ok(done)
}

#[test]
fn pages_land_byte_for_byte_and_the_fence_arrives_after_them() {
    let Some(dev) = device_or_skip("pages_land_byte_for_byte") else {
        return;
    };
    let (src, dst) = (memory(), memory());
    fill_memory(&src, PageMix::REALISTIC, 3).unwrap();
    fill_memory(&dst, PageMix::ALL_RANDOM, 4).unwrap();
    let src_mr = dev.register(&src, false).unwrap();
    let dst_mr = dev.register(&dst, true).unwrap();
    let (mut a, mut b) = connected_pair(&dev);
    b.post_receives(8).unwrap();
    // 256 KiB writes, chains of 2, last of each chain signaled.
    let mut writes = Vec::new();
    for (i, r) in src.regions().iter().enumerate() {
        for off in (0..r.len()).step_by(256 << 10) {
            let remote = dst_mr.remote(i);
            writes.push(WriteRequest {
                region: i,
                offset: off as u64,
                len: (256 << 10).min(r.len() - off) as u32,
                remote_addr: remote.addr + off as u64,
                rkey: remote.rkey,
            });
        }
    }
    // The first two chains one post each, the rest three chains a post
    // (one doorbell): each chain completes on its own, in order.
    let chains: Vec<_> = writes.chunks(2).collect();
    assert!(chains.len() > 5);
    for (n, chain) in chains.iter().enumerate().take(2) {
        a.post_writes(&src_mr, chain, true, n as u64).unwrap();
    }
    for (g, group) in chains[2..].chunks(3).enumerate() {
        a.post_write_chains(&src_mr, group, 2 + 3 * g as u64)
            .unwrap();
    }
    let fence_region = dst_mr.remote(0);
    a.post_fence(fence_region.rkey, fence_region.addr, 0xabcd, 999)
        .unwrap();
    let ids = wait_send(&a, chains.len() + 1).unwrap();
    let want: Vec<u64> = (0..chains.len() as u64).chain([999]).collect();
    assert_eq!(ids, want, "one completion per chain, in posting order");
    let mut imms = Vec::new();
    let start = Instant::now();
    while imms.is_empty() {
        b.poll_recv(&mut imms).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "fence never arrived"
        );
    }
    assert_eq!(imms, vec![0xabcd]);
    assert_eq!(
        first_difference(&src, &dst),
        None,
        "destination differs after RDMA WRITE"
    );
    drop((a, b, src_mr, dst_mr));
}

#[test]
fn a_wrong_remote_key_fails_the_write_with_a_typed_error() {
    let Some(dev) = device_or_skip("a_wrong_remote_key") else {
        return;
    };
    let (src, dst) = (memory(), memory());
    let smr = dev.register(&src, false).unwrap();
    let dmr = dev.register(&dst, true).unwrap();
    let (mut a, _b) = connected_pair(&dev);
    let remote = dmr.remote(0);
    let write = WriteRequest {
        region: 0,
        offset: 0,
        len: 4096,
        remote_addr: remote.addr,
        rkey: remote.rkey ^ 0x5a5a,
    };
    // A local range outside the registration is refused before the post.
    for bad in [
        WriteRequest { region: 2, ..write },
        WriteRequest {
            offset: (4 << 20) - 2048,
            ..write
        },
    ] {
        match a.post_writes(&smr, &[bad], true, 7) {
            Err(VerbsError::OutOfRange { .. }) => {}
            other => panic!("expected OutOfRange for {bad:?}, got {other:?}"),
        }
    }
    a.post_writes(&smr, &[write], true, 1).unwrap();
    match wait_send(&a, 1) {
        Err(VerbsError::Completion {
            wr_id: 1, status, ..
        }) => println!("wrong key refused: {status}"),
        other => panic!("expected a failed completion, got {other:?}"),
    }
}

/// Keys are scoped to one registration: once the destination deregisters
/// its guest memory (as `RdmaDestination::finish` and drop do when a
/// migration ends, whatever the outcome), a WRITE with a key it handed out
/// fails, and the memory is untouched.
#[test]
fn a_key_from_an_ended_registration_fails() {
    let Some(dev) = device_or_skip("a_key_from_an_ended_registration_fails") else {
        return;
    };
    let (src, dst) = (memory(), memory());
    fill_memory(&src, PageMix::ALL_RANDOM, 5).unwrap();
    let smr = dev.register(&src, false).unwrap();
    let dmr = dev.register(&dst, true).unwrap();
    let (mut a, _b) = connected_pair(&dev);
    let remote = dmr.remote(0);
    let write = |offset: u64| WriteRequest {
        region: 0,
        offset,
        len: 4096,
        remote_addr: remote.addr + offset,
        rkey: remote.rkey,
    };
    // While registered, the key works.
    a.post_writes(&smr, &[write(0)], true, 1).unwrap();
    wait_send(&a, 1).unwrap();
    let mut page = vec![0u8; 4096];
    dst.regions()[0].read_bytes(0, &mut page);
    assert!(page.iter().any(|&b| b != 0), "the first write did not land");
    // The migration ended: deregistered.
    drop(dmr);
    a.post_writes(&smr, &[write(4096)], true, 2).unwrap();
    match wait_send(&a, 1) {
        Err(VerbsError::Completion {
            wr_id: 2, status, ..
        }) => {
            println!("old key refused after deregistration: {status}")
        }
        other => panic!("a WRITE with an old key did not fail: {other:?}"),
    }
    dst.regions()[0].read_bytes(4096, &mut page);
    assert!(page.iter().all(|&b| b == 0), "an old key wrote memory");
}

/// Two queue pairs connected to each other, the first letting its peer do
/// `ra`, the second `rb`.
fn pair_with(dev: &Device, ra: Remote, rb: Remote) -> (QueuePair, QueuePair) {
    let mut a = dev.queue_pair(16, 16, ra).unwrap();
    let mut b = dev.queue_pair(16, 16, rb).unwrap();
    let (ea, eb) = (a.local, b.local);
    a.connect_with_reads(&eb, 1).unwrap();
    b.connect_with_reads(&ea, 1).unwrap();
    (a, b)
}

/// A queue pair lets its peer do its role's operation and nothing else,
/// whatever a registration allows: a destination's (remote write) takes
/// WRITEs but no READ, even of memory registered for reading; a source's
/// data queue pair (nothing remote) takes no WRITE; only a post-copy
/// responder (remote read) takes READs. Each refusal is a typed completion
/// error, and the memory is untouched.
#[test]
fn queue_pairs_allow_their_peer_only_their_role() {
    let Some(dev) = device_or_skip("queue_pairs_allow_their_peer_only_their_role") else {
        return;
    };
    let (readable, writable, local) = (memory(), memory(), memory());
    fill_memory(&readable, PageMix::ALL_RANDOM, 8).unwrap();
    fill_memory(&local, PageMix::ALL_RANDOM, 9).unwrap();
    let rmr = dev.register_for(&readable, Remote::Read).unwrap();
    let wmr = dev.register_for(&writable, Remote::Write).unwrap();
    let lmr = dev.register(&local, false).unwrap();
    let (r, w) = (rmr.remote(0), wmr.remote(0));
    let write = |page: u64| WriteRequest {
        region: 0,
        offset: page * 4096,
        len: 4096,
        remote_addr: w.addr + page * 4096,
        rkey: w.rkey,
    };
    let mut page = vec![0u8; 4096];
    // Through a destination's queue pair: WRITE yes...
    let (mut src, _dst) = pair_with(&dev, Remote::None, Remote::Write);
    src.post_writes(&lmr, &[write(0)], true, 1).unwrap();
    wait_send(&src, 1).unwrap();
    writable.regions()[0].read_bytes(0, &mut page);
    assert!(page.iter().any(|&b| b != 0), "the WRITE did not land");
    // ... READ no, though the key's registration allows reading.
    let (mut src, _dst) = pair_with(&dev, Remote::None, Remote::Write);
    src.post_read(&lmr, (0, 0, 4096), (r.addr, r.rkey), 2)
        .unwrap();
    match wait_send(&src, 1) {
        Err(VerbsError::Completion {
            wr_id: 2, status, ..
        }) => {
            println!("READ through a write-only queue pair refused: {status}")
        }
        other => panic!("a READ through a destination's queue pair did not fail: {other:?}"),
    }
    // Into a source's queue pair, which takes nothing: no WRITE.
    let (_src, mut dst) = pair_with(&dev, Remote::None, Remote::None);
    dst.post_writes(&lmr, &[write(1)], true, 3).unwrap();
    match wait_send(&dst, 1) {
        Err(VerbsError::Completion {
            wr_id: 3, status, ..
        }) => {
            println!("WRITE into a send-only queue pair refused: {status}")
        }
        other => panic!("a WRITE into a source's queue pair did not fail: {other:?}"),
    }
    writable.regions()[0].read_bytes(4096, &mut page);
    assert!(page.iter().all(|&b| b == 0), "a refused WRITE wrote memory");
    // A post-copy responder takes READs.
    let (mut reader, _responder) = pair_with(&dev, Remote::None, Remote::Read);
    reader
        .post_read(&lmr, (0, 8192, 4096), (r.addr, r.rkey), 4)
        .unwrap();
    wait_send(&reader, 1).unwrap();
    let mut expect = vec![0u8; 4096];
    readable.regions()[0].read_bytes(0, &mut expect);
    local.regions()[0].read_bytes(8192, &mut page);
    assert_eq!(page, expect, "the READ did not bring the page");
}

/// Every queue pair starts at a random packet sequence number (24 bits):
/// the numbers of queue pairs made one after the other share no pattern.
/// (Derived from the process and the queue pair number, as before, they
/// differed only in their low bits.)
#[test]
fn queue_pairs_start_at_random_sequence_numbers() {
    let Some(dev) = device_or_skip("queue_pairs_start_at_random_sequence_numbers") else {
        return;
    };
    let psns: Vec<u32> = (0..8)
        .map(|_| dev.queue_pair(1, 1, Remote::None).unwrap().local.psn)
        .collect();
    assert!(psns.iter().all(|&p| p <= 0xff_ffff), "{psns:?}");
    // Random: the chance that 8 share their top 12 bits is 2^-84.
    let high: std::collections::HashSet<u32> = psns.iter().map(|p| p >> 12).collect();
    assert!(
        high.len() > 1,
        "sequence numbers share their high bits: {psns:x?}"
    );
}
