//! The fault matrix: a real fault struck at a chosen point of the control
//! stream of a real migration between two `migrate-cli` processes — the
//! connection cut or stalled by a proxy, a process killed or frozen
//! (`SIGKILL`, `SIGSTOP`) — and every outcome checked against the
//! documented one: exit codes, the source guest running or paused, no
//! false success, and the migrated bytes when it completes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Where in the control stream a fault strikes: right after the proxy
/// forwarded the `nth` frame of kind `kind` from the source (frames
/// parsed: 8-byte preamble, then 16-byte headers with the kind in byte 0
/// and the payload length in bytes 4..8); with `last_round`, only a
/// `RoundDone { round, last: true }` counts (payload: the round, 4 bytes,
/// then `last`, 1 byte).
#[derive(Clone, Copy)]
struct At {
    /// The phase, as the table prints it.
    phase: &'static str,
    kind: u8,
    nth: usize,
    last_round: bool,
}

impl At {
    const fn kind(phase: &'static str, kind: u8, nth: usize) -> Self {
        Self {
            phase,
            kind,
            nth,
            last_round: false,
        }
    }

    /// A name for files: unique per phase.
    fn tag(&self) -> String {
        format!("{}-{}-{}", self.kind, self.nth, u8::from(self.last_round))
    }

    fn matches(&self, kind: u8, payload: &[u8]) -> bool {
        kind == self.kind && (!self.last_round || payload.get(4) == Some(&1))
    }
}

/// The phases of a migration, each named by the source's message that
/// opens it: the fault strikes right after that message left the proxy.
const HANDSHAKE: At = At::kind("handshake (Hello)", 1, 1);
/// Setup is not resumable: nothing has been sent, the source guest never
/// stopped; a lost peer there fails the migration on both sides.
const SETUP: At = At::kind(
    "setup (Layout: memory allocated, streams about to join)",
    3,
    1,
);
const DIRTY_ROUND: At = At::kind("a dirty round (RoundDone of round 0)", 8, 1);
const PAUSED_ROUND: At = At {
    phase: "the paused round (RoundDone, last)",
    kind: 8,
    nth: 1,
    last_round: true,
};
const VERIFY: At = At::kind("verification (VerifyRequest)", 10, 1);
const DEVICE_STATE: At = At::kind("device state (DeviceState)", 12, 1);
const COMMIT: At = At::kind("commit (Commit)", 13, 1);

/// What the proxy does at its frame.
#[derive(Clone)]
enum Fault {
    /// Close the source's side of the control connection; the destination
    /// may still answer, into the void.
    CutSource,
    /// Close both sides of the control connection.
    CutBoth,
    /// Stop forwarding anything, both ways, without closing: a frozen
    /// peer, as seen from either side.
    Stall,
    /// `SIGKILL` the process whose pid the cell holds; forwarding goes on
    /// (what was already sent still arrives, as on a real network). As for
    /// a freeze, the destination is killed before the frame reaches it.
    Kill(Arc<AtomicU32>, When),
    /// `SIGSTOP` it for this long, then `SIGCONT`; forwarding goes on.
    /// The destination is stopped before the frame reaches it (it would
    /// otherwise race the signal with its answer: a fault meant for one
    /// phase landing in the next), the source after its frame left.
    Freeze(Arc<AtomicU32>, Duration, When),
}

/// When a killed or frozen process is signalled, relative to the proxy
/// forwarding the frame.
#[derive(Clone, Copy, PartialEq)]
enum When {
    /// Before the frame goes on (the process that receives it).
    BeforeForwarding,
    /// After (the process that sent it).
    AfterForwarding,
}

/// The destination is signalled before the frame reaches it, the source
/// after its frame left.
fn when(side: Side) -> When {
    match side {
        Side::Destination => When::BeforeForwarding,
        Side::Source => When::AfterForwarding,
    }
}

/// The pid in `cell`, once the test has stored it (the proxy may see the
/// first frame before `spawn` returned to the test).
fn pid_of(cell: &AtomicU32) -> u32 {
    let start = Instant::now();
    loop {
        let pid = cell.load(Ordering::SeqCst);
        if pid != 0 {
            return pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no pid to signal"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A TCP proxy to `upstream` that strikes `fault` on the source's first
/// (control) connection at `at`. Later connections (data streams, a
/// reconnection) pass as they are.
fn faulty_proxy(upstream: String, at: At, fault: Fault) -> String {
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = proxy.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (n, client) in proxy.incoming().enumerate() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                return;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let stalled = Arc::new(AtomicBool::new(false));
            let stall = Arc::clone(&stalled);
            // Held while a signal is on its way, so that the answers of the
            // destination do not let the source run ahead of the fault.
            let held = Arc::new(AtomicBool::new(false));
            let hold = Arc::clone(&held);
            // Destination to source, until stalled; the destination's end
            // (it closed, or died) reaches the source, a stall does not.
            std::thread::spawn(move || {
                let mut buf = [0u8; 64 << 10];
                while let Ok(k) = s2.read(&mut buf) {
                    while hold.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if stall.load(Ordering::SeqCst) {
                        return;
                    }
                    if k == 0 || c2.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            let fault = fault.clone();
            std::thread::spawn(move || {
                if n > 0 {
                    let _ = std::io::copy(&mut client, &mut server);
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    return;
                }
                let mut pre = [0u8; 8];
                if client.read_exact(&mut pre).is_err() || server.write_all(&pre).is_err() {
                    return;
                }
                let mut seen = 0;
                loop {
                    let mut h = [0u8; 16];
                    if client.read_exact(&mut h).is_err() {
                        let _ = server.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
                    let mut payload = vec![0u8; len];
                    if client.read_exact(&mut payload).is_err() {
                        let _ = server.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    let strike = at.matches(h[0], &payload) && {
                        seen += 1;
                        seen == at.nth
                    };
                    let mut thaw = None;
                    let mut killed = false;
                    match (strike, &fault) {
                        (true, Fault::Freeze(pid, outage, When::BeforeForwarding)) => {
                            let pid = pid_of(pid);
                            held.store(true, Ordering::SeqCst);
                            signal(pid, "-STOP");
                            thaw = Some((pid, *outage));
                        }
                        (true, Fault::Kill(pid, When::BeforeForwarding)) => {
                            held.store(true, Ordering::SeqCst);
                            signal(pid_of(pid), "-KILL");
                            killed = true;
                        }
                        _ => {}
                    }
                    if server.write_all(&h).is_err() || server.write_all(&payload).is_err() {
                        let _ = server.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    if !strike {
                        continue;
                    }
                    match &fault {
                        Fault::CutSource => {
                            let _ = client.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        Fault::CutBoth => {
                            let _ = client.shutdown(std::net::Shutdown::Both);
                            let _ = server.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        Fault::Stall => {
                            stalled.store(true, Ordering::SeqCst);
                            // Hold both sockets open, forwarding nothing.
                            std::thread::sleep(Duration::from_secs(60));
                            return;
                        }
                        Fault::Kill(pid, _) => {
                            if !killed {
                                held.store(true, Ordering::SeqCst);
                                signal(pid_of(pid), "-KILL");
                            }
                            held.store(false, Ordering::SeqCst);
                        }
                        Fault::Freeze(pid, outage, _) => {
                            let (pid, outage) = thaw.unwrap_or_else(|| {
                                let pid = pid_of(pid);
                                held.store(true, Ordering::SeqCst);
                                signal(pid, "-STOP");
                                (pid, *outage)
                            });
                            held.store(false, Ordering::SeqCst);
                            std::thread::spawn(move || {
                                std::thread::sleep(outage);
                                signal(pid, "-CONT");
                            });
                        }
                    }
                }
            });
        }
    });
    addr
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// Exited with this code.
    Code(i32),
    /// Killed by the fault (the test's `SIGKILL`).
    Killed,
    /// Still running when the test gave up waiting (then killed): a
    /// destination that never began a migration keeps waiting for one.
    Waiting,
}

/// Wait for `child` up to `limit`; then kill it and say so.
fn finish(mut child: Child, limit: Duration) -> (End, Output) {
    let start = Instant::now();
    let mut waited = false;
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            waited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let end = match o.status.code() {
        _ if waited => End::Waiting,
        Some(c) => End::Code(c),
        None => End::Killed,
    };
    (end, o)
}

/// What one migration through a [`faulty_proxy`] came to.
struct Outcome {
    source: End,
    dest: End,
    s: Output,
    d: Output,
    sj: PathBuf,
    dj: PathBuf,
}

/// Which process a signal goes to.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Source,
    Destination,
}

/// How the fault is made.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Strike {
    Cut {
        both: bool,
    },
    Stall,
    Kill(Side),
    /// Frozen for twice the I/O timeout.
    Freeze(Side),
}

/// A 16 MiB bank guest (dirtying, so there are dirty rounds) migrated with
/// `--verify` through a proxy that strikes at `at`, both ends with the I/O
/// timeout `io_timeout_s` and `extra` (reconnection grace, …).
fn migrate_through(
    tag: &str,
    at: At,
    strike: Strike,
    io_timeout_s: u64,
    extra: &[&str],
) -> Outcome {
    let (sj, dj) = (tmp(&format!("{tag}-s.json")), tmp(&format!("{tag}-d.json")));
    let _ = std::fs::remove_file(&sj);
    let _ = std::fs::remove_file(&dj);
    let timeout = io_timeout_s.to_string();
    let mut dest_args = vec!["--io-timeout-s", &timeout];
    dest_args.extend_from_slice(extra);
    let (d, upstream) = dest(None, "127.0.0.1:0", &dest_args, &dj);
    let (dest_pid, source_pid) = (
        Arc::new(AtomicU32::new(d.id())),
        Arc::new(AtomicU32::new(0)),
    );
    let pid = |side| match side {
        Side::Source => Arc::clone(&source_pid),
        Side::Destination => Arc::clone(&dest_pid),
    };
    let fault = match strike {
        Strike::Cut { both: false } => Fault::CutSource,
        Strike::Cut { both: true } => Fault::CutBoth,
        Strike::Stall => Fault::Stall,
        Strike::Kill(side) => Fault::Kill(pid(side), when(side)),
        Strike::Freeze(side) => {
            Fault::Freeze(pid(side), Duration::from_secs(2 * io_timeout_s), when(side))
        }
    };
    let proxy = faulty_proxy(upstream, at, fault);
    let mut args = vec![
        "--memory",
        "16M",
        "--guest",
        "bank",
        "--dirty-rate",
        "2000",
        "--verify",
        "--io-timeout-s",
        &timeout,
    ];
    args.extend_from_slice(extra);
    let s = source(None, &proxy, &args, &sj);
    source_pid.store(s.id(), Ordering::SeqCst);
    let (source, s) = finish(s, Duration::from_secs(120));
    let (dest, d) = finish(d, Duration::from_secs(30));
    Outcome {
        source,
        dest,
        s,
        d,
        sj,
        dj,
    }
}

impl Outcome {
    /// What must hold whatever the fault: never a guest running on both
    /// sides or on neither by a false success; a source that failed says
    /// its guest runs again; one that cannot know says its guest is
    /// paused; a destination that completed holds the paused source's
    /// memory (verified by hashes, and the bank's ledger consistent).
    fn check_invariants(&self, what: &str) {
        let stderr = String::from_utf8_lossy(&self.s.stderr);
        // A killed process writes no report.
        let report = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        };
        let sv = report(&self.sj).unwrap_or_default();
        let dv = report(&self.dj);
        let dest_completed = self.dest == End::Code(0);
        match self.source {
            End::Code(0) => {
                assert_eq!(sv["status"], "completed", "{what}: {sv}");
                assert_eq!(sv["verified"], true, "{what}: {sv}");
                // A destination killed right behind the Commit it acted on
                // committed first: the source heard so.
                assert!(
                    dest_completed || self.dest == End::Killed,
                    "{what}: the source says migrated, the destination ended {:?}: {}",
                    self.dest,
                    text(&self.d)
                );
            }
            End::Code(1) => {
                assert_eq!(sv["status"], "failed", "{what}: {sv}");
                assert!(stderr.contains("running again"), "{what}: {stderr}");
                assert!(
                    !dest_completed,
                    "{what}: two copies of the guest run: {}",
                    text(&self.d)
                );
            }
            End::Code(3) => {
                assert_eq!(sv["status"], "commit-unknown", "{what}: {sv}");
                assert!(!stderr.contains("running again"), "{what}: {stderr}");
            }
            End::Killed => {}
            other => panic!("{what}: source ended {other:?}: {}", text(&self.s)),
        }
        // A destination killed after writing its report (it committed,
        // then the signal landed) ended by the signal, not by its code.
        if let Some(dv) = dv {
            let status = dv["status"].as_str().unwrap_or_default();
            if matches!(self.dest, End::Code(_)) {
                assert_eq!(dest_completed, status == "completed", "{what}: {dv}");
            }
            if status == "completed" {
                assert_eq!(dv["guest_consistent"], true, "{what}: {dv}");
            }
        }
    }
}

#[test]
fn a_cut_in_each_phase_ends_as_documented() {
    // (phase, source exits, destination exits, reconnects). Cut after the
    // device state, the source's Commit, sent right behind it, may still
    // leave its socket: then it cannot know whether the destination
    // committed (3, guest paused); else it knows it did not (1, guest
    // runs). The destination must not commit either way.
    type Case = (At, &'static [i32], i32, u64);
    let cases: [Case; 5] = [
        (HANDSHAKE, &[1], 1, 0),
        (DIRTY_ROUND, &[0], 0, 1),
        (VERIFY, &[1], 1, 0),
        (DEVICE_STATE, &[1, 3], 1, 0),
        (COMMIT, &[3], 0, 0),
    ];
    for (at, source_codes, dest_code, reconnects) in cases {
        let strike = Strike::Cut {
            both: at.phase != COMMIT.phase,
        };
        let o = migrate_through(&format!("cut-{}", at.tag()), at, strike, 3, &[]);
        let phase = at.phase;
        o.check_invariants(phase);
        let End::Code(source_code) = o.source else {
            panic!("{phase}: {}", text(&o.s))
        };
        assert!(
            source_codes.contains(&source_code),
            "{phase}: {}",
            text(&o.s)
        );
        assert_eq!(o.dest, End::Code(dest_code), "{phase}: {}", text(&o.d));
        if source_code == 0 {
            // Exactly the fault's reconnections: heartbeats keep a healthy
            // peer alive, so a reconnection of its own is a finding.
            let made = json(&o.sj)["reconnects"].as_u64().unwrap_or(0);
            assert_eq!(
                made,
                reconnects,
                "{phase}: {made} reconnects, {reconnects} injected\nsource:\n{}\ndestination:\n{}",
                text(&o.s),
                text(&o.d)
            );
        }
        if source_code == 3 {
            let expected = if dest_code == 0 {
                "completed"
            } else {
                "failed"
            };
            assert_eq!(json(&o.dj)["status"], expected, "{phase}");
        }
        println!("cut in {phase}: source {source_code}, destination {dest_code}: as documented");
    }
}

/// The control connection stalls — nothing either way, nothing closed, as
/// a frozen peer looks — once the guest is paused (at `VerifyRequest`, at
/// `DeviceState`). Both sides find the silence within the I/O timeout; the
/// source, past the switch-over, does not resume: it runs its guest again
/// (1), and the destination, which never got `Commit`, discards (1).
#[test]
fn a_stall_after_the_switch_over_fails_with_the_guest_running() {
    for at in [VERIFY, DEVICE_STATE] {
        let phase = at.phase;
        let o = migrate_through(
            &format!("stall-{}", at.tag()),
            at,
            Strike::Stall,
            2,
            &["--reconnect-s", "3"],
        );
        o.check_invariants(phase);
        // Cut after the device state, the Commit right behind it may have
        // left the socket: then commit-unknown (3), the guest paused.
        let expected: &[End] = if at.phase == DEVICE_STATE.phase {
            &[End::Code(1), End::Code(3)]
        } else {
            &[End::Code(1)]
        };
        assert!(expected.contains(&o.source), "{phase}: {}", text(&o.s));
        let err = json(&o.sj)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(err.contains("dead, frozen or cut off"), "{phase}: {err}");
        assert_eq!(o.dest, End::Code(1), "{phase}: {}", text(&o.d));
        println!("stall in {phase}: source {:?}, destination 1", o.source);
    }
}

/// Which outcomes are documented for a fault in one phase: the phase, the
/// source's possible ends, the destination's.
type Case = (At, &'static [End], &'static [End]);

/// Every phase, a real process killed or frozen in it (`strike`): the
/// outcome each time is one of the documented ones, and the invariants hold.
fn signal_matrix(strike: Strike, cases: &[Case]) {
    let mut table = Vec::new();
    for (at, source_ends, dest_ends) in cases {
        let what = format!("{strike:?} in {}", at.phase);
        let tag = format!("{strike:?}-{}", at.tag()).replace([' ', '(', ')', '{', '}', ':'], "");
        let o = migrate_through(&tag, *at, strike, 2, &["--reconnect-s", "6"]);
        o.check_invariants(&what);
        assert!(
            source_ends.contains(&o.source),
            "{what}: source ended {:?}: {}\ndestination ended {:?}: {}",
            o.source,
            text(&o.s),
            o.dest,
            text(&o.d)
        );
        assert!(
            dest_ends.contains(&o.dest),
            "{what}: destination ended {:?}: {}",
            o.dest,
            text(&o.d)
        );
        table.push(format!("| {what} | {:?} | {:?} |", o.source, o.dest));
    }
    println!(
        "| fault | source | destination |\n|---|---|---|\n{}",
        table.join("\n")
    );
}

use End::{Code, Killed};

/// A destination killed before the phase's message reaches it: before the
/// switch-over the source's reconnection is refused (the process is gone)
/// and it runs its guest again (1); after it, it runs it again too, unless
/// its Commit may have arrived (3). (Killed as the message went on, a fast
/// destination could answer first: the fault struck the next phase, or
/// its Commit was answered, 0.)
#[test]
fn a_destination_killed_in_each_phase() {
    let ran: &[End] = &[Code(1)];
    let killed: &[End] = &[Killed];
    signal_matrix(
        Strike::Kill(Side::Destination),
        &[
            (HANDSHAKE, ran, killed),
            (SETUP, ran, killed),
            (DIRTY_ROUND, ran, killed),
            (PAUSED_ROUND, ran, killed),
            (VERIFY, ran, killed),
            (DEVICE_STATE, &[Code(1), Code(3)], killed),
            (COMMIT, &[Code(3)], killed),
        ],
    );
}

/// A killed source: the destination waits out the reconnection grace
/// before the switch-over, then discards (1); after the switch-over it
/// discards at once (1) — unless the Commit arrived, then it commits (0).
#[test]
fn a_source_killed_in_each_phase() {
    let killed: &[End] = &[Killed];
    let discarded: &[End] = &[Code(1)];
    signal_matrix(
        Strike::Kill(Side::Source),
        &[
            (HANDSHAKE, killed, discarded),
            (SETUP, killed, discarded),
            (DIRTY_ROUND, killed, discarded),
            (PAUSED_ROUND, killed, discarded),
            (VERIFY, killed, discarded),
            (DEVICE_STATE, killed, &[Code(0), Code(1)]),
            (COMMIT, killed, &[Code(0)]),
        ],
    );
}

/// A destination frozen for twice the I/O timeout, stopped before the
/// phase's message reaches it: before the switch-over both go on over a
/// new connection once it thaws (0, 0); after it the source runs its guest
/// again (1) and the thawed destination discards (1); once the Commit
/// left, the source cannot know (3) and the thawed destination commits
/// (0). (It was stopped as the message went on, and a fast destination
/// answered `VerifyRequest` before the signal landed: the fault struck
/// the next phase, a clean-clone CI's failure.)
#[test]
fn a_destination_frozen_in_each_phase() {
    let both: &[End] = &[Code(0)];
    let failed: &[End] = &[Code(1)];
    signal_matrix(
        Strike::Freeze(Side::Destination),
        &[
            (HANDSHAKE, failed, failed),
            (SETUP, failed, failed),
            (DIRTY_ROUND, both, both),
            (PAUSED_ROUND, failed, failed),
            (VERIFY, failed, failed),
            (DEVICE_STATE, &[Code(1), Code(3)], &[Code(0), Code(1)]),
            (COMMIT, &[Code(0), Code(3)], &[Code(0), Code(1)]),
        ],
    );
}

/// A source frozen for twice the I/O timeout: before the switch-over both
/// go on once it thaws (0, 0) — in setup too, once its data streams joined
/// (else both fail: 1, 1); after it the destination discards (1) and the
/// thawed source, which finds it gone before its Commit, runs its guest
/// again (1); a Commit that left before the freeze is honoured (0, 0).
#[test]
fn a_source_frozen_in_each_phase() {
    let both: &[End] = &[Code(0)];
    let failed: &[End] = &[Code(1)];
    signal_matrix(
        Strike::Freeze(Side::Source),
        &[
            (HANDSHAKE, failed, failed),
            (SETUP, &[Code(0), Code(1)], &[Code(0), Code(1)]),
            (DIRTY_ROUND, both, both),
            (PAUSED_ROUND, failed, failed),
            (VERIFY, failed, failed),
            (
                DEVICE_STATE,
                &[Code(0), Code(1), Code(3)],
                &[Code(0), Code(1)],
            ),
            (COMMIT, &[Code(0), Code(3)], &[Code(0)]),
        ],
    );
}

/// A post-copy migration of a 2 MiB guest that out-dirties its 1 MB/s
/// link, once the source's events say `postcopy` (the destination runs
/// the guest, most of its pages still at the source): the destination and
/// the source, and their report files.
fn in_postcopy(tag: &str, dest_extra: &[&str]) -> (Child, Child, PathBuf, PathBuf) {
    let (sj, dj, ev) = (
        tmp(&format!("{tag}-s.json")),
        tmp(&format!("{tag}-d.json")),
        tmp(&format!("{tag}.events")),
    );
    let (d, addr) = dest(None, "127.0.0.1:0", dest_extra, &dj);
    let ev_s = ev.to_string_lossy().into_owned();
    let mut args = POSTCOPY_GUEST.to_vec();
    args.extend([
        "--memory",
        "2M",
        "--postcopy-after-rounds",
        "2",
        "--events",
        &ev_s,
    ]);
    let s = source(None, &addr, &args, &sj);
    wait_for_event(&ev, "postcopy");
    (d, s, sj, dj)
}

/// The destination dies during post-copy (SIGKILL once the source's
/// events say `postcopy`): the source cannot give its guest back — the
/// destination ran it — nor finish: exit 4, status `postcopy-interrupted`,
/// its guest paused and its memory kept (it says so), never exit 0 or 1.
#[test]
fn destination_killed_during_postcopy_is_exit_4() {
    let (d, s, sj, _) = in_postcopy("pc-kill", &[]);
    signal(d.id(), "-KILL");
    let _ = d.wait_with_output();
    let (end, s) = finish(s, Duration::from_secs(60));
    assert_eq!(s.status.code(), Some(4), "{end:?}: {}", text(&s));
    let v = json(&sj);
    assert_eq!(v["status"], "postcopy-interrupted", "{v}");
    let err = String::from_utf8_lossy(&s.stderr);
    assert!(
        err.contains("keeps its paused guest") && !err.contains("running again"),
        "{err}"
    );
}

/// The source dies during post-copy (SIGKILL once its events say
/// `postcopy`): the destination runs a guest some of whose pages are gone
/// with it. After its reconnection grace it gives up: exit 4, status
/// `postcopy-interrupted`, never 0 (a guest with holes is not a migrated
/// guest) nor 1 (there is no source guest left to fall back on).
#[test]
fn source_killed_during_postcopy_is_exit_4_at_the_destination() {
    let (d, s, _, dj) = in_postcopy("pc-skill", &["--reconnect-s", "2"]);
    signal(s.id(), "-KILL");
    let _ = s.wait_with_output();
    let (end, d) = finish(d, Duration::from_secs(60));
    assert_eq!(d.status.code(), Some(4), "{end:?}: {}", text(&d));
    let v = json(&dj);
    assert_eq!(v["status"], "postcopy-interrupted", "{v}");
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        err.contains("without all of its pages") && !err.contains("received memory discarded"),
        "{err}"
    );
}
