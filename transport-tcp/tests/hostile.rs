//! Bad input and faults on real sockets: stray clients, truncated and
//! corrupted frames (through a corrupting TCP proxy), a fake destination.
//! Each ends in a typed error with the source guest running, or, for page
//! bytes corrupted in flight, in pages sent again and identical memories.
//! A primary written by hand sends a standby the epochs a correct one
//! never sends; each is refused and the standby's image stays whole.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fixtures::transport_suite::{Scenario, TransportPair, kill_slot, run};
use migrate_core::protocol::wire::{write_message, write_preamble};
use migrate_core::protocol::{Message, ProtocolError};
use migrate_core::transport::{DestinationTransport, SourceTransport, TransportError};
use migrate_core::{IncomingError, IncomingMigration};
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
        matches!(&err, IncomingError::Transport(t) if t.is_disconnect()),
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
        source: Box::new(move || {
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
        Err(IncomingError::Transport(TransportError::Protocol(ProtocolError::Corrupt {
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

/// A source written by hand, frame by frame, to drive a real destination
/// into the states a correct source never reaches.
struct RawSource {
    control: TcpStream,
    reader: std::io::BufReader<TcpStream>,
    data: Vec<TcpStream>,
}

impl RawSource {
    /// Preamble, Hello, Layout (one 1 MiB region), and `streams` joined
    /// data streams.
    fn connect(addr: std::net::SocketAddr, streams: u16) -> RawSource {
        Self::connect_offering(addr, streams, 0)
    }

    /// As `connect`, offering the feature bits `features`.
    fn connect_offering(addr: std::net::SocketAddr, streams: u16, features: u64) -> RawSource {
        use migrate_core::memory::{MemoryLayout, PageSize, RegionLayout};
        use migrate_core::protocol::{MIN_VERSION, VERSION, wire::read_preamble};
        let mut control = TcpStream::connect(addr).unwrap();
        write_preamble(&mut control).unwrap();
        let mut reader = std::io::BufReader::new(control.try_clone().unwrap());
        read_preamble(&mut reader).unwrap();
        let mut raw = RawSource {
            control,
            reader,
            data: Vec::new(),
        };
        raw.send(&Message::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            session: 42,
            data_streams: streams,
            features,
        });
        assert!(matches!(raw.recv(), Message::Welcome { .. }));
        raw.send(&Message::Layout {
            layout: MemoryLayout {
                regions: vec![RegionLayout {
                    gpa: 0,
                    len: 1 << 20,
                    page_size: PageSize::Small,
                }],
            },
        });
        assert_eq!(raw.recv(), Message::LayoutAccepted);
        for index in 0..streams {
            let mut s = TcpStream::connect(addr).unwrap();
            write_preamble(&mut s).unwrap();
            write_message(&mut s, &Message::Join { session: 42, index }).unwrap();
            raw.data.push(s);
        }
        raw
    }

    fn send(&mut self, m: &Message) {
        write_message(&mut self.control, m).unwrap();
    }

    /// The next message that is not a heartbeat.
    fn recv(&mut self) -> Message {
        loop {
            match migrate_core::protocol::wire::read_message(&mut self.reader).unwrap() {
                Message::Heartbeat => continue,
                m => return m,
            }
        }
    }

    /// Round `round` on every data stream: the page batches in `frames`
    /// on stream 0, then the end markers; then `RoundDone`. Returns the
    /// destination's suspect pages.
    fn round(&mut self, round: u32, last: bool, frames: &[Vec<u8>]) -> usize {
        for (i, s) in self.data.iter_mut().enumerate() {
            if i == 0 {
                for f in frames {
                    s.write_all(f).unwrap();
                }
            }
            let batches = if i == 0 { frames.len() as u64 } else { 0 };
            write_message(s, &Message::RoundEnd { round, batches }).unwrap();
        }
        self.send(&Message::RoundDone { round, last });
        match self.recv() {
            Message::RoundAck { round: r, suspect } if r == round => suspect.len(),
            other => panic!("expected RoundAck, got {other:?}"),
        }
    }
}

/// One page batch: page `page` of region 0 holding `fill`, announced with
/// the hash `hash` (the real one, or a wrong one).
fn page_batch(round: u32, page: u64, fill: u8, hash: Option<u64>) -> Vec<u8> {
    let hash = hash.unwrap_or_else(|| migrate_core::checksum::xxh3_64(&[fill; 4096]));
    flagged_page_batch(round, page, fill, &[hash], 0)
}

/// One page batch with frame flags `flags` and the page hashes `hashes`.
fn flagged_page_batch(round: u32, page: u64, fill: u8, hashes: &[u64], flags: u8) -> Vec<u8> {
    use migrate_core::protocol::FrameKind;
    use migrate_core::protocol::wire::{
        BatchRun, FrameHeader, RunKind, check_seed, encode_batch_header,
    };
    let bytes = vec![fill; 4096];
    let runs = [BatchRun {
        region: 0,
        first: page,
        count: 1,
        kind: RunKind::Data,
    }];
    let table = encode_batch_header(round, &runs, 4096, 4096, hashes);
    let len = (table.len() + 4096) as u32;
    let header = FrameHeader {
        kind: FrameKind::Pages,
        flags,
        len,
        check: migrate_core::checksum::xxh3_64_with_seed(
            &table,
            check_seed(FrameKind::Pages, flags, len),
        ),
    };
    let mut frame = header.to_bytes().to_vec();
    frame.extend_from_slice(&table);
    frame.extend_from_slice(&bytes);
    frame
}

/// What a destination ended with: its result, its memory, its VM.
type Received = (
    Result<migrate_core::DestinationReport, IncomingError>,
    Arc<migrate_core::GuestMemory>,
    fixtures::FixtureDestinationVm,
);

/// A destination receiving into 1 MiB, on a thread.
fn destination() -> (std::net::SocketAddr, std::thread::JoinHandle<Received>) {
    let l = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut d = l.accept().unwrap();
        let incoming = IncomingMigration::accept(&mut d).unwrap();
        let mem = Arc::new(
            migrate_core::GuestMemory::new(vec![
                migrate_core::GuestRegion::anonymous(0, 1 << 20).unwrap(),
            ])
            .unwrap(),
        );
        let mut vm = fixtures::FixtureDestinationVm::default();
        let r = incoming.receive(&mut d, &mem, &mut vm);
        (r, mem, vm)
    });
    (addr, t)
}

fn assert_commit_refused(raw: &mut RawSource, what: &str) {
    raw.send(&Message::Commit);
    match raw.recv() {
        Message::Refused { code, message } => {
            assert_eq!(
                code,
                migrate_core::protocol::RefusalCode::Protocol,
                "{what}"
            );
            assert!(message.contains("incomplete"), "{what}: {message}");
        }
        other => panic!("{what}: expected Refused, got {other:?}"),
    }
}

#[test]
fn commit_without_any_round_is_refused() {
    let (addr, dest) = destination();
    let mut raw = RawSource::connect(addr, 1);
    raw.send(&Message::DeviceState {
        last: true,
        bytes: b"state".to_vec(),
    });
    // A device state before the last round breaks the protocol.
    assert!(matches!(raw.recv(), Message::Abort { .. }));
    let (r, _, vm) = dest.join().unwrap();
    assert!(r.is_err() && !vm.resumed, "{r:?}");

    let (addr, dest) = destination();
    let mut raw = RawSource::connect(addr, 1);
    assert_commit_refused(&mut raw, "no round");
    let (r, _, vm) = dest.join().unwrap();
    assert!(
        matches!(r, Err(IncomingError::Refused { .. })) && !vm.resumed,
        "{r:?}"
    );
}

#[test]
fn commit_after_live_rounds_only_is_refused() {
    let (addr, dest) = destination();
    let mut raw = RawSource::connect(addr, 2);
    assert_eq!(raw.round(0, false, &[page_batch(0, 3, 7, None)]), 0);
    assert_commit_refused(&mut raw, "live round only");
    let (r, mem, vm) = dest.join().unwrap();
    assert!(r.is_err() && !vm.resumed, "{r:?}");
    // The page did land (what was received is discarded by the caller).
    let mut b = [0u8; 1];
    mem.read(3 * 4096, &mut b).unwrap();
    assert_eq!(b[0], 7);
}

#[test]
fn commit_after_a_last_round_with_failed_pages_is_refused() {
    let (addr, dest) = destination();
    let mut raw = RawSource::connect(addr, 1);
    let bad = page_batch(0, 5, 9, Some(0xdead_beef));
    assert_eq!(raw.round(0, true, &[bad]), 1, "the bad page is suspect");
    assert_commit_refused(&mut raw, "suspect pages in the last round");
    let (r, _, vm) = dest.join().unwrap();
    assert!(r.is_err() && !vm.resumed, "{r:?}");
}

/// Batches without page hashes are for connections an AEAD seals: a
/// plaintext source that offers the feature and sends one is refused, and
/// its page never lands.
#[test]
fn a_batch_without_page_hashes_is_refused_on_a_plaintext_connection() {
    use migrate_core::protocol::{FEATURE_UNHASHED, wire::FLAG_UNHASHED};
    let (addr, dest) = destination();
    let mut raw = RawSource::connect_offering(addr, 1, FEATURE_UNHASHED);
    raw.data[0]
        .write_all(&flagged_page_batch(0, 5, 0x77, &[], FLAG_UNHASHED))
        .unwrap();
    let (r, mem, vm) = dest.join().unwrap();
    let e = r.expect_err("an unhashed batch on a plaintext connection");
    assert!(
        e.to_string().contains("without page hashes"),
        "the error names the cause: {e}"
    );
    assert!(!vm.resumed);
    let mut page = vec![1u8; 4096];
    mem.read(5 * 4096, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "nothing of it landed");
}

/// The source dies right after its Commit reached the destination: its
/// data streams close at the same time. The migration is complete, so the
/// destination commits, and says so.
#[test]
fn a_complete_migration_commits_even_when_the_data_streams_close_first() {
    for attempt in 0..5 {
        let (addr, dest) = destination();
        let mut raw = RawSource::connect(addr, 2);
        assert_eq!(raw.round(0, true, &[page_batch(0, 1, 0x5a, None)]), 0);
        raw.send(&Message::DeviceState {
            last: true,
            bytes: b"state".to_vec(),
        });
        for s in raw.data.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        raw.send(&Message::Commit);
        assert_eq!(raw.recv(), Message::Committed, "attempt {attempt}");
        let (r, mem, vm) = dest.join().unwrap();
        assert!(r.is_ok() && vm.resumed, "attempt {attempt}: {r:?}");
        assert_eq!(vm.state.as_deref(), Some(&b"state"[..]));
        let mut page = vec![0u8; 4096];
        mem.read(4096, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == 0x5a),
            "the page of the last round landed"
        );
    }
}

/// Clients that connect and say nothing — more of them than the listener
/// handshakes at once — and a real source after them: the real source is
/// served at once, and its migration (with its own data streams joining
/// past more silent clients) is verified.
fn behind_silent_clients() -> TransportPair {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = listener.local_addr().unwrap();
    let silent: Vec<TcpStream> = (0..24).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move || {
            Ok(Box::new(TcpSource::connect(&addr.to_string(), cfg())?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d = loop {
                match listener.accept() {
                    Ok(d) => break d,
                    // A silent client that timed out, or was closed to make room.
                    Err(e) => println!("listener: {e}"),
                }
            };
            // More silent clients while the data streams join.
            let more: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let k = d.kill_switch();
            drop(silent);
            // The kill switch keeps the later silent clients connected for
            // the whole migration.
            *slot.lock().unwrap() = Some(Box::new(move || {
                let _ = &more;
                k.kill()
            }));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
}

#[test]
fn silent_clients_do_not_hold_up_a_real_source() {
    let started = std::time::Instant::now();
    let o = run(behind_silent_clients, Scenario::default());
    o.assert_migrated();
    println!("migrated behind silent clients in {:?}", started.elapsed());
    o.source_vm.stop();
}

impl RawSource {
    /// Epoch `epoch` as a primary ships it, by hand: `frames` on stream 0
    /// and the end markers, then `control` (its page list, device state,
    /// output...) and `EpochEnd`. Returns the standby's answer.
    fn epoch(
        &mut self,
        epoch: u32,
        checkpoint: bool,
        frames: &[Vec<u8>],
        control: &[Message],
    ) -> Message {
        for (i, s) in self.data.iter_mut().enumerate() {
            if i == 0 {
                for f in frames {
                    s.write_all(f).unwrap();
                }
            }
            let batches = if i == 0 { frames.len() as u64 } else { 0 };
            write_message(
                s,
                &Message::RoundEnd {
                    round: epoch,
                    batches,
                },
            )
            .unwrap();
        }
        for m in control {
            self.send(m);
        }
        self.send(&Message::EpochEnd { epoch, checkpoint });
        self.recv()
    }
}

/// The page list of an epoch: `count` pages from `first` in region 0.
fn epoch_pages(epoch: u32, first: u64, count: u32) -> Message {
    Message::EpochPages {
        epoch,
        last: true,
        ranges: vec![migrate_core::protocol::PageRange {
            region: 0,
            first,
            count,
        }],
    }
}

fn whole_state() -> Message {
    Message::DeviceState {
        last: true,
        bytes: b"state".to_vec(),
    }
}

/// A primary written by hand sends a standby the epochs a correct primary
/// never sends: out of order, a checkpoint cut short of its device state,
/// pages outside guest memory, a page failing its hash. Each is refused,
/// and the image stays at the last applied epoch: none of their pages
/// lands in it, and the next good epoch applies.
#[test]
fn a_standby_refuses_epochs_out_of_order_cut_short_or_corrupt_and_keeps_its_image() {
    use migrate_core::mirror::{NoWitness, OutputGate, Standby, StandbyStatus};
    let l = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = l.local_addr().unwrap();
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let standby = std::thread::spawn(move || {
        let mut d = l.accept().unwrap();
        let standby = Standby::accept(&mut d).unwrap();
        events_tx.send(standby.handle().subscribe()).unwrap();
        let image = Arc::new(
            migrate_core::GuestMemory::new(vec![
                migrate_core::GuestRegion::anonymous(0, 1 << 20).unwrap(),
            ])
            .unwrap(),
        );
        let mut vm = fixtures::FixtureDestinationVm::default();
        let gate = OutputGate::new(Box::new(std::io::sink()));
        let r = standby.run(&mut d, &image, &mut vm, &gate, &mut NoWitness);
        (r, image, vm)
    });
    let mut raw = RawSource::connect_offering(addr, 2, migrate_core::protocol::FEATURE_MIRROR);
    let events = events_rx.recv().unwrap();
    let refused = |m: Message, what: &str, why: &str| match m {
        Message::EpochRefused { reason, .. } => {
            assert!(reason.contains(why), "{what}: {reason}")
        }
        other => panic!("{what}: expected EpochRefused, got {other:?}"),
    };
    // Epoch 0 of the initial sync: page 0.
    let answer = raw.epoch(
        0,
        false,
        &[page_batch(0, 0, 1, None)],
        &[epoch_pages(0, 0, 1)],
    );
    assert_eq!(answer, Message::EpochApplied { epoch: 0 });
    // Epoch 2 before 1: out of order.
    let answer = raw.epoch(
        2,
        false,
        &[page_batch(2, 1, 2, None)],
        &[epoch_pages(2, 1, 1)],
    );
    refused(answer, "out of order", "out of order");
    // A checkpoint whose device state never finished.
    let answer = raw.epoch(
        1,
        true,
        &[page_batch(1, 1, 3, None)],
        &[
            epoch_pages(1, 1, 1),
            Message::DeviceState {
                last: false,
                bytes: b"sta".to_vec(),
            },
        ],
    );
    refused(answer, "cut short", "device state");
    // Pages outside the 1 MiB of guest memory.
    let answer = raw.epoch(1, true, &[], &[epoch_pages(1, 255, 4), whole_state()]);
    refused(answer, "outside", "outside guest memory");
    // A page that fails its hash.
    let answer = raw.epoch(
        1,
        true,
        &[page_batch(1, 1, 4, Some(0xdead_beef))],
        &[epoch_pages(1, 1, 1), whole_state()],
    );
    refused(answer, "corrupt", "failed their check");
    // The good epoch 1 (page 2) applies; then a clean end.
    let answer = raw.epoch(
        1,
        true,
        &[page_batch(1, 2, 5, None)],
        &[epoch_pages(1, 2, 1), whole_state()],
    );
    assert_eq!(answer, Message::EpochApplied { epoch: 1 });
    raw.send(&Message::ProtectEnd);
    assert_eq!(raw.recv(), Message::ProtectEnded);
    let (r, image, vm) = standby.join().unwrap();
    let r = r.unwrap();
    assert_eq!(r.status, StandbyStatus::Released);
    assert_eq!(
        (r.epochs_applied, r.epochs_refused, r.last_checkpoint),
        (2, 4, Some(1))
    );
    assert!(!vm.resumed);
    // Page 0 from epoch 0, page 2 from epoch 1; page 1, which only refused
    // epochs carried, never reached the image.
    for (page, fill) in [(0u64, 1u8), (1, 0), (2, 5), (3, 0)] {
        let mut b = [0u8; 4096];
        image.read(page * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == fill), "page {page}: {}", b[0]);
    }
    let names: Vec<&str> = events.try_iter().map(|e| e.name()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "epoch-refused").count(),
        4,
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"released"), "{names:?}");
}
