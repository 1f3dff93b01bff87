//! The TCP transport passes the shared transport suite over real loopback
//! sockets, byte for byte.

use fixtures::transport_suite::{TransportPair, kill_slot};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_tcp::{KillSwitch, TcpConfig, TcpMigrationListener, TcpSource};

fn cfg() -> TcpConfig {
    TcpConfig {
        io_timeout: std::time::Duration::from_secs(10),
        ..TcpConfig::default()
    }
}

fn tcp_pair_with(cfg: TcpConfig) -> TransportPair {
    tcp_pair_of(cfg.clone(), cfg)
}

/// A pair whose ends have their own configuration (their own credentials).
fn tcp_pair_of(source_cfg: TcpConfig, cfg: TcpConfig) -> TransportPair {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move || {
            Ok(Box::new(TcpSource::connect(&addr, source_cfg)?) as Box<dyn SourceTransport>)
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

fn tcp_pair() -> TransportPair {
    tcp_pair_with(cfg())
}

mod plain {
    use super::*;
    fixtures::transport_suite!(tcp_pair);
}

mod one_stream_zstd {
    use super::*;
    fn pair() -> TransportPair {
        tcp_pair_with(TcpConfig {
            data_streams: 1,
            compress: true,
            ..cfg()
        })
    }
    fixtures::transport_suite!(pair);
}

/// The same suite with mutual TLS (certificates from one CA) on every
/// connection.
mod mutual_tls {
    use super::*;
    use transport_tcp::TlsConfig;
    use transport_tcp::pki::write_test_pki;

    fn pair() -> TransportPair {
        let dir = fixtures::scratch_dir("tls-conformance");
        write_test_pki(&dir, &["localhost".into()], &["source".into()], true).unwrap();
        let dest = TcpConfig {
            tls: Some(TlsConfig::destination_from_dir(&dir, &["source".into()]).unwrap()),
            ..cfg()
        };
        let source = TcpConfig {
            tls: Some(TlsConfig::source_from_dir(&dir, "localhost").unwrap()),
            ..cfg()
        };
        let _ = std::fs::remove_dir_all(&dir);
        tcp_pair_of(source, dest)
    }
    fixtures::transport_suite!(pair);
}

/// The same suite with a pre-shared key instead of certificates.
mod psk {
    use super::*;
    use transport_tcp::TlsConfig;

    pub(super) fn pair() -> TransportPair {
        let key = b"0123456789abcdef0123456789abcdef-conformance".to_vec();
        let dest = TcpConfig {
            tls: Some(TlsConfig::destination_psk(key.clone()).unwrap()),
            ..cfg()
        };
        let source = TcpConfig {
            tls: Some(TlsConfig::source_psk(key).unwrap()),
            ..cfg()
        };
        tcp_pair_of(source, dest)
    }
    fixtures::transport_suite!(pair);
}

/// Over TLS a page batch carries no page hashes (the records' AEAD
/// authenticates every byte): an idle random guest moves less than its
/// page bytes plus 8 bytes a page, which plaintext moves at least, and
/// arrives byte for byte either way.
#[test]
fn tls_batches_leave_out_the_page_hashes() {
    use fixtures::image::PageMix;
    use fixtures::transport_suite::{Scenario, run};
    let moved = |factory: fixtures::transport_suite::PairFactory| {
        let o = run(
            factory,
            Scenario {
                mib: 4,
                mix: PageMix::ALL_RANDOM,
                ..Scenario::default()
            },
        );
        let s = o.assert_migrated();
        let (bytes, pages) = (s.bytes_transferred, s.normal_pages);
        o.source_vm.stop();
        (bytes, pages)
    };
    let (plain, pages) = moved(tcp_pair);
    assert_eq!(pages, 1024, "every page of 4 MiB is sent once");
    assert!(plain >= pages * (4096 + 8), "plaintext: {plain} bytes");
    let (sealed, _) = moved(psk::pair);
    assert!(sealed < pages * (4096 + 8), "TLS: {sealed} bytes");
}

/// A balloon inflates while the migration runs, after round 0 sent every
/// page (every 16th page of both regions, anonymous and memfd, discarded:
/// zeros from then on), and the guest writes again to every 64th while a
/// workload out-dirties the link: the destination ends equal to the paused
/// source, page for page, the discarded pages as zeros.
#[test]
fn pages_discarded_during_the_migration_arrive_as_zeros() {
    discarded_pages_arrive_as_zeros(migrate_core::dirty::TrackerPreference::Best);
}

/// The same with the fallback tracker of kernels before 6.7 (uffd-sync),
/// whose fault handler also reads the removal events.
#[test]
fn pages_discarded_during_the_migration_arrive_as_zeros_under_uffd_sync() {
    use migrate_core::dirty::{TrackerKind, TrackerPreference};
    discarded_pages_arrive_as_zeros(TrackerPreference::Only(TrackerKind::UffdSync));
}

fn discarded_pages_arrive_as_zeros(tracker: migrate_core::dirty::TrackerPreference) {
    use fixtures::transport_suite::{Scenario, run};
    let o = run(tcp_pair, Scenario::balloon_while_dirtying(tracker));
    let s = o.assert_migrated();
    assert!(s.precopy.rounds >= 3, "{} rounds", s.precopy.rounds);
    o.source_vm.stop();
}

/// A pre-shared-key pair whose ends use the kernel's TLS as `S` and `D`
/// say (0 off, 1 on).
fn kernel_tls_pair<const S: u8, const D: u8>() -> TransportPair {
    use transport_tcp::{KernelTls, TlsConfig};
    let mode = |m| {
        if m == 1 {
            KernelTls::On
        } else {
            KernelTls::Off
        }
    };
    let key = b"0123456789abcdef0123456789abcdef-kernel-tls".to_vec();
    let dest = TcpConfig {
        tls: Some(
            TlsConfig::destination_psk(key.clone())
                .unwrap()
                .with_kernel_tls(mode(D)),
        ),
        ..cfg()
    };
    let source = TcpConfig {
        tls: Some(TlsConfig::source_psk(key).unwrap().with_kernel_tls(mode(S))),
        ..cfg()
    };
    tcp_pair_of(source, dest)
}

/// Where the kernel has TLS (the SoftRoCE VM's Linux 6.1 does; this host
/// does not): a guest written while it moves arrives byte for byte with
/// the kernel sealing and opening at both ends, and with the kernel at one
/// end and this crate at the other, either way round.
#[test]
fn kernel_tls_moves_a_guest_byte_for_byte() {
    use fixtures::transport_suite::{Scenario, run};
    if let Err(e) = transport_tcp::kernel_tls_support() {
        migrate_core::skip::skip(
            "conformance::kernel_tls_moves_a_guest_byte_for_byte",
            migrate_core::skip::Need::KernelTls,
            &format!("no kernel TLS here: {e}"),
        );
        return;
    }
    let pairs: [(&str, fixtures::transport_suite::PairFactory); 3] = [
        ("kernel to kernel", kernel_tls_pair::<1, 1>),
        ("kernel to this crate", kernel_tls_pair::<1, 0>),
        ("this crate to kernel", kernel_tls_pair::<0, 1>),
    ];
    for (what, factory) in pairs {
        let o = run(
            factory,
            Scenario {
                mib: 8,
                ..Scenario::default()
            },
        );
        let s = o.assert_migrated();
        assert!(s.precopy.rounds >= 1, "{what}");
        o.source_vm.stop();
    }
}
