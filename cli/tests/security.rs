//! Only the right peer, as an operator meets it: a destination on a network
//! address needs credentials, strangers are refused before the destination
//! allocates anything and it keeps waiting for the real source, which then
//! migrates verified.

mod common;

use std::process::Command;

use common::*;

#[test]
fn plaintext_on_a_network_address_needs_insecure() {
    let o = Command::new(BIN)
        .args(["dest", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{}",
        text(&o)
    );
    let o = Command::new(BIN)
        .args(["source", "--connect", "192.0.2.7:4444", "--memory", "4M"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refusing to send a guest's memory to"),
        "{}",
        text(&o)
    );
    // Said on purpose, it starts.
    let (mut d, addr) = dest(None, "0.0.0.0:0", &["--insecure"], &tmp("insecure-d.json"));
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    d.kill().unwrap();
    let _ = d.wait();
}

#[test]
fn unreadable_credentials_fail_before_anything_starts() {
    let empty = tmp("no-credentials");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ca-cert.pem"),
        "{}",
        text(&o)
    );
    // A key file others can read, a short key, a password: refused before
    // anything connects.
    use std::os::unix::fs::PermissionsExt;
    let exposed = tmp("exposed.psk");
    write_key(&exposed);
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let weak = tmp("weak.psk");
    std::fs::write(&weak, "aHVudGVyMg==").unwrap();
    std::fs::set_permissions(&weak, std::fs::Permissions::from_mode(0o600)).unwrap();
    let password = tmp("password.psk");
    std::fs::write(&password, "correct-horse-battery-staple-123").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (key, says) in [
        (&exposed, "chmod 600"),
        (&weak, "at least 32"),
        (&password, "neither base64 nor hex"),
    ] {
        for side in ["source", "dest"] {
            let mut c = Command::new(BIN);
            if side == "source" {
                c.args(["source", "--connect", "127.0.0.1:9", "--memory", "4M"]);
            } else {
                c.args(["dest", "--listen", "127.0.0.1:0"]);
            }
            let o = c.arg("--psk-file").arg(key).output().unwrap();
            assert_eq!(o.status.code(), Some(2), "{side}: {}", text(&o));
            assert!(
                String::from_utf8_lossy(&o.stderr).contains(says),
                "{side}: {}",
                text(&o)
            );
        }
    }
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

/// A TLS destination that would prefault whatever layout a source
/// announces: a plaintext stranger, a source with a certificate from
/// another CA and one with a pre-shared key (each announcing 512 MiB)
/// are refused during the handshake, the destination allocates nothing
/// (its peak RSS stays far below 512 MiB) and keeps waiting; then the
/// right source migrates, verified.
#[test]
fn strangers_are_refused_before_allocation_and_the_right_source_migrates() {
    let good = tls_dir("good", "localhost");
    let other_ca = tls_dir("other-ca", "localhost");
    let (sj, dj) = (tmp("sec-s.json"), tmp("sec-d.json"));
    let mut dest_args = vec!["--prefault", "--tls-allow", "source-a", "--tls-dir"];
    let good_s = good.to_str().unwrap();
    dest_args.push(good_s);
    let (d, addr) = dest(None, "127.0.0.1:0", &dest_args, &dj);
    let port = addr.rsplit_once(':').unwrap().1;
    let localhost = format!("localhost:{port}");
    let stranger = |tag: &str, extra: &[&str]| {
        let mut args = vec!["--memory", "512M", "--guest", "idle"];
        args.extend_from_slice(extra);
        let o = source(None, &localhost, &args, &tmp(&format!("sec-{tag}.json")))
            .wait_with_output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{tag}: {}", text(&o));
        // What the README promises a refused source, whatever it lacked.
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("authentication failed"),
            "{tag}: {}",
            text(&o)
        );
        o
    };
    // No credentials at all (loopback needs none on the source's side).
    stranger("plaintext", &[]);
    // A certificate from another CA.
    stranger("other-ca", &["--tls-dir", other_ca.to_str().unwrap()]);
    // A pre-shared key where certificates are expected.
    let key = tmp("sec.psk");
    write_key(&key);
    stranger("psk", &["--psk-file", key.to_str().unwrap()]);
    let peak = peak_rss(d.id());
    assert!(
        peak < 256 << 20,
        "the destination allocated for a stranger: peak RSS {} MiB",
        peak >> 20
    );
    // The destination is still waiting: the right source migrates.
    let s = source(
        None,
        &localhost,
        &[
            "--memory",
            "16M",
            "--guest",
            "bank",
            "--verify",
            "--tls-dir",
            good_s,
        ],
        &sj,
    )
    .wait_with_output()
    .unwrap();
    let d = d.wait_with_output().unwrap();
    both_migrated(&s, &d, &sj);
    let refused = String::from_utf8_lossy(&d.stderr)
        .matches("refused a connection")
        .count();
    assert_eq!(refused, 3, "{}", text(&d));
}

/// `migrate-cli` as user `nobody` (`setpriv`), with `args`.
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(args);
    c
}

/// Loopback without credentials is not a free pass between users: a
/// source of another user is refused by a root destination before it says
/// anything (the destination allocates nothing for its layout and keeps
/// waiting; then its own user's source migrates, verified), and a root
/// source does not send its guest to a destination another user runs.
/// With `--insecure` the operator allows it.
#[test]
fn on_loopback_without_credentials_only_the_same_user_is_a_peer() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        println!("not root: cannot run a process as another user here");
        return;
    }
    let (sj, dj) = (tmp("users-s.json"), tmp("users-d.json"));
    let (d, addr) = dest(None, "127.0.0.1:0", &["--prefault"], &dj);
    // A stranger announcing 512 MiB: refused at the handshake.
    let o = as_nobody(&[
        "source",
        "--connect",
        &addr,
        "--memory",
        "512M",
        "--guest",
        "idle",
        "--progress",
        "never",
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("authentication failed"),
        "{}",
        text(&o)
    );
    assert!(
        peak_rss(d.id()) < 256 << 20,
        "the destination allocated for another user's source"
    );
    let s = source(
        None,
        &addr,
        &["--memory", "16M", "--guest", "bank", "--verify"],
        &sj,
    )
    .wait_with_output()
    .unwrap();
    let d = d.wait_with_output().unwrap();
    both_migrated(&s, &d, &sj);
    assert!(
        String::from_utf8_lossy(&d.stderr).contains("runs as uid 65534"),
        "{}",
        text(&d)
    );
    // A destination run by another user: a root source sends it nothing.
    let mut other = as_nobody(&["dest", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let other_addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let o = source(
        None,
        &other_addr,
        &["--memory", "4M", "--guest", "idle"],
        &tmp("users-to-other.json"),
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("runs as uid 65534"),
        "{}",
        text(&o)
    );
    // Said on purpose, another user's destination is a peer.
    let o = source(
        None,
        &other_addr,
        &["--memory", "4M", "--guest", "idle", "--insecure"],
        &tmp("users-insecure.json"),
    )
    .wait_with_output()
    .unwrap();
    let _ = other.kill();
    let other = other.wait_with_output().unwrap();
    // The nobody destination cannot allocate what root can, but the
    // handshake passed: the source got past authentication.
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("authentication failed"),
        "{}\n{}",
        text(&o),
        text(&other)
    );
}

/// What is wrong with an address is said before the credential rule: no
/// port, a host that does not resolve, a listen address that is not this
/// host's (exit 2 each, naming the problem, never "without
/// authentication").
#[test]
fn address_errors_say_what_is_wrong_before_credentials() {
    for (args, says) in [
        (
            &["source", "--connect", "127.0.0.1", "--memory", "1M"][..],
            "no port",
        ),
        (
            &[
                "source",
                "--connect",
                "no-such-host.invalid:4444",
                "--memory",
                "1M",
            ][..],
            "cannot resolve the host",
        ),
        (
            &["source", "--connect", "10.0.0.1:http", "--memory", "1M"][..],
            "is not a number",
        ),
        (
            &["dest", "--listen", "192.0.2.1:4444"][..],
            "192.0.2.1 is not an address of this host",
        ),
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("without authentication"), "{args:?}: {err}");
    }
}

/// `--kernel-tls on` is refused before anything listens where it cannot
/// hold: without TLS credentials at all, and on a kernel without kernel
/// TLS (this host's: `check` says which), exit 2 naming why. Where the
/// kernel has it, the destination listens.
#[test]
fn kernel_tls_on_is_refused_where_it_cannot_hold() {
    let o = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--kernel-tls", "on"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--kernel-tls on: there is no TLS"),
        "{}",
        text(&o)
    );
    let key = tmp("ktls.psk");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&key);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .unwrap()
            .write_all(b"6d696772617465206265e5c8207072652d736861726564206b65792030313233")
            .unwrap();
    }
    let check = Command::new(BIN).args(["check"]).output().unwrap();
    let has_ktls = String::from_utf8_lossy(&check.stdout)
        .lines()
        .any(|l| l.starts_with("ok") && l.contains("kernel-tls"));
    let mut d = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--kernel-tls", "on"])
        .arg("--psk-file")
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if has_ktls {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(d.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "{line}");
        let _ = d.kill();
        let _ = d.wait();
    } else {
        let o = d.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("cannot seal TLS records"),
            "{}",
            text(&o)
        );
    }
}

/// `--tls-hostname`: a source that connects by address checks the
/// destination's certificate against the name given, not the address:
/// without it, refused; with the certificate's name, migrated.
#[test]
fn tls_hostname_names_the_certificate_a_source_expects() {
    let dir = tls_dir("hostname", "migrate.example");
    let dir_s = dir.to_str().unwrap();
    for (tag, name, migrates) in [
        ("by-address", None, false),
        ("by-name", Some("migrate.example"), true),
    ] {
        let (sj, dj) = (
            tmp(&format!("tlsname-{tag}-s.json")),
            tmp(&format!("tlsname-{tag}-d.json")),
        );
        let (d, addr) = dest(None, "127.0.0.1:0", &["--tls-dir", dir_s], &dj);
        let mut args = vec![
            "--memory",
            "4M",
            "--guest",
            "idle",
            "--verify",
            "--tls-dir",
            dir_s,
        ];
        if let Some(n) = name {
            args.extend(["--tls-hostname", n]);
        }
        let mut s = source(None, &addr, &args, &sj);
        if migrates {
            let s = s.wait_with_output().unwrap();
            both_migrated(&s, &d.wait_with_output().unwrap(), &sj);
        } else {
            let code = s.wait().unwrap().code();
            assert_eq!(code, Some(2), "{tag}");
            let mut d = d;
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}
