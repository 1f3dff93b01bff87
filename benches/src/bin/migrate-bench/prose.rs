//! The figures BENCHMARKS.md quotes, generated from the same raw results as
//! results.md, so the prose cannot drift from the tables.
//!
//! A quoted figure is marked in the prose with its name:
//! `<!--fig downtime.worst-->404.9 ms<!--/fig-->`, or, for a whole table,
//! the markers on lines of their own. `migrate-bench report` writes every
//! marked figure from the report it just made; `migrate-bench report
//! --check` (in the test command) fails when results.md or any marked
//! figure differs from what the committed raws give, or when the prose
//! names a figure the report does not make.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

const OPEN: &str = "<!--fig ";
const CLOSE: &str = "<!--/fig-->";

/// Named figures, as the prose quotes them.
#[derive(Debug, Default)]
pub struct Figures(BTreeMap<String, String>);

impl Figures {
    /// Record figure `name` (a later value replaces an earlier one).
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    #[cfg(test)]
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// A marked figure whose text differs from the report's.
#[derive(Debug, PartialEq)]
pub struct Stale {
    pub name: String,
    pub quoted: String,
    pub now: String,
}

/// `text` with every marked figure replaced by its value, and the figures
/// that differed. A name the report does not make, or a marker left open,
/// is an error.
pub fn fill(text: &str, figures: &Figures) -> Result<(String, Vec<Stale>)> {
    let mut out = String::with_capacity(text.len());
    let mut stale = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        let (before, marked) = rest.split_at(at);
        out.push_str(before);
        let Some(name_end) = marked.find("-->") else {
            bail!("a figure marker is not closed: {:.60}", marked);
        };
        let name = marked[OPEN.len()..name_end].trim();
        let body = &marked[name_end + 3..];
        let Some(body_end) = body.find(CLOSE) else {
            bail!("figure {name}: no {CLOSE} after it");
        };
        let quoted = &body[..body_end];
        let Some(value) = figures.0.get(name) else {
            bail!("figure {name}: the report makes no figure by that name");
        };
        // A figure on lines of its own (a table) keeps its line breaks.
        let block = quoted.starts_with('\n');
        let now = if block {
            format!("\n{value}\n")
        } else {
            value.clone()
        };
        if quoted != now {
            stale.push(Stale {
                name: name.to_string(),
                quoted: quoted.trim().to_string(),
                now: now.trim().to_string(),
            });
        }
        out.push_str(&marked[..name_end + 3]);
        out.push_str(&now);
        out.push_str(CLOSE);
        rest = &body[body_end + CLOSE.len()..];
    }
    out.push_str(rest);
    Ok((out, stale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Figures {
        let mut f = Figures::default();
        f.set("a", "1.5 %");
        f.set("t", "| x |\n|---|");
        f
    }

    #[test]
    fn marked_figures_are_replaced_and_differences_reported() {
        let text = "worst <!--fig a-->0.66 %<!--/fig--> here\n<!--fig t-->\n| x |\n|---|\n<!--/fig-->\nend";
        let (out, stale) = fill(text, &figures()).unwrap();
        assert_eq!(
            out,
            "worst <!--fig a-->1.5 %<!--/fig--> here\n<!--fig t-->\n| x |\n|---|\n<!--/fig-->\nend"
        );
        assert_eq!(
            stale,
            vec![Stale {
                name: "a".into(),
                quoted: "0.66 %".into(),
                now: "1.5 %".into()
            }]
        );
        assert_eq!(figures().get("a"), Some("1.5 %"));
        // Filled text is a fixed point.
        let (again, stale) = fill(&out, &figures()).unwrap();
        assert_eq!((again.as_str(), stale.len()), (out.as_str(), 0));
    }

    #[test]
    fn unknown_names_and_open_markers_are_errors() {
        assert!(fill("<!--fig nope-->1<!--/fig-->", &figures()).is_err());
        assert!(fill("<!--fig a-->1", &figures()).is_err());
        assert!(fill("<!--fig a", &figures()).is_err());
        let plain = "no figures here";
        assert_eq!(fill(plain, &figures()).unwrap().0, plain);
    }
}
