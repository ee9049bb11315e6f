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

/// The `-` that names standard input as a model (`curl .../config.json | ftplan estimate
/// --model - ...`).
pub const STDIN: &str = "-";

/// Standard input as text, read once (a comparison resolves its model once per method), to
/// the same bound as a file. A terminal is refused rather than waited on.
pub fn read_stdin() -> Result<String> {
    use std::io::IsTerminal;
    static TEXT: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    let read = TEXT.get_or_init(|| {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            return Err("is the terminal: `-` reads a config.json piped to standard input".into());
        }
        let mut text = String::new();
        stdin
            .lock()
            .take(MAX_INPUT_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if text.len() as u64 > MAX_INPUT_BYTES {
            return Err(format!(
                "is over {} MiB; inputs are at most that",
                MAX_INPUT_BYTES >> 20
            ));
        }
        Ok(text)
    });
    read.clone().map_err(|problem| Error::Input {
        path: "standard input".into(),
        problem,
        hint: Some(
            "pipe a config.json in (`cat config.json | ftplan ...`), or pass its path".into(),
        ),
    })
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

/// JSON as Python's `json` module writes it: with `allow_nan` (its default, which transformers'
/// `PretrainedConfig.to_json_string` keeps) non-finite floats are the bare words `Infinity`,
/// `-Infinity` and `NaN`, as in Mamba-2's `"time_step_limit": [0.0, Infinity]`. JSON has no such
/// values, so outside strings each becomes a string of the same word: a field read past still
/// parses, and one that must be a number is refused by name (`must be a number`).
pub fn python_json(text: &str) -> std::borrow::Cow<'_, str> {
    const WORDS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !WORDS.iter().any(|w| text.contains(w)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && let Some(word) = WORDS.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// `serde_json::from_str` of [`python_json`]'s reading of `text`.
pub fn from_python_json<T: serde::de::DeserializeOwned>(
    text: &str,
) -> std::result::Result<T, serde_json::Error> {
    serde_json::from_str(&python_json(text))
}

#[cfg(test)]
mod tests {
    use super::python_json;

    #[test]
    fn pythons_non_finite_words_become_strings_outside_strings_only() {
        let text =
            r#"{"limit": [0.0, Infinity], "low": -Infinity, "x": NaN, "s": "Infinity \" NaN"}"#;
        assert_eq!(
            python_json(text),
            r#"{"limit": [0.0, "Infinity"], "low": "-Infinity", "x": "NaN", "s": "Infinity \" NaN"}"#
        );
        assert!(matches!(python_json("{}"), std::borrow::Cow::Borrowed(_)));
    }
}
