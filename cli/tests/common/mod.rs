//! What the CLI test files share: starting `migrate-cli` processes as an
//! operator would, and reading what they said.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_migrate-cli");

/// A path in this test process's scratch folder. The folder is emptied on
/// first use: a folder left by an earlier run whose test binary had the same
/// process id (a fresh CI container numbers its processes alike) would
/// otherwise hand a test the previous run's events and reports.
pub fn tmp(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("migrate-cli-tests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    });
    dir.join(name)
}

/// Start `migrate-cli dest` (optionally inside a network namespace) and
/// return it with the address it listens on.
pub fn dest(netns: Option<&str>, listen: &str, extra: &[&str], json: &Path) -> (Child, String) {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    let mut child = cmd
        .args(["dest", "--listen", listen, "--json"])
        .arg(json)
        .args(extra)
        .args(default_io_timeout(extra))
        .args(default_auth(netns, extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dest");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("dest said {line:?}"))
        .to_string();
    (child, addr)
}

pub fn source(netns: Option<&str>, addr: &str, args: &[&str], json: &Path) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(["source", "--connect", addr, "--progress", "never", "--json"])
        .arg(json)
        .args(args)
        .args(default_io_timeout(args))
        .args(default_auth(netns, args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn source")
}

/// 10 s unless the test chose its own.
pub fn default_io_timeout(args: &[&str]) -> &'static [&'static str] {
    if args.contains(&"--io-timeout-s") {
        &[]
    } else {
        &["--io-timeout-s", "10"]
    }
}

/// Between network namespaces (a network address: authentication is
/// required), a pre-shared key unless the test chose its own credentials.
pub fn default_auth(netns: Option<&str>, args: &[&str]) -> Vec<String> {
    let chose = ["--tls-dir", "--psk-file", "--insecure"];
    if netns.is_none() || args.iter().any(|a| chose.contains(a)) {
        return Vec::new();
    }
    let key = tmp("shared.psk");
    if !key.exists() {
        write_key(&key);
    }
    vec!["--psk-file".into(), key.display().to_string()]
}

/// Write a pre-shared key file as an operator makes one: 32 random bytes
/// as hex, readable by its owner alone (written aside, then renamed, so
/// a test running beside never reads half a key).
pub fn write_key(path: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .unwrap();
    let aside = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&aside)
        .unwrap();
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    writeln!(f, "{hex}").unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A test CA and certificates for both ends, written by `migrate-cli
/// tls-gen` into a new directory.
pub fn tls_dir(tag: &str, server_name: &str) -> PathBuf {
    let dir = tmp(&format!("tls-{tag}"));
    let o = Command::new(BIN)
        .args(["tls-gen", "--dir"])
        .arg(&dir)
        .args(["--server-name", server_name, "--client-name", "source-a"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    dir
}

/// Both processes exited 0 and the source's report says verified; that
/// report.
pub fn both_migrated(s: &Output, d: &Output, sj: &Path) -> Value {
    assert_eq!(s.status.code(), Some(0), "source: {}", text(s));
    assert_eq!(d.status.code(), Some(0), "destination: {}", text(d));
    let v = json(sj);
    assert_eq!(v["verified"], true, "{v}");
    v
}

/// The source failed (exit 1) and says its guest runs again.
pub fn assert_source_runs_again(s: &Output) {
    assert_eq!(s.status.code(), Some(1), "{}", text(s));
    assert!(
        String::from_utf8_lossy(&s.stderr).contains("source guest is running again"),
        "{}",
        text(s)
    );
}

pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Send `sig` (as `kill` takes it: `-STOP`, `-CONT`, `-KILL`) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A built-in guest that out-dirties a 1 MB/s link, migrated with
/// `--postcopy auto` (the post-copy tests add size and triggers).
pub const POSTCOPY_GUEST: [&str; 12] = [
    "--guest",
    "dirty",
    "--dirty-rate",
    "4000",
    "--pattern",
    "uniform",
    "--mix",
    "0:0:1",
    "--bandwidth-mbs",
    "1",
    "--postcopy",
    "auto",
];

/// Wait (a minute at most) until the `--events` file at `path` holds an
/// event named `name`.
pub fn wait_for_event(path: &Path, name: &str) {
    let needle = format!(r#""event":"{name}""#);
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(path).is_ok_and(|t| t.contains(&needle)) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no {name} event within a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Both processes exited 0 after a post-copy migration: both reports say
/// post-copy and carry the same memory digest; the two reports.
pub fn both_migrated_in_postcopy(s: &Output, d: &Output, sj: &Path, dj: &Path) -> (Value, Value) {
    assert_eq!(s.status.code(), Some(0), "source: {}", text(s));
    assert_eq!(d.status.code(), Some(0), "destination: {}", text(d));
    let (v, dv) = (json(sj), json(dj));
    assert_eq!(
        (&v["postcopy"], &dv["postcopy"]),
        (&true.into(), &true.into())
    );
    assert!(v["memory_digest"].is_string(), "{v}");
    assert_eq!(v["memory_digest"], dv["memory_digest"], "{v}\n{dv}");
    (v, dv)
}

/// Strangers at a destination's port `addr` (host:port), from inside
/// `netns` if given, each for `for_s` seconds: `trickling` of them send
/// what looks like the start of a TLS record (a handshake record of 512
/// bytes) one byte every 2 s — never enough to finish, always enough to
/// beat a per-read timeout — and `silent` say nothing. Real processes
/// (bash's /dev/tcp), so the destination sees real connections.
pub fn strangers(
    netns: Option<&str>,
    addr: &str,
    trickling: usize,
    silent: usize,
    for_s: u64,
) -> Vec<Child> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let trickle = format!(
        "exec 3<>/dev/tcp/{host}/{port} || exit 1; \
         for b in '\\x16' '\\x03' '\\x01' '\\x02' '\\x00'; do printf \"$b\" >&3 || exit 0; sleep 2; done; \
         end=$((SECONDS + {for_s})); \
         while [ $SECONDS -lt $end ]; do printf '\\x00' >&3 || exit 0; sleep 2; done"
    );
    let quiet = format!("exec 3<>/dev/tcp/{host}/{port} || exit 1; sleep {for_s}");
    let script = |s: &str| {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "bash", "-c", s]);
                c
            }
            None => {
                let mut c = Command::new("bash");
                c.args(["-c", s]);
                c
            }
        };
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut all: Vec<Child> = (0..trickling).map(|_| script(&trickle)).collect();
    all.extend((0..silent).map(|_| script(&quiet)));
    all
}

/// End stranger processes.
pub fn dismiss(strangers: Vec<Child>) {
    for mut c in strangers {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `migrate-cli ctl SOCKET ARGS...`: its exit status and first response.
pub fn ctl(socket: &Path, args: &[&str]) -> (i32, Value) {
    let o = Command::new(BIN)
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let first = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (o.status.code().unwrap_or(-1), first)
}

/// A loopback address with a port free a moment ago.
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One scrape of a `--metrics` endpoint, parsed.
pub struct Scraped {
    pub text: String,
    pub parsed: prometheus_parse::Scrape,
}

impl Scraped {
    pub fn value(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        let s = self
            .parsed
            .samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {label:?} in\n{}", self.text));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    }
}

/// GET /metrics at `addr` (HTTP/1.0: the server closes after answering),
/// retried while the endpoint is not up yet: a 200 with the OpenMetrics
/// content type, text that parses and ends with `# EOF`.
pub fn scrape(addr: &str) -> Scraped {
    use std::io::{Read, Write};
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let raw = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(mut c) => {
                c.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
                    .unwrap();
                let mut raw = String::new();
                c.read_to_string(&mut raw).unwrap();
                break raw;
            }
            Err(e) if std::time::Instant::now() > until => panic!("{addr}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{raw}"));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{e}: {body}"));
    Scraped {
        text: body.to_string(),
        parsed,
    }
}

/// A child process killed and reaped when the test lets go of it without
/// having waited for it (a failing assert): a server child (a witness, a
/// standby, a destination) would otherwise outlive the test run, as a
/// witness left by a failed protect test outlived the CI run that started
/// it. Derefs to the [`Child`].
pub struct Reaped(Option<Child>);

impl Reaped {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Wait for it and take its output (nothing is left to reap).
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.0.take().expect("a child").wait_with_output()
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a child")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a child")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
