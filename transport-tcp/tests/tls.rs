//! Only the right peer: each way a stranger can try to be the source or the
//! destination is refused during the TLS handshake, before any byte of the
//! migration (not even its preamble) crosses, over real loopback sockets.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use migrate_core::protocol::wire::write_preamble;
use migrate_core::transport::TransportError;
use transport_tcp::pki::{Leaf, TestCa, write_test_pki};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource, TlsConfig, TlsError};

fn cfg(tls: Option<TlsConfig>) -> TcpConfig {
    TcpConfig {
        io_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        tls,
        ..TcpConfig::default()
    }
}

/// A directory with both ends' files from one fresh CA.
fn pki(server: &str, client: &str) -> PathBuf {
    let dir = fixtures::scratch_dir("tls-test");
    write_test_pki(&dir, &[server.into()], &[client.into()], false).unwrap();
    dir
}

fn source_tls(dir: &Path, name: &str) -> Option<TlsConfig> {
    Some(TlsConfig::source_from_dir(dir, name).unwrap())
}

fn dest_tls(dir: &Path, allowed: &[&str]) -> Option<TlsConfig> {
    let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
    Some(TlsConfig::destination_from_dir(dir, &allowed).unwrap())
}

/// Run a destination's `accept` and a source's `connect` against each
/// other; both results.
fn meet(
    dest: TcpConfig,
    source: TcpConfig,
) -> (Result<(), TransportError>, Result<(), TransportError>) {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", dest).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let d = std::thread::spawn(move || listener.accept().map(drop));
    let s = TcpSource::connect(&addr, source).map(drop);
    (d.join().unwrap(), s)
}

fn auth_detail(r: &Result<(), TransportError>) -> String {
    match r {
        Err(TransportError::Auth { detail }) => detail.clone(),
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[test]
fn the_right_peers_meet() {
    let dir = pki("localhost", "source-a");
    let (d, s) = meet(
        cfg(dest_tls(&dir, &["source-a"])),
        cfg(source_tls(&dir, "localhost")),
    );
    d.unwrap();
    s.unwrap();
}

/// A plaintext source is told, in its own protocol, that authentication is
/// required (and nothing else), and the destination's accept fails.
#[test]
fn a_plaintext_source_is_refused() {
    use migrate_core::protocol::{Message, RefusalCode};
    use migrate_core::transport::SourceTransport;
    let dir = pki("localhost", "source-a");
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg(dest_tls(&dir, &[]))).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let d = std::thread::spawn(move || listener.accept().map(drop));
    let mut s = TcpSource::connect(&addr, cfg(None)).unwrap();
    match s.control().recv() {
        Ok(Message::Refused {
            code: RefusalCode::Auth,
            message,
        }) => assert!(message.contains("--tls-dir"), "{message}"),
        other => panic!("expected Refused(Auth), got {other:?}"),
    }
    let d = d.join().unwrap();
    assert!(auth_detail(&d).contains("source without TLS"), "{d:?}");
}

#[test]
fn a_source_from_another_ca_is_refused() {
    let dir = pki("localhost", "source-a");
    let other = pki("localhost", "source-a");
    let (d, s) = meet(
        cfg(dest_tls(&dir, &[])),
        cfg(source_tls(&dir_with_ca_of(&dir, &other), "localhost")),
    );
    let detail = auth_detail(&d);
    assert!(detail.contains("certificate is not accepted"), "{detail}");
    let detail = auth_detail(&s);
    assert!(
        detail.contains("refused this end's TLS credentials"),
        "{detail}"
    );
}

/// `client` files from `other`'s CA, the CA certificate (to check the
/// destination) from `dir`'s.
fn dir_with_ca_of(dir: &Path, other: &Path) -> PathBuf {
    let mixed = fixtures::scratch_dir("tls-mixed");
    std::fs::copy(dir.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), mixed.join(f)).unwrap();
    }
    mixed
}

#[test]
fn an_expired_source_certificate_is_refused() {
    let dir = fixtures::scratch_dir("tls-expired");
    let ca = TestCa::new("test CA").unwrap();
    ca.write_ca(&dir).unwrap();
    ca.issue(&dir, Leaf::Server, &["localhost".into()], false)
        .unwrap();
    ca.issue(&dir, Leaf::Client, &["source-a".into()], true)
        .unwrap();
    let (d, s) = meet(cfg(dest_tls(&dir, &[])), cfg(source_tls(&dir, "localhost")));
    let detail = auth_detail(&d);
    assert!(detail.contains("expired"), "{detail}");
    assert!(s.is_err());
}

#[test]
fn a_source_not_on_the_allow_list_is_refused() {
    let dir = pki("localhost", "intruder");
    let (d, s) = meet(
        cfg(dest_tls(&dir, &["source-a", "source-b"])),
        cfg(source_tls(&dir, "localhost")),
    );
    let detail = auth_detail(&d);
    assert!(detail.contains("none of the allowed clients"), "{detail}");
    assert!(s.is_err());
}

#[test]
fn a_destination_with_the_wrong_name_is_refused() {
    let dir = pki("dest-a.example", "source-a");
    let (_d, s) = meet(
        cfg(dest_tls(&dir, &[])),
        cfg(source_tls(&dir, "dest-b.example")),
    );
    let detail = auth_detail(&s);
    assert!(
        detail.contains("destination's certificate is not accepted"),
        "{detail}"
    );
}

#[test]
fn a_destination_from_another_ca_is_refused() {
    let dir = pki("localhost", "source-a");
    let fake = pki("localhost", "source-a");
    let (_d, s) = meet(
        cfg(dest_tls(&fake, &[])),
        cfg(source_tls(&dir, "localhost")),
    );
    let detail = auth_detail(&s);
    // Both test CAs carry the same name: the signature does not verify.
    assert!(
        detail.contains("destination's certificate is not accepted"),
        "{detail}"
    );
}

/// A fake destination that speaks the plaintext protocol (it sends our
/// preamble at once) gets a TLS ClientHello and nothing else: no preamble,
/// no Hello, no page.
#[test]
fn a_plaintext_destination_receives_nothing_of_the_migration() {
    let dir = pki("localhost", "source-a");
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let heard = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut greeting = Vec::new();
        write_preamble(&mut greeting).unwrap();
        std::io::Write::write_all(&mut s, &greeting).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        all
    });
    let s = TcpSource::connect(&addr, cfg(source_tls(&dir, "localhost"))).map(drop);
    assert!(auth_detail(&s).contains("does not speak TLS"), "{s:?}");
    let heard = heard.join().unwrap();
    assert_eq!(heard.first(), Some(&0x16), "not a TLS handshake record");
    let mut preamble = Vec::new();
    write_preamble(&mut preamble).unwrap();
    assert!(
        !heard.windows(4).any(|w| w == &preamble[..4]),
        "the migration's preamble crossed in the clear"
    );
}

#[test]
fn psk_peers_meet_and_a_wrong_key_is_refused_both_ways() {
    let key = b"an-example-of-a-random-key-of-40-bytes!!".to_vec();
    let other = b"another-random-key-of-forty-bytes-here!!".to_vec();
    let psk_dest = |k: &[u8]| cfg(Some(TlsConfig::destination_psk(k.to_vec()).unwrap()));
    let psk_source = |k: &[u8]| cfg(Some(TlsConfig::source_psk(k.to_vec()).unwrap()));
    let (d, s) = meet(psk_dest(&key), psk_source(&key));
    d.unwrap();
    s.unwrap();
    let (d, s) = meet(psk_dest(&key), psk_source(&other));
    assert!(auth_detail(&d).contains("source does not hold the pre-shared key"));
    assert!(auth_detail(&s).contains("destination"), "{s:?}");
    // A certificate-holding source is no PSK peer either.
    let dir = pki("localhost", "source-a");
    let (d, _s) = meet(psk_dest(&key), cfg(source_tls(&dir, "localhost")));
    assert!(d.is_err());
}

#[test]
fn credential_files_are_checked_before_anything_starts() {
    let empty = fixtures::scratch_dir("tls-empty");
    match TlsConfig::source_from_dir(&empty, "localhost") {
        Err(TlsError::Read { path, .. }) => assert!(path.ends_with("ca-cert.pem")),
        other => panic!("{other:?}"),
    }
    let dir = pki("localhost", "source-a");
    std::fs::write(dir.join("server-key.pem"), "not a key").unwrap();
    assert!(matches!(
        TlsConfig::destination_from_dir(&dir, &[]),
        Err(TlsError::Pem { .. })
    ));
    // A key that is not the certificate's.
    let other = pki("localhost", "source-a");
    std::fs::copy(other.join("client-key.pem"), dir.join("client-key.pem")).unwrap();
    assert!(TlsConfig::source_from_dir(&dir, "localhost").is_err());
    let short = empty.join("psk");
    write_private(&short, "password\n");
    assert!(matches!(
        TlsConfig::read_psk(&short),
        Err(TlsError::WeakKey { len: 6, .. })
    ));
    assert!(matches!(
        TlsConfig::source_from_dir(&dir, "not a name!"),
        Err(TlsError::Setup(_)) | Err(TlsError::Pem { .. })
    ));
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_psk_file_must_be_private_and_a_key_not_a_password() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("psk-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    // 32 random bytes as base64, as the README makes one.
    let b64 = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    write_private(&path, &format!("{b64}\n"));
    assert_eq!(TlsConfig::read_psk(&path).unwrap().len(), 32);
    // Unpadded base64 and hex say the same key.
    write_private(&path, b64.trim_end_matches('='));
    let unpadded = TlsConfig::read_psk(&path).unwrap();
    write_private(
        &path,
        "abcdef1234567890ABCDEF1234567890abcdef1234567890abcdef1234567890",
    );
    assert_eq!(TlsConfig::read_psk(&path).unwrap().len(), 32);
    assert_eq!(unpadded.len(), 32);
    // Readable by the group or by others: refused whatever the key.
    for mode in [0o640, 0o604, 0o644] {
        write_private(&path, b64);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        assert!(
            matches!(TlsConfig::read_psk(&path), Err(TlsError::KeyFileExposed { mode: m, .. }) if m == mode),
            "mode {mode:o}"
        );
    }
    // A 32-character password is no key: not base64 or hex...
    write_private(&path, "correct-horse-battery-staple-123");
    assert!(matches!(
        TlsConfig::read_psk(&path),
        Err(TlsError::KeyEncoding { .. })
    ));
    // ... and 32 characters of base64 are 24 bytes, too few.
    write_private(&path, "Y29ycmVjdGhvcnNlYmF0dGVyeXN0YXBs");
    assert!(matches!(
        TlsConfig::read_psk(&path),
        Err(TlsError::WeakKey { len: 24, .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--tls-allow` names match a certificate's names exactly: a wildcard
/// certificate allows no host, a parent domain no child.
#[test]
fn an_allowed_name_matches_exactly_never_by_wildcard() {
    let dir = fixtures::scratch_dir("tls-exact");
    let ca = TestCa::new("test CA").unwrap();
    ca.write_ca(&dir).unwrap();
    ca.issue(&dir, Leaf::Server, &["localhost".into()], false)
        .unwrap();
    ca.issue(&dir, Leaf::Client, &["*.corp.example".into()], false)
        .unwrap();
    let (d, s) = meet(
        cfg(dest_tls(&dir, &["src-host.corp.example"])),
        cfg(source_tls(&dir, "localhost")),
    );
    let detail = auth_detail(&d);
    assert!(
        detail.contains("names none of the allowed clients"),
        "{detail}"
    );
    assert!(s.is_err());
    ca.issue(
        &dir,
        Leaf::Client,
        &["src-host.corp.example".into(), "10.1.2.3".into()],
        false,
    )
    .unwrap();
    for (allowed, ok) in [
        ("SRC-HOST.corp.example", true),
        ("10.1.2.3", true),
        ("corp.example", false),
        ("10.1.2.4", false),
    ] {
        let (d, s) = meet(
            cfg(dest_tls(&dir, &[allowed])),
            cfg(source_tls(&dir, "localhost")),
        );
        assert_eq!(d.is_ok(), ok, "{allowed}: {d:?}");
        assert_eq!(s.is_ok(), ok, "{allowed}: {s:?}");
    }
}

/// A `ca-crl.pem` beside the CA (QEMU's name) revokes: a revoked source is
/// refused by the destination, a revoked destination by the source.
#[test]
fn a_revoked_certificate_is_refused() {
    let dir = fixtures::scratch_dir("tls-crl");
    let ca = TestCa::new("test CA").unwrap();
    ca.write_ca(&dir).unwrap();
    let server = ca
        .issue(&dir, Leaf::Server, &["localhost".into()], false)
        .unwrap();
    let client = ca
        .issue(&dir, Leaf::Client, &["source-a".into()], false)
        .unwrap();
    ca.write_crl(&dir, &[]).unwrap();
    let (d, s) = meet(cfg(dest_tls(&dir, &[])), cfg(source_tls(&dir, "localhost")));
    d.unwrap();
    s.unwrap();
    ca.write_crl(&dir, &[client]).unwrap();
    let (d, s) = meet(cfg(dest_tls(&dir, &[])), cfg(source_tls(&dir, "localhost")));
    let detail = auth_detail(&d);
    assert!(detail.to_lowercase().contains("revoked"), "{detail}");
    assert!(s.is_err());
    ca.write_crl(&dir, &[server]).unwrap();
    let (d, s) = meet(cfg(dest_tls(&dir, &[])), cfg(source_tls(&dir, "localhost")));
    let detail = auth_detail(&s);
    assert!(detail.to_lowercase().contains("revoked"), "{detail}");
    assert!(d.is_err());
    // A list that is not one is an error at set-up, not an open door.
    std::fs::write(dir.join("ca-crl.pem"), "not a list").unwrap();
    assert!(matches!(
        TlsConfig::destination_from_dir(&dir, &[]),
        Err(TlsError::Pem { .. })
    ));
}

/// A proxy to `upstream` that delays every chunk by `delay`, both ways (a
/// slow, far link); its address.
fn slow_link(upstream: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    slow_start(upstream, delay, usize::MAX)
}

/// As [`slow_link`], for the first `chunks` chunks each way only (a peer
/// slow to answer, then fast).
fn slow_start(
    upstream: std::net::SocketAddr,
    delay: Duration,
    chunks: usize,
) -> std::net::SocketAddr {
    use std::net::TcpStream;
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = proxy.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in proxy.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut buf = [0u8; 16 << 10];
                    let mut seen = 0;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        seen += 1;
                        if seen <= chunks {
                            std::thread::sleep(delay);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// A real source whose handshake is slow (30 ms per chunk each way, so
/// its TLS handshake takes a few hundred milliseconds) while a flood of
/// silent connections from the same address (about 600 a second, each
/// held open, for a second before the source comes) hits the destination:
/// the pending handshakes overflow again and again, and each time one
/// that said nothing is closed, never the source that is getting
/// somewhere. The source connects.
#[test]
fn a_flood_of_silent_connections_never_evicts_a_progressing_handshake() {
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = pki("localhost", "source-a");
    let listener =
        TcpMigrationListener::bind("127.0.0.1:0", cfg(dest_tls(&dir, &["source-a"]))).unwrap();
    let addr = listener.local_addr().unwrap();
    let d = std::thread::spawn(move || {
        // Strangers' handshakes fail (closed, or timed out); the source's
        // is the one that finishes (or the test gives up after 30 s).
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            match listener.accept() {
                Ok(d) => return Some(d),
                Err(e) => println!("listener: {e}"),
            }
        }
        None
    });
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            // Held open (the newest 600: the destination closed the older
            // ones, and file descriptors are finite).
            let mut held = std::collections::VecDeque::new();
            let mut made = 0;
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = TcpStream::connect(addr) {
                    held.push_back(s);
                    made += 1;
                    if held.len() > 600 {
                        held.pop_front();
                    }
                }
                std::thread::sleep(Duration::from_micros(1600));
            }
            made
        })
    };
    // A second of flood first: the pending handshakes are full and
    // evicting when the source comes.
    std::thread::sleep(Duration::from_secs(1));
    let slow = slow_link(addr, Duration::from_millis(30));
    let s = TcpSource::connect(&slow.to_string(), cfg(source_tls(&dir, "localhost")));
    stop.store(true, Ordering::SeqCst);
    let d = s.as_ref().ok().and_then(|_| d.join().unwrap());
    let flooded = flood.join().unwrap();
    println!("silent connections: {flooded}");
    assert!(
        flooded > 400,
        "the flood did not overflow the pending handshakes"
    );
    s.unwrap();
    assert!(d.is_some(), "the destination never got the source");
}

/// The I/O timeout is how soon a running migration (or a protection, whose
/// `--failover-after-ms` may be a few hundred milliseconds) counts its
/// peer lost, not a bound on the handshake's public-key work: both ends
/// with a 100 ms I/O timeout meet although each of the handshake's first
/// flights (ClientHello, then the destination's whole first flight)
/// takes 400 ms to arrive. A peer that never answers fails the
/// handshake after [`HANDSHAKE_TIMEOUT`]'s 5 s without progress, saying
/// so (it once said "Resource temporarily unavailable (os error 11)").
#[test]
fn a_short_io_timeout_bounds_the_migration_not_the_handshake() {
    let dir = pki("localhost", "source-a");
    let quick = |tls| TcpConfig {
        io_timeout: Duration::from_millis(100),
        ..cfg(tls)
    };
    let listener =
        TcpMigrationListener::bind("127.0.0.1:0", quick(dest_tls(&dir, &["source-a"]))).unwrap();
    let addr = listener.local_addr().unwrap();
    let d = std::thread::spawn(move || listener.accept().map(drop));
    let slow = slow_start(addr, Duration::from_millis(400), 1);
    let s = TcpSource::connect(&slow.to_string(), quick(source_tls(&dir, "localhost")));
    s.unwrap();
    d.join().unwrap().unwrap();
    // A destination that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || silent.accept().map(|(c, _)| c));
    let start = std::time::Instant::now();
    let e = TcpSource::connect(&addr, quick(source_tls(&dir, "localhost")))
        .map(drop)
        .unwrap_err();
    let took = start.elapsed();
    drop(held.join());
    assert!(
        e.to_string()
            .contains("TLS handshake: no progress for 5.0 s: the peer is dead, frozen or cut off"),
        "{e}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "{took:?}"
    );
}
