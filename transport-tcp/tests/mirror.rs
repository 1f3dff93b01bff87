//! Continuous mirroring over real TCP sockets: a bank guest with receipts,
//! protected in epochs; the standby's image is compared with the primary's
//! paused memory at the epoch it last applied, the ledger is checked, and
//! the receipts released by both ends must be contiguous, any repeat
//! identical.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fixtures::{BankConfig, BankGuest, FixtureDestinationVm, FixtureSourceVm};
use migrate_core::dirty::{DirtyTracking, TrackerPreference};
use migrate_core::memory::{GuestMemory, GuestRegion};
use migrate_core::mirror::{
    Claimant, NoWitness, OutputGate, ProtectConfig, ProtectStatus, Protection, ProtectionReport,
    RunRight, Standby, StandbyReport, StandbyStatus, WitnessBook,
};
use migrate_core::transport::TransportError;
use migrate_core::vm::{SourceVm, VmError};
use transport_tcp::{KillSwitch, TcpConfig, TcpMigrationListener, TcpSource};

const MIB: usize = 1 << 20;

fn cfg() -> TcpConfig {
    TcpConfig {
        data_streams: 2,
        io_timeout: Duration::from_secs(1),
        ..TcpConfig::default()
    }
}

fn memory() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::new(vec![GuestRegion::anonymous(0, 16 * MIB).unwrap()]).unwrap())
}

fn bank() -> BankConfig {
    BankConfig {
        accounts: 8192,
        threads: 2,
        transfers_per_sec: 3000,
        ..BankConfig::default()
    }
}

/// A sink the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// The fixture VM, recording the digest of the paused memory at every
/// capture (the state the epoch carries).
struct Recording {
    inner: FixtureSourceVm,
    mem: Arc<GuestMemory>,
    digests: Arc<Mutex<Vec<u64>>>,
    paused: Arc<Mutex<bool>>,
}

impl SourceVm for Recording {
    fn pause(&mut self) -> Result<(), VmError> {
        *self.paused.lock().unwrap() = true;
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        *self.paused.lock().unwrap() = false;
        self.inner.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.digests.lock().unwrap().push(self.mem.digest());
        self.inner.save_state()
    }
    fn throttle(&mut self, percent: u8) -> Result<bool, VmError> {
        self.inner.throttle(percent)
    }
}

/// The witness's decision, in this process, asked after `delay` (a slower
/// claimant).
struct LocalWitness {
    book: Arc<WitnessBook>,
    delay: Duration,
}

impl RunRight for LocalWitness {
    fn claim(&mut self, session: u64, claimant: Claimant) -> Result<bool, TransportError> {
        std::thread::sleep(self.delay);
        Ok(self.book.decide(session, claimant))
    }
}

struct Ends {
    primary: ProtectionReport,
    standby: StandbyReport,
    digests: Vec<u64>,
    image: Arc<GuestMemory>,
    primary_out: Sink,
    standby_out: Sink,
    primary_paused: bool,
    standby_resumed: bool,
}

/// Protect a bank guest to a standby over TCP; `during` acts on the
/// running protection (it gets the standby's kill switch and the primary's
/// handle).
fn protect(
    primary_witness: Box<dyn RunRight>,
    standby_witness: Box<dyn RunRight>,
    during: impl FnOnce(&KillSwitch, &migrate_core::mirror::ProtectHandle),
) -> Ends {
    protect_via(primary_witness, standby_witness, |a| a, during)
}

/// As [`protect`], the primary connecting to `via(standby's address)` (a
/// proxy in between).
fn protect_via(
    primary_witness: Box<dyn RunRight>,
    standby_witness: Box<dyn RunRight>,
    via: impl FnOnce(String) -> String,
    during: impl FnOnce(&KillSwitch, &migrate_core::mirror::ProtectHandle),
) -> Ends {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg()).unwrap();
    let addr = via(listener.local_addr().unwrap().to_string());
    let image = memory();
    let standby_out = Sink::default();
    let (kill_tx, kill_rx) = crossbeam_channel::bounded(1);
    let standby = {
        let (image, out) = (Arc::clone(&image), standby_out.clone());
        let mut witness = standby_witness;
        std::thread::spawn(move || {
            let mut t = listener.accept().unwrap();
            kill_tx.send(t.kill_switch()).unwrap();
            let s = Standby::accept(&mut t).unwrap();
            let gate = OutputGate::new(Box::new(out));
            let mut vm = FixtureDestinationVm::default();
            let report = s
                .run(&mut t, &image, &mut vm, &gate, witness.as_mut())
                .unwrap();
            (report, vm.resumed)
        })
    };
    let mem = memory();
    // Mostly data pages (the bank alone would leave them sparse).
    fixtures::fill_memory(&mem, fixtures::PageMix::parse("10:45:45").unwrap(), 7).unwrap();
    BankGuest::format(&mem, &bank()).unwrap();
    let primary_out = Sink::default();
    let gate = OutputGate::new(Box::new(primary_out.clone()));
    let guest =
        BankGuest::start_with_receipts(Arc::clone(&mem), bank(), Arc::clone(&gate)).unwrap();
    let digests = Arc::new(Mutex::new(Vec::new()));
    let paused = Arc::new(Mutex::new(false));
    let mut vm = Recording {
        inner: FixtureSourceVm::new(guest, b"bank".to_vec()),
        mem: Arc::clone(&mem),
        digests: Arc::clone(&digests),
        paused: Arc::clone(&paused),
    };
    let mut transport = TcpSource::connect(&addr, cfg()).unwrap();
    let tracker = DirtyTracking::new(&mem, TrackerPreference::Best).unwrap();
    let protection = Protection::new(ProtectConfig::with_epoch(Duration::from_millis(20)));
    let handle = protection.handle();
    let kill = kill_rx.recv().unwrap();
    let report = std::thread::scope(|s| {
        let run = s.spawn(|| {
            let mut witness = primary_witness;
            protection
                .run(
                    &mut transport,
                    &mem,
                    &tracker,
                    &mut vm,
                    &gate,
                    witness.as_mut(),
                )
                .unwrap()
        });
        during(&kill, &handle);
        run.join().unwrap()
    });
    let (standby, standby_resumed) = standby.join().unwrap();
    let primary_paused = *paused.lock().unwrap();
    vm.inner.stop();
    let digests = digests.lock().unwrap().clone();
    Ends {
        primary: report,
        standby,
        digests,
        image,
        primary_out,
        standby_out,
        primary_paused,
        standby_resumed,
    }
}

/// Wait until the primary has had `n` checkpoints applied.
fn epochs(handle: &migrate_core::mirror::ProtectHandle, n: u64) {
    let t = Instant::now();
    while handle.stats().epochs < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{:?}",
            handle.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Receipts released by both ends, in order: contiguous from 0, every
/// repeat identical to its first release. Returns the receipts.
fn receipts_hold(outputs: &[&str]) -> u64 {
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    for out in outputs {
        let mut expect: Option<u64> = None;
        for line in out.lines() {
            let seq: u64 = line.split(' ').next().unwrap().parse().unwrap();
            if let Some(e) = expect {
                assert_eq!(seq, e, "a gap or disorder in one end's output at {line:?}");
            }
            expect = Some(seq + 1);
            if let Some(first) = seen.insert(seq, line.to_string()) {
                assert_eq!(first, line, "receipt {seq} released twice, differently");
            }
        }
    }
    let n = seen.len() as u64;
    assert_eq!(
        seen.keys().next_back().map(|k| k + 1).unwrap_or(0),
        n,
        "a gap"
    );
    n
}

/// The standby's image is the primary's paused memory at the checkpoint
/// it last applied, and its ledger holds.
fn image_is_checkpoint(e: &Ends) {
    let last = e.standby.last_checkpoint.expect("a checkpoint applied");
    let i = (last - e.primary.sync_rounds) as usize;
    assert_eq!(
        e.image.digest(),
        e.digests[i],
        "standby image differs from the primary's memory at epoch {last}"
    );
    BankGuest::validate(&e.image).expect("the standby's ledger");
}

#[test]
fn epochs_apply_whole_and_a_clean_end_releases_the_standby() {
    let e = protect(Box::new(NoWitness), Box::new(NoWitness), |_, h| {
        epochs(h, 20);
        h.end();
    });
    assert_eq!(e.primary.status, ProtectStatus::Released, "{:?}", e.primary);
    assert_eq!(e.standby.status, StandbyStatus::Released, "{:?}", e.standby);
    assert!(e.primary.epochs >= 20);
    assert_eq!(
        e.standby.epochs_applied,
        e.primary.epochs + u64::from(e.primary.sync_rounds)
    );
    assert_eq!(e.standby.last_checkpoint, e.primary.last_applied_epoch);
    assert_eq!(e.digests.len() as u64, e.primary.epochs);
    image_is_checkpoint(&e);
    // Every receipt went out, in order, once; none waited for longer
    // than a few epochs.
    assert!(receipts_hold(&[&e.primary_out.text()]) > 0);
    assert!(e.standby_out.text().is_empty());
    assert!(e.primary.epoch_pause_us.p50 > 0);
    assert!(e.primary.output_delay_us.max > 0);
}

#[test]
fn a_cut_link_leaves_exactly_one_guest_running_and_nothing_seen_lost() {
    // Whoever asks the witness first runs; the other stops.
    for standby_first in [true, false] {
        let book = Arc::new(WitnessBook::new());
        // The slower claimant asks well after the other noticed: a primary
        // notices a lost standby at its next epoch, a standby at once.
        let (fast, slow) = (Duration::ZERO, Duration::from_millis(1500));
        let (p, s) = if standby_first {
            (slow, fast)
        } else {
            (fast, slow)
        };
        let e = protect(
            Box::new(LocalWitness {
                book: Arc::clone(&book),
                delay: p,
            }),
            Box::new(LocalWitness { book, delay: s }),
            |kill, h| {
                epochs(h, 10);
                kill.kill();
            },
        );
        let runs_here = [
            e.primary.status == ProtectStatus::Degraded,
            e.standby_resumed,
        ];
        assert_eq!(runs_here.iter().filter(|r| **r).count(), 1, "{e:?}");
        if standby_first {
            assert_eq!(e.standby.status, StandbyStatus::TookOver, "{:?}", e.standby);
            assert_eq!(e.primary.status, ProtectStatus::Fenced, "{:?}", e.primary);
            assert!(e.primary_paused, "a fenced primary's guest stays paused");
            image_is_checkpoint(&e);
        } else {
            assert_eq!(e.primary.status, ProtectStatus::Degraded, "{:?}", e.primary);
            assert_eq!(e.standby.status, StandbyStatus::Fenced, "{:?}", e.standby);
            assert!(!e.primary_paused);
        }
        receipts_hold(&[&e.primary_out.text(), &e.standby_out.text()]);
    }
}

impl std::fmt::Debug for Ends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ends")
            .field("primary", &self.primary)
            .field("standby", &self.standby)
            .field("standby_resumed", &self.standby_resumed)
            .finish()
    }
}

/// A proxy that passes frames through, and flips the last byte of the first
/// page batch of round (epoch) `from_epoch` or later that carries page
/// bytes, on any data stream: a page byte corrupted in flight (frames: an
/// 8-byte preamble, then 16-byte headers with the kind in byte 0 and the
/// payload length in bytes 4..8; a batch's payload starts with its round
/// and ends with its page bytes, `wire_len` of them at bytes 8..12).
fn page_flipping_proxy(to: String, from_epoch: u32) -> String {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let done = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(a) = conn else { return };
            let Ok(b) = TcpStream::connect(&to) else {
                return;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut b2, &mut a2));
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                use std::io::Read;
                let (mut from, mut into) = (a, b);
                let mut pre = [0u8; 8];
                if from.read_exact(&mut pre).is_err() || into.write_all(&pre).is_err() {
                    return;
                }
                loop {
                    let mut h = [0u8; 16];
                    if from.read_exact(&mut h).is_err() {
                        return;
                    }
                    let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
                    let mut p = vec![0u8; len];
                    if from.read_exact(&mut p).is_err() {
                        return;
                    }
                    let batch = h[0] == 6 && len >= 16;
                    if batch
                        && u32::from_le_bytes(p[0..4].try_into().unwrap()) >= from_epoch
                        && u32::from_le_bytes(p[8..12].try_into().unwrap()) > 0
                        && !done.swap(true, Ordering::SeqCst)
                    {
                        p[len - 1] ^= 0x40;
                    }
                    if into
                        .write_all(&h)
                        .and_then(|()| into.write_all(&p))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_corrupted_epoch_is_refused_and_sent_again_the_image_never_torn() {
    let e = protect_via(
        Box::new(NoWitness),
        Box::new(NoWitness),
        |standby| page_flipping_proxy(standby, 8),
        |_, h| {
            epochs(h, 20);
            h.end();
        },
    );
    assert_eq!(e.primary.status, ProtectStatus::Released, "{e:?}");
    assert_eq!(e.standby.status, StandbyStatus::Released, "{e:?}");
    assert_eq!(
        (e.primary.epochs_refused, e.standby.epochs_refused),
        (1, 1),
        "{e:?}"
    );
    assert_eq!(
        e.standby.epochs_applied,
        e.primary.epochs + u64::from(e.primary.sync_rounds)
    );
    image_is_checkpoint(&e);
    receipts_hold(&[&e.primary_out.text()]);
}
