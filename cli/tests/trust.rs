//! Trust at the edges of the host, as another local user would try it:
//! guest memory files, report and event files, and the test PKI's keys are
//! neither readable, planted, nor overwritten through a link.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file of 1 MiB of recognisable bytes, 0600, owned by this user.
fn image(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(path, &bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    bytes
}

#[test]
fn an_existing_memory_file_is_used_as_it_is_even_when_the_source_fails() {
    let path = tmp("existing.img");
    let bytes = image(&path);
    // Nothing listens on port 9: the connection fails after the memory
    // was opened.
    let o = source(
        None,
        "127.0.0.1:9",
        &["--memory-file", path.to_str().unwrap()],
        &tmp("ex.json"),
    )
    .wait_with_output()
    .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the guest's memory file changed"
    );
    // Formatting a ledger over it needs --fill, said before anything starts.
    let o = source(
        None,
        "127.0.0.1:9",
        &["--memory-file", path.to_str().unwrap(), "--guest", "bank"],
        &tmp("ex-bank.json"),
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("--fill"), "{}", text(&o));
    assert!(std::fs::read(&path).unwrap() == bytes);
}

#[test]
fn guest_memory_files_are_private_and_never_another_users() {
    // A file the source creates: 0600 whatever the umask (the test's
    // umask is the default 022, which would leave it world-readable).
    let new = tmp("new.img");
    let o = source(
        None,
        "127.0.0.1:9",
        &["--memory", "1M", "--memory-file", new.to_str().unwrap()],
        &tmp("new.json"),
    )
    .wait_with_output()
    .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(mode(&new), 0o600, "{}", text(&o));
    // A link planted where the file will be: not followed.
    let victim = tmp("victim.img");
    let victim_bytes = image(&victim);
    let link = tmp("planted-link.img");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let o = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--memory-file"])
        .arg(&link)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", text(&o));
    assert!(std::fs::read(&victim).unwrap() == victim_bytes);
    // A file others may write: refused.
    let shared = tmp("group-writable.img");
    image(&shared);
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o660)).unwrap();
    let o = Command::new(BIN)
        .args(["dest", "--listen", "127.0.0.1:0", "--memory-file"])
        .arg(&shared)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("chmod go-w"), "{}", text(&o));
    // Pre-created by another user in a sticky directory (as in /dev/shm):
    // refused, nothing written into it.
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let sticky = tmp("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let planted = sticky.join("guest.img");
        let planted_bytes = image(&planted);
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        for side in ["source", "dest"] {
            let mut c = Command::new(BIN);
            if side == "source" {
                c.args(["source", "--connect", "127.0.0.1:9", "--fill"]);
            } else {
                c.args(["dest", "--listen", "127.0.0.1:0"]);
            }
            let o = c.arg("--memory-file").arg(&planted).output().unwrap();
            assert_eq!(o.status.code(), Some(2), "{side}: {}", text(&o));
            assert!(
                stderr(&o).contains("owned by uid 65534"),
                "{side}: {}",
                text(&o)
            );
            assert!(std::fs::read(&planted).unwrap() == planted_bytes);
        }
    }
}

#[test]
fn reports_and_event_logs_never_write_through_a_planted_link() {
    let victim = tmp("report-victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let link = tmp("report-link.json");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    // A source that fails to connect still writes its report: not there.
    let o = source(None, "127.0.0.1:9", &["--memory", "1M"], &link)
        .wait_with_output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // An event log is opened before anything connects: exit 2.
    let o = Command::new(BIN)
        .args([
            "source",
            "--connect",
            "127.0.0.1:9",
            "--memory",
            "1M",
            "--events",
        ])
        .arg(&link)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    // A report the process can write is made for its user alone.
    let report = tmp("private-report.json");
    let _ = source(None, "127.0.0.1:9", &["--memory", "1M"], &report).wait_with_output();
    assert_eq!(mode(&report), 0o600);
}

#[test]
fn tls_gen_writes_private_keys_never_through_links_and_keeps_a_ca() {
    let dir = tmp("tls-gen-trust");
    std::fs::create_dir_all(&dir).unwrap();
    // A planted link where the client key goes, and an old 0644 server key.
    let victim = tmp("tls-gen-victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("client-key.pem")).unwrap();
    std::fs::write(dir.join("server-key.pem"), "old key\n").unwrap();
    std::fs::set_permissions(
        dir.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let gen_ = |extra: &[&str]| {
        Command::new(BIN)
            .args(["tls-gen", "--dir"])
            .arg(&dir)
            .args(["--server-name", "dest-host", "--client-name", "src-host"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = gen_(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    for key in ["client-key.pem", "server-key.pem"] {
        let p = dir.join(key);
        assert!(
            std::fs::symlink_metadata(&p).unwrap().file_type().is_file(),
            "{key}"
        );
        assert_eq!(mode(&p), 0o600, "{key}");
    }
    // The CA is there now: not replaced without --force.
    let ca = std::fs::read(dir.join("ca-cert.pem")).unwrap();
    let o = gen_(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("--force"), "{}", text(&o));
    assert_eq!(std::fs::read(dir.join("ca-cert.pem")).unwrap(), ca);
    let o = gen_(&["--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_ne!(std::fs::read(dir.join("ca-cert.pem")).unwrap(), ca);
    // Names that are no DNS name or address, wildcards included.
    for bad in ["*.corp.example", "not a name!", "https://dest-host/"] {
        let o = Command::new(BIN)
            .args(["tls-gen", "--dir"])
            .arg(tmp("tls-gen-bad"))
            .args(["--server-name", bad])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(stderr(&o).contains(bad), "{bad}: {}", text(&o));
    }
}

/// Every output path is checked before anything listens or connects: a
/// report, an event log or a control socket in a directory that does not
/// exist fails at once (exit 2, naming the option and the path), not when
/// a source arrives (it died then with "stream ended inside a frame") or
/// after the migration (the report was lost).
#[test]
fn output_paths_are_checked_before_anything_starts() {
    let missing = "/nonexistent-migrate-dir/out";
    for (side, option) in [
        ("dest", "--events"),
        ("dest", "--control"),
        ("dest", "--json"),
        ("source", "--json"),
        ("source", "--events"),
        ("source", "--control"),
    ] {
        let mut c = Command::new(BIN);
        if side == "source" {
            // A listening port that must never be reached.
            c.args(["source", "--connect", "127.0.0.1:9", "--memory", "1M"]);
        } else {
            c.args(["dest", "--listen", "127.0.0.1:0"]);
        }
        let started = std::time::Instant::now();
        let o = c
            .args([option, missing])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{side} {option}: {}", text(&o));
        let err = stderr(&o);
        assert!(
            err.contains(option) && err.contains(missing),
            "{side} {option}: {err}"
        );
        assert!(!String::from_utf8_lossy(&o.stdout).contains("listening on"));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
