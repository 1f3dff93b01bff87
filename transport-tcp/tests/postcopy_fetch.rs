//! Post-copy's fetch connection under a fault: cut by a real proxy after
//! it carried some pages, the destination's fault handler asks over the
//! control connection from then on, and the guest still reads only the
//! source's final bytes; memories compared page for page.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fixtures::transport_suite::{
    TransportPair, assert_destination_read_final_bytes, kill_slot, outdirtying_postcopy_scenario,
    run,
};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_tcp::{KillSwitch, TcpConfig, TcpMigrationListener, TcpSource};

/// Pages the fetch connection carries before the proxy cuts it.
const ANSWERS_BEFORE_CUT: usize = 20;

/// Whether the proxy cut a fetch connection (set by the factory's proxy).
fn cut_flag() -> &'static Arc<AtomicBool> {
    static CUT: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    CUT.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Read one frame (16-byte header: kind at 0, payload length at 4..8)
/// from `from`, forward it to `to`; its kind and payload.
fn forward_frame(from: &mut TcpStream, to: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 16];
    from.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).ok()?;
    to.write_all(&h).ok()?;
    to.write_all(&payload).ok()?;
    Some((h[0], payload))
}

/// A plaintext TCP proxy to `upstream`: every connection passes as it is,
/// except post-copy's fetch connection (its `Join` names stream
/// `u16::MAX`), which it cuts both ways, as a broken link would, once the
/// source's answers on it have carried [`ANSWERS_BEFORE_CUT`] frames.
fn fetch_cutting_proxy(upstream: String) -> String {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in proxy.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                return;
            };
            std::thread::spawn(move || {
                // The destination's preamble must reach the source before
                // the source says more than its own.
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
                let mut preamble = [0u8; 8];
                if client.read_exact(&mut preamble).is_err() || server.write_all(&preamble).is_err()
                {
                    return;
                }
                let Some((kind, join)) = forward_frame(&mut client, &mut server) else {
                    return;
                };
                // Join = 5: session u64, then the stream's index u16.
                if kind == 5 && join.get(8..10) == Some(&[0xff, 0xff]) {
                    for _ in 0..ANSWERS_BEFORE_CUT {
                        if forward_frame(&mut client, &mut server).is_none() {
                            return;
                        }
                    }
                    cut_flag().store(true, Ordering::SeqCst);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    return;
                }
                let _ = std::io::copy(&mut client, &mut server);
                let _ = server.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Plaintext TCP, the source connecting through the proxy.
fn proxied_pair() -> TransportPair {
    let cfg = TcpConfig {
        io_timeout: Duration::from_secs(10),
        ..TcpConfig::default()
    };
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let addr = fetch_cutting_proxy(listener.local_addr().unwrap().to_string());
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move || {
            Ok(Box::new(TcpSource::connect(&addr, cfg)?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d = listener.accept()?;
            let k: KillSwitch = d.kill_switch();
            *slot.lock().unwrap() = Some(Box::new(move || k.kill()));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
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
