//! The RDMA transport passes the shared transport suite over real SoftRoCE
//! verbs (inside the VM: `scripts/test-rdma.sh`), byte for byte; and falls
//! back to TCP, saying why, when either side has no RDMA device.

use std::time::Duration;

use fixtures::transport_suite::{Scenario, TransportPair, kill_slot, run};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_rdma::verbs::device_names;
use transport_rdma::{RdmaConfig, RdmaDestination, RdmaMigrationListener, RdmaSource};
use transport_tcp::TcpConfig;

fn available() -> Result<(), String> {
    if device_names().is_empty() {
        if std::env::var_os("MIGRATE_REQUIRE_RDMA").is_some() {
            panic!("no RDMA device, but MIGRATE_REQUIRE_RDMA is set");
        }
        return Err("no RDMA device here (run scripts/test-rdma.sh)".into());
    }
    Ok(())
}

fn cfg(qps: u16, require: bool) -> RdmaConfig {
    RdmaConfig {
        tcp: TcpConfig {
            io_timeout: Duration::from_secs(20),
            ..TcpConfig::default()
        },
        queue_pairs: qps,
        require,
        // The suite's post-copy test reads faulted pages by RDMA READ.
        postcopy_reads: true,
        ..RdmaConfig::default()
    }
}

fn pair_with(src: RdmaConfig, dst: RdmaConfig) -> TransportPair {
    let listener = RdmaMigrationListener::bind("127.0.0.1:0", dst).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move || {
            Ok(Box::new(RdmaSource::connect(&addr, src)?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d: RdmaDestination = listener.accept()?;
            let k = d.kill_switch();
            *slot.lock().unwrap() = Some(Box::new(move || k.kill()));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
}

fn rdma_pair() -> TransportPair {
    pair_with(cfg(1, true), cfg(1, true))
}

mod one_qp {
    use super::*;
    fixtures::transport_suite!(rdma_pair, available = available);
}

fn two_qps() -> TransportPair {
    pair_with(cfg(2, true), cfg(2, true))
}

#[test]
fn pages_travel_by_rdma_over_two_queue_pairs() {
    if let Err(reason) = available() {
        fixtures::skip(
            "pages_travel_by_rdma_over_two_queue_pairs",
            fixtures::Need::Rdma,
            &reason,
        );
        return;
    }
    let o = run(two_qps, Scenario::default());
    let s = o.assert_migrated();
    assert_eq!(s.transport, "rdma");
    assert!(
        s.zero_pages > 0,
        "zero pages were written instead of zeroed"
    );
    o.source_vm.stop();
}

/// The VMM discards guest pages (a balloon inflating) while the source's
/// memory is registered for RDMA: the NIC reads the pinned pages, which
/// keep their old bytes while the guest goes on in new ones. The
/// migration fails with its own error at the next harvest, and the source
/// guest runs on (QEMU forbids discards under RDMA instead).
#[test]
fn a_discard_under_rdma_fails_the_migration_and_the_source_runs_on() {
    use migrate_core::MigrationError;
    use migrate_core::dirty::TrackerPreference;
    if let Err(reason) = available() {
        fixtures::skip(
            "a_discard_under_rdma_fails_the_migration_and_the_source_runs_on",
            fixtures::Need::Rdma,
            &reason,
        );
        return;
    }
    let o = run(
        rdma_pair,
        Scenario::balloon_while_dirtying(TrackerPreference::Best),
    );
    let e = o.assert_failed_and_source_runs();
    assert!(
        matches!(e, MigrationError::DiscardedWhilePinned { pages } if *pages > 0),
        "{e}"
    );
    o.source_vm.stop();
}

fn source_without_device() -> TransportPair {
    let src = RdmaConfig {
        device: Some("no-such-device".into()),
        ..cfg(1, false)
    };
    pair_with(src, cfg(1, false))
}

/// Outside the VM (no device anywhere) and inside it (the source pretends to
/// have none): auto mode migrates over TCP, verified, and says why.
#[test]
fn auto_falls_back_to_tcp_without_a_source_device() {
    let o = run(source_without_device, Scenario::default());
    let s = o.assert_migrated();
    assert_eq!(s.transport, "tcp");
    o.source_vm.stop();
}

fn destination_without_device() -> TransportPair {
    let dst = RdmaConfig {
        device: Some("no-such-device".into()),
        ..cfg(1, false)
    };
    pair_with(cfg(1, false), dst)
}

#[test]
fn auto_falls_back_to_tcp_when_the_destination_has_no_device() {
    if let Err(reason) = available() {
        fixtures::skip(
            "auto_falls_back_to_tcp_when_the_destination_has_no_device",
            fixtures::Need::Rdma,
            &reason,
        );
        return;
    }
    let o = run(destination_without_device, Scenario::default());
    let s = o.assert_migrated();
    assert_eq!(
        s.transport, "tcp",
        "the destination has no device: pages must go over TCP"
    );
    o.source_vm.stop();
}

#[test]
fn required_rdma_without_a_device_is_a_clear_error() {
    let l = RdmaMigrationListener::bind("127.0.0.1:0", cfg(1, false)).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let src = RdmaConfig {
        device: Some("no-such-device".into()),
        ..cfg(1, true)
    };
    let accept = std::thread::spawn(move || l.accept().map(|_| ()));
    let err = RdmaSource::connect(&addr, src).unwrap_err();
    assert!(err.to_string().contains("no RDMA device"), "{err}");
    let _ = accept.join();
}
