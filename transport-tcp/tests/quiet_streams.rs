//! A data stream that falls silent between two frames of a round for longer
//! than the I/O timeout, while the control connection's heartbeats go on:
//! what a destination sees when the source spends that long on pages it
//! sends no frame for (a batch of pages the destination already reads as
//! zeros sends none: a mostly-zero guest of a few hundred GiB is minutes of
//! zero tests). Through a real proxy between real TCP ends; memories
//! compared page for page.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{Frame, forward_frame, frame_proxy, pair_through, write_frame};
use fixtures::transport_suite::{Scenario, run};

/// Both ends' I/O timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a data stream stays silent after its first frame.
const QUIET: Duration = Duration::from_millis(2500);

/// Data streams the proxy held silent.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Whether `f` is a data stream's `Join` (kind 5: session u64, then the
/// stream's index u16, not post-copy's `u16::MAX`).
fn data_join(f: &Frame) -> bool {
    f.0[0] == 5 && f.1.get(8..10).is_some_and(|i| i != [0xff, 0xff])
}

/// A plaintext TCP proxy to `upstream` that passes every connection as it
/// is, but holds each data stream silent for [`QUIET`] after its first
/// frame following the join; what the source sends meanwhile is read at
/// once (the source never waits on the proxy) and delivered after.
fn quiet_after_first_frame_proxy(upstream: String) -> String {
    frame_proxy(upstream, |_, client, server, join| {
        if write_frame(server, &join).is_none() {
            return false;
        }
        if !data_join(&join) {
            return true;
        }
        if forward_frame(client, server).is_none() {
            return false;
        }
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let mut from = client.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(QUIET);
        HELD.fetch_add(1, Ordering::SeqCst);
        for chunk in rx {
            if server.write_all(&chunk).is_err() {
                return false;
            }
        }
        let _ = server.shutdown(Shutdown::Write);
        false
    })
}

/// Every data stream silent for 2.5 × the I/O timeout after its first
/// batch of round 0 (a fresh destination, which reads zeros, as the
/// source's frame skipping needs): the round waits for the frames, the
/// migration completes without a reconnection, memories equal. Before,
/// the destination took the silence for a dead source ("read frame
/// header: no progress for 1.0 s"), killed the connections, and the
/// source reconnected into the same silence.
#[test]
fn a_data_stream_silent_between_frames_is_waited_for() {
    let scenario = Scenario {
        fresh_destination: true,
        ..Scenario::default()
    };
    let o = run(
        || pair_through(quiet_after_first_frame_proxy, IO_TIMEOUT),
        scenario,
    );
    let stats = o.assert_migrated();
    assert!(
        HELD.load(Ordering::SeqCst) >= 2,
        "the proxy held {} data streams silent",
        HELD.load(Ordering::SeqCst)
    );
    assert_eq!(stats.reconnects, 0, "{stats:?}");
}
