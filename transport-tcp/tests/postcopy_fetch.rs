//! Post-copy's fetch connection under a fault: cut by a real proxy after
//! it carried some pages, the destination's fault handler asks over the
//! control connection from then on, and the guest still reads only the
//! source's final bytes; memories compared page for page.

mod common;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use migrate_core::protocol::Message;
use migrate_core::protocol::wire::{write_message, write_preamble};

use common::{Frame, forward_frame, frame_proxy, pair_through, write_frame};
use fixtures::transport_suite::{
    TransportPair, assert_destination_read_final_bytes, outdirtying_postcopy_scenario, run,
};

/// Pages the fetch connection carries before the proxy cuts it.
const ANSWERS_BEFORE_CUT: usize = 20;

/// Whether the proxy cut a fetch connection (set by the factory's proxy).
fn cut_flag() -> &'static Arc<AtomicBool> {
    static CUT: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    CUT.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Whether `f` is the `Join` (kind 5: session u64, then the stream's index
/// u16) of post-copy's fetch connection (stream `u16::MAX`); its session.
fn fetch_join(f: &Frame) -> Option<u64> {
    (f.0[0] == 5 && f.1.get(8..10) == Some(&[0xff, 0xff]))
        .then(|| u64::from_le_bytes(f.1[..8].try_into().unwrap()))
}

/// A plaintext TCP proxy to `upstream`: every connection passes as it is,
/// except post-copy's fetch connection, which it cuts both ways, as a
/// broken link would, once the source's answers on it have carried
/// [`ANSWERS_BEFORE_CUT`] frames.
fn fetch_cutting_proxy(upstream: String) -> String {
    frame_proxy(upstream, |_, client, server, join| {
        if write_frame(server, &join).is_none() {
            return false;
        }
        if fetch_join(&join).is_none() {
            return true;
        }
        for _ in 0..ANSWERS_BEFORE_CUT {
            if forward_frame(client, server).is_none() {
                return false;
            }
        }
        cut_flag().store(true, Ordering::SeqCst);
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        false
    })
}

/// Plaintext TCP, the source connecting through the proxy.
fn proxied_pair() -> TransportPair {
    pair_through(fetch_cutting_proxy, Duration::from_secs(10))
}

/// The guest of the transport suite's post-copy test (it out-dirties a
/// 1 MB/s link; its destination reads every page), its fetch connection
/// cut after 20 answers: the migration completes, memories equal, every
/// page the destination's guest read was the source's final one; the
/// fetch connection brought at most those 20 pages and the control
/// connection the rest of the guest's faults, without a reconnection.
#[test]
fn a_cut_fetch_connection_falls_back_to_the_control_connection() {
    let mut o = run(proxied_pair, outdirtying_postcopy_scenario());
    let stats = o.assert_migrated().clone();
    let report = o.destination.as_ref().expect("destination report").clone();
    let (Some(s), Some(d)) = (&stats.postcopy, &report.postcopy) else {
        panic!("no post-copy: {stats:?}");
    };
    assert!(
        cut_flag().load(Ordering::SeqCst),
        "no fetch connection was cut (did one join?): {report:?}"
    );
    let read = d.read_pages.unwrap_or(0);
    assert!(
        read > 0 && read <= ANSWERS_BEFORE_CUT as u64,
        "{read} pages came on the fetch connection, which carried {ANSWERS_BEFORE_CUT} \
         answers: {report:?}"
    );
    assert!(
        s.demand_pages > read,
        "no fault asked over the control connection after the cut: {stats:?}"
    );
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert_destination_read_final_bytes(&mut o);
    o.source_vm.stop();
}

/// Whether a stranger's join as the fetch connection was dropped by the
/// destination (set by the stranger proxy).
fn stranger_dropped() -> &'static Arc<AtomicBool> {
    static DROPPED: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    DROPPED.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// A plaintext TCP proxy to `upstream` that passes every connection as it
/// is, but holds back the source's fetch-connection join while a stranger,
/// first, joins the destination as the fetch connection of another session
/// (the real session's id with one bit flipped); it records whether the
/// destination closed the stranger's connection without a word of page
/// data, then lets the real join go.
fn stranger_first_proxy(upstream: String) -> String {
    frame_proxy(upstream, |upstream, _, server, join| {
        if let Some(session) = fetch_join(&join) {
            let dropped = stranger_joins(upstream, session ^ 1);
            stranger_dropped().store(dropped, Ordering::SeqCst);
        }
        write_frame(server, &join).is_some()
    })
}

/// Join `upstream` as the fetch connection of `session`; whether the destination closed the connection within 5 s having
/// sent nothing but its preamble.
fn stranger_joins(upstream: &str, session: u64) -> bool {
    let Ok(mut s) = TcpStream::connect(upstream) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if write_preamble(&mut s).is_err() {
        return false;
    }
    let _ = write_message(
        &mut s,
        &Message::Join {
            session,
            index: u16::MAX,
        },
    );
    let mut got = Vec::new();
    // EOF (or a reset) in time; the destination's preamble may come first.
    match s.read_to_end(&mut got) {
        Ok(_) => got.len() <= 8,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset && got.len() <= 8,
    }
}

/// A stranger joins the destination as post-copy's fetch connection of
/// another session just before the source's own fetch connection does:
/// the destination closes the stranger's connection without a byte of
/// guest memory, the source's fetch connection joins after it and carries
/// the guest's faults (pages got by the fault handler), and the migration
/// completes with memories equal and every page the destination's guest
/// read the source's final one.
#[test]
fn a_strangers_fetch_join_is_dropped_and_the_real_one_serves() {
    let mut o = run(
        || pair_through(stranger_first_proxy, Duration::from_secs(10)),
        outdirtying_postcopy_scenario(),
    );
    let stats = o.assert_migrated().clone();
    let report = o.destination.as_ref().expect("destination report").clone();
    assert!(stats.postcopy.is_some(), "no post-copy: {stats:?}");
    assert!(
        stranger_dropped().load(Ordering::SeqCst),
        "the stranger's fetch join was not closed at once (or no fetch connection joined)"
    );
    let read = report
        .postcopy
        .as_ref()
        .and_then(|p| p.read_pages)
        .unwrap_or(0);
    assert!(
        read > 0,
        "no page came over the source's fetch connection after the stranger: {report:?}"
    );
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert_destination_read_final_bytes(&mut o);
    o.source_vm.stop();
}
