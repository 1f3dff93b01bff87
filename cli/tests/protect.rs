//! Fault tolerance between real processes: `protect`, `standby` and
//! `witness` over loopback TCP, the primary killed at random points, the
//! standby frozen, the link between them cut while both reach the witness.
//! Every run checks the guest's own rule (the bank ledger of the guest that
//! runs on) and the receipts both ends released: contiguous from 0, any
//! repeat identical, never a contradiction.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Start `migrate-cli ARGS` logging at `info` into the test folder's file
/// `log` (what a failing assert quotes: see [`logs`]), wait for its first
/// stdout line starting with `prefix` and return it with the rest of that
/// line.
fn start(args: &[&str], prefix: &str, log: &str) -> (Reaped, String) {
    let err = std::fs::File::create(tmp(log)).expect("create the log file");
    let mut child = Reaped::new(
        Command::new(BIN)
            .args(args)
            .env("MIGRATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn migrate-cli"),
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.wait();
            panic!("{args:?} ended before saying {prefix:?}:\n{}", logs(&[log]));
        }
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            let rest = rest.to_string();
            // Keep draining stdout so the child never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return (child, rest);
        }
    }
}

/// The last lines of each of these logs (files of the test folder), for a
/// failing assert: what each end saw, with its timestamps.
fn logs(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(tmp(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            format!("--- {name}:\n{tail}\n")
        })
        .collect()
}

fn witness(tag: &str) -> (Reaped, String) {
    start(
        &["witness", "--listen", "127.0.0.1:0"],
        "witness listening on ",
        &format!("{tag}-w.err"),
    )
}

fn standby(witness: &str, tag: &str, extra: &[&str]) -> (Reaped, String) {
    let (out, json) = (tmp(&format!("{tag}-s.out")), tmp(&format!("{tag}-s.json")));
    let mut args = vec![
        "standby",
        "--listen",
        "127.0.0.1:0",
        "--witness",
        witness,
        "--failover-after-ms",
        "500",
        "--run-after-failover-s",
        "1",
    ];
    args.extend_from_slice(extra);
    let (out, json) = (out.display().to_string(), json.display().to_string());
    args.extend(["--output", &out, "--json", &json]);
    start(&args, "listening on ", &format!("{tag}-s.err"))
}

/// The primary, once the standby holds a checkpoint.
fn protect(standby: &str, witness: &str, tag: &str, extra: &[&str]) -> Reaped {
    let (out, json) = (tmp(&format!("{tag}-p.out")), tmp(&format!("{tag}-p.json")));
    let (out, json) = (out.display().to_string(), json.display().to_string());
    let mut args = vec![
        "protect",
        "--standby",
        standby,
        "--witness",
        witness,
        "--memory",
        "16M",
        "--guest",
        "bank",
        "--dirty-rate",
        "2000",
        "--epoch-ms",
        "25",
        "--failover-after-ms",
        "500",
        "--output",
        &out,
        "--json",
        &json,
    ];
    args.extend_from_slice(extra);
    start(&args, "protected: ", &format!("{tag}-p.err")).0
}

fn wait(child: &mut Child, within: Duration) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(t.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The receipts released by the ends, each file in order: contiguous from
/// 0 when merged, every repeat identical. A primary killed in the middle
/// of a write may leave a last line cut short: it must be the start of the
/// same receipt the other end released whole. Returns how many receipts.
fn receipts_hold(files: &[&Path]) -> usize {
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut cut: Vec<String> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let whole = text.ends_with('\n') || text.is_empty();
        let mut lines: Vec<&str> = text.lines().collect();
        if !whole {
            cut.push(lines.pop().unwrap().to_string());
        }
        let mut next: Option<u64> = None;
        for line in lines {
            let seq: u64 = line.split(' ').next().unwrap().parse().unwrap();
            if let Some(n) = next {
                assert_eq!(seq, n, "{}: a gap or disorder at {line:?}", f.display());
            }
            next = Some(seq + 1);
            if let Some(first) = seen.insert(seq, line.to_string()) {
                assert_eq!(first, line, "receipt {seq} released twice, differently");
            }
        }
    }
    let n = seen.len();
    assert_eq!(
        seen.keys().next_back().map_or(0, |k| k + 1) as usize,
        n,
        "receipts missing between the ends"
    );
    for c in cut {
        assert!(
            seen.values().any(|l| l.starts_with(&c)),
            "a cut-short receipt {c:?} that no end released whole"
        );
    }
    n
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_killed_primary_is_taken_over_from_its_last_epoch_losing_nothing_seen() {
    let (mut w, waddr) = witness("kill");
    for run in 0..20u64 {
        let tag = format!("kill{run}");
        let (mut s, saddr) = standby(&waddr, &tag, &[]);
        let mut p = protect(&saddr, &waddr, &tag, &[]);
        // A spread of points: early epochs to several seconds in.
        std::thread::sleep(Duration::from_millis((run * 7919) % 1200));
        signal(p.id(), "-KILL");
        let _ = p.wait();
        let code = wait(&mut s, Duration::from_secs(20));
        let report = json(&tmp(&format!("{tag}-s.json")));
        let seen = || logs(&[&format!("{tag}-p.err"), &format!("{tag}-s.err")]);
        assert_eq!(
            code,
            0,
            "run {run}: standby exit {code}: {report}\n{}",
            seen()
        );
        assert_eq!(
            report["status"],
            "took-over",
            "run {run}: {report}\n{}",
            seen()
        );
        assert_eq!(
            report["guest_check"],
            "ok",
            "run {run}: {report}\n{}",
            seen()
        );
        assert!(
            report["failover_ms"].as_f64().unwrap() < 600.0,
            "{report}\n{}",
            seen()
        );
        // The logs are what an operator's journal gets: plain text.
        let log = std::fs::read_to_string(tmp(&format!("{tag}-p.err"))).unwrap();
        assert!(log.contains("initial sync done"), "{log}");
        assert!(
            !log.contains('\x1b'),
            "terminal escapes in a log file: {log:?}"
        );
        let n = receipts_hold(&[&tmp(&format!("{tag}-p.out")), &tmp(&format!("{tag}-s.out"))]);
        assert!(n > 0, "run {run}: no receipts at all");
    }
    kill(&mut w);
}

#[test]
fn a_frozen_standby_leaves_the_primary_running_degraded_and_the_standby_fenced() {
    let (mut w, waddr) = witness("frozen");
    let (mut s, saddr) = standby(&waddr, "frozen", &[]);
    let mut p = protect(&saddr, &waddr, "frozen", &["--run-for-s", "3"]);
    std::thread::sleep(Duration::from_millis(300));
    signal(s.id(), "-STOP");
    let code = wait(&mut p, Duration::from_secs(20));
    let report = json(&tmp("frozen-p.json"));
    let seen = || logs(&["frozen-p.err", "frozen-s.err"]);
    assert_eq!(code, 5, "{report}\n{}", seen());
    assert_eq!(report["status"], "degraded", "{report}\n{}", seen());
    assert_eq!(report["guest_check"], "ok", "{report}");
    // The guest never stopped for longer than an epoch's capture.
    assert!(
        report["epoch_pause_us"]["max"].as_u64().unwrap() < 500_000,
        "{report}"
    );
    // Thawed, the standby finds its primary gone and the run right taken.
    signal(s.id(), "-CONT");
    let code = wait(&mut s, Duration::from_secs(20));
    let sreport = json(&tmp("frozen-s.json"));
    assert_eq!(
        (code, &sreport["status"]),
        (6, &"fenced".into()),
        "{sreport}"
    );
    assert!(
        std::fs::read_to_string(tmp("frozen-s.out"))
            .unwrap()
            .is_empty()
    );
    receipts_hold(&[&tmp("frozen-p.out")]);
    kill(&mut w);
}

/// A TCP proxy that forwards until cut, then swallows everything in both
/// directions without closing: a link that went silent.
fn silent_cut_proxy(to: String) -> (String, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cut = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cut);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(a) = conn else { return };
            let Ok(b) = TcpStream::connect(&to) else {
                return;
            };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let cut = Arc::clone(&c);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !cut.load(Ordering::SeqCst) && into.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, cut)
}

#[test]
fn a_cut_link_with_the_witness_reachable_leaves_exactly_one_guest_running() {
    let (mut w, waddr) = witness("cut");
    let (mut s, saddr) = standby(&waddr, "cut", &[]);
    let (proxy, cut) = silent_cut_proxy(saddr);
    let mut p = protect(&proxy, &waddr, "cut", &["--run-for-s", "4"]);
    std::thread::sleep(Duration::from_millis(400));
    cut.store(true, Ordering::SeqCst);
    let pcode = wait(&mut p, Duration::from_secs(30));
    let scode = wait(&mut s, Duration::from_secs(30));
    let (pr, sr) = (json(&tmp("cut-p.json")), json(&tmp("cut-s.json")));
    let primary_runs = pcode == 5 && pr["status"] == "degraded";
    let standby_runs = scode == 0 && sr["status"] == "took-over";
    assert!(
        primary_runs ^ standby_runs,
        "exactly one guest runs: {pr} {sr}"
    );
    if primary_runs {
        assert_eq!((scode, &sr["status"]), (6, &"fenced".into()), "{sr}");
        assert_eq!(pr["guest_check"], "ok", "{pr}");
    } else {
        assert_eq!((pcode, &pr["status"]), (6, &"fenced".into()), "{pr}");
        assert_eq!(sr["guest_check"], "ok", "{sr}");
    }
    receipts_hold(&[&tmp("cut-p.out"), &tmp("cut-s.out")]);
    kill(&mut w);
}

/// Start `migrate-cli ARGS`; every stdout line arrives on the channel.
fn start_lines(args: &[&str]) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = Reaped::new(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn migrate-cli"),
    );
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The rest of the first line from `rx` that starts with `prefix`.
fn line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no {prefix:?} line: {e}"));
        if let Some(rest) = l.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
}

#[test]
fn the_new_primary_is_protected_again_and_survives_a_second_failure() {
    let (mut w, waddr) = witness("re");
    // The second standby, then the first, which re-protects to it after a
    // takeover.
    let (mut s2, s2addr) = standby(&waddr, "re2", &[]);
    let (out1, json1) = (tmp("re1-s.out"), tmp("re1-s.json"));
    let (out1, json1) = (out1.display().to_string(), json1.display().to_string());
    let (mut s1, rx1) = start_lines(&[
        "standby",
        "--listen",
        "127.0.0.1:0",
        "--witness",
        &waddr,
        "--failover-after-ms",
        "500",
        "--run-after-failover-s",
        "30",
        "--reprotect-to",
        &s2addr,
        "--output",
        &out1,
        "--json",
        &json1,
    ]);
    let s1addr = line(&rx1, "listening on ");
    let mut p = protect(&s1addr, &waddr, "re0", &[]);
    std::thread::sleep(Duration::from_millis(400));
    signal(p.id(), "-KILL");
    let _ = p.wait();
    // The first standby took over, and is protected again by the second.
    line(&rx1, "took over from epoch");
    line(&rx1, "protected: ");
    std::thread::sleep(Duration::from_millis(500));
    signal(s1.id(), "-KILL");
    let _ = s1.wait();
    let code = wait(&mut s2, Duration::from_secs(30));
    let r2 = json(&tmp("re2-s.json"));
    assert_eq!(code, 0, "{r2}");
    assert_eq!(r2["status"], "took-over", "{r2}");
    assert_eq!(r2["guest_check"], "ok", "{r2}");
    let n = receipts_hold(&[&tmp("re0-p.out"), Path::new(&out1), &tmp("re2-s.out")]);
    assert!(n > 0);
    kill(&mut w);
}

#[test]
fn a_killed_standby_leaves_the_primary_running_degraded() {
    let (mut w, waddr) = witness("skill");
    let (mut s, saddr) = standby(&waddr, "skill", &[]);
    let mut p = protect(&saddr, &waddr, "skill", &["--run-for-s", "3"]);
    std::thread::sleep(Duration::from_millis(300));
    signal(s.id(), "-KILL");
    let _ = s.wait();
    let code = wait(&mut p, Duration::from_secs(20));
    let report = json(&tmp("skill-p.json"));
    assert_eq!(
        (code, &report["status"]),
        (5, &"degraded".into()),
        "{report}"
    );
    assert_eq!(report["guest_check"], "ok", "{report}");
    // Noticed at once (the standby's sockets closed with it), and the guest
    // never stopped for longer than an epoch's capture.
    assert!(report["detect_ms"].as_f64().unwrap() < 500.0, "{report}");
    assert!(
        report["epoch_pause_us"]["max"].as_u64().unwrap() < 500_000,
        "{report}"
    );
    // Unprotected from then on: its output went out directly, contiguous.
    assert!(receipts_hold(&[&tmp("skill-p.out")]) > 0);
    kill(&mut w);
}

/// The events of an `--events` file, in order.
fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn a_protection_is_watched_and_ended_through_its_control_sockets() {
    let (mut w, waddr) = witness("ctl");
    let (ssock, sev) = (tmp("ctl-s.sock"), tmp("ctl-s.events"));
    let (psock, pev) = (tmp("ctl-p.sock"), tmp("ctl-p.events"));
    let (ssock_s, sev_s) = (ssock.display().to_string(), sev.display().to_string());
    let (sm, pm) = (free_port(), free_port());
    let (mut s, saddr) = standby(
        &waddr,
        "ctl",
        &["--control", &ssock_s, "--events", &sev_s, "--metrics", &sm],
    );
    // Steered from the moment it listens: waiting for a primary.
    let (code, v) = ctl(&ssock, &["query"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (&v["stats"]["role"], &v["stats"]["status"]),
        (&"standby".into(), &"waiting".into()),
        "{v}"
    );
    let (psock_s, pev_s) = (psock.display().to_string(), pev.display().to_string());
    let mut p = protect(
        &saddr,
        &waddr,
        "ctl",
        &["--control", &psock_s, "--events", &pev_s, "--metrics", &pm],
    );
    // Live figures that move within the protection.
    std::thread::sleep(Duration::from_millis(1300));
    let (code, a) = ctl(&psock, &["query"]);
    assert_eq!(code, 0, "{a}");
    assert_eq!(a["stats"]["status"], "protected", "{a}");
    assert_eq!(a["stats"]["role"], "primary", "{a}");
    std::thread::sleep(Duration::from_millis(300));
    let (_, b) = ctl(&psock, &["query"]);
    assert!(
        b["stats"]["epochs"].as_u64() > a["stats"]["epochs"].as_u64(),
        "{a} then {b}"
    );
    let (code, v) = ctl(&ssock, &["query"]);
    assert_eq!(
        (code, &v["stats"]["status"]),
        (0, &"protected".into()),
        "{v}"
    );
    assert!(v["stats"]["epochs_applied"].as_u64().unwrap() > 0, "{v}");
    // The same figures as OpenMetrics text, growing.
    let m1 = scrape(&pm);
    std::thread::sleep(Duration::from_millis(300));
    let m2 = scrape(&pm);
    assert!(
        m2.value("migrate_protect_epochs_total", None)
            > m1.value("migrate_protect_epochs_total", None),
        "{}\nthen\n{}",
        m1.text,
        m2.text
    );
    assert_eq!(
        m2.value("migrate_status", Some(("status", "protected"))),
        1.0
    );
    assert!(m2.text.contains("role=\"primary\""), "{}", m2.text);
    let sm1 = scrape(&sm);
    assert!(
        sm1.value("migrate_protect_epochs_total", None) > 0.0,
        "{}",
        sm1.text
    );
    assert!(sm1.text.contains("role=\"standby\""), "{}", sm1.text);
    // No knobs: refused, with what it answers.
    let (code, v) = ctl(&psock, &["set", "downtime_ms=5"]);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("answers query, cancel and watch"),
        "{v}"
    );
    // `cancel` on the primary ends protection cleanly: both released.
    let (code, v) = ctl(&psock, &["cancel"]);
    assert_eq!(code, 0, "{v}");
    let pcode = wait(&mut p, Duration::from_secs(20));
    let scode = wait(&mut s, Duration::from_secs(20));
    let (pr, sr) = (json(&tmp("ctl-p.json")), json(&tmp("ctl-s.json")));
    assert_eq!((pcode, &pr["status"]), (0, &"released".into()), "{pr}");
    assert_eq!((scode, &sr["status"]), (0, &"released".into()), "{sr}");
    assert_eq!(pr["guest_check"], "ok", "{pr}");
    // What the primary spent: per epoch in the steady state, its guest's
    // threads apart.
    let per_epoch = pr["cpu_per_epoch_us"].as_f64().unwrap();
    assert!(per_epoch > 0.0 && per_epoch < 100_000.0, "{pr}");
    assert!(
        pr["resources"]["guest_cpu_ms"].as_f64().unwrap() > 0.0,
        "{pr}"
    );
    assert!(!psock.exists() && !ssock.exists(), "sockets left behind");
    // The event streams: protected first, progress about once a second,
    // released last, each with its time and figures.
    for (file, last_epochs) in [(&pev, &pr["epochs"]), (&sev, &sr["epochs_applied"])] {
        let ev = events(file);
        let names: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(names.first(), Some(&"protected"), "{names:?}");
        assert_eq!(names.last(), Some(&"released"), "{names:?}");
        assert!(names.contains(&"progress"), "{names:?}");
        assert!(ev.iter().all(|e| e["time"].as_f64().unwrap() > 1.7e9));
        assert_eq!(
            &ev.last().unwrap()["stats"][if file == &pev {
                "epochs"
            } else {
                "epochs_applied"
            }],
            last_epochs
        );
    }
    receipts_hold(&[&tmp("ctl-p.out")]);
    kill(&mut w);
}

#[test]
fn a_standby_stopped_through_its_socket_leaves_the_primary_degraded() {
    let (mut w, waddr) = witness("stop");
    let ssock = tmp("stop-s.sock");
    let ssock_s = ssock.display().to_string();
    let (mut s, saddr) = standby(&waddr, "stop", &["--control", &ssock_s]);
    let mut p = protect(&saddr, &waddr, "stop", &["--run-for-s", "2"]);
    std::thread::sleep(Duration::from_millis(300));
    let (code, v) = ctl(&ssock, &["cancel"]);
    assert_eq!(code, 0, "{v}");
    let scode = wait(&mut s, Duration::from_secs(10));
    let sr = json(&tmp("stop-s.json"));
    assert_eq!((scode, &sr["status"]), (1, &"cancelled".into()), "{sr}");
    let pcode = wait(&mut p, Duration::from_secs(20));
    let pr = json(&tmp("stop-p.json"));
    assert_eq!((pcode, &pr["status"]), (5, &"degraded".into()), "{pr}");
    assert_eq!(pr["guest_check"], "ok", "{pr}");
    // Nothing was released by the standby; the primary's receipts hold.
    assert!(
        std::fs::read_to_string(tmp("stop-s.out"))
            .unwrap()
            .is_empty()
    );
    assert!(receipts_hold(&[&tmp("stop-p.out")]) > 0);
    kill(&mut w);
}
