//! Steering a running migration from outside: the control socket
//! (`--control PATH`), the event stream (`--events PATH`) and clean
//! cancellation on SIGINT/SIGTERM.
//!
//! # The control protocol
//!
//! A Unix socket (mode 0600 from the moment it exists: whoever may use it
//! may cancel the migration; a client of another user than the process's,
//! root aside, is refused by its kernel credentials too) speaking JSON, one
//! object per line of at most 64 KiB, to at most 16 clients at once, in the spirit of QEMU's QMP but
//! simpler. Each request is an object with a `cmd`; each gets one response
//! line, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`:
//!
//! | request | effect | response |
//! |---|---|---|
//! | `{"cmd": "query"}` | – | `{"ok": true, "stats": {…}}`: the `--json` report's fields, live |
//! | `{"cmd": "set", "downtime_ms": 800}` (and/or `bandwidth_mbs`, 0 = no cap; `max_rounds`) | from the next round boundary (the cap at once) | `{"ok": true}` |
//! | `{"cmd": "get"}` | – | `{"ok": true, "parameters": {"downtime_ms": …, "bandwidth_mbs": …, "max_rounds": …}}`: the knobs as they are now |
//! | `{"cmd": "switchover"}` | switch over at the next round boundary, whatever the downtime | `{"ok": true}` |
//! | `{"cmd": "continue"}` | leave `pre-switchover` (`--pause-before-switchover`) | `{"ok": true}`; refused in any other state |
//! | `{"cmd": "cancel"}` | cancel: the source guest runs on, the destination discards | `{"ok": true}` |
//! | `{"cmd": "watch"}` | – | `{"ok": true}`, then one line per event until the migration ends |
//!
//! The destination's socket (`dest --control`, from the moment it listens;
//! `waiting` until a source begins)
//! answers `query` (its report's fields, live), `cancel` and `watch`, and
//! refuses what only the source can do.
//!
//! Events (on `watch` and in `--events`) are objects with `event` (its
//! name: `setup-done`, `round-started`, `progress`, `round-done`,
//! `throttled`, `switch-over`, `pre-switchover`, `postcopy`, `parameter-changed`,
//! `connection-lost`, `resumed`, `completed`, `failed`, `cancelled`), `time`
//! (seconds since the Unix epoch) and the event's own fields.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use migrate_core::mirror::{ProtectHandle, StandbyHandle};
use migrate_core::{IncomingHandle, MigrationHandle};
use serde_json::Value;

use crate::report;

/// The control socket of one migration; dropping it stops serving and
/// removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A control-socket request, parsed once from its line (one JSON object,
/// `cmd` naming it): the handlers below match on this, never on text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The live figures.
    Query,
    /// The knobs as they are now.
    Get,
    /// Change the knobs named (each checked before any is applied).
    Set(Knobs),
    /// Switch over at the next round boundary.
    Switchover,
    /// Leave `pre-switchover`.
    Continue,
    /// Cancel the migration.
    Cancel,
    /// Every event until the migration ends.
    Watch,
}

/// The knobs of a `set`, those named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Knobs {
    /// `downtime_ms` (≥ 1).
    pub downtime_ms: Option<u64>,
    /// `bandwidth_mbs` (0: no cap).
    pub bandwidth_mbs: Option<u64>,
    /// `max_rounds` (≥ 1).
    pub max_rounds: Option<u32>,
}

impl Request {
    /// The request a line holds; the error is the refusal's text.
    pub fn parse(line: &str) -> Result<Request, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let Some(fields) = v.as_object() else {
            return Err("a request is an object with a \"cmd\"".into());
        };
        Ok(match v["cmd"].as_str() {
            Some("query") => Request::Query,
            Some("get") => Request::Get,
            Some("set") => Request::Set(Knobs::parse(fields)?),
            Some("switchover") => Request::Switchover,
            Some("continue") => Request::Continue,
            Some("cancel") => Request::Cancel,
            Some("watch") => Request::Watch,
            Some(other) => {
                return Err(format!(
                    "unknown command {other:?}: query, get, set, switchover, continue, cancel, watch"
                ));
            }
            None => return Err("a request is an object with a \"cmd\"".into()),
        })
    }

    /// Its `cmd`.
    pub fn name(self) -> &'static str {
        match self {
            Request::Query => "query",
            Request::Get => "get",
            Request::Set(_) => "set",
            Request::Switchover => "switchover",
            Request::Continue => "continue",
            Request::Cancel => "cancel",
            Request::Watch => "watch",
        }
    }
}

impl Knobs {
    const NAMES: [&'static str; 3] = ["downtime_ms", "bandwidth_mbs", "max_rounds"];

    /// A `set`'s knobs: known names, whole numbers in range, at least one.
    fn parse(fields: &serde_json::Map<String, Value>) -> Result<Knobs, String> {
        let mut knobs = Knobs::default();
        for (k, v) in fields.iter().filter(|(k, _)| k.as_str() != "cmd") {
            let Some(n) = v.as_u64() else {
                return Err(if Self::NAMES.contains(&k.as_str()) {
                    format!("{k} must be a whole number, not {v}")
                } else {
                    format!("unknown parameter {k:?}: {}", Self::NAMES.join(", "))
                });
            };
            match k.as_str() {
                "downtime_ms" if n == 0 => return Err("downtime_ms must be at least 1".into()),
                "downtime_ms" => knobs.downtime_ms = Some(n),
                "bandwidth_mbs" => knobs.bandwidth_mbs = Some(n),
                "max_rounds" => match u32::try_from(n) {
                    Ok(r) if r > 0 => knobs.max_rounds = Some(r),
                    _ => return Err(format!("max_rounds must be 1..{}", u32::MAX)),
                },
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?}: {}",
                        Self::NAMES.join(", ")
                    ));
                }
            }
        }
        if knobs == Knobs::default() {
            return Err(format!("set what? {}", Self::NAMES.join(", ")));
        }
        Ok(knobs)
    }
}

/// What the control socket and the event stream steer and watch: the
/// source's [`MigrationHandle`] or the destination's [`IncomingHandle`].
pub trait Steer: Clone + Send + 'static {
    /// `query`'s `stats` object: the `--json` report's fields, live.
    fn query(&self) -> Value;
    /// `set`, `get`, `switchover`, `continue`: the response.
    fn command(&self, request: Request) -> Reply;
    /// `cancel`.
    fn cancel(&self);
    /// Events from now on, as JSON, each with whether it is the last.
    fn events(&self) -> Box<dyn Iterator<Item = (Value, bool)> + Send>;
}

impl Steer for MigrationHandle {
    fn query(&self) -> Value {
        report::source_json(&self.stats(), None, None)
    }

    fn command(&self, request: Request) -> Reply {
        match request {
            Request::Set(knobs) => set(knobs, self),
            Request::Switchover => {
                self.switchover();
                Reply::ok()
            }
            Request::Get => {
                let p = self.parameters();
                Reply {
                    parameters: Some(Parameters {
                        downtime_ms: u64::try_from(p.downtime_limit.as_millis())
                            .unwrap_or(u64::MAX),
                        bandwidth_mbs: p.bandwidth_limit.map_or(0, |b| b / 1_000_000),
                        max_rounds: p.max_rounds,
                    }),
                    ..Reply::ok()
                }
            }
            Request::Continue => match self.continue_switchover() {
                Ok(()) => Reply::ok(),
                Err(e) => refuse(e.to_string()),
            },
            Request::Query | Request::Cancel | Request::Watch => not_here(request),
        }
    }

    fn cancel(&self) {
        MigrationHandle::cancel(self);
    }

    fn events(&self) -> Box<dyn Iterator<Item = (Value, bool)> + Send> {
        Box::new(
            self.subscribe()
                .into_iter()
                .map(|e| (report::event_json(&e), e.is_final())),
        )
    }
}

impl Steer for IncomingHandle {
    fn query(&self) -> Value {
        // The engine's own status: active, or postcopy-active once the
        // guest runs here.
        report::destination_json(Some(&self.stats()), None, None)
    }

    fn command(&self, request: Request) -> Reply {
        match request {
            Request::Set(_) | Request::Get | Request::Switchover | Request::Continue => {
                refuse(format!(
                    "{:?} steers the source: ask its control socket; the destination answers query, cancel and watch",
                    request.name()
                ))
            }
            Request::Query | Request::Cancel | Request::Watch => not_here(request),
        }
    }

    fn cancel(&self) {
        IncomingHandle::cancel(self);
    }

    fn events(&self) -> Box<dyn Iterator<Item = (Value, bool)> + Send> {
        Box::new(
            self.subscribe()
                .into_iter()
                .map(|e| (report::incoming_event_json(&e), e.is_final())),
        )
    }
}

/// The events a watcher waits for, once the handle exists.
type EventStream = Box<dyn Iterator<Item = (Value, bool)> + Send>;

/// A listening end's control socket and event stream from the moment it
/// listens (a destination's, a standby's): before a peer begins, `query`
/// says `waiting`, `cancel` ends the wait (exit 1, as SIGINT does) and
/// `watch` waits for it; from [`attach`](Waiting::attach) on, the handle
/// `H` of what began.
#[derive(Clone)]
pub struct Waiting<H> {
    slot: Slot<H>,
    /// `query`'s `role` while waiting.
    role: &'static str,
    /// Event streams asked for before the peer began: each gets its
    /// subscription at `attach`, before the engine emits anything.
    watchers: Arc<std::sync::Mutex<Vec<crossbeam_channel::Sender<EventStream>>>>,
}

impl<H: Steer> Waiting<H> {
    /// Steering that waits for a peer, in `slot` once it began (the signal
    /// handler's slot); `role` names this end while it waits.
    pub fn new(slot: Slot<H>, role: &'static str) -> Self {
        Self {
            slot,
            role,
            watchers: Arc::default(),
        }
    }

    /// The peer began: it is steered and watched from now on, every
    /// waiting event stream from its first event.
    pub fn attach(&self, h: &H) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.clone());
        for w in watchers.drain(..) {
            let _ = w.send(h.events());
        }
    }

    fn handle(&self) -> Option<H> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl<H: Steer> Steer for Waiting<H> {
    fn query(&self) -> Value {
        match self.handle() {
            Some(h) => h.query(),
            None => serde_json::to_value(Unbegun {
                role: self.role,
                status: "waiting",
            })
            .unwrap_or_default(),
        }
    }

    fn command(&self, request: Request) -> Reply {
        match self.handle() {
            Some(h) => h.command(request),
            None => match request {
                Request::Set(_) | Request::Get | Request::Switchover | Request::Continue => {
                    refuse(format!(
                        "{:?} steers the sending end, and none has begun here yet",
                        request.name()
                    ))
                }
                Request::Query | Request::Cancel | Request::Watch => not_here(request),
            },
        }
    }

    fn cancel(&self) {
        match self.handle() {
            Some(h) => h.cancel(),
            None => {
                let what = if self.role == "standby" {
                    "protection"
                } else {
                    "migration"
                };
                say!("migrate-cli: cancelled by the control socket: no {what} had begun; exiting");
                std::process::exit(1);
            }
        }
    }

    fn events(&self) -> EventStream {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = self.handle() {
            return h.events();
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        watchers.push(tx);
        // Waits, at its first item, for the subscription `attach` sends.
        Box::new(
            std::iter::once(())
                .flat_map(move |()| rx.recv().ok())
                .flatten(),
        )
    }
}

/// What a protection's socket refuses: it has no knobs to steer.
fn protection_refuses(request: Request, end: &str) -> Reply {
    match request {
        Request::Query | Request::Cancel | Request::Watch => not_here(request),
        _ => refuse(format!(
            "{:?}: {end} answers query, cancel and watch",
            request.name()
        )),
    }
}

/// `protect --control`: `cancel` ends protection cleanly (the standby is
/// released, the guest runs on here), as SIGINT does.
impl Steer for ProtectHandle {
    fn query(&self) -> Value {
        let mut v = serde_json::to_value(self.stats()).unwrap_or_default();
        v["role"] = "primary".into();
        v
    }

    fn command(&self, request: Request) -> Reply {
        protection_refuses(request, "a protecting primary")
    }

    fn cancel(&self) {
        self.end();
    }

    fn events(&self) -> Box<dyn Iterator<Item = (Value, bool)> + Send> {
        Box::new(
            self.subscribe()
                .into_iter()
                .map(|e| (report::protect_event_json(&e), e.is_final())),
        )
    }
}

/// `standby --control`: `cancel` stops standing by (this end never takes
/// over; the primary finds its standby lost).
impl Steer for StandbyHandle {
    fn query(&self) -> Value {
        let mut v = serde_json::to_value(self.stats()).unwrap_or_default();
        v["role"] = "standby".into();
        v
    }

    fn command(&self, request: Request) -> Reply {
        protection_refuses(request, "a standby")
    }

    fn cancel(&self) {
        StandbyHandle::cancel(self);
    }

    fn events(&self) -> Box<dyn Iterator<Item = (Value, bool)> + Send> {
        Box::new(
            self.subscribe()
                .into_iter()
                .map(|e| (report::standby_event_json(&e), e.is_final())),
        )
    }
}

/// A request the socket itself answers (query, cancel, watch) reached a
/// handle's `command`: never, by construction of [`serve`]'s loop.
fn not_here(request: Request) -> Reply {
    refuse(format!(
        "{:?} is answered by the socket, not a handle",
        request.name()
    ))
}

/// Serve `handle` on a Unix socket at `path` (a stale socket there is
/// replaced; any other file is an error).
pub fn serve<H: Steer>(path: &Path, handle: &H) -> Result<ControlSocket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("--control {}: exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!(
                "--control {}: another process serves this socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = bind_private(path)?;
    listener
        .set_nonblocking(true)
        .context("control socket: non-blocking accept")?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (stop, handle) = (Arc::clone(&stop), handle.clone());
        std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || accept_loop(&listener, &handle, &stop))
            .context("starting the control socket")?
    };
    Ok(ControlSocket {
        path: path.to_path_buf(),
        stop,
        thread: Some(thread),
    })
}

/// The longest request line a client may send (a longer one is refused
/// and the client closed: a line is held whole before it is parsed).
pub const MAX_REQUEST: usize = 64 << 10;
/// The most clients served at once (each holds a thread).
pub const MAX_CLIENTS: usize = 16;

/// Listen at `path` with mode 0600 from the moment the socket exists: it
/// is bound inside a new private (0700) directory beside `path`, restricted,
/// then renamed into place, so no other user can connect in between (a
/// chmod after bind leaves a window, and the umask is process-wide).
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("--control {}: not a file name", path.display()))?;
    let private = parent.join(format!(
        ".{}.{}.bind",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| {
            format!(
                "--control {}: cannot create {}",
                path.display(),
                private.display()
            )
        })?;
    let inside = private.join("socket");
    let bound = listen_then_move(&inside, path);
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound.with_context(|| format!("--control {}: cannot listen", path.display()))
}

/// Listen at `inside` (in a directory only this user can enter), make
/// the socket this user's alone, then move it to `path`.
fn listen_then_move(inside: &Path, path: &Path) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind(inside)?;
    std::fs::set_permissions(inside, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(inside, path)?;
    Ok(listener)
}

fn accept_loop<H: Steer>(listener: &UnixListener, handle: &H, stop: &AtomicBool) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let me = crate::sys::effective_uid();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // The socket's mode keeps other users out; the peer's
                // credentials say so again (root may always steer).
                match crate::sys::peer_uid(&stream) {
                    Ok(uid) if uid == me || uid == 0 => {}
                    Ok(uid) => {
                        tracing::warn!(uid, "control socket: refused a client of another user");
                        let _ = reply(
                            &mut stream,
                            &refuse(format!("uid {uid} may not steer this migration")),
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: no peer credentials");
                        continue;
                    }
                }
                if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
                    let _ = reply(
                        &mut stream,
                        &refuse(format!("{MAX_CLIENTS} clients already connected")),
                    );
                    continue;
                }
                clients.fetch_add(1, Ordering::SeqCst);
                let served = Served(Arc::clone(&clients));
                let handle = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        let _served = served;
                        if let Err(e) = client(stream, &handle) {
                            tracing::debug!(error = %e, "control client gone");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "control socket: cannot serve a client");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A client being served: counted until its thread ends (a panic too).
struct Served(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client: requests until it closes the connection, or sends a line
/// longer than [`MAX_REQUEST`].
fn client<H: Steer>(stream: UnixStream, handle: &H) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut raw = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Ok(());
        }
        if raw.last() != Some(&b'\n') && n > MAX_REQUEST {
            reply(
                &mut out,
                &refuse(format!("a request line is at most {MAX_REQUEST} bytes")),
            )?;
            return Ok(());
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            reply(&mut out, &refuse("not UTF-8".into()))?;
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let request = match Request::parse(line) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut out, &refuse(e))?;
                continue;
            }
        };
        match request {
            Request::Watch => {
                // Subscribe before answering: no event falls in between.
                let events = handle.events();
                reply(&mut out, &Reply::ok())?;
                for (event, last) in events {
                    reply(&mut out, &event)?;
                    if last {
                        break;
                    }
                }
                return Ok(());
            }
            // Answered first: a cancel may end this process (a destination
            // that had no migration yet exits at once).
            Request::Cancel => {
                reply(&mut out, &Reply::ok())?;
                handle.cancel();
            }
            Request::Query => reply(
                &mut out,
                &Reply {
                    stats: Some(handle.query()),
                    ..Reply::ok()
                },
            )?,
            other => reply(&mut out, &handle.command(other))?,
        }
    }
}

fn reply<T: serde::Serialize>(out: &mut UnixStream, v: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)?;
    out.flush()
}

/// One response line: `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// `get`'s answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Parameters>,
    /// `query`'s answer: the report's fields, live.
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<Value>,
}

impl Reply {
    /// Accepted, nothing more to say.
    fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }
}

/// The knobs as they are now (`get`).
#[derive(Debug, serde::Serialize)]
struct Parameters {
    downtime_ms: u64,
    /// 0: no cap.
    bandwidth_mbs: u64,
    max_rounds: u32,
}

/// A listening end's `query` before any peer began.
#[derive(serde::Serialize)]
struct Unbegun {
    role: &'static str,
    status: &'static str,
}

fn refuse(error: String) -> Reply {
    Reply {
        error: Some(error),
        ..Reply::default()
    }
}

/// `set`: the knobs named (checked when parsed), applied together.
fn set(knobs: Knobs, handle: &MigrationHandle) -> Reply {
    if let Some(ms) = knobs.downtime_ms {
        handle.set_downtime_limit(Duration::from_millis(ms));
    }
    if let Some(mbs) = knobs.bandwidth_mbs {
        handle.set_bandwidth_limit((mbs > 0).then(|| mbs.saturating_mul(1_000_000)));
    }
    if let Some(rounds) = knobs.max_rounds {
        handle.set_max_rounds(rounds);
    }
    Reply::ok()
}

/// Write every event to `path` as JSON Lines, from now until the migration
/// ends (the returned thread ends with it).
pub fn events_to<H: Steer>(path: &Path, handle: &H) -> Result<JoinHandle<()>> {
    let mut file = migrate_frontend::output::create_output(path).context("--events")?;
    let events = handle.events();
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("events-file".into())
        .spawn(move || {
            for (event, last) in events {
                if let Err(e) = writeln!(file, "{event}").and_then(|()| file.flush()) {
                    say!(
                        "migrate-cli: warning: --events {}: {e}; no more events written",
                        path.display()
                    );
                    return;
                }
                if last {
                    return;
                }
            }
        })
        .context("starting the events writer")
}

/// What serves a running migration from outside: the control socket and
/// the metrics endpoint (dropping it stops both).
pub struct Steering {
    _socket: Option<ControlSocket>,
    _metrics: Option<crate::metrics::MetricsServer>,
}

/// `--control`, `--events` and `--metrics` on `handle`, all made before
/// anything is sent (a socket or an address that cannot be served is a
/// setup error): what serves it, and the events writer (it ends with the
/// final event).
pub fn steer<H: Steer>(
    s: &crate::args::SteeringArgs,
    handle: &H,
) -> Result<(Steering, Option<JoinHandle<()>>)> {
    let socket = s.control.as_deref().map(|p| serve(p, handle)).transpose()?;
    let metrics = s
        .metrics
        .as_deref()
        .map(|a| crate::metrics::serve(a, s.metrics_public, handle))
        .transpose()?;
    if let Some(m) = &metrics {
        say!("metrics at http://{}/metrics", m.addr);
    }
    let events = s
        .events
        .as_deref()
        .map(|p| events_to(p, handle))
        .transpose()?;
    Ok((
        Steering {
            _socket: socket,
            _metrics: metrics,
        },
        events,
    ))
}

/// Where the signal thread finds the migration to cancel: empty while a
/// destination still waits for its source.
pub type Slot<H> = Arc<std::sync::Mutex<Option<H>>>;

/// On SIGINT or SIGTERM, cancel the migration in `slot` cleanly (a source's
/// guest runs on and the destination is told; a destination tells the
/// source and resumes nothing; the report says `cancelled`, exit 1). With
/// nothing in the slot yet (a destination waiting for a source), exit 1 at
/// once: there is nothing to clean up. A second signal is only
/// acknowledged.
pub fn cancel_on_signals<H: Steer>(slot: Slot<H>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT/SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = false;
            for sig in signals.forever() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                if seen {
                    say!("migrate-cli: {name}: already cancelling");
                    continue;
                }
                seen = true;
                let handle = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match handle {
                    Some(h) => {
                        h.cancel();
                        say!("migrate-cli: {name}: cancelling the migration");
                    }
                    None => {
                        say!("migrate-cli: {name}: no migration had begun; exiting");
                        std::process::exit(1);
                    }
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// `migrate-cli ctl PATH COMMAND [KEY=VALUE...]`: send one request, print
/// the response (and, for `watch`, every event until the migration ends).
/// Exit status 0 when the request was accepted, 1 when it was refused.
pub fn ctl(path: &Path, command: &str, params: &[String]) -> Result<bool> {
    let mut request = serde_json::Map::new();
    request.insert("cmd".into(), command.into());
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            bail!("{p:?}: parameters are KEY=VALUE, e.g. downtime_ms=800");
        };
        let n: u64 = v
            .parse()
            .with_context(|| format!("{k}: {v:?} is not a whole number"))?;
        request.insert(k.into(), n.into());
    }
    let stream = UnixStream::connect(path)
        .with_context(|| format!("connecting to the control socket {}", path.display()))?;
    let mut out = stream.try_clone()?;
    writeln!(out, "{}", Value::Object(request))?;
    out.flush()?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines
        .next()
        .context("the control socket closed without an answer")??;
    out!("{first}");
    let ok = serde_json::from_str::<Value>(&first)
        .ok()
        .and_then(|v| v["ok"].as_bool())
        .unwrap_or(false);
    if ok && command == "watch" {
        // Until the socket ends, or nobody reads our stdout any more (`ctl
        // watch | head`): then the watch ends too.
        let mut stdout = std::io::stdout();
        for line in lines {
            if writeln!(stdout, "{}", line?).is_err() {
                break;
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every request a line can hold, and the refusals.
    #[test]
    fn requests_parse_into_their_variants_or_a_refusal() {
        let ok = [
            (r#"{"cmd":"query"}"#, Request::Query),
            (r#"{"cmd":"get"}"#, Request::Get),
            (r#"{"cmd":"switchover"}"#, Request::Switchover),
            (r#"{"cmd":"continue"}"#, Request::Continue),
            (r#"{"cmd":"cancel"}"#, Request::Cancel),
            (r#"{"cmd":"watch"}"#, Request::Watch),
            (
                r#"{"cmd":"set","downtime_ms":800,"bandwidth_mbs":0}"#,
                Request::Set(Knobs {
                    downtime_ms: Some(800),
                    bandwidth_mbs: Some(0),
                    max_rounds: None,
                }),
            ),
            (
                r#"{"cmd":"set","max_rounds":7}"#,
                Request::Set(Knobs {
                    max_rounds: Some(7),
                    ..Knobs::default()
                }),
            ),
        ];
        for (line, want) in ok {
            assert_eq!(Request::parse(line), Ok(want), "{line}");
            assert_eq!(
                Request::parse(&json!({"cmd": want.name()}).to_string())
                    .map(Request::name)
                    .unwrap_or("set"),
                want.name()
            );
        }
        let refused = [
            ("not json", "not JSON"),
            ("[1]", "an object with a \"cmd\""),
            (r#"{"x":1}"#, "an object with a \"cmd\""),
            (r#"{"cmd":"pause"}"#, "unknown command \"pause\""),
            (r#"{"cmd":"set"}"#, "set what?"),
            (r#"{"cmd":"set","speed":3}"#, "unknown parameter \"speed\""),
            (
                r#"{"cmd":"set","downtime_ms":"fast"}"#,
                "must be a whole number",
            ),
            (r#"{"cmd":"set","downtime_ms":0}"#, "at least 1"),
            (r#"{"cmd":"set","max_rounds":0}"#, "max_rounds must be 1.."),
            (
                r#"{"cmd":"set","max_rounds":4294967296}"#,
                "max_rounds must be 1..",
            ),
        ];
        for (line, says) in refused {
            let e = Request::parse(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }
}
