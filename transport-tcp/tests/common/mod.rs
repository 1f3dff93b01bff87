//! Proxies that read the migration's frames between a real source and a
//! real destination (plaintext TCP), for the tests that fault one
//! connection of a migration at a frame boundary.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use fixtures::transport_suite::{TransportPair, kill_slot};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_tcp::{KillSwitch, TcpConfig, TcpMigrationListener, TcpSource};

/// One frame's 16-byte header (kind at 0, payload length at 4..8) and
/// payload.
pub type Frame = ([u8; 16], Vec<u8>);

/// Read one frame from `from`.
pub fn read_frame(from: &mut TcpStream) -> Option<Frame> {
    let mut h = [0u8; 16];
    from.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

/// Write frame `f` to `to`.
pub fn write_frame(to: &mut TcpStream, f: &Frame) -> Option<()> {
    to.write_all(&f.0).ok()?;
    to.write_all(&f.1).ok()
}

/// Read one frame from `from` and forward it to `to`.
pub fn forward_frame(from: &mut TcpStream, to: &mut TcpStream) -> Option<Frame> {
    let f = read_frame(from)?;
    write_frame(to, &f)?;
    Some(f)
}

/// A plaintext TCP proxy to `upstream`: each connection's preamble passes,
/// then its first frame (a `Join` or a `Hello`) goes to `first` with the
/// client and server ends and `upstream`; `first` forwards it or not and
/// says whether the rest of the client's bytes pass as they are. The
/// server's bytes always pass.
pub fn frame_proxy(
    upstream: String,
    first: fn(&str, &mut TcpStream, &mut TcpStream, Frame) -> bool,
) -> String {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in proxy.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                return;
            };
            let upstream = upstream.clone();
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
                let Some(frame) = read_frame(&mut client) else {
                    return;
                };
                if first(&upstream, &mut client, &mut server, frame) {
                    let _ = std::io::copy(&mut client, &mut server);
                    let _ = server.shutdown(Shutdown::Write);
                }
            });
        }
    });
    addr
}

/// Plaintext TCP with `io_timeout` on both ends, the source connecting
/// through `proxy` (given the destination's address, it returns its own).
pub fn pair_through(proxy: fn(String) -> String, io_timeout: Duration) -> TransportPair {
    let cfg = TcpConfig {
        io_timeout,
        ..TcpConfig::default()
    };
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let addr = proxy(listener.local_addr().unwrap().to_string());
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
