//! The commands around a migration, as an operator meets them: the
//! README's table of report fields stays in step with the reports `--json`
//! writes (every field a report holds is in the table for its side, every
//! field the table promises unconditionally is in the report), shell
//! completions and the man page, and `check`.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

/// The table between the `report-fields` markers: (field, side, whether
/// it is written only sometimes).
fn readme_fields() -> Vec<(String, String, bool)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("<!-- report-fields -->").expect("start marker");
    let end = readme.find("<!-- /report-fields -->").expect("end marker");
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let field = cells[1].trim_matches('`').to_string();
            let conditional = cells[3].starts_with("when ");
            (field, cells[2].to_string(), conditional)
        })
        .collect()
}

/// A report's keys, `resources` flattened one level (`resources.cpu_ms`).
fn keys(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (k, val) in v.as_object().unwrap() {
        match (k.as_str(), val) {
            ("resources", Value::Object(inner)) => {
                out.extend(inner.keys().map(|i| format!("resources.{i}")));
            }
            _ => {
                out.insert(k.clone());
            }
        }
    }
    out
}

fn check(side: &str, report: &Value, table: &[(String, String, bool)]) {
    let here: Vec<&(String, String, bool)> = table
        .iter()
        .filter(|(_, s, _)| s == side || s == "both")
        .collect();
    let listed: BTreeSet<&str> = here.iter().map(|(f, _, _)| f.as_str()).collect();
    let written = keys(report);
    for k in &written {
        assert!(
            listed.contains(k.as_str()),
            "the {side} report writes `{k}`, which the README's table does not list"
        );
    }
    for (f, _, conditional) in here {
        assert!(
            *conditional || written.contains(f),
            "the README promises `{f}` in every {side} report; this one lacks it: {report}"
        );
    }
}

#[test]
fn the_readme_lists_every_report_field() {
    let table = readme_fields();
    assert!(table.len() > 30, "{table:?}");
    let (sj, dj) = (tmp("fields-s.json"), tmp("fields-d.json"));
    let (d, addr) = dest(None, "127.0.0.1:0", &["--digest"], &dj);
    let s = source(
        None,
        &addr,
        &["--memory", "8M", "--guest", "bank", "--verify", "--digest"],
        &sj,
    )
    .wait_with_output()
    .unwrap();
    let d = d.wait_with_output().unwrap();
    let sv = both_migrated(&s, &d, &sj);
    let dv = json(&dj);
    check("source", &sv, &table);
    check("destination", &dv, &table);
    // Both sides name the same migration, and hold the same bytes.
    assert_eq!(sv["migration_id"], dv["migration_id"]);
    assert_eq!(sv["memory_digest"].as_str().map(str::len), Some(16), "{sv}");
    assert_eq!(sv["memory_digest"], dv["memory_digest"]);
    assert_eq!(sv["schema_version"], 1);
}

/// The table against the reports of the other outcomes: a post-copy
/// migration (both ends), a migration the source cancelled (SIGINT: the
/// source `cancelled`, the destination `failed`), and one whose
/// destination was killed (the source `failed`, with its error). (RDMA
/// reports are not compared here: the host has no device.)
#[test]
fn the_readme_lists_the_fields_of_every_outcome() {
    let table = readme_fields();
    // Post-copy.
    let (sj, dj) = (tmp("fields-pc-s.json"), tmp("fields-pc-d.json"));
    let (d, addr) = dest(None, "127.0.0.1:0", &["--digest"], &dj);
    let mut args = POSTCOPY_GUEST.to_vec();
    args.extend(["--memory", "2M", "--postcopy-after-rounds", "1", "--digest"]);
    let s = source(None, &addr, &args, &sj).wait_with_output().unwrap();
    let d = d.wait_with_output().unwrap();
    let (sv, dv) = both_migrated_in_postcopy(&s, &d, &sj, &dj);
    check("source", &sv, &table);
    check("destination", &dv, &table);
    // Cancelled by the source, and killed at the destination: a guest that
    // cannot converge over a 5 MB/s link, stopped after its first round.
    let slow = [
        "--memory",
        "16M",
        "--guest",
        "dirty",
        "--dirty-rate",
        "0",
        "--bandwidth-mbs",
        "5",
        "--no-auto-converge",
    ];
    for (tag, kill_dest) in [("cancelled", false), ("killed", true)] {
        let (sj, dj) = (
            tmp(&format!("fields-{tag}-s.json")),
            tmp(&format!("fields-{tag}-d.json")),
        );
        let (mut d, addr) = dest(None, "127.0.0.1:0", &[], &dj);
        let s = source(None, &addr, &slow, &sj);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        if kill_dest {
            d.kill().unwrap();
        } else {
            signal(s.id(), "-INT");
        }
        let s = s.wait_with_output().unwrap();
        let d = d.wait_with_output().unwrap();
        assert_eq!(s.status.code(), Some(1), "{tag}: {}", text(&s));
        let sv = json(&sj);
        let want = if kill_dest { "failed" } else { "cancelled" };
        assert_eq!(sv["status"], want, "{sv}");
        check("source", &sv, &table);
        if !kill_dest {
            assert_eq!(d.status.code(), Some(1), "{}", text(&d));
            let dv = json(&dj);
            assert_eq!(dv["status"], "failed", "{dv}");
            check("destination", &dv, &table);
        }
    }
}

/// Completions and the man page come from the parser's own definitions:
/// they name today's options.
#[test]
fn completions_and_man_page_name_the_options() {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(BIN).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let c = run(&["completions", shell]);
        assert!(c.contains("pause-before-switchover"), "{shell}");
        assert!(c.contains("ctl"), "{shell}");
    }
    let man = run(&["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(man.contains("migrate\\-cli"), "{man}");
}

/// The bash completion completes for real, in bash: a subcommand's
/// options (`source --tra<TAB>`), a hyphenated subcommand's (`tls-gen
/// --f<TAB>`) and the subcommands themselves. (clap_complete's script named
/// its cases after a mangled binary name, so no option of a subcommand
/// completed; zsh's and fish's scripts name no mangled cases. Those shells
/// are not on the test machines: the test above checks their options.)
#[test]
fn completion_completes_subcommand_options_in_the_shell() {
    let script = tmp("completion.bash");
    let o = std::process::Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(&script, &o.stdout).unwrap();
    let complete = |words: &[&str]| {
        let cword = words.len() - 1;
        let prev = if cword > 0 { words[cword - 1] } else { "" };
        let line = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={cword}; _migrate__cli migrate-cli {} {}; \
             echo \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.join(" "),
            words[cword],
            prev
        );
        let o = std::process::Command::new("bash")
            .args(["-c", &line])
            .output()
            .unwrap();
        assert!(o.status.success(), "{words:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        complete(&["migrate-cli", "source", "--tra"]),
        "--transport --traffic-class --tracker"
    );
    assert_eq!(complete(&["migrate-cli", "tls-gen", "--f"]), "--force");
    assert_eq!(complete(&["migrate-cli", "de"]), "dest demo");
}

/// `man --dir` writes the top page and one per subcommand, the ones the
/// top page refers to (`migrate-cli-source(1)`, ...); each says its exit
/// codes, and the pages of the commands that write `--json` its fields,
/// from the README's tables.
#[test]
fn man_pages_one_per_subcommand_with_exit_status_and_fields() {
    let dir = tmp("man");
    let o = std::process::Command::new(BIN)
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let top = page("migrate-cli.1");
    for sub in [
        "source",
        "dest",
        "demo",
        "tls-gen",
        "ctl",
        "check",
        "completions",
        "man",
    ] {
        let p = page(&format!("migrate-cli-{sub}.1"));
        assert!(p.contains(".SH \"EXIT STATUS\""), "{sub}");
        let roff_name = format!("migrate-cli-{sub}(1)").replace('-', "\\-");
        assert!(top.contains(&roff_name), "top page names {sub}");
    }
    let source = page("migrate-cli-source.1");
    assert!(source.contains("commit unknown"), "{source}");
    assert!(source.contains(".SH \"JSON FIELDS\"") && source.contains("downtime_ms"));
    let dest = page("migrate-cli-dest.1");
    assert!(
        dest.contains("guest_consistent") || dest.contains("digest"),
        "{dest}"
    );
    assert!(
        !dest.contains("started_at_unix_ms"),
        "a source-only field on the dest page"
    );
}

/// `check` reports this host: the trackers it tries on real memory work
/// here (the other tests migrate with them), and RDMA is judged by what
/// sysfs shows: no device, no RDMA (exit 1, with the fix).
#[test]
fn check_reports_this_host() {
    let out = tmp("check.json");
    let o = std::process::Command::new(BIN)
        .args(["check", "--memory", "64M", "--json"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = json(&out);
    let verdict = |name: &str| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["verdict"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(verdict("uffd-async"), "ok", "{v}");
    assert_eq!(verdict("memlock"), "ok", "{v}");
    // With free huge pages (the test command reserves them), the tracker is
    // tried on hugetlb memory too, and works on this kernel.
    if verdict("huge pages") == "ok" {
        assert_eq!(verdict("uffd-hugetlb"), "ok", "{v}");
    } else {
        fixtures::skip(
            "check_reports_this_host (uffd-hugetlb)",
            fixtures::Need::HugePages,
            "no free huge pages here",
        );
    }
    let has_rdma = std::fs::read_dir("/sys/class/infiniband")
        .map(|d| d.count() > 0)
        .unwrap_or(false);
    let o = std::process::Command::new(BIN)
        .args(["check", "--transport", "rdma"])
        .output()
        .unwrap();
    if has_rdma {
        println!("RDMA devices here: {}", text(&o));
    } else {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("FAIL rdma devices") && out.contains("fix:"),
            "{out}"
        );
    }
}
