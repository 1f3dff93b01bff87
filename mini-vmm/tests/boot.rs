//! PC boot sectors under KVM: our own guests (assembled in `mini_vmm::boot`)
//! booted as a BIOS hands over, and migrated live while they run — in one
//! process through the library, checked by the guest's own rule on the
//! paused source, by the digests at switch-over and by the guest printing
//! on at the destination; and between two `mini-vmm` processes.

mod common;
use common::{bin, kvm_here, text};

use std::io::{BufRead, BufReader, Write};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrate_core::{IncomingMigration, SourceConfig, SourceMigration};
use mini_vmm::boot::{self, LEDGER_STEP};
use mini_vmm::machine::{KvmDestination, KvmSource, Machine};
use mini_vmm::vcpu::VcpuRunner;
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

/// A serial line the test reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn count(&self, c: char) -> usize {
        self.text().chars().filter(|&x| x == c).count()
    }
}

/// Wait (a minute at most: only a hang fails) until `cond`.
fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "never {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const MIB: u32 = 1 << 20;

/// Boot `sector` on a `mem_mib` MiB PC, wait until it printed `c` twice,
/// migrate it live over loopback TCP to a destination in this process,
/// and return the paused source machine and vCPU, the destination's
/// running vCPU and serial line, and the digests at switch-over.
struct Moved {
    source: Machine,
    _source_vcpu: VcpuRunner,
    source_serial: Captured,
    dest_vcpu: VcpuRunner,
    dest_serial: Captured,
    source_digest: u128,
    dest_digest: u128,
    _dest: Machine,
}

fn migrate_live(sector: [u8; 512], mem_mib: u64, c: char) -> Moved {
    let mut m = Machine::pc(mem_mib << 20).unwrap();
    let state = m.load_boot_sector(&sector).unwrap();
    let source_serial = Captured::default();
    m.set_serial(Box::new(source_serial.clone()));
    let vcpu = m.start(&state, 0).unwrap();
    // Running, and past its set-up: it printed twice.
    until("the guest printed on the source", || {
        source_serial.count(c) >= 2
    });

    let listener = TcpMigrationListener::bind("127.0.0.1:0", TcpConfig::default()).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest_serial = Captured::default();
    let ds = dest_serial.clone();
    let dest = std::thread::spawn(move || {
        let mut t = listener.accept().unwrap();
        let incoming = IncomingMigration::accept(&mut t).unwrap();
        let mut dm = Machine::for_layout(incoming.layout()).unwrap();
        dm.set_serial(Box::new(ds));
        let mem = dm.memory().clone();
        let mut vm = KvmDestination::new(&mut dm, 0);
        incoming.receive(&mut t, &mem, &mut vm).unwrap();
        let digest = vm.digest_at_resume.unwrap();
        let running = vm.running.take().unwrap();
        (dm, digest, running)
    });
    let mut t = TcpSource::connect(&addr, TcpConfig::default()).unwrap();
    // Bind, then track (the guest already runs: round 0 reads every page
    // after tracking started).
    let bound = SourceMigration::new(SourceConfig::default())
        .bind(&mut t, m.memory())
        .unwrap();
    let tracking = m.dirty_tracking().unwrap();
    let stats = bound.run(&tracking, &mut KvmSource::new(&vcpu)).unwrap();
    assert!(stats.precopy.rounds >= 2, "not a live migration: {stats:?}");
    let (dm, dest_digest, dest_vcpu) = dest.join().unwrap();
    Moved {
        source_digest: m.digest(),
        source: m,
        _source_vcpu: vcpu,
        source_serial,
        dest_vcpu,
        dest_serial,
        dest_digest,
        _dest: dm,
    }
}

#[test]
fn our_sweeper_migrates_live_and_sweeps_on() {
    if !kvm_here("sweeper_migrates_live") {
        return;
    }
    let (start, end) = (MIB, 24 * MIB);
    let moved = migrate_live(boot::sweeper(start, end, 1).unwrap(), 32, 'B');
    // The paused source obeys the sweep rule, and the destination started
    // from the same bytes.
    let mut pages = Vec::new();
    for gpa in (start..end).step_by(4096) {
        let mut b = [0u8];
        moved.source.memory().read(u64::from(gpa), &mut b).unwrap();
        pages.push(b[0]);
    }
    let (value, at) = boot::check_sweep(&pages).unwrap();
    assert_ne!(
        (value, at),
        (0, 0),
        "the guest had not swept anything before the switch-over"
    );
    assert_eq!(
        moved.source_digest, moved.dest_digest,
        "digests at switch-over differ"
    );
    // It sweeps on over there: it prints, and the source stays quiet.
    let before = moved.source_serial.count('B');
    until("the guest printed on the destination", || {
        moved.dest_serial.count('B') >= 2
    });
    assert_eq!(moved.source_serial.count('B'), before, "the source ran on");
    assert!(!moved.dest_vcpu.device().halted);
    assert_eq!(moved.dest_serial.text().trim_matches('B'), "");
}

#[test]
fn our_ledger_migrates_live_and_checks_itself() {
    if !kvm_here("ledger_migrates_live") {
        return;
    }
    // 64 Ki words: this machine's KVM (a paravirtual backend) emulates a
    // 32-bit guest's instructions at a few microseconds each, so a pass
    // over them takes about half a second.
    let (start, end) = (MIB, MIB + (256 << 10));
    let moved = migrate_live(boot::ledger(start, end, LEDGER_STEP, 1).unwrap(), 16, 'G');
    let mut bytes = vec![0u8; (end - start) as usize];
    moved
        .source
        .memory()
        .read(u64::from(start), &mut bytes)
        .unwrap();
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect();
    boot::check_ledger(&words, LEDGER_STEP).unwrap();
    assert_eq!(moved.source_digest, moved.dest_digest);
    // The guest checks its whole table each pass on the destination: it
    // prints G, never E.
    until("two checked passes on the destination", || {
        moved.dest_serial.count('G') >= 2
    });
    let t = moved.dest_serial.text();
    assert!(!t.contains('E'), "the guest found its table broken: {t}");
    assert!(!moved.dest_vcpu.device().halted);
}

/// A path in this process's scratch folder, emptied on first use so that a
/// folder an earlier run left under the same process id gives no stale files.
fn scratch(name: &str) -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mini-vmm-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .join(name)
}

/// Command-line arguments of mixed kinds.
fn args(items: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    items.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// What a migration between two `mini-vmm` processes left: the source's
/// output and the destination's stdout + stderr (both exited 0).
struct TwoProcesses {
    src: Output,
    dest_text: String,
}

impl TwoProcesses {
    /// `mini-vmm dest --listen 127.0.0.1:0 DEST_ARGS`, then `mini-vmm source
    /// --connect ADDR SOURCE_ARGS` against it, both with `--digest`; both
    /// must succeed.
    fn run(dest_args: &[std::ffi::OsString], source_args: &[std::ffi::OsString]) -> Self {
        let mut dest = bin()
            .args(["dest", "--listen", "127.0.0.1:0", "--digest"])
            .args(dest_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut dest_out = BufReader::new(dest.stdout.take().unwrap());
        let mut l = String::new();
        dest_out.read_line(&mut l).unwrap();
        let addr = l.trim().strip_prefix("listening on ").unwrap().to_string();
        let src = bin()
            .args(["source", "--connect", &addr, "--digest"])
            .args(source_args)
            .output()
            .unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut dest_out, &mut rest).unwrap();
        let dest = dest.wait_with_output().unwrap();
        let dest_text = format!("{rest}{}", String::from_utf8_lossy(&dest.stderr));
        assert!(src.status.success(), "source: {}", text(&src));
        assert!(dest.status.success(), "destination: {dest_text}");
        Self { src, dest_text }
    }

    /// Both ends printed the same `digest: ` of the memory at switch-over.
    fn assert_same_digest(&self) {
        let digest = |t: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix("digest: "))
                .map(str::to_string)
        };
        let s = digest(&text(&self.src));
        assert!(
            s.is_some() && s == digest(&self.dest_text),
            "digests differ:\n{}\n{}",
            text(&self.src),
            self.dest_text
        );
    }
}

/// Pages `start..end` of a RAM file, one byte each (the sweep's bytes),
/// obey the sweep rule; returns the sweep's value.
fn swept(ram: &std::path::Path, start: usize, end: usize) -> u8 {
    let ram = std::fs::read(ram).unwrap();
    let pages: Vec<u8> = (start..end).step_by(4096).map(|a| ram[a]).collect();
    boot::check_sweep(&pages).unwrap().0
}

#[test]
fn a_file_that_is_no_boot_sector_is_refused() {
    let short = scratch("short.img");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let unsigned = scratch("unsigned.img");
    std::fs::write(&unsigned, [0u8; 512]).unwrap();
    for (f, says) in [(&short, "512 bytes"), (&unsigned, "boot signature")] {
        let o = bin()
            .args(["run", "--boot-sector"])
            .arg(f)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(says), "{}", text(&o));
    }
}

#[test]
fn a_boot_sector_migrates_live_between_two_processes() {
    if !kvm_here("boot_sector_two_processes") {
        return;
    }
    let image = scratch("sweeper.img");
    let o = bin()
        .args(["guest", "sweeper", "--start", "1M", "--end", "40M", "--out"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Booted alone, it prints.
    let alone = scratch("alone.txt");
    let o = bin()
        .args([
            "run",
            "--memory",
            "48M",
            "--run-for-s",
            "1",
            "--boot-sector",
        ])
        .arg(&image)
        .arg("--serial")
        .arg(&alone)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("still running"), "{}", text(&o));
    assert!(std::fs::read_to_string(&alone).unwrap().contains('B'));

    let dest_serial = scratch("dest.txt");
    let (ram, dest_json, source_json) = (scratch("ram.img"), scratch("d.json"), scratch("s.json"));
    let source_serial = scratch("source.txt");
    let run = TwoProcesses::run(
        &args(&[
            &"--run-for-s",
            &"2",
            &"--serial",
            &dest_serial,
            &"--memory-file",
            &ram,
            &"--json",
            &dest_json,
        ]),
        &args(&[
            &"--memory",
            &"48M",
            &"--start-after-ms",
            &"300",
            &"--boot-sector",
            &image,
            &"--serial",
            &source_serial,
            &"--json",
            &source_json,
        ]),
    );
    run.assert_same_digest();
    let (src, dest_text) = (&run.src, &run.dest_text);
    assert!(dest_text.contains("still running"), "{dest_text}");
    let printed = std::fs::read_to_string(&dest_serial).unwrap();
    assert!(
        printed.contains('B') && printed.trim_matches('B').is_empty(),
        "the destination's serial line: {printed:?}"
    );
    // The destination's RAM, read from its file after mini-vmm exited,
    // obeys the sweep rule: the guest ran on and was stopped mid-sweep.
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 48 << 20);
    assert_ne!(swept(&ram, 1 << 20, 40 << 20), 0, "nothing swept there");
    // Both reports, with migrate-cli's fields, agree.
    let json = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (s, d) = (json(&source_json), json(&dest_json));
    assert_eq!(s["role"], "source");
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(d["role"], "destination");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(s["migration_id"], d["migration_id"]);
    assert_eq!(s["transport"], d["transport"]);
    assert!(s["rounds"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["downtime_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(
        s["digest"].as_str().map(|d| format!("digest: {d}")),
        text(src)
            .lines()
            .find(|l| l.starts_with("digest: "))
            .map(String::from)
    );
    assert_eq!(s["digest"], d["digest"], "{s}\n{d}");
}

#[test]
fn plaintext_off_this_host_needs_insecure() {
    for args in [
        &["dest", "--listen", "0.0.0.0:0"][..],
        &[
            "source",
            "--connect",
            "192.0.2.1:4444",
            "--boot-sector",
            "/nonexistent",
        ][..],
    ] {
        let o = bin().args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains("without authentication"), "{}", text(&o));
    }
}

/// Whether userfaultfd write-protect (async) sees what a KVM guest writes,
/// beside KVM's own dirty log: both trackers on the same memory while our
/// sweeper runs two whole sweeps must each report every page of its range.
/// Prints what one harvest of each costs (measured, not asserted).
#[test]
fn userfaultfd_sees_a_kvm_guests_writes_as_the_dirty_log_does() {
    use migrate_core::dirty::{DirtyLog, DirtyTracker, DirtyTracking, TrackerPreference};
    if !kvm_here("uffd_sees_kvm_writes") {
        return;
    }
    let (start, end) = (MIB, 24 * MIB);
    let mut m = Machine::pc(32 << 20).unwrap();
    let state = m
        .load_boot_sector(&boot::sweeper(start, end, 1).unwrap())
        .unwrap();
    let serial = Captured::default();
    m.set_serial(Box::new(serial.clone()));
    let kvm_log = m.dirty_tracking().unwrap();
    let uffd = match DirtyTracking::new(m.memory(), TrackerPreference::Best) {
        Ok(t) => t,
        Err(e) => {
            migrate_core::skip::skip(
                "uffd_sees_kvm_writes",
                migrate_core::skip::Need::Uffd,
                &e.to_string(),
            );
            return;
        }
    };
    // Everything loaded so far counts as sent: start both from clean.
    let (mut a, mut b) = (DirtyLog::new(m.memory()), DirtyLog::new(m.memory()));
    kvm_log.harvest(&mut a).unwrap();
    uffd.harvest(&mut b).unwrap();
    let vcpu = m.start(&state, 0).unwrap();
    let printed = serial.count('B');
    until("two whole sweeps", || serial.count('B') >= printed + 2);
    vcpu.pause().unwrap();
    let timed = |t: &dyn DirtyTracker| {
        let mut log = DirtyLog::new(m.memory());
        let at = Instant::now();
        t.harvest(&mut log).unwrap();
        (log, at.elapsed())
    };
    let (by_kvm, kvm_took) = timed(&kvm_log);
    let (by_uffd, uffd_took) = timed(&uffd);
    let range = (start as usize / 4096)..(end as usize / 4096);
    let missed = |log: &DirtyLog| range.clone().filter(|&p| !log.is_dirty(0, p)).count();
    assert_eq!(missed(&by_kvm), 0, "KVM's dirty log missed swept pages");
    assert_eq!(
        missed(&by_uffd),
        0,
        "{} missed pages the KVM guest swept",
        uffd.kind().name()
    );
    println!(
        "one harvest of {} MiB after two sweeps: KVM dirty log + bitmap {kvm_took:?} \
         ({} pages), {} {uffd_took:?} ({} pages)",
        m.memory().total_bytes() >> 20,
        by_kvm.count(),
        uffd.kind().name(),
        by_uffd.count()
    );
}

/// QEMU's own migration-test guest (`tests/migration/i386/a-b-bootblock`,
/// fetched by `scripts/foreign-boot-sector.sh`, never stored here): it
/// enters protected mode with its own GDT, sets A20 through port 0x92,
/// prints `A`, then sweeps 1..100 MiB adding one to a byte of every page,
/// printing `B` every 64 sweeps. Dropped into `mini-vmm source
/// --boot-sector`, it migrates live between two processes and runs on at
/// the destination (prints there), whose RAM obeys the sweep rule.
#[test]
fn a_boot_sector_nobody_here_wrote_migrates_live() {
    if !kvm_here("foreign_boot_sector") {
        return;
    }
    let image = std::env::var_os("MINI_VMM_FOREIGN_BOOT_SECTOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/foreign/qemu-a-b-bootblock.img")
        });
    if !image.exists() {
        migrate_core::skip::skip(
            "foreign_boot_sector",
            migrate_core::skip::Need::ForeignGuest,
            &format!(
                "{} is missing (scripts/foreign-boot-sector.sh fetches it)",
                image.display()
            ),
        );
        return;
    }
    let (ram, dest_serial) = (scratch("foreign-ram.img"), scratch("foreign-dest.txt"));
    let source_serial = scratch("foreign-source.txt");
    let run = TwoProcesses::run(
        &args(&[
            &"--transport",
            &"tcp",
            // Until it prints here: a B takes 64 sweeps of 99 MiB.
            &"--run-until-serial",
            &"1",
            &"--run-for-s",
            &"600",
            &"--memory-file",
            &ram,
            &"--serial",
            &dest_serial,
        ]),
        &args(&[
            &"--memory",
            &"150M",
            &"--transport",
            &"tcp",
            &"--start-after-ms",
            &"500",
            &"--boot-sector",
            &image,
            &"--serial",
            &source_serial,
        ]),
    );
    // It ran before the migration: it printed its A on the source.
    assert!(
        std::fs::read_to_string(&source_serial)
            .unwrap()
            .starts_with('A'),
        "the guest never started on the source"
    );
    run.assert_same_digest();
    assert!(run.dest_text.contains("still running"), "{}", run.dest_text);
    let printed = std::fs::read_to_string(&dest_serial).unwrap();
    assert!(
        printed.contains('B'),
        "nothing printed on the destination: {printed:?}"
    );
    assert_ne!(swept(&ram, 1 << 20, 100 << 20), 0, "nothing swept there");
}

/// Sent whole (`--no-sparse`), a sweeper out-dirties a 20 MB/s link (it
/// rewrites 15 MiB in a few milliseconds, a round takes most of a second):
/// auto-converge throttles its vCPU (mini-vmm sleeps it a share of each
/// period), the report says so, and the guest still arrives whole and runs
/// on. (Its pages hold one byte each: as sparse pages they take 12 bytes,
/// and the same guest converges at once, unthrottled.)
#[test]
fn a_sweeping_boot_sector_is_throttled_and_still_arrives() {
    if !kvm_here("boot_sector_throttled") {
        return;
    }
    let image = scratch("throttled.img");
    let o = bin()
        .args(["guest", "sweeper", "--start", "1M", "--end", "16M", "--out"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (ram, dj, sj) = (
        scratch("throttled-ram.img"),
        scratch("throttled-d.json"),
        scratch("throttled-s.json"),
    );
    TwoProcesses::run(
        &args(&[
            &"--transport",
            &"tcp",
            &"--run-until-serial",
            &"2",
            &"--run-for-s",
            &"600",
            &"--memory-file",
            &ram,
            &"--json",
            &dj,
            &"--serial",
            &scratch("throttled-serial.txt"),
        ]),
        &args(&[
            &"--memory",
            &"24M",
            &"--transport",
            &"tcp",
            &"--bandwidth-mbs",
            &"20",
            &"--no-sparse",
            &"--start-after-ms",
            &"300",
            &"--boot-sector",
            &image,
            &"--serial",
            &scratch("throttled-source.txt"),
            &"--json",
            &sj,
        ]),
    );
    let json = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (s, d) = (json(&sj), json(&dj));
    assert_eq!(s["status"], "completed", "{s}");
    assert!(
        s["throttle_percent"].as_u64().unwrap() > 0,
        "a guest rewriting 15 MiB per sweep over a 20 MB/s link was never throttled: {s}"
    );
    assert_eq!(s["digest"], d["digest"], "{s}\n{d}");
    swept(&ram, 1 << 20, 16 << 20);
}
