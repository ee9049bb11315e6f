//! Renderers: pure functions from results to text (tables, JSON) or files (charts), and the
//! atomic file writer they share.

pub mod chart;
pub mod json;
pub mod table;

use crate::error::{Error, Result};
use crate::units::Bytes;
use std::path::Path;

/// Writes via a temporary file in the same folder and a rename, so a failure never leaves a
/// half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |e: std::io::Error| Error::Write { path: path.into(), message: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e)
    })
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
