//! Finding models and GPUs by name, alias or path: the shipped `models/*.toml` and
//! `hardware/*.toml` (embedded at build time), or a user's `config.json` / TOML file.

use crate::error::{Error, Result};
use crate::spec::hardware::{Hardware, HardwareWire};
use crate::spec::hf::parse_config;
use crate::spec::model::ModelSpec;
use std::path::Path;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// A resolved name, with a note when an alias picked one of several variants.
#[derive(Debug, Clone)]
pub struct Resolved<T> {
    pub value: T,
    pub note: Option<String>,
}

/// The shipped model files as (name, TOML text).
pub fn model_files() -> &'static [(&'static str, &'static str)] {
    embedded::MODELS
}

/// The shipped hardware files as (name, TOML text).
pub fn hardware_files() -> &'static [(&'static str, &'static str)] {
    embedded::HARDWARE
}

fn looks_like_path(arg: &str) -> bool {
    looks_like_file(arg) || arg.contains('/') || arg.contains('\\') || arg == "." || arg == ".."
}

fn normalize(name: &str) -> String {
    name.trim().to_lowercase().replace(['_', ' '], "-")
}

fn toml_to_json(path: &str, text: &str) -> Result<serde_json::Value> {
    let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    // JSON has no NaN or infinity: caught here, they would read as absent.
    if let Some(key) = non_finite(&table) {
        return Err(Error::field(
            path,
            key,
            "must be a finite number, found nan or inf",
        ));
    }
    serde_json::to_value(table).map_err(|e| Error::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })
}

/// The first key whose value is a NaN or infinite float, at any depth.
fn non_finite(table: &toml::Table) -> Option<String> {
    table.iter().find_map(|(k, v)| match v {
        toml::Value::Float(f) if !f.is_finite() => Some(k.clone()),
        toml::Value::Table(t) => non_finite(t).map(|inner| format!("{k}.{inner}")),
        toml::Value::Array(a) => a.iter().find_map(|x| match x {
            toml::Value::Float(f) if !f.is_finite() => Some(k.clone()),
            toml::Value::Table(t) => non_finite(t).map(|inner| format!("{k}.{inner}")),
            _ => None,
        }),
        _ => None,
    })
}

/// Collapses a multi-line parser message (toml shows a source excerpt) to one line.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A TOML error as one line: `line N: message`; an unknown field (with a "did you mean") or a
/// missing one as a field error.
pub fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> Error {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let message = one_line(e.message());
    // serde's "unknown field `x`, expected one of `a`, `b`": suggest the closest.
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let err = Error::field(path, field, "is not a known field");
        return match crate::error::did_you_mean(field, candidates.iter().copied()) {
            Some(s) => err.with_hint(format!("did you mean `{s}`?")),
            None => err,
        };
    }
    // serde's "missing field `x`": the field, as every other refusal names one.
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((field, "")) = rest.split_once('`')
    {
        return Error::field(path, field, "is missing");
    }
    Error::Parse {
        path: path.to_string(),
        message: match line {
            Some(l) => format!("line {l}: {message}"),
            None => message,
        },
    }
}

fn aliases(value: &serde_json::Value) -> Vec<String> {
    value
        .get("aliases")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(normalize)).collect())
        .unwrap_or_default()
}

/// Parses a shipped or user TOML model file; `stem` is the expected `name`.
pub fn parse_model_toml(path: &str, stem: &str, text: &str) -> Result<ModelSpec> {
    let value = toml_to_json(path, text)?;
    let name = value.get("name").and_then(|n| n.as_str()).unwrap_or(stem);
    if name != stem {
        return Err(Error::field(
            path,
            "name",
            format!("is `{name}` but the file is `{stem}.toml`"),
        )
        .with_hint("a model file's `name` must equal its file stem"));
    }
    parse_config(path, &value, name, true)
}

/// Where a model argument's config comes from.
enum Source {
    /// A config.json on standard input.
    Stdin,
    /// A user's file (a `config.json` or a model TOML), and the name the model takes.
    File { path: String, name: String },
    /// A shipped model file, with a note when the argument named it another way.
    Shipped {
        stem: &'static str,
        text: &'static str,
        note: Option<String>,
    },
}

/// The shipped model named `arg` (its file stem or an alias).
fn shipped(arg: &str) -> Result<Option<(&'static str, &'static str)>> {
    let wanted = normalize(arg);
    for (stem, text) in model_files() {
        let path = format!("models/{stem}.toml");
        if *stem == wanted || aliases(&toml_to_json(&path, text)?).contains(&wanted) {
            return Ok(Some((stem, text)));
        }
    }
    Ok(None)
}

/// The repository part of a Hugging Face Hub id (`meta-llama/Llama-3.1-8B`): one `owner/name`
/// of the characters the Hub allows, not a file name.
fn hub_repo(arg: &str) -> Option<&str> {
    let (owner, repo) = arg.split_once('/')?;
    let part = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part(owner) && part(repo) && !looks_like_file(repo)).then_some(repo)
}

fn looks_like_file(arg: &str) -> bool {
    arg.ends_with(".json") || arg.ends_with(".toml")
}

/// Classifies a model argument: `-`, a path (a model folder stands for its `config.json`, as
/// `from_pretrained` reads it), a Hub id that is not a path here (its shipped copy, if one
/// ships), or a shipped name or alias.
fn locate_model(arg: &str) -> Result<Source> {
    if arg == crate::io::STDIN {
        return Ok(Source::Stdin);
    }
    // A path must look like one: a file in the working directory named like a shipped model
    // (`./llama2-7b`) must not silently replace it.
    if looks_like_path(arg) {
        let path = Path::new(arg);
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.is_file() {
                return Err(Error::Input {
                    path: path.into(),
                    problem: "is a folder without a config.json".into(),
                    hint: Some("pass a model folder, its config.json or a model TOML".into()),
                });
            }
            return Ok(Source::File {
                path: config.to_string_lossy().into_owned(),
                name: folder_name(path).unwrap_or_else(|| "config".into()),
            });
        }
        if !path.exists()
            && let Some(repo) = hub_repo(arg)
        {
            // ftplan reads no network; the shipped files are the published configs.
            return match shipped(repo)? {
                Some((stem, text)) => Ok(Source::Shipped {
                    stem,
                    text,
                    note: Some(format!(
                        "`{arg}` is not a file here: using the shipped `{stem}`"
                    )),
                }),
                None => {
                    let near =
                        crate::error::did_you_mean(repo, model_files().iter().map(|(n, _)| *n))
                            .map(|m| format!(" (or the shipped `{m}`?)"))
                            .unwrap_or_default();
                    Err(Error::Input {
                        path: path.into(),
                        problem: "is neither a file here nor a shipped model, and ftplan does \
                                  not download from the Hugging Face Hub"
                            .into(),
                        hint: Some(format!(
                            "download its config.json (`hf download {arg} config.json \
                             --local-dir DIR`) and pass DIR{near}; `ftplan list models` lists \
                             the shipped ones"
                        )),
                    })
                }
            };
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        // A config.json is named after its folder (`Llama-2-7b-hf/config.json`).
        let name = if stem == "config" && !arg.ends_with(".toml") {
            path.parent()
                .and_then(folder_name)
                .unwrap_or_else(|| "config".into())
        } else {
            stem
        };
        return Ok(Source::File {
            path: arg.to_string(),
            name,
        });
    }
    match shipped(arg)? {
        Some((stem, text)) => Ok(Source::Shipped {
            stem,
            text,
            note: (*stem != normalize(arg)).then(|| format!("model `{arg}` resolves to `{stem}`")),
        }),
        None if Path::new(arg).exists() => Err(Error::Unknown {
            kind: "model",
            name: arg.to_string(),
            // A bare name is a shipped model's, so that a file named like one cannot shadow it.
            hint: Some(format!(
                "`{arg}` here is a file or folder: pass it as `./{arg}`"
            )),
        }),
        None => Err(Error::unknown(
            "model",
            arg,
            model_files().iter().map(|(n, _)| *n),
            "ftplan list models",
        )),
    }
}

/// A folder's own name; for `.`, `..` or the empty parent of a bare `config.json`, that of the
/// folder they stand for.
fn folder_name(path: &Path) -> Option<String> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let named = path.file_name().map(|s| s.to_os_string()).or_else(|| {
        path.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_os_string()))
    })?;
    named.to_str().map(str::to_string)
}

/// A user's model file's config object: TOML, or (Python's) JSON.
fn read_model_file(path: &str) -> Result<serde_json::Value> {
    let text = crate::io::read_text(Path::new(path))?;
    if path.ends_with(".toml") {
        toml_to_json(path, &text)
    } else {
        crate::io::from_python_json(&text).map_err(|e| Error::Parse {
            path: path.to_string(),
            message: format!("invalid JSON: {e}"),
        })
    }
}

/// Reads a model from a path (`config.json`, a model folder or TOML), by shipped name or alias
/// (or a Hub id whose model ships), or from a config.json on standard input (`-`).
pub fn resolve_model(arg: &str) -> Result<Resolved<ModelSpec>> {
    match locate_model(arg)? {
        Source::Stdin => {
            let value = stdin_config()?;
            // Named as the hub names it (`_name_or_path`, which `save_pretrained` writes), if
            // it says.
            let name = value
                .get("_name_or_path")
                .and_then(|v| v.as_str())
                .and_then(|p| p.trim_end_matches('/').rsplit('/').next())
                .filter(|n| !n.is_empty())
                .unwrap_or("stdin")
                .to_string();
            Ok(Resolved {
                value: parse_config("standard input", &value, &name, false)?,
                note: None,
            })
        }
        Source::File { path, name } => {
            let spec = if path.ends_with(".toml") {
                parse_model_toml(&path, &name, &crate::io::read_text(Path::new(&path))?)?
            } else {
                parse_config(&path, &read_model_file(&path)?, &name, false)?
            };
            Ok(Resolved {
                value: spec,
                note: None,
            })
        }
        Source::Shipped { stem, text, note } => Ok(Resolved {
            value: parse_model_toml(&format!("models/{stem}.toml"), stem, text)?,
            note,
        }),
    }
}

/// One shipped model as `ftplan list models` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub model_type: &'static str,
    /// The published parameter count the file cites.
    pub params: Option<u64>,
    /// Decoder layers (every layer of a decoder-only model).
    pub layers: u64,
    pub encoder_layers: Option<u64>,
    pub hidden_size: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab_size: u64,
}

/// The shipped models, by name.
pub fn models() -> Result<Vec<ModelEntry>> {
    model_files()
        .iter()
        .map(|(stem, text)| {
            let m = parse_model_toml(&format!("models/{stem}.toml"), stem, text)?;
            Ok(ModelEntry {
                model_type: m.model_type,
                params: m.published_params,
                layers: m.decoder.layers,
                encoder_layers: m.encoder.map(|e| e.layers),
                hidden_size: m.hidden_size,
                heads: m.decoder.heads,
                kv_heads: m.decoder.kv_heads,
                vocab_size: m.vocab_size,
                name: m.name,
            })
        })
        .collect()
}

/// One shipped GPU as `ftplan list gpus` shows it (memory in bytes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuEntry {
    pub name: String,
    pub display_name: String,
    pub memory: u64,
    pub bf16_tflops: f64,
    pub hbm_gbps: f64,
    pub interconnect: String,
    pub interconnect_gbps: f64,
    pub network_gbps: f64,
    pub gpus_per_node: u64,
    pub host_memory: u64,
}

/// The shipped GPUs, by name.
pub fn gpus() -> Result<Vec<GpuEntry>> {
    hardware_files()
        .iter()
        .map(|(stem, text)| {
            let (h, _) = parse_hardware_toml(&format!("hardware/{stem}.toml"), stem, text)?;
            Ok(GpuEntry {
                name: h.name,
                display_name: h.display_name,
                memory: h.memory.0,
                bf16_tflops: h.bf16_tflops,
                hbm_gbps: h.hbm_gbps,
                interconnect: h.interconnect,
                interconnect_gbps: h.interconnect_gbps,
                network_gbps: h.network_gbps,
                gpus_per_node: h.gpus_per_node,
                host_memory: h.host_memory.0,
            })
        })
        .collect()
}

/// Whether a model or GPU argument names a file (or standard input) rather than a shipped
/// name or alias.
pub fn names_a_file(arg: &str) -> bool {
    arg == crate::io::STDIN || looks_like_path(arg)
}

/// A config.json piped to standard input (`--model -`).
fn stdin_config() -> Result<serde_json::Value> {
    let text = crate::io::read_stdin()?;
    crate::io::from_python_json(&text).map_err(|e| Error::Parse {
        path: "standard input".into(),
        message: format!("invalid JSON: {e} (`-` reads a config.json)"),
    })
}

/// The config object behind a model argument (a `config.json` or TOML path, a shipped name or
/// alias, or `-`), without the file-only keys (`name`, `source`, `params`, `aliases`): what
/// `ftplan measure` hands to transformers.
pub fn model_config(arg: &str) -> Result<serde_json::Value> {
    let mut value = match locate_model(arg)? {
        Source::Stdin => stdin_config()?,
        Source::File { path, .. } => read_model_file(&path)?,
        Source::Shipped { stem, text, .. } => toml_to_json(&format!("models/{stem}.toml"), text)?,
    };
    if let Some(map) = value.as_object_mut() {
        for key in ["name", "source", "params", "aliases"] {
            map.remove(key);
        }
        // TOML has no null: a 0 query rank is DeepSeek's `q_lora_rank: null`.
        if map.get("q_lora_rank").and_then(serde_json::Value::as_u64) == Some(0) {
            map.insert("q_lora_rank".into(), serde_json::Value::Null);
        }
    }
    Ok(value)
}

/// Parses a hardware TOML file.
pub fn parse_hardware_toml(path: &str, stem: &str, text: &str) -> Result<(Hardware, Vec<String>)> {
    let mut wire: HardwareWire = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let aliases = std::mem::take(&mut wire.aliases);
    if wire.name != stem {
        return Err(Error::field(
            path,
            "name",
            format!("is `{}` but the file is `{stem}.toml`", wire.name),
        ));
    }
    let hw = Hardware::from_wire(path, wire)?;
    Ok((hw, aliases.iter().map(|a| normalize(a)).collect()))
}

/// Finds a GPU by shipped name or alias, or reads a hardware TOML path.
pub fn resolve_hardware(arg: &str) -> Result<Resolved<Hardware>> {
    if looks_like_path(arg) {
        let path = Path::new(arg);
        let text = crate::io::read_text(path)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("gpu");
        let (hw, _) = parse_hardware_toml(arg, stem, &text)?;
        return Ok(Resolved {
            value: hw,
            note: None,
        });
    }
    let wanted = normalize(arg);
    for (stem, text) in hardware_files() {
        let path = format!("hardware/{stem}.toml");
        let (hw, aliases) = parse_hardware_toml(&path, stem, text)?;
        if *stem == wanted || aliases.contains(&wanted) {
            let note = (*stem != wanted)
                .then(|| format!("GPU `{arg}` resolves to `{stem}` ({})", hw.display_name));
            return Ok(Resolved { value: hw, note });
        }
    }
    Err(Error::unknown(
        "GPU",
        arg,
        hardware_files().iter().map(|(n, _)| *n),
        "ftplan list gpus",
    ))
}
