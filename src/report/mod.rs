//! Renderers: pure functions from results to text (tables, JSON) or files (charts), and the
//! atomic file writer they share.

pub mod chart;
pub mod json;
pub mod table;

use crate::error::{Error, Result};
use crate::units::Bytes;
use std::path::Path;

/// Writes via an exclusively created temporary file with an unpredictable name in the same
/// folder (`tempfile::NamedTempFile::new_in`: `O_EXCL`, never follows a planted symlink) and a
/// rename, so a failure never leaves a half-written file behind and nothing outside `path` is
/// ever written.
/// Appends one line to a file by rewriting it whole through a temporary file: a reader never
/// sees half a line, and a failed write leaves the old file.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(Error::Write {
                path: path.into(),
                message: e.to_string(),
            });
        }
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| write_error(path, e))?;
    persist(tmp, path)
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Write {
        path: path.into(),
        message: e.to_string(),
    }
}

/// A fresh temporary file in `path`'s folder (created if missing); dropped, it is removed.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| write_error(path, e))?;
    // Keep the extension: the bitmap encoder picks its format from it.
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ftplan-").suffix(&suffix);
    // tempfile creates its files owner-only (0600), right for a secret and wrong for a report or
    // an engine config that others read: a new file gets what `File::create` gives (0666 less the
    // umask), and a file it replaces keeps its mode.
    #[cfg(unix)]
    let existing = std::fs::metadata(path).ok().map(|m| m.permissions());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| write_error(path, e))?;
    #[cfg(unix)]
    if let Some(p) = existing {
        tmp.as_file()
            .set_permissions(p)
            .map_err(|e| write_error(path, e))?;
    }
    Ok(tmp)
}

/// Renames a finished temporary file onto `path` (the temporary file is removed on failure).
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.persist(path)
        .map(|_| ())
        .map_err(|e| write_error(path, e.error))
}

/// A command's outputs, written into a fresh, exclusively created folder inside the output
/// folder and moved into place together only once all of them are written: a run that fails
/// part-way leaves the previous reports as they were (the folder is removed on drop).
pub struct Stage {
    dir: tempfile::TempDir,
    out: std::path::PathBuf,
}

impl Stage {
    pub fn new(out: &Path) -> Result<Stage> {
        if out.exists() && !out.is_dir() {
            return Err(Error::Input {
                path: out.into(),
                problem: "is a file, not a folder for the reports".into(),
                hint: Some("name a folder (it is created if missing)".into()),
            });
        }
        std::fs::create_dir_all(out).map_err(|e| write_error(out, e))?;
        let dir = tempfile::Builder::new()
            .prefix(".ftplan-stage-")
            .tempdir_in(out)
            .map_err(|e| write_error(out, e))?;
        Ok(Stage {
            dir,
            out: out.to_path_buf(),
        })
    }

    /// Where the writers write.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Moves the staged `files` into the output folder; returns their final paths.
    pub fn commit(self, files: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>> {
        let mut done = Vec::with_capacity(files.len());
        for f in files {
            let name = f.file_name().unwrap_or_default();
            let target = self.out.join(name);
            std::fs::rename(self.dir.path().join(name), &target)
                .map_err(|e| write_error(&target, e))?;
            done.push(target);
        }
        Ok(done)
    }
}

/// GiB with two decimals.
pub fn gib(b: Bytes) -> String {
    format!("{:.2}", b.gib())
}

/// A parameter count as 1.23 B / 45.6 M / 7.8 K.
pub fn count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// Seconds as ms or s or hours.
pub fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 3600.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Writes `dir/stem.md` (the report for `files`) and returns its path.
pub fn write_markdown(
    dir: &Path,
    stem: &str,
    title: &str,
    table: &str,
    files: &[std::path::PathBuf],
) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{stem}.md"));
    write_atomic(&path, markdown(title, table, files).as_bytes())?;
    Ok(path)
}

/// A Markdown report embedding the charts and the table.
pub fn markdown(title: &str, table: &str, files: &[std::path::PathBuf]) -> String {
    let mut s = format!("# {title}\n\n");
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
    {
        if let Some(name) = f.file_name().and_then(|n| n.to_str()) {
            s += &format!("![{title}]({name})\n\n");
        }
    }
    s += &format!(
        "```text\n{table}\n```\n\nGenerated by ftplan {}.\n",
        env!("CARGO_PKG_VERSION")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn written_files_get_the_modes_other_writers_give() {
        use std::os::unix::fs::PermissionsExt;
        let out = tempfile::tempdir().expect("temp dir");
        let mode = |p: &Path| std::fs::metadata(p).expect("written").permissions().mode() & 0o777;
        // A new file: what `File::create` gives under this process's umask, not tempfile's 0600.
        let plain = out.path().join("plain.json");
        std::fs::File::create(&plain).expect("plain file");
        let ours = out.path().join("ds.json");
        write_atomic(&ours, b"{}").expect("written");
        assert_eq!(mode(&ours), mode(&plain));
        // A replaced file keeps its own mode.
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        write_atomic(&ours, b"{\"a\": 1}").expect("rewritten");
        assert_eq!(mode(&ours), 0o640);
    }

    #[test]
    fn a_stage_dropped_before_commit_leaves_the_previous_reports() {
        let out = tempfile::tempdir().expect("temp dir");
        std::fs::write(out.path().join("r.md"), "previous").expect("previous report");
        {
            let stage = Stage::new(out.path()).expect("stage");
            write_atomic(&stage.path().join("r.md"), b"half of a new run").expect("staged");
            // A later writer fails: the stage is dropped uncommitted.
        }
        let names: Vec<_> = std::fs::read_dir(out.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let kept = std::fs::read_to_string(out.path().join("r.md")).expect("read");
        assert_eq!(kept, "previous");
        // Committed, the new file replaces the old one.
        let stage = Stage::new(out.path()).expect("stage");
        let staged = stage.path().join("r.md");
        write_atomic(&staged, b"new").expect("staged");
        stage.commit(&[staged]).expect("commit");
        assert_eq!(
            std::fs::read_to_string(out.path().join("r.md")).expect("read"),
            "new"
        );
    }
}
