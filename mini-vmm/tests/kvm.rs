//! A real vCPU under KVM: its writes in KVM's dirty log, and its live
//! migration between two `mini-vmm` processes over TCP, checked by its own
//! answer and by the memory digests at switch-over.

mod common;
use common::{bin, kvm_here, text};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use migrate_core::dirty::{DirtyLog, DirtyTracker, KvmDirtyLogTracker, VmMemoryBitmap};
use migrate_core::vm::conformance::vm_control_suite;
use mini_vmm::machine::{KvmDestination, KvmSource, Machine};
use mini_vmm::program::{ScatterProgram, TABLE_GPA, TableProgram};

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn kvm_log_has_exactly_the_guests_writes_and_the_bitmap_the_vmms() {
    if !kvm_here("kvm_log") {
        return;
    }
    let table = 4u64 << 20;
    let mut m = Machine::new(table).unwrap();
    let mem = m.memory().clone();
    let slots = [0, 1];
    let kvm = KvmDirtyLogTracker::new(m_vm(&m), &mem, &slots).unwrap();
    let vmm = VmMemoryBitmap::new(m.vmm_memory(), &mem).unwrap();
    // Pages in both regions, first and last included, some twice.
    let pages: Vec<u64> = vec![
        0x20, 0x21, 0x90, 0xff, 0x100, 0x101, 0x3ff, 0x400, 0x477, 0x4ff, 0x101,
    ];
    let targets: Vec<u32> = pages.iter().map(|p| (p * 4096 + 8) as u32).collect();
    let prog = ScatterProgram { targets };
    let boot = m.load_scatter_program(&prog).unwrap();

    // The VMM's own writes (code, list) are in vm-memory's bitmap, not KVM's.
    let mut log = DirtyLog::new(&mem);
    kvm.harvest(&mut log).unwrap();
    assert!(log.is_empty(), "KVM logged the VMM's writes");
    vmm.harvest(&mut log).unwrap();
    assert!(
        log.is_dirty(0, 1) && log.is_dirty(0, 8),
        "code and list pages not in the VMM bitmap"
    );

    let vcpu = m.start(&boot, 0).unwrap();
    let d = vcpu.wait_halted(WAIT).unwrap().expect("guest finished");
    assert_eq!(d.result, Some(ScatterProgram::DONE));
    let mut got = DirtyLog::new(&mem);
    kvm.harvest(&mut got).unwrap();
    let mut want = DirtyLog::new(&mem);
    for &p in &pages {
        let gpa = p * 4096;
        if gpa < TABLE_GPA {
            want.mark(0, p as usize);
        } else {
            want.mark(1, ((gpa - TABLE_GPA) / 4096) as usize);
        }
    }
    assert_eq!(
        got.count(),
        want.count(),
        "KVM logged {} pages, guest wrote {}",
        got.count(),
        want.count()
    );
    assert!(got == want, "KVM's pages differ from the guest's writes");
    let mut again = DirtyLog::new(&mem);
    kvm.harvest(&mut again).unwrap();
    vmm.harvest(&mut again).unwrap();
    assert!(again.is_empty(), "second harvest not empty");
}

/// mini-vmm's KVM VM control passes the same VM-control suite as the
/// fixture guests: a real vCPU paused, saved, throttled and resumed, and a
/// second machine loading the saved registers and starting its vCPU.
#[test]
fn kvm_vm_control() {
    if !kvm_here("kvm_vm_control") {
        return;
    }
    // Enough passes to keep writing through the whole suite.
    let program = TableProgram::new(1, 100_000);
    let mut m = Machine::new(program.table_bytes()).unwrap();
    let mem = m.memory().clone();
    let boot = m.load_table_program(&program).unwrap();
    let vcpu = m.start(&boot, 20_000).unwrap();
    let mut dm = Machine::new(program.table_bytes()).unwrap();
    let mut destination = KvmDestination::new(&mut dm, 20_000);
    vm_control_suite(
        "kvm_vm_control",
        &mut KvmSource::new(&vcpu),
        &mem,
        &mut destination,
    );
    assert!(
        destination.running.is_some(),
        "the destination's vCPU did not start"
    );
    assert!(!vcpu.device().halted, "the source guest stopped");
}

fn m_vm(m: &Machine) -> std::sync::Arc<kvm_ioctls::VmFd> {
    m.vm_fd().clone()
}

/// A running guest, harvested again and again into a shadow copy (what
/// pre-copy does): after the pause and a last harvest, the shadow equals the
/// memory byte for byte, and the guest still computes the right answer.
#[test]
fn harvests_of_a_running_guest_lose_nothing() {
    if !kvm_here("running_guest") {
        return;
    }
    let program = TableProgram::new(1, 12);
    let mut m = Machine::new(program.table_bytes()).unwrap();
    let mem = m.memory().clone();
    let boot = m.load_table_program(&program).unwrap();
    let tracking = m.dirty_tracking().unwrap();
    let mut shadow: Vec<Vec<u8>> = mem
        .regions()
        .iter()
        .map(|r| {
            let mut v = vec![0; r.len()];
            mem.read(r.gpa(), &mut v).unwrap();
            v
        })
        .collect();
    let refresh = |shadow: &mut Vec<Vec<u8>>, log: &DirtyLog| {
        for (ri, page) in log.pages() {
            let r = &mem.regions()[ri];
            let off = page * 4096;
            mem.read(r.gpa() + off as u64, &mut shadow[ri][off..off + 4096])
                .unwrap();
        }
    };
    // Paced so that it runs through many harvests.
    let vcpu = m.start(&boot, 4_000).unwrap();
    let mut harvests = 0;
    let mut dirty_seen = 0;
    let start = Instant::now();
    while vcpu.device().passes < 6 && start.elapsed() < WAIT {
        let mut log = DirtyLog::new(&mem);
        tracking.harvest(&mut log).unwrap();
        dirty_seen += log.count();
        refresh(&mut shadow, &log);
        harvests += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let state = vcpu.pause().unwrap();
    let mut log = DirtyLog::new(&mem);
    tracking.harvest(&mut log).unwrap();
    refresh(&mut shadow, &log);
    assert!(
        harvests > 10 && dirty_seen > 256,
        "{harvests} harvests saw {dirty_seen} pages"
    );
    for (ri, r) in mem.regions().iter().enumerate() {
        let mut now = vec![0; r.len()];
        mem.read(r.gpa(), &mut now).unwrap();
        if let Some(i) = (0..r.len()).find(|&i| now[i] != shadow[ri][i]) {
            panic!("shadow differs at region {ri} byte {i:#x} after {harvests} harvests");
        }
    }
    assert!(state.device.passes >= 6 && !state.device.halted);
    vcpu.resume();
    let d = vcpu.wait_halted(WAIT).unwrap().expect("guest finished");
    assert_eq!(
        d.result,
        Some(program.expected()),
        "guest answer differs from the model"
    );
}

fn line(out: &str, prefix: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.strip_prefix(prefix)
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
    })
}

/// Start a destination; returns it and the address it listens on.
fn start_dest() -> (Child, String, BufReader<std::process::ChildStdout>) {
    start_dest_with(&["--digest".as_ref()])
}

/// As [`start_dest`], with `extra` arguments instead of `--digest`.
fn start_dest_with(
    extra: &[&std::ffi::OsStr],
) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut d = bin()
        .args(["dest", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(d.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let addr = l
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    (d, addr, out)
}

// Two passes over a 4 MiB table, paced to at most 800 pages/s: at least
// 2.5 s of guest work on any machine, so each migration below happens
// while it runs; about 12 s here, where each page's first write costs a
// nested VM exit of ~6 ms (eight passes took 50 s of every test's time).
const GUEST: [&str; 6] = [
    "--table-mib",
    "4",
    "--passes",
    "2",
    "--pages-per-sec",
    "800",
];

/// The answer of [`GUEST`] unmigrated, as `result:` prints it: the model's
/// (the test above holds a real vCPU's answer to the model, so the
/// migrated runs need not run the guest a second time to know it).
fn unmigrated_result() -> String {
    format!("{:#010x}", TableProgram::new(4, 2).expected())
}

/// Migrate [`GUEST`] live from a `mini-vmm source` (with `source_extra`,
/// starting after `start_after_ms`) to a `mini-vmm dest --digest` (with
/// `dest_extra`): both exit 0, the guest finishes on the destination with
/// the unmigrated answer and not on the source, and the paused source's
/// memory equals the destination's (digests). Both outputs.
fn migrate_live(
    dest_extra: &[&std::ffi::OsStr],
    source_extra: &[&std::ffi::OsStr],
    start_after_ms: &str,
) -> (String, String) {
    let expected = unmigrated_result();
    let mut dargs = vec!["--digest".as_ref()];
    dargs.extend_from_slice(dest_extra);
    let (dest, addr, mut dest_out) = start_dest_with(&dargs);
    let src = bin()
        .args([
            "source",
            "--connect",
            &addr,
            "--digest",
            "--start-after-ms",
            start_after_ms,
        ])
        .args(source_extra)
        .args(GUEST)
        .output()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut dest_out, &mut rest).unwrap();
    let dest = dest.wait_with_output().unwrap();
    let dest_text = format!("{rest}{}", String::from_utf8_lossy(&dest.stderr));
    let src_text = text(&src);
    assert!(src.status.success(), "source failed:\n{src_text}");
    assert!(dest.status.success(), "destination failed:\n{dest_text}");
    // The guest finished on the destination, with the unmigrated answer.
    assert_eq!(line(&dest_text, "result: "), Some(expected), "{dest_text}");
    assert!(
        line(&src_text, "result: ").is_none(),
        "the source guest ran on: {src_text}"
    );
    // Memory at switch-over: the paused source's equals the destination's.
    let (sd, dd) = (line(&src_text, "digest: "), line(&dest_text, "digest: "));
    assert!(
        sd.is_some() && sd == dd,
        "digests differ: source {sd:?}, destination {dd:?}"
    );
    (src_text, dest_text)
}

#[test]
fn a_running_kvm_guest_migrates_live_between_two_processes() {
    if !kvm_here("live_migration") {
        return;
    }
    let (src_text, _) = migrate_live(&[], &["--verify".as_ref()], "500");
    assert!(src_text.contains("migrated: "), "{src_text}");
}

#[test]
fn the_source_guest_runs_on_when_the_destination_dies() {
    if !kvm_here("destination_dies") {
        return;
    }
    let expected = unmigrated_result();
    let (mut dest, addr, _out) = start_dest();
    // At 1 MB/s round 0 of the 4 MiB table lasts about 4 s: the
    // destination dies inside it, at the event that says the migration
    // began (the source's "migrating to"), never near the commit.
    let mut src = bin()
        .args([
            "source",
            "--connect",
            &addr,
            "--bandwidth-mbs",
            "1",
            "--start-after-ms",
            "300",
        ])
        .args(GUEST)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(src.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.contains("migrating to"), "{first}");
    dest.kill().unwrap();
    dest.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let src = src.wait_with_output().unwrap();
    let t = format!("{}{first}{rest}", String::from_utf8_lossy(&src.stdout));
    assert_eq!(src.status.code(), Some(1), "{t}");
    assert!(t.contains("migration failed"), "{t}");
    assert_eq!(line(&t, "result: "), Some(expected), "{t}");
}

/// A destination frozen before the source arrives never answers the
/// handshake: the source gives up after its I/O timeout with a set-up
/// error (exit 2: nothing was sent), saying what it waited for, and never
/// starts the guest it meant to migrate.
#[test]
fn a_destination_frozen_in_the_handshake_is_a_set_up_error() {
    if !kvm_here("frozen_in_handshake") {
        return;
    }
    let (mut dest, addr, _out) = start_dest();
    let frozen = Command::new("kill")
        .args(["-STOP", &dest.id().to_string()])
        .status()
        .unwrap();
    assert!(frozen.success());
    let src = bin()
        .args(["source", "--connect", &addr, "--io-timeout-s", "2"])
        .args(GUEST)
        .output()
        .unwrap();
    dest.kill().unwrap();
    dest.wait().unwrap();
    let t = text(&src);
    assert_eq!(src.status.code(), Some(2), "{t}");
    assert!(t.contains("preamble"), "{t}");
    assert!(!t.contains("migrating to"), "{t}");
    assert!(line(&t, "result: ").is_none(), "the guest ran: {t}");
}

/// A source of the KVM guest to `addr` that goes post-copy after one round
/// over a 2 MB/s link.
fn postcopy_source(addr: &str) -> Command {
    let mut c = bin();
    c.args([
        "source",
        "--connect",
        addr,
        "--bandwidth-mbs",
        "2",
        "--postcopy-after-rounds",
        "1",
        // Any rest misses a 1 ms budget at 2 MB/s: post-copy, never a
        // pre-copy finish.
        "--downtime-ms",
        "1",
        "--start-after-ms",
        "300",
    ])
    .args(GUEST);
    c
}

/// The KVM guest moves in post-copy: after one round over a 2 MB/s link
/// the source pauses it and the destination resumes it with the table
/// pages it rewrote still on the source; the vCPU's accesses to them fault
/// through KVM into userfaultfd and wait for their pages. It finishes
/// there with the unmigrated answer.
#[test]
fn a_running_kvm_guest_migrates_in_postcopy() {
    if !kvm_here("postcopy") {
        return;
    }
    let expected = unmigrated_result();
    let json = std::env::temp_dir().join(format!("mini-vmm-postcopy-{}.json", std::process::id()));
    // Never an earlier run's report under the same process id.
    let _ = std::fs::remove_file(&json);
    let (d, addr, mut dest_out) = start_dest_with(&["--json".as_ref(), json.as_os_str()]);
    let src = postcopy_source(&addr).output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut dest_out, &mut rest).unwrap();
    let dest = d.wait_with_output().unwrap();
    let dest_text = format!("{rest}{}", String::from_utf8_lossy(&dest.stderr));
    let src_text = text(&src);
    assert!(src.status.success(), "source failed:\n{src_text}");
    assert!(dest.status.success(), "destination failed:\n{dest_text}");
    assert_eq!(line(&dest_text, "result: "), Some(expected), "{dest_text}");
    assert!(
        line(&src_text, "result: ").is_none(),
        "the source guest ran on: {src_text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["postcopy"], true, "{v}");
    let set =
        v["postcopy_demand_pages"].as_u64().unwrap() + v["postcopy_pushed_pages"].as_u64().unwrap();
    assert!(set > 0, "{v}");
    println!(
        "KVM post-copy: {set} pages ({} on demand), faults {}, p50 {} us, p99 {} us",
        v["postcopy_demand_pages"],
        v["fault_latency_us"]["faults"],
        v["fault_latency_us"]["p50"],
        v["fault_latency_us"]["p99"]
    );
}

/// The destination dies while the KVM guest runs there in post-copy (its
/// missing pages still on the source): the source can neither give the
/// guest back (the destination ran it) nor finish. Exit 4, the guest not
/// run on at the source, never 0 or 1.
#[test]
fn the_destination_killed_in_postcopy_is_exit_4_at_the_source() {
    if !kvm_here("postcopy_destination_killed") {
        return;
    }
    let (mut d, addr, _dest_out) = start_dest_with(&[]);
    let mut src = postcopy_source(&addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The source says when post-copy runs: the destination acknowledged
    // the commit (killed before that, the source could not know whether it
    // runs the guest: exit 3).
    let mut src_err = BufReader::new(src.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut l = String::new();
        if src_err.read_line(&mut l).unwrap() == 0 {
            panic!("the source ended before post-copy: {said}");
        }
        said.push_str(&l);
        if l.starts_with("post-copy: ") {
            break;
        }
    }
    d.kill().unwrap();
    d.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut src_err, &mut rest).unwrap();
    let src = src.wait_with_output().unwrap();
    let t = format!("{}{said}{rest}", text(&src));
    assert_eq!(src.status.code(), Some(4), "{t}");
    assert!(
        t.contains("migration failed") && !t.contains("runs on here"),
        "{t}"
    );
    assert!(
        line(&t, "result: ").is_none(),
        "the source guest ran on: {t}"
    );
}

/// `--psk-file` (both ends) and `--compress` (the source) work as in
/// migrate-cli: the running guest migrates authenticated by the key, its
/// batches compressed, and finishes on the destination with the
/// unmigrated answer and the paused source's memory (digests).
#[test]
fn a_kvm_guest_migrates_with_a_preshared_key_and_compression() {
    if !kvm_here("psk_compress") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mini-vmm-psk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{:064x}\n", 0x5eed_u128 * 7919).as_bytes())
            .unwrap();
    }
    let (sj, dj) = (dir.join("s.json"), dir.join("d.json"));
    migrate_live(
        &[
            "--psk-file".as_ref(),
            key.as_os_str(),
            "--json".as_ref(),
            dj.as_os_str(),
        ],
        &[
            "--compress".as_ref(),
            "--psk-file".as_ref(),
            key.as_os_str(),
            "--json".as_ref(),
            sj.as_os_str(),
        ],
        "300",
    );
    for j in [&sj, &dj] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(j).unwrap()).unwrap();
        assert_eq!(v["authentication"], "psk", "{v}");
        assert_eq!(v["status"], "completed", "{v}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination whose stdout nobody reads any more (the pipe closed after
/// its `listening on` line: the orchestrator died) runs the migrated guest
/// to its end all the same, exit 0; only its lines are lost. Its
/// `println!` panicked on the closed pipe at the digest after the commit:
/// the guest was gone from both ends.
#[test]
fn a_destination_whose_stdout_is_gone_runs_the_guest_on() {
    if !kvm_here("stdout_gone") {
        return;
    }
    let (dest, addr, out) = start_dest();
    drop(out);
    let src = bin()
        .args(["source", "--connect", &addr, "--start-after-ms", "500"])
        .args(GUEST)
        .output()
        .unwrap();
    let dest = dest.wait_with_output().unwrap();
    assert!(src.status.success(), "source failed:\n{}", text(&src));
    assert!(text(&src).contains("migrated: "), "{}", text(&src));
    assert!(
        dest.status.success(),
        "destination: {}",
        String::from_utf8_lossy(&dest.stderr)
    );
}
