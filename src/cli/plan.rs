//! One way in for a plan, from flags or from a plan file: `PlanInput` -> validated
//! model + plan + GPU + rates.

use crate::cli::args::{
    AttentionArg, LinearKernelArg, MethodArg, OptimizerArg, PlanArgs, PrecisionArg,
};
use ftplan::error::{Error, Result, did_you_mean};
use ftplan::spec::hardware::Hardware;
use ftplan::spec::model::ModelSpec;
use ftplan::spec::parallel::{Engine, Offload, Parallel};
use ftplan::spec::plan::{
    AttentionKernel, LinearKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision, Proj,
    Side,
};
use ftplan::spec::registry::{resolve_hardware, resolve_model, toml_error};
use ftplan::time::Rates;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A plan file (`examples/*.toml`) as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub name: Option<String>,
    pub model: String,
    pub gpu: String,
    pub gpus: Option<u64>,
    pub gpus_per_node: Option<u64>,
    pub engine: Option<String>,
    pub offload: Option<String>,
    pub tp: Option<u64>,
    #[serde(default)]
    pub sp: bool,
    pub pp: Option<u64>,
    pub micro_batches: Option<u64>,
    #[serde(default = "one")]
    pub grad_accum: u64,
    #[serde(default = "full")]
    pub method: String,
    pub precision: Option<String>,
    #[serde(default = "adamw")]
    pub optimizer: String,
    #[serde(default = "one")]
    pub batch: u64,
    #[serde(default = "seq")]
    pub seq: u64,
    #[serde(default = "target")]
    pub target_seq: u64,
    #[serde(default)]
    pub grad_ckpt: bool,
    #[serde(default = "sdpa")]
    pub attention: String,
    #[serde(default)]
    pub headroom_percent: f64,
    pub lora: Option<LoraFile>,
    pub virtual_tokens: Option<u64>,
    pub adapter_size: Option<u64>,
    pub train_layers: Option<String>,
    #[serde(default)]
    pub train_embeddings: bool,
    pub train_side: Option<String>,
    pub expert_load: Option<f64>,
    #[serde(default = "torch")]
    pub linear_kernel: String,
    pub calibration: Option<PathBuf>,
    /// A DeepSpeed JSON beside the plan (relative to it).
    pub deepspeed: Option<PathBuf>,
    /// An Accelerate YAML beside the plan (relative to it).
    pub accelerate_config: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraFile {
    #[serde(default = "rank")]
    pub rank: u64,
    pub alpha: Option<f64>,
    #[serde(default = "qv")]
    pub targets: String,
    #[serde(default)]
    pub dora: bool,
}

fn one() -> u64 {
    1
}
fn full() -> String {
    "full".into()
}
fn adamw() -> String {
    "adamw".into()
}
fn seq() -> u64 {
    1024
}
fn target() -> u64 {
    128
}
fn sdpa() -> String {
    "sdpa".into()
}
fn torch() -> String {
    "torch".into()
}
fn rank() -> u64 {
    16
}
fn qv() -> String {
    "qv".into()
}

/// Everything needed to run one estimate.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    /// Where the plan came from (a plan file's path, or "command line").
    pub origin: String,
    pub model: ModelSpec,
    pub plan: Plan,
    pub hardware: Hardware,
    pub rates: Rates,
    /// Fraction of device memory to keep free.
    pub headroom: f64,
    /// Alias resolutions and similar, for stderr.
    pub notes: Vec<String>,
}

impl Resolved {
    /// Device memory available to the run after the headroom.
    pub fn budget(&self) -> ftplan::units::Bytes {
        ftplan::units::Bytes((self.hardware.memory.0 as f64 * (1.0 - self.headroom)) as u64)
    }
}

fn parse_name<T: Copy>(
    origin: &str,
    field: &str,
    value: &str,
    table: &[(&'static str, T)],
) -> Result<T> {
    ftplan::spec::value_in(table, value).ok_or_else(|| {
        let err = Error::field(
            origin,
            field,
            format!("`{value}` is not one of {}", names(table)),
        );
        match did_you_mean(value, table.iter().map(|(n, _)| *n)) {
            Some(s) => err.with_hint(format!("did you mean `{s}`?")),
            None => err,
        }
    })
}

fn names<T>(table: &[(&'static str, T)]) -> String {
    table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A method, precision, optimizer or attention kernel named in a plan file: the same names as
/// the flag's (one definition, clap's `ValueEnum`).
fn parse_value<T: clap::ValueEnum>(origin: &str, field: &str, value: &str) -> Result<T> {
    let names: Vec<String> = T::value_variants()
        .iter()
        .filter_map(|m| m.to_possible_value().map(|p| p.get_name().to_string()))
        .collect();
    T::from_str(value, false).map_err(|_| {
        let err = Error::field(
            origin,
            field,
            format!("`{value}` is not one of {}", names.join(", ")),
        );
        match did_you_mean(value, names.iter().map(String::as_str)) {
            Some(s) => err.with_hint(format!("did you mean `{s}`?")),
            None => err,
        }
    })
}

/// `top:N` or `N`: the number of top blocks `--method freeze` trains.
fn parse_train_layers(origin: &str, text: &str) -> Result<u64> {
    let n = text.strip_prefix("top:").unwrap_or(text).trim();
    n.parse::<u64>().map_err(|_| {
        Error::field(
            origin,
            "train-layers",
            format!("`{text}` is not `top:N` or a number of layers"),
        )
        .with_hint("e.g. --train-layers top:4")
    })
}

/// Parses `qv`, `all` or `q,k,v,o,gate,up,down`.
pub fn lora_targets(origin: &str, field: &str, text: &str) -> Result<LoraTargets> {
    LoraTargets::parse(text.split(',')).map_err(|(name, hint)| {
        let problem = if name.is_empty() {
            "names no projection".to_string()
        } else {
            format!("`{name}` is not a projection ftplan knows")
        };
        let err = Error::field(origin, field, problem);
        match hint {
            Some(h) => err.with_hint(h),
            None => err,
        }
    })
}

/// A plan's fields before validation, from flags or a file.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub origin: String,
    pub name: Option<String>,
    pub model: Option<String>,
    pub gpu: Option<String>,
    pub method: MethodArg,
    pub precision: Option<PrecisionArg>,
    pub optimizer: OptimizerArg,
    pub batch: u64,
    pub seq: u64,
    pub target_seq: u64,
    pub grad_ckpt: bool,
    pub attention: AttentionArg,
    pub lora_rank: u64,
    pub lora_alpha: Option<f64>,
    pub lora_targets: String,
    pub lora_dora: bool,
    pub virtual_tokens: u64,
    pub adapter_size: u64,
    pub train_layers: Option<String>,
    pub train_embeddings: bool,
    pub train_side: Option<String>,
    pub expert_load: Option<f64>,
    pub linear_kernel: LinearKernelArg,
    pub layout: LayoutInput,
    pub headroom_percent: f64,
    pub calibration: Option<PathBuf>,
    pub deepspeed: Option<PathBuf>,
    pub accelerate_config: Option<PathBuf>,
    /// The keys a plan file sets (`[lora]`'s as `lora.KEY`); the command line asks clap.
    pub keys: Vec<String>,
}

/// The parallel layout as given; defaults are filled in by `resolve`.
#[derive(Debug, Clone, Default)]
pub struct LayoutInput {
    pub gpus: Option<u64>,
    pub gpus_per_node: Option<u64>,
    pub engine: Option<String>,
    pub offload: Option<String>,
    pub tp: Option<u64>,
    pub sp: bool,
    pub pp: Option<u64>,
    pub micro_batches: Option<u64>,
    pub grad_accum: u64,
}

impl LayoutInput {
    /// The layout choices given (for `fit`'s search, which searches the rest).
    pub fn fixed(&self, origin: &str, grad_ckpt: bool) -> Result<ftplan::layouts::Fixed> {
        Ok(ftplan::layouts::Fixed {
            gpus: self.gpus,
            engine: match &self.engine {
                Some(e) => Some(parse_name(origin, "engine", e, &Engine::ALL)?),
                None => None,
            },
            offload: match &self.offload {
                Some(o) => Some(parse_name(origin, "offload", o, &Offload::ALL)?),
                None => None,
            },
            tp: self.tp,
            pp: self.pp,
            grad_ckpt: grad_ckpt.then_some(true),
        })
    }

    /// The layout on `hardware`, defaults filled in (its rules are checked with the plan).
    pub fn resolve(&self, origin: &str, hardware: &Hardware) -> Result<Parallel> {
        let fixed = self.fixed(origin, false)?;
        let engine = fixed.engine.unwrap_or(Engine::Ddp);
        let offload = fixed.offload.unwrap_or(Offload::None);
        let gpus = self.gpus.unwrap_or(1);
        let (tp, pp) = (self.tp.unwrap_or(1), self.pp.unwrap_or(1));
        let p = Parallel {
            gpus,
            gpus_per_node: self
                .gpus_per_node
                .unwrap_or_else(|| hardware.gpus_per_node.min(gpus.max(1))),
            engine,
            offload,
            tp,
            sp: self.sp,
            pp,
            micro_batches: self
                .micro_batches
                .unwrap_or(if pp > 1 { 2 * pp } else { 1 }),
            grad_accum: self.grad_accum,
        };
        // Its rules are checked with the rest of the plan (`estimate::check_plan`).
        Ok(p)
    }
}

impl PlanInput {
    pub fn from_args(a: &PlanArgs) -> PlanInput {
        PlanInput {
            origin: "command line".into(),
            name: None,
            model: a.model.clone(),
            gpu: a.gpu.clone(),
            method: a.method,
            precision: a.precision,
            optimizer: a.optimizer,
            batch: a.batch,
            seq: a.seq,
            target_seq: a.target_seq,
            grad_ckpt: a.grad_ckpt,
            attention: a.attention,
            lora_rank: a.lora_rank,
            lora_alpha: a.lora_alpha,
            lora_targets: a.lora_targets.clone(),
            lora_dora: a.lora_dora,
            virtual_tokens: a.virtual_tokens,
            adapter_size: a.adapter_size,
            train_layers: a.train_layers.clone(),
            train_embeddings: a.train_embeddings,
            train_side: a.train_side.clone(),
            expert_load: a.expert_load,
            linear_kernel: a.linear_kernel,
            layout: LayoutInput {
                gpus: a.gpus,
                gpus_per_node: a.gpus_per_node,
                engine: a.engine.clone(),
                offload: a.offload.clone(),
                tp: a.tp,
                sp: a.sp,
                pp: a.pp,
                micro_batches: a.micro_batches,
                grad_accum: a.grad_accum,
            },
            headroom_percent: a.headroom,
            calibration: a.calibration.clone(),
            deepspeed: a.deepspeed.clone(),
            accelerate_config: a.accelerate_config.clone(),
            keys: Vec::new(),
        }
    }

    /// Whether the plan sets a field itself (by its clap id, `lora_rank`), rather than taking
    /// its default.
    fn given(&self, id: &str) -> bool {
        if self.origin == "command line" {
            return crate::cli::given(id);
        }
        let key = spelled_for(&self.origin, &id.replace('_', "-"));
        self.keys.contains(&key)
    }

    /// Reads a plan file; relative model/GPU/calibration paths are relative to the file.
    pub fn from_file(path: &Path) -> Result<PlanInput> {
        let origin = path.display().to_string();
        let text = ftplan::io::read_text(path)?;
        let f: PlanFile = toml::from_str(&text).map_err(|e| toml_error(&origin, &text, &e))?;
        // The keys it sets, for the notes on keys its method does not read.
        let table: toml::Table = toml::from_str(&text).unwrap_or_default();
        let keys = table
            .iter()
            .flat_map(|(k, v)| match v.as_table() {
                Some(t) => t.keys().map(|sub| format!("{k}.{sub}")).collect(),
                None => vec![k.clone()],
            })
            .collect();
        let dir = path.parent().unwrap_or(Path::new("."));
        // A file, or a model folder that is there; a name or Hub id (`org/name`) stays as it is.
        let rel = |p: &str| {
            let beside = dir.join(p);
            if p.ends_with(".json") || p.ends_with(".toml") || (p.contains('/') && beside.is_dir())
            {
                beside.display().to_string()
            } else {
                p.to_string()
            }
        };
        let lora = f.lora.unwrap_or(LoraFile {
            rank: 16,
            alpha: None,
            targets: "qv".into(),
            dora: false,
        });
        Ok(PlanInput {
            name: f
                .name
                .clone()
                .or_else(|| path.file_stem().and_then(|s| s.to_str()).map(String::from)),
            model: Some(rel(&f.model)),
            gpu: Some(rel(&f.gpu)),
            method: parse_value(&origin, "method", &f.method)?,
            precision: match &f.precision {
                Some(p) => Some(parse_value(&origin, "precision", p)?),
                None => None,
            },
            optimizer: parse_value(&origin, "optimizer", &f.optimizer)?,
            batch: f.batch,
            seq: f.seq,
            target_seq: f.target_seq,
            grad_ckpt: f.grad_ckpt,
            attention: parse_value(&origin, "attention", &f.attention)?,
            lora_rank: lora.rank,
            lora_alpha: lora.alpha,
            lora_targets: lora.targets,
            lora_dora: lora.dora,
            virtual_tokens: f.virtual_tokens.unwrap_or(20),
            adapter_size: f.adapter_size.unwrap_or(64),
            train_layers: f.train_layers.clone(),
            train_embeddings: f.train_embeddings,
            train_side: f.train_side.clone(),
            expert_load: f.expert_load,
            linear_kernel: parse_value(&origin, "linear_kernel", &f.linear_kernel)?,
            layout: LayoutInput {
                gpus: f.gpus,
                gpus_per_node: f.gpus_per_node,
                engine: f.engine,
                offload: f.offload,
                tp: f.tp,
                sp: f.sp,
                pp: f.pp,
                micro_batches: f.micro_batches,
                grad_accum: f.grad_accum,
            },
            headroom_percent: f.headroom_percent,
            calibration: f.calibration.map(|c| dir.join(c)),
            deepspeed: f.deepspeed.map(|c| dir.join(c)),
            accelerate_config: f.accelerate_config.map(|c| dir.join(c)),
            keys,
            origin,
        })
    }

    /// Applies the engine configuration files the plan names: their values replace the
    /// plan's defaults; flags given explicitly for the layout win.
    fn with_engine_configs(&self) -> Result<(PlanInput, Vec<String>)> {
        let mut input = self.clone();
        let mut notes = Vec::new();
        let mut files = Vec::new();
        if let Some(p) = &self.deepspeed {
            let text = ftplan::io::read_text(p)?;
            files.push(ftplan::interop::deepspeed::read(
                &p.display().to_string(),
                &text,
            )?);
        }
        if let Some(p) = &self.accelerate_config {
            let text = ftplan::io::read_text(p)?;
            files.push(ftplan::interop::accelerate::read(
                &p.display().to_string(),
                &text,
            )?);
        }
        for i in files {
            let l = &mut input.layout;
            l.gpus = l.gpus.or(i.gpus);
            if let (None, Some(g), Some(n)) = (l.gpus_per_node, i.gpus, i.nodes) {
                l.gpus_per_node = Some(g.div_ceil(n.max(1)));
            }
            if l.engine.is_none() {
                l.engine = i.engine.map(|e| e.name().to_string());
            }
            if l.offload.is_none() {
                l.offload = i.offload.map(|o| o.name().to_string());
            }
            if let Some(g) = i.grad_accum {
                l.grad_accum = g;
            }
            if let Some(b) = i.batch {
                input.batch = b;
            }
            if input.precision.is_none() {
                input.precision = i.precision.map(|p| match p {
                    Precision::MixedBf16 => PrecisionArg::MixedBf16,
                    Precision::MixedFp16 => PrecisionArg::MixedFp16,
                    Precision::Bf16 => PrecisionArg::Bf16,
                    Precision::Fp32 => PrecisionArg::Fp32,
                });
            }
            input.grad_ckpt |= i.grad_ckpt == Some(true);
            notes.extend(i.notes);
        }
        input.deepspeed = None;
        input.accelerate_config = None;
        Ok((input, notes))
    }

    /// A refused layout field that an engine config supplied (its flag was not given) says
    /// which file set it: `--engine zero2` beside a DeepSpeed file that offloads parameters is
    /// refused for the file's offload, which the flag `--offload` overrides.
    fn name_engine_config_source(&self, e: Error, merged: &PlanInput) -> Error {
        let supplied = |field: &str| match field {
            "engine" => self.layout.engine.is_none() && merged.layout.engine.is_some(),
            "offload" => self.layout.offload.is_none() && merged.layout.offload.is_some(),
            "gpus" => self.layout.gpus.is_none() && merged.layout.gpus.is_some(),
            _ => false,
        };
        let field = match &e {
            Error::Field {
                field, hint: None, ..
            } if supplied(field) => field.clone(),
            _ => return e,
        };
        let files: Vec<String> = [&self.deepspeed, &self.accelerate_config]
            .into_iter()
            .flatten()
            .map(|p| format!("`{}`", p.display()))
            .collect();
        // The engine and its offload are refused together: name both where the file set both.
        let fields: Vec<&str> = match field.as_str() {
            "engine" | "offload" => ["engine", "offload"]
                .into_iter()
                .filter(|f| supplied(f))
                .collect(),
            f => vec![f],
        };
        let flags: Vec<String> = fields
            .iter()
            .map(|f| {
                if self.origin == "command line" {
                    format!("--{f}")
                } else {
                    format!("the plan's `{}`", spelled_for(&self.origin, f))
                }
            })
            .collect();
        let verb = if fields.len() > 1 {
            "override them"
        } else {
            "overrides it"
        };
        e.with_hint(format!(
            "{} sets the {}; {} {verb}",
            files.join(" or "),
            fields.join(" and "),
            flags.join(" and ")
        ))
    }

    /// Validates and resolves names; a refused field is named as its origin spells it.
    pub fn resolve(&self) -> Result<Resolved> {
        let mut r = self.resolve_fields().map_err(|e| match &e {
            Error::Field { path, .. } if *path == self.origin => as_origin_spells(e, &self.origin),
            _ => e,
        })?;
        // Notes name the plan's settings as its origin spells them, as its errors do.
        for n in &mut r.notes {
            *n = flags_as_keys(&self.origin, n);
        }
        Ok(r)
    }

    fn resolve_fields(&self) -> Result<Resolved> {
        if self.deepspeed.is_some() || self.accelerate_config.is_some() {
            let (input, notes) = self.with_engine_configs()?;
            let mut r = input
                .resolve()
                .map_err(|e| self.name_engine_config_source(e, &input))?;
            r.notes.extend(notes);
            return Ok(r);
        }
        let o = self.origin.as_str();
        let model_name = self.model.as_deref().ok_or_else(|| {
            Error::field(o, "model", "is missing")
                .with_hint("pass --model NAME or a config.json path")
        })?;
        let gpu_name = self.gpu.as_deref().ok_or_else(|| {
            Error::field(o, "gpu", "is missing").with_hint("pass --gpu NAME (`ftplan list gpus`)")
        })?;
        let model = resolve_model(model_name).map_err(|e| in_file(e, o, "model"))?;
        let gpu = resolve_hardware(gpu_name).map_err(|e| in_file(e, o, "gpu"))?;
        let mut notes: Vec<String> = [model.note.clone(), gpu.note.clone()]
            .into_iter()
            .flatten()
            .collect();
        let lora = || -> Result<Lora> {
            Ok(Lora {
                rank: self.lora_rank,
                alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64),
                targets: lora_targets(o, "lora-targets", &self.lora_targets)?,
                dora: self.lora_dora,
            })
        };
        let method = match self.method {
            MethodArg::Full => Method::Full,
            MethodArg::Lora => Method::Lora(lora()?),
            MethodArg::Qlora => Method::Qlora(lora()?),
            MethodArg::Adapter => Method::Adapter {
                size: self.adapter_size,
            },
            MethodArg::Prefix => Method::Prefix {
                virtual_tokens: self.virtual_tokens,
            },
            MethodArg::Prompt => Method::Prompt {
                virtual_tokens: self.virtual_tokens,
            },
            MethodArg::Ia3 => Method::Ia3,
            MethodArg::BitFit => Method::BitFit,
            MethodArg::LnTuning => Method::LnTuning,
            MethodArg::Freeze => Method::Freeze {
                top_layers: match &self.train_layers {
                    Some(t) => Some(parse_train_layers(o, t)?),
                    None => None,
                },
                embeddings: self.train_embeddings,
                side: match &self.train_side {
                    Some(s) => Some(parse_name(o, "train-side", s, &Side::NAMES)?),
                    None => None,
                },
            },
        };
        let expert_load = self.expert_load.unwrap_or(1.0);
        if self.expert_load.is_some() {
            notes.push(match model.value.moe {
                None => format!(
                    "--expert-load is ignored: `{}` has no mixture-of-experts layers",
                    model.value.name
                ),
                Some(_) => "--expert-load changes nothing: transformers 5 runs every routed row \
                            through one grouped matmul per projection, so memory and FLOPs do \
                            not depend on how the router spreads the tokens"
                    .to_string(),
            });
        }
        if !(expert_load.is_finite() && (1.0..=1000.0).contains(&expert_load)) {
            return Err(Error::field(
                o,
                "expert-load",
                format!(
                    "must be a ratio in [1, 1000] (busiest expert over the mean), found {expert_load}"
                ),
            ));
        }
        // Flags (or plan-file keys) the method does not read: said, not silently dropped.
        {
            let lora = matches!(method, Method::Lora(_) | Method::Qlora(_));
            let tokens = matches!(method, Method::Prefix { .. } | Method::Prompt { .. });
            let unused: &[(&str, bool)] = &[
                ("lora_rank", !lora),
                ("lora_alpha", !lora),
                ("lora_targets", !lora),
                ("lora_dora", !lora),
                ("virtual_tokens", !tokens),
                ("adapter_size", !matches!(method, Method::Adapter { .. })),
                ("train_layers", !matches!(method, Method::Freeze { .. })),
                ("train_embeddings", !matches!(method, Method::Freeze { .. })),
                ("train_side", !matches!(method, Method::Freeze { .. })),
                // QLoRA's base is NF4 and the rest fp32 whatever --precision; it computes in
                // bf16, or in fp16 with a loss scaler under mixed-fp16 (the recipe for GPUs
                // without bf16).
                (
                    "precision",
                    matches!(method, Method::Qlora(_))
                        && self.precision != Some(PrecisionArg::MixedFp16),
                ),
            ];
            for (id, ignored) in unused {
                if *ignored && self.given(id) {
                    notes.push(format!(
                        "{} is ignored by --method {}",
                        crate::cli::flag(id),
                        method.name()
                    ));
                }
            }
        }
        let longest = self.seq.max(self.target_seq);
        if let Some(context) = model.value.context.filter(|&c| longest > c) {
            notes.push(format!(
                "--seq {longest} is past `{}`'s trained context of {context} tokens (it runs, out of distribution)",
                model.value.name
            ));
        }
        let precision = match self.precision {
            Some(PrecisionArg::MixedBf16) => Precision::MixedBf16,
            Some(PrecisionArg::MixedFp16) => Precision::MixedFp16,
            Some(PrecisionArg::Bf16) => Precision::Bf16,
            Some(PrecisionArg::Fp32) => Precision::Fp32,
            None if method.frozen_base() => Precision::Bf16,
            None => Precision::MixedBf16,
        };
        let optimizer = match self.optimizer {
            OptimizerArg::Adamw => Optimizer::Adamw,
            OptimizerArg::AdamwForeach => Optimizer::AdamwForeach,
            OptimizerArg::Adamw8bit => Optimizer::Adamw8bit,
            OptimizerArg::PagedAdamw8bit => Optimizer::PagedAdamw8bit,
            OptimizerArg::PagedAdamw32bit => Optimizer::PagedAdamw32bit,
            OptimizerArg::Sgd => Optimizer::Sgd,
            OptimizerArg::Adafactor => Optimizer::Adafactor,
        };
        if !(0.0..100.0).contains(&self.headroom_percent) {
            return Err(Error::field(
                o,
                "headroom",
                format!(
                    "must be a percentage in [0, 100), found {}",
                    crate::cli::show(self.headroom_percent)
                ),
            ));
        }
        // V100 and T4 have no bf16 tensor cores: bf16 runs there at their fp32 rate.
        let hw = &gpu.value;
        let computes_bf16 = match precision {
            Precision::MixedFp16 => false,
            // QLoRA computes in bf16 whatever the other weights' dtype.
            Precision::Fp32 => matches!(method, Method::Qlora(_)),
            Precision::MixedBf16 | Precision::Bf16 => true,
        };
        if computes_bf16 && !hw.has_bf16_tensor_cores() {
            notes.push(format!(
                "`{}` has no bf16 tensor cores: bf16 runs at its fp32 rate ({} TFLOP/s); fp16 mixed precision uses its fp16 tensor cores ({} TFLOP/s): try --precision mixed-fp16",
                hw.name, hw.fp32_tflops, hw.fp16_tflops
            ));
        }
        if matches!(method, Method::Qlora(_)) && model.value.moe.is_some() {
            notes.push(format!(
                "`{}`'s experts are 3-D parameters in transformers 5, which bitsandbytes does not \
                 quantize (it swaps `nn.Linear` modules): under QLoRA they stay unquantized and \
                 peft's `prepare_model_for_kbit_training` upcasts them to fp32, as planned",
                model.value.name
            ));
        }
        let family = model.value.family;
        if matches!(method, Method::Prefix { .. } | Method::Prompt { .. })
            && !family.config_names_attention_heads()
        {
            notes.push(format!(
                "peft finds no `num_attention_heads` in `{}`'s config and raises until it is \
                 given: pass num_attention_heads to its {} config",
                model.value.name,
                if matches!(method, Method::Prefix { .. }) {
                    "PrefixTuningConfig"
                } else {
                    "PromptTuningConfig"
                }
            ));
        }
        // peft's tables lack defaults for many model types; the plan follows Llama's entry
        // (IA3) or trains every norm (LN tuning), which the user then names.
        if method == Method::Ia3 && !model.value.peft_ia3_defaults() {
            notes.push(format!(
                "peft has no IA3 defaults for model type `{}` and raises until they are given: \
                 planned with Llama's entry by role, so pass this model's key, value and FFN \
                 output modules as target_modules and the FFN output as feedforward_modules",
                model.value.model_type
            ));
        }
        // Latent attention has no `v_proj` (nor a `q_proj` behind a query bottleneck), so peft's
        // usual q,v names find little or nothing there; the plan takes the roles.
        if let (Method::Lora(l) | Method::Qlora(l), Some(mla)) = (&method, model.value.mla)
            && l.targets == LoraTargets::QueryValue
        {
            let missing = if mla.q_rank.is_some() {
                " and no `q_proj`"
            } else {
                ""
            };
            notes.push(format!(
                "`{}`'s latent attention has no `v_proj`{missing}: LoRA q,v is planned on the \
                 query projections ({}) and `kv_b_proj`, so pass those as target_modules",
                model.value.name,
                mla.query_modules(),
            ));
        }
        if method == Method::LnTuning && !model.value.peft_ln_tuning_defaults() {
            notes.push(format!(
                "peft has no LN-tuning defaults for model type `{}` and raises until \
                 target_modules are given: planned with every norm trained",
                model.value.model_type
            ));
        }
        // Layers bitsandbytes leaves alone (`Family::bnb_swaps`) are planned as they load.
        if matches!(method, Method::Qlora(_)) {
            if !family.bnb_swaps(Some(Proj::Q)) {
                notes.push(format!(
                    "`{}`'s linears are an `nn.Linear` subclass, which transformers' \
                     bitsandbytes integration does not swap (it swaps modules whose type is \
                     `nn.Linear`): under QLoRA nothing is quantized and \
                     `prepare_model_for_kbit_training` upcasts the whole base to fp32, as \
                     planned; --method lora keeps it bf16",
                    model.value.name
                ));
            } else if !family.bnb_swaps(Some(Proj::Down)) {
                notes.push(format!(
                    "`{}` keeps each FFN's `wo` out of quantization (`_keep_in_fp32_modules`): \
                     under QLoRA it stays unquantized and is upcast to fp32, as planned",
                    model.value.name
                ));
            }
        }
        if model.value.has_linear_attention() && self.linear_kernel == LinearKernelArg::Torch {
            notes.push(format!(
                "`{}`'s Gated DeltaNet layers are planned as transformers' PyTorch code, which a \
                 plain install runs; with flash-linear-attention and causal-conv1d installed \
                 pass --linear-kernel fla",
                model.value.name
            ));
        }
        if model.value.has_ssd() && self.linear_kernel == LinearKernelArg::Torch {
            notes.push(format!(
                "`{}`'s Mamba-2 layers are planned as transformers' PyTorch chunked scan (no \
                 mamba-ssm installed), whose backward holds two fp32 tensors of chunk x chunk x \
                 heads x state elements per chunk",
                model.value.name
            ));
        }
        if self.linear_kernel == LinearKernelArg::Fla
            && !model.value.has_linear_attention()
            && !model.value.has_short_conv()
            && !model.value.has_state_space_layers()
        {
            notes.push(format!(
                "--linear-kernel fla is ignored: `{}` has no linear-attention or short-convolution \
                 layers for its kernels",
                model.value.name
            ));
        }
        if model.value.has_mamba_layers() && self.linear_kernel == LinearKernelArg::Torch {
            notes.push(format!(
                "`{}`'s Mamba layers are planned as transformers' PyTorch selective scan (no \
                 mamba-ssm installed), a loop over positions that keeps 14 bytes per batch x \
                 channel x position x state element and launches kernels per position",
                model.value.name
            ));
        }
        let plan = Plan {
            method,
            precision,
            optimizer,
            batch: self.batch,
            seq: self.seq,
            target_seq: if model.value.is_encoder_decoder() {
                self.target_seq
            } else {
                0
            },
            grad_ckpt: self.grad_ckpt,
            attention: match self.attention {
                // transformers refuses SDPA for a model without an SDPA path
                // (`_supports_sdpa = False`) and runs its eager code by default.
                AttentionArg::Sdpa if !model.value.sdpa => {
                    notes.push(if model.value.attention_sinks {
                        format!(
                            "`{}` has attention sinks, which SDPA cannot take: planned with \
                             eager attention, as transformers runs it (--attention flash2 plans \
                             a sink-aware flash kernel)",
                            model.value.name
                        )
                    } else if model.value.flash_attention {
                        format!(
                            "`{}` has no SDPA path in transformers: planned with its eager \
                             attention, as transformers runs it (--attention flash2 plans its \
                             flash_attention_2 class)",
                            model.value.name
                        )
                    } else {
                        format!(
                            "`{}` has no SDPA path in transformers: planned with its eager \
                             attention, the only one transformers has for it",
                            model.value.name
                        )
                    });
                    AttentionKernel::Eager
                }
                AttentionArg::Sdpa => AttentionKernel::Sdpa,
                AttentionArg::Flash2 => AttentionKernel::Flash2,
                AttentionArg::Eager => AttentionKernel::Eager,
            },
            expert_load,
            linear_kernel: match self.linear_kernel {
                LinearKernelArg::Torch => LinearKernel::Torch,
                LinearKernelArg::Fla => LinearKernel::Fla,
            },
            parallel: self.layout.resolve(o, &gpu.value)?,
        };
        ftplan::estimate::check_plan(&model.value, &plan, &gpu.value).map_err(|e| relabel(e, o))?;
        // MambaMixer computes `dt_proj.weight @ time_step` without calling the wrapped module,
        // so LoRA's factors on `dt_proj` never get a gradient. DDP's reducer expects every
        // trainable parameter's gradient each step and raises on the second one unless it
        // is built with `find_unused_parameters=True` (which searches the graph each step).
        let names_dt_proj = matches!(&plan.method, Method::Lora(l)
            if matches!(&l.targets, LoraTargets::Named(v) if v.contains(&Proj::DtProj)));
        if names_dt_proj
            && model.value.has_mamba_layers()
            && plan.parallel.engine == Engine::Ddp
            && plan.parallel.dp() > 1
        {
            notes.push(format!(
                "`{}`'s Mamba layers never call `dt_proj`, so its LoRA factors get no gradient: \
                 DDP needs `find_unused_parameters=True` (Accelerate's \
                 `DistributedDataParallelKwargs`), or leave dt_proj out of --lora-targets",
                model.value.name
            ));
        }
        let rates = match &self.calibration {
            Some(path) => {
                let cal = ftplan::calibrate::Calibration::load(path)?;
                if cal.device_matches(&gpu.value) {
                    notes.push(format!(
                        "using calibration `{}` ({})",
                        path.display(),
                        cal.adapter.name
                    ));
                } else {
                    notes.push(format!(
                        "calibration `{}` was measured on `{}`, not `{}`: its rates are used as given",
                        path.display(),
                        cal.adapter.name,
                        gpu.value.display_name
                    ));
                }
                // wgpu's fp32 products run on CUDA cores without the vendor library's tuning:
                // on the H200 they reached 19.9 TFLOP/s where PyTorch's fp32 reached 50.7
                // (validation/calib-wgpu-h200.toml, calib-h200.json). Only a calibration with
                // PyTorch-measured rates (which carries bf16 ones) is the library's own rate.
                let fp32_gemms =
                    plan.precision == Precision::Fp32 && !matches!(plan.method, Method::Qlora(_));
                if fp32_gemms && cal.bf16_matmul.is_empty() && !cal.fp32_matmul.is_empty() {
                    let peak = cal.fp32_matmul.iter().map(|p| p.flops).fold(0.0, f64::max);
                    notes.push(format!(
                        "calibration `{}` timed fp32 products with its own WGSL kernels ({:.1} TFLOP/s at best); \
                         PyTorch's fp32 GEMMs run faster (50.7 against 19.9 TFLOP/s on the H200), so this fp32 \
                         plan's matmul time is an upper bound",
                        path.display(),
                        peak / 1e12
                    ));
                }
                cal.rates(&gpu.value)
            }
            None => Rates::from_datasheet(&gpu.value),
        };
        Ok(Resolved {
            origin: self.origin.clone(),
            name: self.name.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}-{}",
                    model.value.name,
                    plan.method.name(),
                    gpu.value.name
                )
            }),
            model: model.value,
            plan,
            hardware: gpu.value,
            rates,
            headroom: self.headroom_percent / 100.0,
            notes,
        })
    }
}

/// An unknown model or GPU named by a plan file: say which file and field named it.
fn in_file(e: Error, origin: &str, field: &str) -> Error {
    match e {
        Error::Unknown { kind, name, hint } if origin != "command line" => Error::Field {
            path: origin.to_string(),
            field: field.to_string(),
            problem: format!("names unknown {kind} `{name}`"),
            hint,
        },
        other => other,
    }
}

/// Plan validation errors name "plan"; say where the plan came from instead.
pub fn relabel(e: Error, origin: &str) -> Error {
    match e {
        Error::Field {
            field,
            problem,
            hint,
            ..
        } => {
            let relabelled = Error::Field {
                path: origin.to_string(),
                field,
                problem,
                hint,
            };
            as_origin_spells(relabelled, origin)
        }
        other => other,
    }
}

/// A field error as its origin spells it: the field, and the flags its problem and hint name
/// (`needs --pp 2 or more` in a plan file reads `needs `pp` 2 or more`).
fn as_origin_spells(e: Error, origin: &str) -> Error {
    e.map_field(|field| spelled_for(origin, field))
        .map_words(|text| flags_as_keys(origin, text))
}

/// The keys of a plan file (`[lora]`'s as `lora.KEY`): `PlanFile`'s and `LoraFile`'s fields,
/// which a test holds to serde's own list.
const PLAN_KEYS: &[&str] = &[
    "name",
    "model",
    "gpu",
    "gpus",
    "gpus_per_node",
    "engine",
    "offload",
    "tp",
    "sp",
    "pp",
    "micro_batches",
    "grad_accum",
    "method",
    "precision",
    "optimizer",
    "batch",
    "seq",
    "target_seq",
    "grad_ckpt",
    "attention",
    "headroom_percent",
    "lora",
    "virtual_tokens",
    "adapter_size",
    "train_layers",
    "train_embeddings",
    "train_side",
    "expert_load",
    "linear_kernel",
    "calibration",
    "deepspeed",
    "accelerate_config",
    "lora.rank",
    "lora.alpha",
    "lora.targets",
    "lora.dora",
];

/// `text` with each `--flag` that a plan file takes as a key written as that key, in
/// backquotes; other flags (`--format`) stay as they are.
fn flags_as_keys(origin: &str, text: &str) -> String {
    if origin == "command line" {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(after.len());
        let key = spelled_for(origin, &after[..len]);
        if len > 0 && PLAN_KEYS.contains(&key.as_str()) {
            out.push_str(&format!("`{key}`"));
        } else {
            out.push_str(&rest[at..at + 2 + len]);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// A plan field as its origin spells it: a flag on the command line (`micro-batches`,
/// `lora-rank`), a key in a plan file (`micro_batches`, `rank` under `[lora]` as `lora.rank`,
/// `headroom_percent`).
fn spelled_for(origin: &str, field: &str) -> String {
    if origin == "command line" {
        return field.to_string();
    }
    match field {
        "headroom" => "headroom_percent".into(),
        f => match f.strip_prefix("lora-") {
            Some(key) => format!("lora.{key}"),
            None => f.replace('-', "_"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde's own list of a struct's fields, from its refusal of an unknown one.
    fn serde_fields<T: serde::de::DeserializeOwned + std::fmt::Debug>(text: &str) -> Vec<String> {
        let e = toml::from_str::<T>(text).expect_err("an unknown field is refused");
        let message = e.message().to_string();
        let expected = message.split_once("expected one of").expect("a list").1;
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    }

    #[test]
    fn plan_keys_are_the_plan_file_s_fields() {
        let mut keys = serde_fields::<PlanFile>("unknown = 1");
        keys.extend(
            serde_fields::<LoraFile>("unknown = 1")
                .into_iter()
                .map(|k| format!("lora.{k}")),
        );
        assert_eq!(keys, PLAN_KEYS);
    }

    #[test]
    fn flags_a_plan_file_takes_read_as_its_keys() {
        let file = "plan.toml";
        assert_eq!(
            flags_as_keys(
                file,
                "needs --pp 2 or more (use --grad-accum without a pipeline)"
            ),
            "needs `pp` 2 or more (use `grad_accum` without a pipeline)"
        );
        assert_eq!(
            flags_as_keys(
                file,
                "--lora-targets in_proj; --headroom 10; --format json; --"
            ),
            "`lora.targets` in_proj; `headroom_percent` 10; --format json; --"
        );
        assert_eq!(flags_as_keys("command line", "--pp 2"), "--pp 2");
    }
}
