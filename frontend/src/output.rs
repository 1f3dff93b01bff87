//! Where reports and event logs are written: files made for this user
//! alone, checked before anything listens or connects.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::SetupError;

fn refused(path: &Path, detail: impl Into<String>, source: Option<std::io::Error>) -> SetupError {
    SetupError::Output {
        path: path.to_path_buf(),
        detail: detail.into(),
        source,
    }
}

/// Open an output file (a report, an event log) for writing from its
/// start, made for this process's user alone (0600) when new. A symbolic
/// link there is not followed and a file another user owns is refused,
/// before anything in it changes: nobody can plant a link or a file to have
/// a root migration write through it.
///
/// # Errors
/// [`SetupError::Output`] saying why the file cannot be written.
pub fn create_output(path: &Path) -> Result<std::fs::File, SetupError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refused(path, "a symbolic link, not followed", None)
            } else {
                refused(path, "cannot create", Some(e))
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| refused(path, "cannot inspect", Some(e)))?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "not a regular file", None));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(refused(
            path,
            format!(
                "owned by uid {}, not by this process's uid {euid}: not overwritten",
                meta.uid()
            ),
            None,
        ));
    }
    file.set_len(0)
        .map_err(|e| refused(path, "cannot truncate", Some(e)))?;
    Ok(file)
}

/// The paths a command will write, checked together by [`check_outputs`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    /// `--json`: the report.
    pub json: Option<&'a Path>,
    /// `--events`: the event log.
    pub events: Option<&'a Path>,
    /// `--control`: the control socket.
    pub control: Option<&'a Path>,
}

/// Check, before anything listens or connects, every path a command will
/// write to: a report (`--json`) and an event log (`--events`) are created
/// now (empty until written, by [`create_output`]'s rules), and a control
/// socket's (`--control`) directory must exist and the path, if it exists,
/// be a socket. A path that cannot serve fails now, naming the option and
/// the path (exit 2), not when a source arrives or after the migration.
///
/// # Errors
/// [`SetupError`] naming the option and the path.
pub fn check_outputs(o: Outputs<'_>) -> Result<(), SetupError> {
    let named = |option: &str, p: &Path, e: SetupError| {
        SetupError::Option(format!("{option} {}: {}", p.display(), chain(&e)))
    };
    if let Some(p) = o.json {
        create_output(p).map_err(|e| named("--json", p, e))?;
    }
    if let Some(p) = o.events {
        create_output(p).map_err(|e| named("--events", p, e))?;
    }
    if let Some(p) = o.control {
        use std::os::unix::fs::FileTypeExt;
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(SetupError::Option(format!(
                "--control {}: the directory {} does not exist",
                p.display(),
                dir.display()
            )));
        }
        if let Ok(meta) = std::fs::symlink_metadata(p)
            && !meta.file_type().is_socket()
        {
            return Err(SetupError::Option(format!(
                "--control {}: exists and is not a socket",
                p.display()
            )));
        }
    }
    Ok(())
}

/// An error and its causes as one line, each cause once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// Write a JSON report (through [`create_output`]).
///
/// # Errors
/// [`SetupError::Output`] when it cannot be written.
pub fn write_json(path: &Path, v: &Value) -> Result<(), SetupError> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| refused(path, "cannot encode", Some(std::io::Error::other(e))))?;
    create_output(path)?
        .write_all((text + "\n").as_bytes())
        .map_err(|e| refused(path, "cannot write", Some(e)))
}

/// A report that must not change how the command ended when it cannot be
/// written: written, or said on stderr.
pub fn write_report(program: &str, path: &Path, v: &Value) {
    if let Err(e) = write_json(path, v) {
        crate::say!(
            "{program}: warning: the migration ended, but its report {} could not be written: {}",
            path.display(),
            chain(&e)
        );
    }
}
