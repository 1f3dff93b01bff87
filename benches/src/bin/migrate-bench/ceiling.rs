//! The ceilings, measured in the same run as the migrations: what the link
//! moves with the standard tools at their best, and what this machine's
//! memory does (memcpy, first touch of fresh pages).
//!
//! Each tool runs over a sweep of its knobs, every setting recorded:
//! `iperf3` with 1, 2 and 4 streams, with and without `-Z` zero-copy, and
//! as two processes at once (iperf3 3.12 runs all its streams in one
//! thread, so one process is bound by one core while a migration uses a
//! thread per stream), also with 1 MiB writes; perftest WRITE at 4 KiB,
//! 64 KiB and 1 MiB with 2 and 4 queue pairs, with a post list of 16, as
//! two processes at once, and SEND at 1 MiB;
//! the setting with the highest median becomes the site's `best: ...`
//! ceiling, the one migrations are held against. A ceiling is an upper
//! bound only if the tool at its best is faster than we are: the report
//! says so where it is not.

use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns::in_ns;
use crate::plan::{STREAMS, Site};

/// One ceiling measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceiling {
    /// Site (`machine` for the memory figures).
    pub site: String,
    /// What it bounds: `tcp`, `rdma`, `memory`.
    pub bounds: String,
    /// The tool and its parameters.
    pub tool: String,
    /// Mbit/s, one per repetition.
    pub mbps: Vec<f64>,
    /// Why it is missing, if it is.
    pub error: Option<String>,
}

/// memcpy between two resident buffers, and the first write to each page of
/// fresh anonymous memory (the kernel allocating and zeroing it).
pub fn memory(reps: usize) -> Vec<Ceiling> {
    let len = 256usize << 20;
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    dst.fill(1);
    let mut copy = Vec::new();
    let mut touch = Vec::new();
    for _ in 0..reps.max(3) {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
        copy.push(mbps(len as u64, t.elapsed()));
        let t = Instant::now();
        let mut fresh = vec![0u8; len];
        for i in (0..len).step_by(4096) {
            fresh[i] = 1;
        }
        black_box(&fresh);
        touch.push(mbps(len as u64, t.elapsed()));
    }
    vec![
        Ceiling {
            site: "machine".into(),
            bounds: "memory".into(),
            tool: "memcpy 256 MiB".into(),
            mbps: copy,
            error: None,
        },
        Ceiling {
            site: "machine".into(),
            bounds: "memory".into(),
            tool: "first write to fresh pages".into(),
            mbps: touch,
            error: None,
        },
    ]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e6
}

/// The site's link ceilings, for the transports it measures.
pub fn network(site: &Site, reps: usize, secs: u32) -> Result<Vec<Ceiling>> {
    let mut out = Vec::new();
    let mut add = |bounds: &str, tool: String, f: &mut dyn FnMut() -> Result<f64>| {
        let mut c = Ceiling {
            site: site.name.clone(),
            bounds: bounds.into(),
            tool,
            mbps: Vec::new(),
            error: None,
        };
        for _ in 0..reps {
            match f() {
                Ok(v) => c.mbps.push(v),
                Err(e) => {
                    eprintln!("ceiling {}: {e:#}", c.tool);
                    c.error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        if let Some(m) = c.mbps.first() {
            eprintln!(
                "ceiling {} on {}: {m:.0} Mbit/s (first of {})",
                c.tool,
                site.name,
                c.mbps.len()
            );
        }
        out.push(c);
    };
    if site.transports.iter().any(|t| t == "tcp") {
        let mut settings: Vec<Iperf> = Vec::new();
        for streams in [1u32, 2, 4] {
            for zerocopy in [false, true] {
                settings.push(Iperf {
                    procs: 1,
                    streams,
                    zerocopy,
                    big_writes: false,
                });
            }
        }
        for (zerocopy, big_writes) in [(false, false), (true, false), (true, true)] {
            settings.push(Iperf {
                procs: STREAMS,
                streams: 1,
                zerocopy,
                big_writes,
            });
        }
        for i in settings {
            add("tcp", i.label(), &mut || iperf3(site, secs, i));
        }
    }
    if let (true, Some((dev, gid))) = (
        site.transports.iter().any(|t| t == "rdma"),
        site.rdma_device.clone(),
    ) {
        let q = STREAMS;
        let one = |tool, size, qps| Perf {
            tool,
            size,
            qps,
            procs: 1,
            post_list: None,
        };
        for p in [
            one("ib_write_bw", 1 << 20, q),
            one("ib_write_bw", 64 << 10, q),
            one("ib_write_bw", 4096, q),
            one("ib_write_bw", 1 << 20, 4),
            one("ib_write_bw", 64 << 10, 4),
            Perf {
                post_list: Some(16),
                ..one("ib_write_bw", 1 << 20, q)
            },
            Perf {
                post_list: Some(16),
                ..one("ib_write_bw", 64 << 10, q)
            },
            Perf {
                procs: q,
                ..one("ib_write_bw", 1 << 20, 1)
            },
            one("ib_send_bw", 1 << 20, q),
        ] {
            add("rdma", p.label(), &mut || perftest(&p, &dev, gid, secs));
        }
    }
    out.extend(best(&out, "tcp"));
    out.extend(best(&out, "rdma"));
    Ok(out)
}

/// The setting with the highest median among `bounds`' measured ones, as
/// the site's `best: <setting>` ceiling (none when none measured).
fn best(all: &[Ceiling], bounds: &str) -> Option<Ceiling> {
    let median = |c: &Ceiling| crate::spread::Spread::of(c.mbps.iter().copied()).map(|s| s.median);
    all.iter()
        .filter(|c| c.bounds == bounds && c.error.is_none())
        .filter_map(|c| median(c).map(|m| (m, c)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| Ceiling {
            tool: format!("{BEST}{}", c.tool),
            ..c.clone()
        })
}

/// How the best setting of a tool is named.
pub const BEST: &str = "best: ";

/// Wait for a server to accept connections.
fn settle() {
    std::thread::sleep(Duration::from_millis(700));
}

/// One iperf3 setting: `procs` client/server pairs at once (their rates
/// summed), each with `streams` streams.
#[derive(Debug, Clone, Copy)]
struct Iperf {
    procs: u32,
    streams: u32,
    zerocopy: bool,
    /// 1 MiB per write instead of iperf3's 128 KiB.
    big_writes: bool,
}

impl Iperf {
    fn label(&self) -> String {
        format!(
            "{}iperf3 -P {}{}{}",
            times(self.procs),
            self.streams,
            if self.zerocopy { " -Z" } else { "" },
            if self.big_writes { " -l 1M" } else { "" }
        )
    }
}

fn iperf3(site: &Site, secs: u32, i: Iperf) -> Result<f64> {
    let ports: Vec<String> = (0..i.procs).map(|k| (5399 + k).to_string()).collect();
    let servers = ports.iter().map(|port| {
        let mut c = in_ns(&site.dst_ns, "iperf3");
        c.args(["-s", "-1", "-p", port, "-B", &site.dst_ip]);
        c
    });
    let clients = ports.iter().map(|port| {
        let mut c = in_ns(&site.src_ns, "iperf3");
        c.args(["-c", &site.dst_ip, "-p", port, "-J"]).args([
            "-P",
            &i.streams.to_string(),
            "-t",
            &secs.to_string(),
        ]);
        if i.zerocopy {
            c.arg("-Z");
        }
        if i.big_writes {
            c.args(["-l", "1M"]);
        }
        c
    });
    let outs = pairs("iperf3 (apt-get install iperf3)", servers, clients)?;
    let mut total = 0.0;
    for out in outs {
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
        total += v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
            .with_context(|| format!("iperf3 reported no rate: {}", v["error"]))?;
    }
    Ok(total)
}

/// Send-queue depth for perftest. Its default (128) of 1 MiB WRITEs in
/// flight collapses on rxe over loopback (0.27 against 0.71 Gbit/s at 16,
/// measured in the VM: drops and retransmission timeouts); 16 is the best
/// we found, so the ceiling is the tool at its best.
pub const TX_DEPTH: u32 = 16;

/// The ceiling a transport's throughput is held against at a site: the
/// best setting of iperf3 for TCP (TLS too: the ratio shows its cost), of
/// perftest for RDMA. Results recorded before the sweep have no best: then
/// the setting they were held against (same streams; WRITE at 1 MiB).
pub fn ceiling_for<'a>(
    ceilings: &'a [Ceiling],
    site: &str,
    transport: &str,
) -> Option<&'a Ceiling> {
    let (bounds, older) = match transport {
        "tcp" | "tcp-tls" | "tcp-ktls" => ("tcp", format!("iperf3 -P {STREAMS}")),
        _ => (
            "rdma",
            format!("ib_write_bw -q {STREAMS} -t {TX_DEPTH} -s 1M"),
        ),
    };
    let here = |c: &&Ceiling| c.site == site && c.bounds == bounds;
    ceilings
        .iter()
        .filter(here)
        .find(|c| c.tool.starts_with(BEST))
        .or_else(|| ceilings.iter().filter(here).find(|c| c.tool == older))
}

/// One perftest setting: `procs` server/client pairs at once on the same
/// device (ports 18515 on), their rates summed.
#[derive(Debug, Clone, Copy)]
struct Perf {
    tool: &'static str,
    size: u32,
    qps: u32,
    procs: u32,
    /// Work requests posted per call (`--post_list`).
    post_list: Option<u32>,
}

impl Perf {
    fn label(&self) -> String {
        let size = if self.size >= 1 << 20 {
            format!("{}M", self.size >> 20)
        } else {
            format!("{}K", self.size >> 10)
        };
        format!(
            "{}{} -q {} -t {TX_DEPTH} -s {size}{}",
            times(self.procs),
            self.tool,
            self.qps,
            self.post_list
                .map(|l| format!(" -l {l}"))
                .unwrap_or_default()
        )
    }
}

/// `2x ` for two processes at once, nothing for one.
fn times(procs: u32) -> String {
    if procs > 1 {
        format!("{procs}x ")
    } else {
        String::new()
    }
}

/// Start every server, wait for them to listen, run every client at once
/// and collect their output, then stop the servers.
fn pairs(
    tool: &str,
    servers: impl Iterator<Item = Command>,
    clients: impl Iterator<Item = Command>,
) -> Result<Vec<std::process::Output>> {
    let mut running = Vec::new();
    for mut c in servers {
        running.push(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {tool}"))?,
        );
    }
    settle();
    let spawned: Vec<_> = clients
        .map(|mut c| c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn())
        .collect();
    let outs: Vec<_> = spawned
        .into_iter()
        .map(|c| c.and_then(|c| c.wait_with_output()))
        .collect();
    for mut server in running {
        let _ = server.kill();
        let _ = server.wait();
    }
    outs.into_iter()
        .map(|o| o.with_context(|| format!("running {tool}")))
        .collect()
}

/// perftest servers and clients on the same device (rxe over loopback).
fn perftest(p: &Perf, dev: &str, gid: u32, secs: u32) -> Result<f64> {
    let args = |c: &mut Command, port: u32| {
        c.args(["-d", dev, "-x", &gid.to_string(), "-s", &p.size.to_string()])
            .args(["-q", &p.qps.to_string(), "-D", &secs.to_string()])
            .args(["-t", &TX_DEPTH.to_string()])
            .args(["-F", "--report_gbits", "-p", &port.to_string()]);
        if let Some(l) = p.post_list {
            c.args(["-l", &l.to_string()]);
        }
    };
    let ports: Vec<u32> = (0..p.procs).map(|k| 18515 + k).collect();
    let make = |port: u32, client: bool| {
        let mut c = Command::new(p.tool);
        args(&mut c, port);
        if client {
            c.arg("127.0.0.1");
        }
        c
    };
    let outs = pairs(
        &format!("{} (apt-get install perftest)", p.tool),
        ports.iter().map(|&port| make(port, false)),
        ports.iter().map(|&port| make(port, true)),
    )?;
    let mut total = 0.0;
    for out in outs {
        total += perftest_rate(p.tool, &out)?;
    }
    Ok(total)
}

/// The average rate, Mbit/s, in one perftest client's report.
fn perftest_rate(tool: &str, out: &std::process::Output) -> Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    // " #bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]"
    // then one line of numbers.
    let mut lines = text.lines().skip_while(|l| !l.contains("#bytes"));
    lines.next();
    let Some(row) = lines.next() else {
        bail!(
            "{tool} printed no result: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    let cols: Vec<f64> = row
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    cols.get(3)
        .map(|g| g * 1000.0)
        .with_context(|| format!("{tool}: cannot read {row:?}"))
}
