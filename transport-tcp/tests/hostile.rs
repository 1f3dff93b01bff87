//! Bad input and faults on real sockets: stray clients, truncated and
//! corrupted frames (through a corrupting TCP proxy), a fake destination.
//! Each ends in a typed error with the source guest running, or, for page
//! bytes corrupted in flight, in pages sent again and identical memories.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fixtures::transport_suite::{Scenario, TransportPair, kill_slot, run};
use migrate_core::protocol::wire::{write_message, write_preamble};
use migrate_core::protocol::{Message, ProtocolError};
use migrate_core::transport::{DestinationTransport, SourceTransport, TransportError};
use migrate_core::{IncomingMigration, MigrationError};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

fn cfg() -> TcpConfig {
    TcpConfig {
        data_streams: 1,
        io_timeout: std::time::Duration::from_secs(5),
        ..TcpConfig::default()
    }
}

#[test]
fn stray_client_is_refused_on_its_first_bytes() {
    let l = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 8];
        let _ = s.read(&mut buf);
    });
    match l.accept() {
        Err(TransportError::Protocol(ProtocolError::BadMagic { found })) => {
            assert_eq!(&found, b"GET / ")
        }
        other => panic!("expected BadMagic, got {other:?}"),
    }
    t.join().unwrap();
}

#[test]
fn truncated_hello_is_a_typed_error() {
    let l = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        write_preamble(&mut s).unwrap();
        let mut frame = Vec::new();
        write_message(
            &mut frame,
            &Message::Hello {
                min_version: 1,
                max_version: 1,
                session: 1,
                data_streams: 1,
                features: 0,
            },
        )
        .unwrap();
        s.write_all(&frame[..frame.len() / 2]).unwrap();
        // Closing mid-frame.
    });
    let mut d = l.accept().unwrap();
    let err = IncomingMigration::accept(&mut d).unwrap_err();
    // The peer vanished mid-frame: truncation or reset, both typed.
    assert!(
        matches!(&err, MigrationError::Transport(t) if t.is_disconnect()),
        "{err}"
    );
    t.join().unwrap();
}

#[test]
fn fake_destination_sending_garbage_fails_the_source_cleanly() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        write_preamble(&mut s).unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        s.write_all(&[9u8; 40]).unwrap();
        let _ = s.read(&mut buf);
    });
    let err = TcpSource::connect(&addr, cfg()).and_then(|mut src| {
        src.control().send(&Message::VerifyRequest)?;
        src.control().recv()
    });
    assert!(matches!(err, Err(TransportError::Protocol(_))), "{err:?}");
    t.join().unwrap();
}

/// A TCP proxy that flips one byte, at `offset` of the client→server bytes
/// of its `conn`-th connection (0 = control, 1 = first data stream).
fn corrupting_pair(conn: usize, offset: usize) -> TransportPair {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let upstream = listener.local_addr().unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in proxy.incoming() {
            let Ok(client) = client else { return };
            let i = count.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            let flip = (i == conn).then_some(offset);
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                flip,
            );
            pump(server, client, None);
        }
    });
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move |_| {
            Ok(Box::new(TcpSource::connect(&proxy_addr, cfg())?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d = listener.accept()?;
            let k = d.kill_switch();
            *slot.lock().unwrap() = Some(Box::new(move || k.kill()));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<usize>) {
    std::thread::spawn(move || {
        let mut seen = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(at) = flip
                && (seen..seen + n).contains(&at)
            {
                buf[at - seen] ^= 0x40;
            }
            seen += n;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

fn page_bytes_corrupted() -> TransportPair {
    // Deep inside round 0's page bytes on the only data stream.
    corrupting_pair(1, 3_000_000)
}

#[test]
fn corrupted_page_bytes_are_sent_again() {
    let o = run(page_bytes_corrupted, Scenario::default());
    let s = o.assert_migrated();
    assert!(s.resent_pages >= 1, "the corrupted page was not sent again");
    assert!(o.destination.as_ref().unwrap().suspect_pages >= 1);
    o.source_vm.stop();
}

fn control_corrupted() -> TransportPair {
    // Inside the Hello frame (after the 8-byte preamble).
    corrupting_pair(0, 8 + 20)
}

#[test]
fn corrupted_control_frame_fails_with_the_source_running() {
    let o = run(control_corrupted, Scenario::default());
    o.assert_failed_and_source_runs();
    match &o.destination {
        Err(MigrationError::Transport(TransportError::Protocol(ProtocolError::Corrupt {
            ..
        }))) => {}
        other => panic!(
            "destination should see a corrupt frame, got {:?}",
            other.as_ref().err()
        ),
    }
    assert!(
        o.source_vm.history.is_empty(),
        "guest paused for a migration that never started"
    );
    o.source_vm.stop();
}
