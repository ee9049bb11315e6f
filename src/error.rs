//! The library's one error type: structured fields, lowercase messages, a `hint:` where a fix exists.

use std::path::PathBuf;

/// Everything that can go wrong between reading an input and producing a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (the OS's reason is the source, printed once by the chain).
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An input that is not something ftplan reads (a FIFO, a device, a huge file).
    #[error("`{path}`: {problem}{}", hint_line(.hint))]
    Input {
        path: PathBuf,
        problem: String,
        hint: Option<String>,
    },
    /// A file is not valid TOML or JSON, or does not match the expected shape.
    #[error("`{path}`: {message}")]
    Parse { path: String, message: String },
    /// A field is missing, out of range or inconsistent with another.
    #[error("`{path}`: field `{field}` {problem}{}", hint_line(.hint))]
    Field {
        path: String,
        field: String,
        problem: String,
        hint: Option<String>,
    },
    /// A name (model, GPU, method, ...) that is not known.
    #[error("unknown {kind} `{name}`{}", hint_line(.hint))]
    Unknown {
        kind: &'static str,
        name: String,
        hint: Option<String>,
    },
    /// A plan that cannot be simulated (e.g. a method that needs attention the model lacks).
    #[error("{message}{}", hint_line(.hint))]
    Plan {
        message: String,
        hint: Option<String>,
    },
    /// No GPU adapter for `ftplan calibrate`.
    #[error("no GPU adapter found: {reason}{}", hint_line(&Some(.hint.clone())))]
    NoAdapter { reason: String, hint: String },
    /// The GPU benchmark ran but failed or produced wrong numbers.
    #[error("calibration failed: {0}")]
    Calibration(String),
    /// Writing an output file failed.
    #[error("cannot write `{path}`: {message}")]
    Write { path: PathBuf, message: String },
}

fn hint_line(hint: &Option<String>) -> String {
    match hint {
        // The message policy: what failed, the file and field, then the hint on its own line.
        Some(h) => format!("\nhint: {h}"),
        None => String::new(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The path a plan's own refusals name until the caller says where the plan came from.
    pub const PLAN: &'static str = "plan";

    /// A plan's refusal (path [`Error::PLAN`]) as from `origin` (a plan file, the command
    /// line); any other error unchanged.
    pub fn from_origin(mut self, origin: &str) -> Error {
        if let Error::Field { path, .. } = &mut self
            && path == Error::PLAN
        {
            *path = origin.to_string();
        }
        self
    }

    pub fn field(
        path: impl Into<String>,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Error {
        Error::Field {
            path: path.into(),
            field: field.into(),
            problem: problem.into(),
            hint: None,
        }
    }

    /// The same error with a field error's field renamed (a key under its section, a flag as
    /// a plan file spells it); any other error unchanged.
    pub fn map_field(mut self, rename: impl FnOnce(&str) -> String) -> Error {
        if let Error::Field { field, .. } = &mut self {
            *field = rename(field);
        }
        self
    }

    /// The same error with a field error's problem and hint rewritten (flags named as a plan
    /// file spells its keys); any other error unchanged.
    pub fn map_words(mut self, rewrite: impl Fn(&str) -> String) -> Error {
        if let Error::Field { problem, hint, .. } = &mut self {
            *problem = rewrite(problem);
            *hint = hint.as_deref().map(&rewrite);
        }
        self
    }

    pub fn with_hint(mut self, text: impl Into<String>) -> Error {
        if let Error::Field { hint, .. } | Error::Plan { hint, .. } = &mut self {
            *hint = Some(text.into());
        }
        self
    }

    /// An unknown name with a "did you mean" drawn from `candidates`.
    pub fn unknown<'a>(
        kind: &'static str,
        name: &str,
        candidates: impl IntoIterator<Item = &'a str>,
        list_command: &str,
    ) -> Error {
        let hint = match did_you_mean(name, candidates) {
            Some(best) => Some(format!(
                "did you mean `{best}`? `{list_command}` lists them all"
            )),
            None => Some(format!("`{list_command}` lists them all")),
        };
        Error::Unknown {
            kind,
            name: name.to_string(),
            hint,
        }
    }
}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let lower = name.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(lower.len()) / 3).max(2) || c.contains(&lower))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        let names = ["llama2-7b", "llama3-8b", "mistral-7b"];
        assert_eq!(
            did_you_mean("llama2-7", names).as_deref(),
            Some("llama2-7b")
        );
        assert_eq!(
            did_you_mean("mistrl-7b", names).as_deref(),
            Some("mistral-7b")
        );
        assert_eq!(did_you_mean("bert", names), None);
    }
}
