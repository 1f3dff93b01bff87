//! The three commands.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use migrate_core::dirty::{DirtyTracking, TrackerKind, TrackerPreference};
use migrate_core::memory::GuestMemory;
use migrate_core::protocol::RefusalCode;
use migrate_core::transport::TransportError;
use migrate_core::{IncomingMigration, MigrationStats, SourceMigration};
use migrate_guests::FixtureDestinationVm;

use migrate_core::report::{Extras, with_extras};
use migrate_frontend::{output, security, transport};

pub use migrate_frontend::Outcome;

use crate::args::{
    DemoArgs, DestArgs, MigrationArgs, SourceArgs, SteeringArgs, TlsGenArgs, TrackerChoice,
    TransportArgs, TransportChoice,
};
use crate::{control, guest, memory, report, resources};

/// Write a report after the migration ended: failing to write it must not
/// change the outcome the exit status reports, so it is said on stderr.
fn write_report(path: &std::path::Path, v: &serde_json::Value) {
    output::write_report("migrate-cli", path, v);
}

/// The files a command writes, for [`output::check_outputs`].
pub(crate) fn outputs<'a>(
    json: Option<&'a std::path::Path>,
    steering: Option<&'a SteeringArgs>,
) -> output::Outputs<'a> {
    output::Outputs {
        json,
        events: steering.and_then(|s| s.events.as_deref()),
        control: steering.and_then(|s| s.control.as_deref()),
    }
}

pub(crate) fn tracker_pref(t: TrackerChoice) -> TrackerPreference {
    match t {
        TrackerChoice::Best => TrackerPreference::Best,
        TrackerChoice::UffdAsync => TrackerPreference::Only(TrackerKind::UffdAsync),
        TrackerChoice::UffdSync => TrackerPreference::Only(TrackerKind::UffdSync),
    }
}

/// `migrate-cli source`.
pub fn source(a: SourceArgs, baseline_rss: u64) -> Result<Outcome> {
    // Where the results go, then credentials: a bad path or file fails
    // before any memory is allocated or anything is sent.
    output::check_outputs(outputs(a.json.as_deref(), Some(&a.steering)))?;
    let tls = security::tls(
        &a.transport,
        &security::Role::Source {
            connect: &a.connect,
            hostname: a.tls_hostname.as_deref(),
        },
    )?;
    // An existing memory file is the guest's memory: used as it is.
    let guest = a.guest.for_memory(memory::existing_file(&a.memory))?;
    let mem = memory::from_args(&a.memory)?
        .context("give the guest memory: --memory SIZE and/or --memory-file PATH")?;
    migrate_out(
        Arc::new(mem),
        Outbound {
            addr: &a.connect,
            t: &a.transport,
            tls,
            guest: &guest,
            m: &a.migration,
            tracker: a.tracker,
            json: a.json.as_deref(),
            progress: a.progress,
            baseline_rss: Some(baseline_rss),
            steering: Some((&a.steering, a.pause_before_switchover)),
        },
    )
}

/// What an outgoing migration needs besides the memory: where, how, and
/// what to say about it.
struct Outbound<'a> {
    addr: &'a str,
    t: &'a TransportArgs,
    tls: Option<transport_tcp::TlsConfig>,
    guest: &'a crate::args::GuestArgs,
    m: &'a MigrationArgs,
    tracker: TrackerChoice,
    json: Option<&'a std::path::Path>,
    progress: crate::args::ProgressChoice,
    /// The process's RSS before the guest memory (resources are reported).
    baseline_rss: Option<u64>,
    /// The control socket and event stream, and whether to pause before
    /// the switch-over.
    steering: Option<(&'a SteeringArgs, bool)>,
}

/// Migrate `mem` out: connect, bind the memory, start tracking and the
/// guest, run, then say how it ended.
fn migrate_out(mem: Arc<GuestMemory>, o: Outbound<'_>) -> Result<Outcome> {
    let mut config = o.m.source_config(o.t);
    config.pause_before_switchover = o.steering.is_some_and(|(_, pause)| pause);
    let migration = SourceMigration::new(config);
    let handle = migration.handle();
    // The ways to steer it exist before anything connects: a socket that
    // cannot be served is a setup error, with nothing sent.
    let (_served, events) = match o.steering {
        Some((s, _)) => {
            let (served, events) = control::steer(s, &handle)?;
            (Some(served), events)
        }
        None => (None, None),
    };
    control::cancel_on_signals(Arc::new(std::sync::Mutex::new(Some(handle.clone()))))?;
    guest::fill(&mem, o.guest)?;
    let cpu_start = resources::CpuSample::now();
    let connect_start = std::time::Instant::now();
    let mut transport =
        transport::connect(o.addr, o.t, o.m.compress, o.tls.clone(), o.m.postcopy())
            .map_err(anyhow::Error::from)
            .inspect_err(|e| failed_before_start(&o, &mem, e))?;
    // The engine binds the memory first (RDMA registers, i.e. pins, it),
    // then tracking starts: the other order is refused.
    let bound = migration
        .bind(transport.as_dyn(), &mem)
        .map_err(anyhow::Error::from)
        .inspect_err(|e| failed_before_start(&o, &mem, e))?;
    let connect_ms = connect_start.elapsed().as_secs_f64() * 1e3;
    let tracking = DirtyTracking::new(&mem, tracker_pref(o.tracker))?;
    for f in tracking.fallbacks() {
        say!("dirty tracking: not using {}: {}", f.tracker, f.reason);
    }
    let mut vm = guest::start(&mem, o.guest)?;
    let bar = report::progress(&handle, o.progress);
    let result = bound.run(&tracking, &mut vm);
    let fallback = transport.fallback_reason();
    if let Some(reason) = &fallback {
        say!("transport: pages went over TCP: {reason}");
    }
    for t in [bar, events].into_iter().flatten() {
        let _ = t.join();
    }
    say_source_result(&result);
    if let Some(path) = o.json {
        let stats = match &result {
            Ok(s) => s.clone(),
            Err(_) => handle.stats(),
        };
        let error = result.as_ref().err().map(ToString::to_string);
        let mut extras = Extras::default();
        extras.connect_ms = Some(connect_ms);
        extras.authentication = Some(o.t.authentication());
        extras.resources = o
            .baseline_rss
            .map(|base| resources::report(cpu_start, base, Some(&mem)));
        // After the figures: the guest stays paused, nothing is timed.
        extras.memory_digest =
            (o.m.digest && result.is_ok()).then(|| format!("{:016x}", mem.digest()));
        let v = report::source_json(&stats, fallback.as_deref(), error.as_deref());
        write_report(path, &with_extras(v, &extras));
    }
    vm.stop();
    if let Err(migrate_core::MigrationError::Refused {
        code: RefusalCode::Auth,
        message,
    }) = &result
    {
        // Like credentials the destination refused during the handshake: a
        // set-up error, nothing was sent.
        bail!(
            "authentication failed: the destination refused a source without credentials: {message}"
        );
    }
    Ok(Outcome::of_source(&result))
}

/// A migration that failed before it started (connect, bind): its report
/// says so (the error itself is the caller's).
fn failed_before_start(o: &Outbound<'_>, mem: &GuestMemory, e: &anyhow::Error) {
    let Some(path) = o.json else { return };
    let mut stats = MigrationStats::default();
    stats.transport = transport_name(o.t.transport).into();
    stats.bytes_total = mem.total_bytes();
    stats.status = migrate_core::MigrationStatus::Failed;
    let v = report::source_json(&stats, None, Some(&report::error_text(e)));
    if let Err(w) = output::write_json(path, &v) {
        say!(
            "migrate-cli: warning: the report {} could not be written: {}",
            path.display(),
            report::error_text(&w.into())
        );
    }
}

/// Say on the terminal how the source's migration ended, and where the
/// guest runs.
fn say_source_result(result: &Result<MigrationStats, migrate_core::MigrationError>) {
    match result {
        Ok(s) => out!("{}", report::source_summary(s)),
        Err(migrate_core::MigrationError::Cancelled) => {
            say!("migration cancelled");
            say!("the source guest is running again");
        }
        Err(e) => {
            say!("migration failed: {e}");
            if !matches!(
                e,
                migrate_core::MigrationError::CommitUnknown(_)
                    | migrate_core::MigrationError::PostcopyInterrupted(_)
            ) {
                say!("the source guest is running again");
            }
        }
    }
}

fn transport_name(t: TransportChoice) -> &'static str {
    match t {
        TransportChoice::Rdma => "rdma",
        _ => "tcp",
    }
}

/// `migrate-cli dest`.
pub fn dest(a: DestArgs, baseline_rss: u64) -> Result<Outcome> {
    output::check_outputs(outputs(a.json.as_deref(), Some(&a.steering)))?;
    let tls = security::tls(
        &a.transport,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &a.tls_allow,
        },
    )?;
    let listener = transport::Listener::bind(&a.listen, &a.transport, tls)
        .with_context(|| format!("--listen {}: cannot listen", a.listen))?;
    let addr = listener.local_addr()?;
    let own_reads_zero = memory::reads_zero(&a.memory);
    let own = memory::from_args(&a.memory)?.map(Arc::new);
    if let Some(m) = &own
        && a.prefault
    {
        m.prefault()?;
    }
    // Signals and the control socket answer before the line below: a
    // SIGINT or a `ctl` the moment it is printed finds them in place.
    let watched = Watched::new(&a.steering)?;
    // Ready: its own memory allocated (and prefaulted when asked), so a
    // source that connects on this line waits for nothing.
    out!("listening on {addr}");
    std::io::stdout().flush().ok();
    let opts = Receiving {
        // Adopted memory is fresh.
        reads_zero: own.is_none() || own_reads_zero,
        digest: a.digest,
        prefault: a.prefault,
        max_memory: a.max_memory.unwrap_or_else(memory::available),
        reconnect: a.transport.reconnect(),
        authentication: a.transport.authentication(),
    };
    receive(
        &listener,
        own,
        a.json.as_deref(),
        &opts,
        Some(baseline_rss),
        watched,
    )
}

/// A destination's signal handling and steering, in place from before it
/// announces that it listens until its migration ends.
struct Watched {
    /// What the control socket and the signals reach: `waiting` until a
    /// source begins, then its migration.
    waiting: control::Waiting<migrate_core::IncomingHandle>,
    /// The control socket and metrics endpoint, served while this lives.
    socket: control::Steering,
    /// The event stream's writer, ended by the migration's last event.
    events: Option<std::thread::JoinHandle<()>>,
}

impl Watched {
    /// Install the SIGINT/SIGTERM handlers (a signal before a source began
    /// ends the wait; after, it cancels) and serve what `steering` asks for.
    fn new(steering: &SteeringArgs) -> Result<Self> {
        let slot: control::Slot<migrate_core::IncomingHandle> = Arc::default();
        control::cancel_on_signals(Arc::clone(&slot))?;
        let waiting = control::Waiting::new(slot, "destination");
        let (socket, events) = control::steer(steering, &waiting)?;
        Ok(Self {
            waiting,
            socket,
            events,
        })
    }
}

/// How the destination receives.
struct Receiving {
    /// Write the memory's digest after the commit.
    digest: bool,
    /// The memory reads as zeros before the first page lands.
    reads_zero: bool,
    /// Allocate adopted memory before the first page.
    prefault: bool,
    /// Largest layout adopted.
    max_memory: u64,
    /// Grace period for a lost connection.
    reconnect: Option<Duration>,
    /// How sources authenticate (for the report).
    authentication: &'static str,
}

/// Accept one migration (skipping clients that are not migration sources)
/// and receive it.
fn receive(
    listener: &transport::Listener,
    own: Option<Arc<GuestMemory>>,
    json: Option<&std::path::Path>,
    opts: &Receiving,
    baseline_rss: Option<u64>,
    watched: Watched,
) -> Result<Outcome> {
    let Watched {
        waiting,
        socket: control_socket,
        events,
    } = watched;
    let mut t = accept_source(listener)?;
    let cpu_start = resources::CpuSample::now();
    let mut received = Received::default();
    let result = receive_one(t.as_dyn(), own, opts, &waiting, &mut received);
    // Committed or failed: end remote access to the guest memory now.
    t.finish();
    let (outcome, v) = say_destination_result(&result, &received);
    // The last event is out: the event stream ends, the socket goes.
    if let Some(t) = events {
        let _ = t.join();
    }
    drop(control_socket);
    if let Some(path) = json {
        let mut extras = Extras::default();
        extras.authentication = Some(opts.authentication);
        extras.resources =
            baseline_rss.map(|base| resources::report(cpu_start, base, received.mem.as_deref()));
        if let (true, Outcome::Migrated, Some(mem)) = (opts.digest, outcome, &received.mem) {
            extras.memory_digest = Some(format!("{:016x}", mem.digest()));
        }
        write_report(path, &with_extras(v, &extras));
    }
    Ok(outcome)
}

/// Accept the first connection that is a migration source: one client's
/// failure is not the listener's (a stranger, a port scanner, a peer with
/// the wrong credentials).
pub(crate) fn accept_source(listener: &transport::Listener) -> Result<transport::Destination> {
    loop {
        match listener.accept() {
            Ok(t) => return Ok(t),
            Err(e)
                if e.is_disconnect()
                    || matches!(e, TransportError::Protocol(_) | TransportError::Auth { .. }) =>
            {
                say!("refused a connection: {}", report::error_text(&e.into()));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The engine's report and the built-in guest's own check.
type Arrived = (
    migrate_core::DestinationReport,
    Option<Result<String, String>>,
);

/// What the report needs of an incoming migration besides its result.
#[derive(Default)]
struct Received {
    /// The guest memory, once there was one.
    mem: Option<Arc<GuestMemory>>,
    /// The migration's handle, once a source began.
    handle: Option<migrate_core::IncomingHandle>,
}

/// Accept the source's migration into `own` memory (or memory adopted
/// from its layout) and receive it; the memory and handle go into `into`.
fn receive_one(
    t: &mut dyn migrate_core::DestinationTransport,
    own: Option<Arc<GuestMemory>>,
    opts: &Receiving,
    waiting: &control::Waiting<migrate_core::IncomingHandle>,
    into: &mut Received,
) -> Result<Arrived> {
    let mut incoming = IncomingMigration::accept(t)?.memory_reads_zero(opts.reads_zero);
    if let Some(grace) = opts.reconnect {
        incoming = incoming.resume_within(grace);
    }
    let h = incoming.handle();
    waiting.attach(&h);
    into.handle = Some(h);
    let mem = match own {
        Some(m) => m,
        None => match adopt(incoming.layout(), opts) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let msg = format!(
                    "destination cannot allocate the guest memory: {}",
                    report::error_text(&e)
                );
                incoming.refuse(t, RefusalCode::Setup, &msg);
                bail!(msg);
            }
        },
    };
    into.mem = Some(Arc::clone(&mem));
    let mut vm = FixtureDestinationVm::default();
    let r = incoming.receive(t, &mem, &mut vm)?;
    let check = vm
        .state
        .as_deref()
        .and_then(|s| guest::check_destination(&mem, s));
    Ok((r, check))
}

/// Memory for the source's layout, allocated before the first page when
/// asked.
fn adopt(layout: &migrate_core::memory::MemoryLayout, opts: &Receiving) -> Result<GuestMemory> {
    let m = memory::adopt(layout, opts.max_memory)?;
    if opts.prefault {
        m.prefault()?;
    }
    Ok(m)
}

/// Say on the terminal how the incoming migration ended; its outcome and
/// report.
fn say_destination_result(
    result: &Result<Arrived>,
    received: &Received,
) -> (Outcome, serde_json::Value) {
    let e = match result {
        Ok((r, check)) => {
            out!(
                "received {} pages and {} zero pages in {} rounds over {}; guest resumed",
                r.received.normal_pages,
                r.received.zero_pages,
                r.rounds,
                r.transport
            );
            if !r.commit_ack_sent {
                say!(
                    "the commit acknowledgement could not be sent: the source reports \
                     commit-unknown and keeps its guest paused; this side runs the guest"
                );
            }
            match check {
                Some(Ok(m)) => out!("{m}"),
                Some(Err(m)) => say!("{m}"),
                None => {}
            }
            let consistent = !matches!(check, Some(Err(_)));
            let outcome = Outcome::of_destination(&Ok(r.clone()), consistent);
            return (
                outcome,
                report::destination_json(Some(r), check.as_ref(), None),
            );
        }
        Err(e) => e,
    };
    let outcome = match e.downcast_ref::<migrate_core::IncomingError>() {
        Some(migrate_core::IncomingError::PostcopyInterrupted(_)) => Outcome::PostcopyInterrupted,
        _ => Outcome::Failed,
    };
    let text = report::error_text(e);
    match e.downcast_ref::<migrate_core::IncomingError>() {
        Some(migrate_core::IncomingError::Cancelled) => {
            say!("incoming migration cancelled; received memory discarded")
        }
        _ if outcome == Outcome::PostcopyInterrupted => {
            say!("{text}: the guest runs here without all of its pages; the source keeps them")
        }
        _ => say!("incoming migration failed: {text}; received memory discarded"),
    }
    // The engine's final status (failed, cancelled or postcopy-interrupted)
    // once a migration began.
    let so_far = received.handle.as_ref().map(|h| h.stats());
    (
        outcome,
        report::destination_json(so_far.as_ref(), None, Some(&text)),
    )
}

/// `migrate-cli tls-gen`.
pub fn tls_gen(a: TlsGenArgs) -> Result<Outcome> {
    transport_tcp::pki::write_test_pki(&a.dir, &a.server_names, &a.client_names, a.force)?;
    out!(
        "wrote a test CA and certificates to {}: destination `--tls-dir {0}` (names: {}), \
         source `--tls-dir {0}` (names: {}); the CA's key was not kept",
        a.dir.display(),
        a.server_names.join(", "),
        a.client_names.join(", ")
    );
    Ok(Outcome::Done)
}

/// `migrate-cli demo`.
pub fn demo(a: DemoArgs) -> Result<Outcome> {
    output::check_outputs(outputs(a.json.as_deref(), None))?;
    let demo_transport = TransportArgs {
        transport: TransportChoice::Tcp,
        streams: a.streams,
        no_sparse: false,
        io_timeout_s: 30,
        io_timeout: None,
        reconnect_s: 0,
        tls_dir: None,
        psk_file: None,
        insecure: false,
        kernel_tls: crate::args::KernelTlsArg::Auto,
        rdma_device: None,
        gid_index: None,
        dscp: None,
        traffic_class: None,
        service_level: None,
    };
    // Loopback within one process: nobody else to authenticate.
    let listener = transport::Listener::bind("127.0.0.1:0", &demo_transport, None)?;
    let addr = listener.local_addr()?.to_string();
    let mem = Arc::new(GuestMemory::new(vec![
        migrate_core::memory::GuestRegion::anonymous(0, a.memory as usize)?,
    ])?);
    say!(
        "demo: {} guest ({:?} guest, {} pages/s, {} threads) migrating over loopback TCP to {addr}",
        report::human(a.memory),
        a.guest.kind(),
        a.guest.dirty_rate,
        a.guest.threads
    );
    // One process holds both ends: no per-side resource figures.
    let dest = std::thread::spawn(move || {
        let opts = Receiving {
            reads_zero: true,
            digest: false,
            prefault: false,
            max_memory: memory::available(),
            reconnect: None,
            authentication: "none",
        };
        let quiet = SteeringArgs {
            control: None,
            events: None,
            metrics: None,
            metrics_public: false,
        };
        receive(&listener, None, None, &opts, None, Watched::new(&quiet)?)
    });
    let mut m = a.migration.clone();
    m.verify = true;
    let outcome = migrate_out(
        mem,
        Outbound {
            addr: &addr,
            t: &demo_transport,
            tls: None,
            guest: &a.guest,
            m: &m,
            tracker: a.tracker,
            json: a.json.as_deref(),
            progress: a.progress,
            baseline_rss: None,
            steering: None,
        },
    )?;
    let dest_outcome = dest
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))??;
    Ok(match (outcome, dest_outcome) {
        (Outcome::Migrated, Outcome::Migrated) => Outcome::Migrated,
        (Outcome::CommitUnknown, _) => Outcome::CommitUnknown,
        (Outcome::PostcopyInterrupted, _) | (_, Outcome::PostcopyInterrupted) => {
            Outcome::PostcopyInterrupted
        }
        _ => Outcome::Failed,
    })
}
