//! Reading input files: regular files only, of a bounded size, so a FIFO, a device or a huge file
//! is one clear error instead of a hang or an exhausted memory.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The largest input file read (a `config.json` or plan is kilobytes; the measured-run tables
/// are a few hundred kilobytes).
pub const MAX_INPUT_BYTES: u64 = 16 << 20;

/// Reads a UTF-8 text file.
pub fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::Input {
            path: path.into(),
            problem: if meta.is_dir() {
                "is a folder, not a file".into()
            } else {
                "is not a regular file (a pipe, socket or device)".into()
            },
            hint: Some("save the input to a file and pass its path".into()),
        });
    }
    if meta.len() > MAX_INPUT_BYTES {
        return Err(too_large(path, meta.len()));
    }
    let file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let mut text = String::new();
    file.take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(too_large(path, text.len() as u64));
    }
    Ok(text)
}

fn too_large(path: &Path, bytes: u64) -> Error {
    Error::Input {
        path: path.into(),
        problem: format!(
            "is {bytes} bytes; input files are at most {} MiB",
            MAX_INPUT_BYTES >> 20
        ),
        hint: None,
    }
}
