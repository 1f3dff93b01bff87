//! The three commands.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fixtures::FixtureDestinationVm;
use migrate_core::dirty::{DirtyTracking, TrackerKind, TrackerPreference};
use migrate_core::memory::GuestMemory;
use migrate_core::protocol::RefusalCode;
use migrate_core::transport::TransportError;
use migrate_core::{
    IncomingMigration, MigrationStats, PostcopyMode, SourceConfig, SourceMigration, TimeoutPolicy,
};

use crate::args::{
    DemoArgs, DestArgs, MigrationArgs, PostcopyChoice, SourceArgs, SteeringArgs, TimeoutChoice,
    TlsGenArgs, TrackerChoice, TransportArgs, TransportChoice,
};
use crate::{control, guest, memory, report, resources, security, transport};

/// How a command ended. The process exit status says exactly this, one
/// meaning per code (setup errors before anything was sent are 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 0: migrated; the destination runs the guest.
    Migrated,
    /// 1: failed; the source guest runs again, the destination discarded.
    Failed,
    /// 3: commit sent but not acknowledged; the source guest stays paused
    /// and the operator must find out whether the destination runs it.
    CommitUnknown,
    /// 4: the link broke during post-copy: the destination runs the guest
    /// without all of its pages, the source keeps its paused guest and the
    /// pages; neither may be discarded.
    PostcopyInterrupted,
    /// 0: a command that migrates nothing (`ctl`, `tls-gen`,
    /// `completions`, `man`) did what it was asked.
    Done,
    /// 1: `ctl`: the migration refused the request (the response says
    /// why); `check`: the asked transport cannot work on this host.
    Refused,
}

impl Outcome {
    /// The exit status.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Migrated | Outcome::Done => 0,
            Outcome::Failed | Outcome::Refused => 1,
            Outcome::CommitUnknown => 3,
            Outcome::PostcopyInterrupted => 4,
        }
    }

    fn of(ok: bool) -> Self {
        if ok {
            Outcome::Migrated
        } else {
            Outcome::Failed
        }
    }
}

/// Write a report after the migration ended: failing to write it must not
/// change the outcome the exit status reports, so it is said on stderr.
fn write_report(path: &std::path::Path, v: &serde_json::Value) {
    if let Err(e) = report::write_json(path, v) {
        eprintln!(
            "migrate-cli: warning: the migration ended, but its report {} could not be written: {}",
            path.display(),
            report::error_text(&e)
        );
    }
}

fn source_config(m: &MigrationArgs, t: &TransportArgs) -> SourceConfig {
    SourceConfig {
        downtime_limit: Duration::from_millis(m.downtime_ms.max(1)),
        bandwidth_limit: (m.bandwidth_mbs > 0).then_some(m.bandwidth_mbs * 1_000_000),
        max_rounds: m.max_rounds.max(1),
        timeout: (m.timeout_s > 0).then(|| {
            (
                Duration::from_secs(m.timeout_s),
                match m.timeout_policy {
                    TimeoutChoice::Cancel => TimeoutPolicy::Cancel,
                    TimeoutChoice::Force => TimeoutPolicy::ForceSwitchover,
                },
            )
        }),
        auto_converge: !m.no_auto_converge,
        verify: m.verify,
        postcopy: match m.postcopy {
            PostcopyChoice::Never => PostcopyMode::Never,
            PostcopyChoice::Auto => PostcopyMode::Auto,
        },
        postcopy_after_rounds: m.postcopy_after_rounds,
        reconnect: reconnect(t),
        ..SourceConfig::default()
    }
}

/// The grace period for a lost connection, if any.
fn reconnect(t: &TransportArgs) -> Option<Duration> {
    (t.reconnect_s > 0).then(|| Duration::from_secs(t.reconnect_s))
}

fn tracker_pref(t: TrackerChoice) -> TrackerPreference {
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
    report::check_outputs(a.json.as_deref(), Some(&a.steering))?;
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
        &a.connect,
        &a.transport,
        tls,
        &guest,
        &a.migration,
        a.json.as_deref(),
        a.progress,
        Some(baseline_rss),
        Some((&a.steering, a.pause_before_switchover)),
    )
}

#[allow(clippy::too_many_arguments)]
fn migrate_out(
    mem: Arc<GuestMemory>,
    addr: &str,
    t: &TransportArgs,
    tls: Option<transport_tcp::TlsConfig>,
    g: &crate::args::GuestArgs,
    m: &MigrationArgs,
    json: Option<&std::path::Path>,
    progress: crate::args::ProgressChoice,
    baseline_rss: Option<u64>,
    steering: Option<(&SteeringArgs, bool)>,
) -> Result<Outcome> {
    let mut config = source_config(m, t);
    config.pause_before_switchover = steering.is_some_and(|(_, pause)| pause);
    let migration = SourceMigration::new(config);
    let handle = migration.handle();
    // The ways to steer it exist before anything connects: a socket that
    // cannot be served is a setup error, with nothing sent.
    let steering = steering.map(|(s, _)| s);
    let _control = steering
        .and_then(|s| s.control.as_deref())
        .map(|p| control::serve(p, &handle))
        .transpose()?;
    let events = steering
        .and_then(|s| s.events.as_deref())
        .map(|p| control::events_to(p, &handle))
        .transpose()?;
    control::cancel_on_signals(Arc::new(std::sync::Mutex::new(Some(handle.clone()))))?;
    guest::fill(&mem, g)?;
    let cpu_start = resources::CpuSample::now();
    // Connect first: RDMA registers (pins) the memory, which must happen
    // before dirty tracking starts.
    let connect_start = std::time::Instant::now();
    let postcopy = m.postcopy != PostcopyChoice::Never;
    let mut transport = match transport::connect(addr, t, m.compress, &mem, tls, postcopy) {
        Ok(x) => x,
        Err(e) => {
            if let Some(path) = json {
                let mut stats = MigrationStats::default();
                stats.transport = transport_name(t.transport).into();
                stats.bytes_total = mem.total_bytes();
                stats.status = migrate_core::MigrationStatus::Failed;
                report::write_json(
                    path,
                    &report::source_json(&stats, None, Some(&report::error_text(&e))),
                )?;
            }
            return Err(e);
        }
    };
    let connect_ms = connect_start.elapsed().as_secs_f64() * 1e3;
    let tracking = DirtyTracking::new(&mem, tracker_pref(m.tracker))?;
    for f in tracking.fallbacks() {
        eprintln!("dirty tracking: not using {}: {}", f.tracker, f.reason);
    }
    let mut vm = guest::start(&mem, g)?;
    let bar = report::progress(&handle, progress);
    let result = migration.run(transport.as_dyn(), &mem, &tracking, &mut vm);
    let fallback = transport.fallback_reason();
    if let Some(reason) = &fallback {
        eprintln!("transport: pages went over TCP: {reason}");
    }
    for t in [bar, events].into_iter().flatten() {
        let _ = t.join();
    }
    let outcome = match &result {
        Ok(_) => Outcome::Migrated,
        Err(migrate_core::MigrationError::CommitUnknown(_)) => Outcome::CommitUnknown,
        Err(migrate_core::MigrationError::PostcopyInterrupted(_)) => Outcome::PostcopyInterrupted,
        // Cancelled is a failure to migrate: the guest runs here (1).
        Err(_) => Outcome::Failed,
    };
    let (stats, error) = match &result {
        Ok(s) => (s.clone(), None),
        Err(e) => (handle.stats(), Some(e.to_string())),
    };
    match &result {
        Ok(s) => println!("{}", report::source_summary(s)),
        Err(migrate_core::MigrationError::Cancelled) => {
            eprintln!("migration cancelled");
            eprintln!("the source guest is running again");
        }
        Err(e) => {
            eprintln!("migration failed: {e}");
            if !matches!(
                e,
                migrate_core::MigrationError::CommitUnknown(_)
                    | migrate_core::MigrationError::PostcopyInterrupted(_)
            ) {
                eprintln!("the source guest is running again");
            }
        }
    }
    if let Some(path) = json {
        let mut v = report::source_json(&stats, fallback.as_deref(), error.as_deref());
        v["connect_ms"] = serde_json::json!(connect_ms);
        v["authentication"] = serde_json::json!(security::kind(t));
        if let Some(base) = baseline_rss {
            v["resources"] = resources::report(cpu_start, base, Some(&mem));
        }
        // After the figures: the guest stays paused, nothing is timed.
        if m.digest && result.is_ok() {
            v["memory_digest"] = serde_json::json!(format!("{:016x}", mem.digest()));
        }
        write_report(path, &v);
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
    Ok(outcome)
}

fn transport_name(t: TransportChoice) -> &'static str {
    match t {
        TransportChoice::Rdma => "rdma",
        _ => "tcp",
    }
}

/// `migrate-cli dest`.
pub fn dest(a: DestArgs, baseline_rss: u64) -> Result<Outcome> {
    report::check_outputs(a.json.as_deref(), Some(&a.steering))?;
    let tls = security::tls(
        &a.transport,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &a.tls_allow,
        },
    )?;
    let listener = transport::Listener::bind(&a.listen, &a.transport, tls)?;
    let addr = listener.local_addr()?;
    let own_reads_zero = memory::reads_zero(&a.memory);
    let own = memory::from_args(&a.memory)?.map(Arc::new);
    if let Some(m) = &own
        && a.prefault
    {
        m.prefault()?;
    }
    // Ready: its own memory allocated (and prefaulted when asked), so a
    // source that connects on this line waits for nothing.
    println!("listening on {addr}");
    std::io::stdout().flush().ok();
    let opts = Receiving {
        // Adopted memory is fresh.
        reads_zero: own.is_none() || own_reads_zero,
        digest: a.digest,
        prefault: a.prefault,
        max_memory: a.max_memory.unwrap_or_else(memory::available),
        reconnect: reconnect(&a.transport),
        authentication: security::kind(&a.transport),
    };
    receive(
        &listener,
        own,
        a.json.as_deref(),
        &opts,
        Some(baseline_rss),
        &a.steering,
    )
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
    steering: &SteeringArgs,
) -> Result<Outcome> {
    // A signal before a source began ends the wait; after, it cancels.
    let slot: control::Slot<migrate_core::IncomingHandle> = Arc::default();
    control::cancel_on_signals(Arc::clone(&slot))?;
    // Steered and watched from the moment it listens: before a source
    // begins the socket says `waiting`, then it is the migration's.
    let waiting = control::Waiting::new(Arc::clone(&slot));
    let steered = (
        steering
            .control
            .as_deref()
            .map(|p| control::serve(p, &waiting))
            .transpose()?,
        steering
            .events
            .as_deref()
            .map(|p| control::events_to(p, &waiting))
            .transpose()?,
    );
    let mut t = loop {
        match listener.accept() {
            Ok(t) => break t,
            // One client's failure is not the listener's: a stranger, a
            // port scanner, a peer with the wrong credentials.
            Err(e)
                if e.is_disconnect()
                    || matches!(e, TransportError::Protocol(_) | TransportError::Auth { .. }) =>
            {
                eprintln!("refused a connection: {}", report::error_text(&e.into()));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let cpu_start = resources::CpuSample::now();
    let mut guest_mem = None;
    let mut handle = None;
    let outcome = (|| -> Result<(migrate_core::DestinationReport, Option<Result<String, String>>)> {
        let t = t.as_dyn();
        let mut incoming = IncomingMigration::accept(t)?.memory_reads_zero(opts.reads_zero);
        if let Some(grace) = opts.reconnect {
            incoming = incoming.resume_within(grace);
        }
        let h = incoming.handle();
        waiting.attach(&h);
        handle = Some(h);
        let mem = match own {
            Some(m) => m,
            None => match memory::adopt(incoming.layout(), opts.max_memory).and_then(|m| {
                if opts.prefault {
                    m.prefault()?;
                }
                Ok(m)
            }) {
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
        guest_mem = Some(Arc::clone(&mem));
        let mut vm = FixtureDestinationVm::default();
        let r = incoming.receive(t, &mem, &mut vm)?;
        let check = vm
            .state
            .as_deref()
            .and_then(|s| guest::check_destination(&mem, s));
        Ok((r, check))
    })();
    // Committed or failed: end remote access to the guest memory now.
    t.finish();
    let interrupted = matches!(
        outcome
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<migrate_core::MigrationError>()),
        Some(migrate_core::MigrationError::PostcopyInterrupted(_))
    );
    let (ok, v) = match &outcome {
        Ok((r, check)) => {
            println!(
                "received {} pages and {} zero pages in {} rounds over {}; guest resumed",
                r.received.normal_pages, r.received.zero_pages, r.rounds, r.transport
            );
            if !r.commit_ack_sent {
                eprintln!(
                    "the commit acknowledgement could not be sent: the source reports \
                     commit-unknown and keeps its guest paused; this side runs the guest"
                );
            }
            if let Some(c) = check {
                match c {
                    Ok(m) => println!("{m}"),
                    Err(m) => eprintln!("{m}"),
                }
            }
            let consistent = !matches!(check, Some(Err(_)));
            (
                consistent,
                report::destination_json(Some(r), check.as_ref(), None),
            )
        }
        Err(e) => {
            let cancelled = matches!(
                e.downcast_ref::<migrate_core::MigrationError>(),
                Some(migrate_core::MigrationError::Cancelled)
            );
            if cancelled {
                eprintln!("incoming migration cancelled; received memory discarded");
            } else if interrupted {
                eprintln!(
                    "{}: the guest runs here without all of its pages; the source keeps them",
                    report::error_text(e)
                );
            } else {
                eprintln!(
                    "incoming migration failed: {}; received memory discarded",
                    report::error_text(e)
                );
            }
            let so_far = handle.as_ref().map(|h| h.stats());
            let mut v =
                report::destination_json(so_far.as_ref(), None, Some(&report::error_text(e)));
            if cancelled {
                v["status"] = serde_json::json!("cancelled");
            } else if interrupted {
                v["status"] = serde_json::json!("postcopy-interrupted");
            }
            (false, v)
        }
    };
    // The last event is out: the event stream ends, the socket goes.
    let (control_socket, events) = steered;
    if let Some(t) = events {
        let _ = t.join();
    }
    drop(control_socket);
    if let Some(path) = json {
        let mut v = v;
        v["authentication"] = serde_json::json!(opts.authentication);
        if let Some(base) = baseline_rss {
            v["resources"] = resources::report(cpu_start, base, guest_mem.as_deref());
        }
        if let (true, true, Some(mem)) = (opts.digest, ok, &guest_mem) {
            v["memory_digest"] = serde_json::json!(format!("{:016x}", mem.digest()));
        }
        write_report(path, &v);
    }
    Ok(if interrupted {
        Outcome::PostcopyInterrupted
    } else {
        Outcome::of(ok)
    })
}

/// `migrate-cli tls-gen`.
pub fn tls_gen(a: TlsGenArgs) -> Result<Outcome> {
    transport_tcp::pki::write_test_pki(&a.dir, &a.server_names, &a.client_names, a.force)?;
    println!(
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
    report::check_outputs(a.json.as_deref(), None)?;
    let demo_transport = TransportArgs {
        transport: TransportChoice::Tcp,
        streams: a.streams,
        no_sparse: false,
        io_timeout_s: 30,
        reconnect_s: 0,
        tls_dir: None,
        psk_file: None,
        insecure: false,
        kernel_tls: crate::args::KernelTlsArg::Auto,
        rdma_device: None,
        gid_index: None,
    };
    // Loopback within one process: nobody else to authenticate.
    let listener = transport::Listener::bind("127.0.0.1:0", &demo_transport, None)?;
    let addr = listener.local_addr()?.to_string();
    let mem = Arc::new(GuestMemory::new(vec![
        migrate_core::memory::GuestRegion::anonymous(0, a.memory as usize)?,
    ])?);
    eprintln!(
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
        };
        receive(&listener, None, None, &opts, None, &quiet)
    });
    let mut m = a.migration.clone();
    m.verify = true;
    let outcome = migrate_out(
        mem,
        &addr,
        &demo_transport,
        None,
        &a.guest,
        &m,
        a.json.as_deref(),
        a.progress,
        None,
        None,
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
