//! The man pages: one for `migrate-cli` and one per subcommand
//! (`migrate-cli-source(1)`, ...), from the parser's own definitions, each
//! with an EXIT STATUS section and, for the commands that write a
//! `--json` report, its fields. Both tables come from the README (between
//! its `exit-status` and `report-fields` markers), which a test keeps in
//! step with the reports: one source for the operator's two references.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::Cli;

const README: &str = include_str!("../../README.md");

/// The rows of the README table between `<!-- name -->` and
/// `<!-- /name -->`, as cells without their backquotes.
fn table(name: &str) -> Vec<Vec<String>> {
    let (Some(start), Some(end)) = (
        README.find(&format!("<!-- {name} -->")),
        README.find(&format!("<!-- /{name} -->")),
    ) else {
        return Vec::new();
    };
    README[start..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| code"))
        .filter(|l| !l.starts_with("| field "))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

/// `text` safe as roff running text.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// The EXIT STATUS section for `page` (`source`, `dest`, or another).
fn exit_status(page: &str) -> String {
    let mut out = String::from(".SH \"EXIT STATUS\"\n");
    for row in table("exit-status") {
        let [code, source, dest] = &row[..] else {
            continue;
        };
        let meaning = match page {
            "source" | "demo" => source,
            "dest" => dest,
            _ => match code.as_str() {
                "0" => "done",
                "1" => "refused or failed (the reason is on stderr or stdout)",
                "2" => "bad arguments or setup",
                _ => continue,
            },
        };
        if meaning == "–" {
            continue;
        }
        out += &format!(".TP\n{code}\n{}\n", roff(meaning));
    }
    out
}

/// The JSON FIELDS section for a page that writes `--json` (written by
/// `side`: `source`, `destination`).
fn json_fields(side: &str) -> String {
    let mut out =
        String::from(".SH \"JSON FIELDS\"\nThe object --json writes when the command ends:\n");
    for row in table("report-fields") {
        let [field, by, meaning] = &row[..] else {
            continue;
        };
        if by == "both" || by == side {
            out += &format!(".TP\n{}\n{}\n", roff(field), roff(meaning));
        }
    }
    out
}

/// Every page: (file name, roff).
pub fn pages() -> Result<Vec<(String, Vec<u8>)>> {
    let top = Cli::command();
    let mut pages = Vec::new();
    let mut page = Vec::new();
    clap_mangen::Man::new(top.clone()).render(&mut page)?;
    page.extend_from_slice(exit_status("migrate-cli").as_bytes());
    pages.push(("migrate-cli.1".to_string(), page));
    for sub in top.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name().to_string();
        let cmd = sub
            .clone()
            .name(format!("migrate-cli-{name}"))
            .bin_name(format!("migrate-cli {name}"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        page.extend_from_slice(exit_status(&name).as_bytes());
        match name.as_str() {
            "source" | "demo" => page.extend_from_slice(json_fields("source").as_bytes()),
            "dest" => page.extend_from_slice(json_fields("destination").as_bytes()),
            _ => {}
        }
        pages.push((format!("migrate-cli-{name}.1"), page));
    }
    Ok(pages)
}

/// `migrate-cli man`: the top page on stdout, or every page into `dir`.
pub fn man(dir: Option<&Path>) -> Result<()> {
    use std::io::Write;
    let pages = pages()?;
    let Some(dir) = dir else {
        std::io::stdout().write_all(&pages[0].1)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("--dir {}", dir.display()))?;
    for (name, page) in &pages {
        let path = dir.join(name);
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    out!("wrote {} man pages to {}", pages.len(), dir.display());
    Ok(())
}
