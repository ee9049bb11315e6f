//! `ftplan measure`: runs a plan for real with the libraries people fine-tune with (the harness in
//! `harness/measure.py`, embedded here), and sets the measurement beside the estimate.
//!
//! The harness builds the model from the plan's own config with random weights, applies the method
//! with peft, trains a few steps on random tokens and reports the peak of
//! `torch.cuda.max_memory_allocated` (on CPU: the bytes of live tensor storages as PyTorch's
//! dispatcher creates them), the step time and the parameter counts.

use crate::error::{Error, Result};
use crate::estimate::Estimate;
use crate::spec::model::ModelSpec;
use crate::spec::plan::{LoraTargets, Method, Plan, Precision};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::path::Path;

/// The harness, shipped in the binary.
pub const HARNESS: &str = include_str!("../harness/measure.py");

/// The packages a measurement needs, as one `pip install` line.
pub const PIP: &str = "pip install torch transformers peft";

/// Where the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cuda,
    Cpu,
}

/// What the harness measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Peak bytes over the run.
    pub peak: u64,
    pub peak_by_step: Vec<u64>,
    /// Median wall time of the steps after the first.
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub params_total: u64,
    pub params_trainable: u64,
    /// Each rank's peak, for a multi-GPU plan (`peak` is the largest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peak_by_rank: Vec<u64>,
}

/// A plan's data-parallel layout as the harness runs it under `torchrun`, or why it cannot:
/// one node's GPUs with DDP or FSDP2 (`fully_shard`); ZeRO needs DeepSpeed's launcher, and tensor
/// or pipeline parallelism, offload and several nodes need more than one `torchrun`.
pub fn layout(plan: &Plan) -> Result<Option<(u64, &'static str)>> {
    use crate::spec::parallel::{Engine, Offload};
    let par = &plan.parallel;
    if par.gpus <= 1 {
        return Ok(None);
    }
    const OTHER_LAYOUT: &str =
        "measure the plan with --engine ddp, fsdp or fsdp-grad-op on one node's GPUs";
    let refuse = |field: &str, what: &str, hint: &str| {
        Err(Error::field(
            Error::PLAN,
            field,
            format!(
                "asks for {what}, which `ftplan measure` does not run (it runs one torchrun on \
                 one node: DDP or FSDP2)"
            ),
        )
        .with_hint(hint))
    };
    if par.tp > 1 {
        return refuse("tp", "tensor parallelism", OTHER_LAYOUT);
    }
    if par.pp > 1 {
        return refuse("pp", "pipeline parallelism", OTHER_LAYOUT);
    }
    if par.offload != Offload::None {
        return refuse("offload", "offload", OTHER_LAYOUT);
    }
    if par.gpus > par.gpus_per_node {
        return refuse("gpus", "several nodes", OTHER_LAYOUT);
    }
    if par.grad_accum > 1 {
        return refuse("grad-accum", "gradient accumulation", OTHER_LAYOUT);
    }
    let engine = match par.engine {
        Engine::Ddp | Engine::Fsdp | Engine::FsdpGradOp => par.engine.name(),
        Engine::Zero1 | Engine::Zero2 | Engine::Zero3 => {
            return refuse(
                "engine",
                "DeepSpeed ZeRO",
                "`ftplan export --deepspeed FILE` writes the DeepSpeed config to launch with \
                 `deepspeed`; `measure` runs --engine ddp, fsdp or fsdp-grad-op",
            );
        }
        Engine::FsdpHybrid => return refuse("engine", "hybrid sharding", OTHER_LAYOUT),
    };
    Ok(Some((par.gpus, engine)))
}

/// A run's outcome: measured, or out of memory (the plan does not fit).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Measured {
        measured: Measured,
        environment: Value,
    },
    OutOfMemory(String),
}

/// (estimate - measured) / measured for each figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Errors {
    pub peak: f64,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub params_trainable: f64,
}

/// `ftplan measure`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub estimate: Estimate,
    pub measured: Measured,
    pub errors: Errors,
    pub environment: Value,
}

impl Comparison {
    pub fn new(estimate: Estimate, measured: Measured, environment: Value) -> Comparison {
        let rel = |e: f64, m: f64| if m > 0.0 { (e - m) / m } else { 0.0 };
        let errors = Errors {
            peak: rel(estimate.memory.peak.0 as f64, measured.peak as f64),
            step_seconds: rel(estimate.time.step_seconds, measured.step_seconds),
            tokens_per_second: rel(estimate.time.tokens_per_second, measured.tokens_per_second),
            params_trainable: rel(
                estimate.memory.trainable_params as f64,
                measured.params_trainable as f64,
            ),
        };
        Comparison {
            estimate,
            measured,
            errors,
            environment,
        }
    }
}

/// Shrinks a config to the same structure at toy size (`--tiny`): 2 layers per stack, width 64,
/// 4 heads of 16, FFN 128, vocabulary 512, at most 4 experts (2 active), small latent ranks and
/// windows, so that a run takes seconds anywhere.
pub fn tiny_config(config: &Value) -> Value {
    let mut c = config.as_object().cloned().unwrap_or_default();
    // GPT-J's `rotary_dim` keeps its share of the (now 16-wide) head.
    let head = |c: &Map<String, Value>| {
        let hidden = ["n_embd", "hidden_size"]
            .iter()
            .find_map(|k| c.get(*k).and_then(Value::as_u64))?;
        let heads = ["n_head", "num_attention_heads"]
            .iter()
            .find_map(|k| c.get(*k).and_then(Value::as_u64))?;
        Some(hidden / heads.max(1))
    };
    if let (Some(rot), Some(h)) = (c.get("rotary_dim").and_then(Value::as_u64), head(&c)) {
        let tiny = (rot * 16 / h.max(1)).max(2) & !1;
        c.insert("rotary_dim".into(), json!(tiny));
    }
    let set = |c: &mut Map<String, Value>, keys: &[&str], v: u64| {
        for k in keys {
            if c.get(*k).is_some_and(|x| !x.is_null()) {
                c.insert((*k).to_string(), json!(v));
            }
        }
    };
    let cap = |c: &mut Map<String, Value>, k: &str, most: u64| {
        if let Some(v) = c.get(k).and_then(Value::as_u64) {
            c.insert(k.to_string(), json!(v.min(most)));
        }
    };
    set(
        &mut c,
        &[
            "num_hidden_layers",
            "n_layer",
            "num_layers",
            "num_decoder_layers",
            "encoder_layers",
            "decoder_layers",
        ],
        2,
    );
    // OPT's `word_embed_proj_dim` equals its hidden size (ftplan refuses a projection).
    set(
        &mut c,
        &[
            "hidden_size",
            "n_embd",
            "d_model",
            "n_embed",
            "word_embed_proj_dim",
        ],
        64,
    );
    set(
        &mut c,
        &[
            "num_attention_heads",
            "n_head",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ],
        4,
    );
    set(
        &mut c,
        &[
            "intermediate_size",
            "ffn_dim",
            "d_ff",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "n_inner",
            "ffn_hidden_size",
        ],
        128,
    );
    set(&mut c, &["head_dim", "d_kv", "v_head_dim"], 16);
    set(&mut c, &["vocab_size", "decoder_vocab_size"], 512);
    set(
        &mut c,
        &["moe_intermediate_size", "shared_expert_intermediate_size"],
        32,
    );
    set(&mut c, &["kv_lora_rank", "q_lora_rank"], 16);
    set(&mut c, &["qk_rope_head_dim", "qk_nope_head_dim"], 8);
    set(&mut c, &["sliding_window"], 32);
    set(&mut c, &["time_step_rank"], 4);
    for (k, most) in [
        ("num_key_value_heads", 2),
        ("num_kv_heads", 2),
        ("num_local_experts", 4),
        ("num_experts", 4),
        ("n_routed_experts", 4),
        ("num_experts_per_tok", 2),
        // Gemma 4's and ERNIE 4.5's names for the experts and the top-k.
        ("top_k_experts", 2),
        ("moe_num_experts", 4),
        ("moe_k", 2),
        ("first_k_dense_replace", 1),
        ("n_shared_experts", 1),
        // DeepSeek-V3's grouped routing: one group of the few experts left.
        ("n_group", 1),
        ("topk_group", 1),
    ] {
        cap(&mut c, k, most);
    }
    // Special tokens past the small vocabulary (Phi-3's pad 32000) point at its first row.
    for k in [
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
    ] {
        if c.get(k).and_then(Value::as_u64).is_some_and(|t| t >= 512) {
            c.insert(k.to_string(), json!(0));
        }
    }
    // GPT-Neo's `attention_types` ([[pattern, repeats]]) must spell out exactly two layers;
    // `attention_layers` (the expanded list some saved configs carry) likewise.
    if let Some(Value::Array(groups)) = c.get("attention_types").cloned() {
        let layers: Vec<Value> = groups
            .iter()
            .filter_map(|g| {
                let pattern = g.get(0)?.as_array()?.clone();
                let times = g.get(1)?.as_u64()?;
                Some((0..times).flat_map(move |_| pattern.clone()))
            })
            .flatten()
            .take(2)
            .collect();
        c.insert(
            "attention_types".into(),
            json!(layers.iter().map(|l| json!([[l], 1])).collect::<Vec<_>>()),
        );
        if c.contains_key("attention_layers") {
            c.insert("attention_layers".into(), Value::Array(layers));
        }
    }
    // A per-layer pattern keeps one layer of each kind, in the order they first come (Gemma's
    // sliding and full attention, Qwen3.5's linear and full, LFM2's convolution and attention):
    // the first two alone can hold one kind only, and a hybrid without its attention layer
    // fails in transformers' cache.
    if let Some(Value::Array(types)) = c.get("layer_types").cloned() {
        let kinds = first_of_each(types.iter().cloned());
        let tiny: Vec<Value> = if kinds.len() >= 2 {
            kinds
        } else {
            types.into_iter().take(2).collect()
        };
        set(&mut c, &["num_hidden_layers"], tiny.len() as u64);
        // Gemma 4's shared-KV layers read an earlier layer of their own kind: with one layer
        // of each kind there is none, so none shares.
        let same = tiny.windows(2).any(|w| w[0] == w[1]);
        cap(&mut c, "num_kv_shared_layers", u64::from(same));
        c.insert("layer_types".into(), Value::Array(tiny));
    } else {
        cap(&mut c, "num_kv_shared_layers", 1);
    }
    // Nemotron-H spells its pattern as one character per layer (`M` Mamba-2, `*` attention,
    // `-` MLP, `E` experts), or as `layers_block_type`: one layer of each kind too, at the
    // small Mamba-2 widths (its heads are not among the attention heads above).
    if let Some(pattern) = c.get("hybrid_override_pattern").and_then(Value::as_str) {
        let kinds: String = first_of_each(pattern.chars()).into_iter().collect();
        set(&mut c, &["num_hidden_layers"], kinds.chars().count() as u64);
        c.insert("hybrid_override_pattern".into(), json!(kinds));
    }
    if let Some(Value::Array(types)) = c.get("layers_block_type").cloned() {
        let kinds = first_of_each(types);
        set(&mut c, &["num_hidden_layers"], kinds.len() as u64);
        c.insert("layers_block_type".into(), Value::Array(kinds));
    }
    set(&mut c, &["mamba_head_dim"], 16);
    cap(&mut c, "mamba_num_heads", 8);
    cap(&mut c, "ssm_state_size", 16);
    // Interleaves given by period and offset put each kind in the two layers: Jamba's
    // attention and experts in the second, Qwen3.5's full attention every second layer, LFM2's
    // attention at index 1.
    for (period, offset) in [
        ("attn_layer_period", "attn_layer_offset"),
        ("expert_layer_period", "expert_layer_offset"),
    ] {
        if c.contains_key(period) {
            c.insert(period.into(), json!(2));
            c.insert(offset.into(), json!(1));
        }
    }
    if c.contains_key("full_attention_interval") {
        c.insert("full_attention_interval".into(), json!(2));
    }
    if c.contains_key("full_attn_idxs") {
        c.insert("full_attn_idxs".into(), json!([1]));
    }
    // ERNIE 4.5's sparse layers run to the last one.
    if c.contains_key("moe_layer_end_index") {
        c.insert("moe_layer_end_index".into(), json!(-1));
        cap(&mut c, "moe_layer_start_index", 1);
    }
    // Mamba-2's heads tile its inner width (expand x hidden) at the small head width.
    if c.get("model_type").and_then(Value::as_str) == Some("mamba2")
        && let (Some(expand), Some(hd)) = (
            c.get("expand").and_then(Value::as_u64),
            c.get("head_dim").and_then(Value::as_u64),
        )
    {
        c.insert("num_heads".into(), json!(expand * 64 / hd.max(1)));
    }
    // An encoder-decoder whose config leaves its special tokens to the class defaults (Marian's
    // pad and decoder start are row 58100) gets them at row 0 of the small vocabulary.
    if c.get("is_encoder_decoder").and_then(Value::as_bool) == Some(true)
        || matches!(
            c.get("model_type").and_then(Value::as_str),
            Some("marian" | "bart" | "mbart" | "pegasus" | "t5" | "mt5")
        )
    {
        for k in ["pad_token_id", "decoder_start_token_id"] {
            c.entry(k.to_string()).or_insert(json!(0));
        }
    }
    // A multimodal checkpoint nests its language model and vision tower: each shrinks the same
    // way (the tower is loaded, never run, by text-only training).
    for key in ["text_config", "vision_config"] {
        if let Some(nested) = c.get(key).filter(|v| v.is_object()).cloned() {
            c.insert(key.into(), tiny_config(&nested));
        }
    }
    Value::Object(c)
}

/// One of each item, in the order each first comes (a per-layer pattern's kinds).
fn first_of_each<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut kinds: Vec<T> = Vec::new();
    for item in items {
        if !kinds.contains(&item) {
            kinds.push(item);
        }
    }
    kinds
}

/// The plan in the harness's (and `validation/*.jsonl`'s) run vocabulary.
pub fn run_record(model: &ModelSpec, plan: &Plan) -> Value {
    let method = match (&plan.method, plan.precision) {
        (Method::Full, Precision::Bf16) => "full_bf16",
        (Method::Full, _) => "full",
        (Method::LnTuning, _) => "ln_tuning",
        (m, _) => m.name(),
    };
    let seq = if model.is_encoder_decoder() {
        json!([plan.seq, plan.target_seq])
    } else {
        json!(plan.seq)
    };
    let mut run = json!({
        "model": model.name,
        "method": method,
        "batch": plan.batch,
        "seq": seq,
        "grad_ckpt": plan.grad_ckpt,
        "attn": plan.attention.record_name(),
        "optimizer": plan.optimizer.record_name(),
    });
    let r = run.as_object_mut().expect("an object");
    // A frozen base kept in fp32 under autocast (QLoRA under mixed-fp16 computes in fp16 over
    // its NF4 base, whatever dtype the base loaded in).
    let fp16_qlora =
        matches!(plan.method, Method::Qlora(_)) && plan.precision == Precision::MixedFp16;
    if plan.method.frozen_base()
        && !fp16_qlora
        && matches!(plan.precision, Precision::MixedBf16 | Precision::MixedFp16)
    {
        r.insert("base_fp32".into(), json!(true));
    }
    if let Some(name) = plan.precision.record_name() {
        r.insert("precision".into(), json!(name));
    }
    match &plan.method {
        Method::Lora(l) | Method::Qlora(l) => {
            r.insert("lora_r".into(), json!(l.rank));
            r.insert("lora_alpha".into(), json!(l.alpha));
            r.insert(
                "lora_targets".into(),
                match &l.targets {
                    LoraTargets::QueryValue => json!("qv"),
                    LoraTargets::AllLinear => json!("all"),
                    LoraTargets::Named(p) => {
                        json!(p.iter().map(|p| p.module()).collect::<Vec<_>>())
                    }
                },
            );
            if l.dora {
                r.insert("lora_dora".into(), json!(true));
            }
        }
        Method::Prefix { virtual_tokens } | Method::Prompt { virtual_tokens } => {
            r.insert("n_virtual".into(), json!(virtual_tokens));
        }
        Method::Adapter { size } => {
            r.insert("adapter_dim".into(), json!(size));
        }
        Method::Freeze {
            top_layers,
            embeddings,
            side,
        } => {
            // The harness resolves the default as ftplan does: the top block, or the whole
            // side when one is named.
            if let Some(top) = top_layers {
                r.insert("train_layers".into(), json!(top));
            }
            if *embeddings {
                r.insert("train_embeddings".into(), json!(true));
            }
            if let Some(side) = side {
                let name = crate::spec::name_in(&crate::spec::plan::Side::NAMES, *side);
                r.insert("train_side".into(), json!(name));
            }
        }
        Method::Full | Method::Ia3 | Method::BitFit | Method::LnTuning => {}
    }
    run
}

/// Times this machine's host costs with the harness (`--calibrate-host`): one op's dispatch, one
/// module call and gradient checkpointing's per-block and per-saved-tensor hooks, the constants
/// the time model otherwise takes from the GPU profile.
pub fn host_costs(
    python: &Path,
    device: Device,
) -> Result<(crate::calibrate::file::HostCosts, Value)> {
    let reply = match invoke(
        python,
        &json!({"calibrate_host": true, "device": device_name(device)}),
    ) {
        Ok(v) => v,
        Err(Failed(e)) => return Err(e),
        Err(Oom(m)) => {
            return Err(Error::Plan {
                message: m,
                hint: None,
            });
        }
    };
    let h = &reply["host"];
    match (h["dispatch_us"].as_f64(), h["module_us"].as_f64()) {
        (Some(d), Some(m)) => Ok((
            crate::calibrate::file::HostCosts {
                dispatch_us: d,
                module_us: m,
                checkpoint_block_us: h["checkpoint_block_us"].as_f64(),
                checkpoint_tensor_us: h["checkpoint_tensor_us"].as_f64(),
            },
            reply["environment"].clone(),
        )),
        _ => Err(Error::Plan {
            message: format!("the harness's host timing is not understood: {reply}"),
            hint: None,
        }),
    }
}

fn device_name(device: Device) -> &'static str {
    match device {
        Device::Cuda => "cuda",
        Device::Cpu => "cpu",
    }
}

/// Runs the harness with `python` and returns what it measured.
pub fn run_harness(
    python: &Path,
    config: &Value,
    run: &Value,
    device: Device,
    steps: u32,
    layout: Option<(u64, &str)>,
) -> Result<Outcome> {
    let (world, engine) = layout.unwrap_or((1, "ddp"));
    let spec = json!({
        "config": config,
        "run": run,
        "device": device_name(device),
        "steps": steps,
        "world_size": world,
        "engine": engine,
    });
    match invoke(python, &spec) {
        Ok(v) => {
            let measured: Measured =
                serde_json::from_value(v["measured"].clone()).map_err(|e| Error::Plan {
                    message: format!("the harness's reply is not understood: {e}"),
                    hint: None,
                })?;
            Ok(Outcome::Measured {
                measured,
                environment: v["environment"].clone(),
            })
        }
        Err(Oom(message)) => Ok(Outcome::OutOfMemory(message)),
        Err(Failed(e)) => Err(e),
    }
}

/// Why a harness call gave no reply.
enum Failure {
    Oom(String),
    Failed(Error),
}
use Failure::{Failed, Oom};

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failed(e)
    }
}

/// Writes the harness to a temporary folder, runs it with `spec` on stdin, returns its reply.
fn invoke(python: &Path, spec: &Value) -> std::result::Result<Value, Failure> {
    let dir = tempfile::tempdir().map_err(|e| Error::Write {
        path: std::env::temp_dir(),
        message: e.to_string(),
    })?;
    let script = dir.path().join("measure.py");
    std::fs::write(&script, HARNESS).map_err(|e| Error::Write {
        path: script.clone(),
        message: e.to_string(),
    })?;
    let world = spec["world_size"].as_u64().unwrap_or(1);
    let mut command = std::process::Command::new(python);
    if world > 1 {
        // torchrun starts one process per rank; they read the plan from a file.
        let path = dir.path().join("spec.json");
        std::fs::write(&path, spec.to_string()).map_err(|e| Error::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        command
            .args(["-m", "torch.distributed.run", "--standalone"])
            .arg(format!("--nproc_per_node={world}"))
            .arg(&script)
            .arg("--spec")
            .arg(&path);
    } else {
        command.arg(&script);
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Plan {
            message: format!("cannot run `{}`: {e}", python.display()),
            hint: Some(format!(
                "install Python 3 with `{PIP}`, or pass --python PATH"
            )),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        // A harness that exits early closes its stdin; its exit status says why.
        let _ = stdin.write_all(spec.to_string().as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Plan {
        message: format!("`{}` did not finish: {e}", python.display()),
        hint: None,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| l.starts_with('{'));
    let reply: Option<Value> = last.and_then(|l| serde_json::from_str(l).ok());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    // Under torchrun a rank's own exit status becomes torchrun's 1; its reply still says why.
    // `python -m torch.distributed.run` without torch fails before the harness can say so.
    let reply = reply.or_else(|| {
        (stderr.contains("No module named torch") || stderr.contains("No module named 'torch'"))
            .then(|| json!({"missing": "torch"}))
    });
    let code = match &reply {
        Some(v) if v.get("missing").is_some() => Some(3),
        Some(v) if v.get("unavailable").is_some() => Some(4),
        Some(v) if v.get("oom").is_some() => Some(5),
        _ => out.status.code(),
    };
    match (code, reply) {
        (Some(0), Some(v)) => Ok(v),
        (Some(3), Some(v)) => Err(Failed(Error::Plan {
            message: format!(
                "`{}` has no Python package `{}`",
                python.display(),
                v["missing"].as_str().unwrap_or("?")
            ),
            hint: Some(format!(
                "{PIP} (bitsandbytes too for QLoRA and 8-bit AdamW)"
            )),
        })),
        (Some(4), Some(v)) => Err(Failed(Error::Plan {
            message: v["unavailable"]
                .as_str()
                .unwrap_or("the device is unavailable")
                .to_string(),
            hint: Some("run on a machine with an NVIDIA GPU, or pass --device cpu".into()),
        })),
        (Some(5), Some(v)) => Err(Oom(v["message"]
            .as_str()
            .unwrap_or("out of memory")
            .to_string())),
        (code, _) => Err(Failed(Error::Plan {
            message: format!(
                "the harness failed (exit {}): {tail}",
                code.map_or("by signal".to_string(), |c| c.to_string())
            ),
            hint: Some(
                "the plan may use a method or option this transformers/peft cannot run".into(),
            ),
        })),
    }
}

/// A measured run as a line of `validation/*.jsonl` (what `ftplan validate --file` reads).
pub fn record(
    config: &Value,
    run: &Value,
    device: Device,
    m: &Measured,
    environment: &Value,
) -> Value {
    let name = format!(
        "{}|{}|b{}|s{}|gc{}|{}",
        run["model"].as_str().unwrap_or("model"),
        run["method"].as_str().unwrap_or("?"),
        run["batch"],
        run["seq"],
        u8::from(run["grad_ckpt"].as_bool().unwrap_or(false)),
        run["attn"].as_str().unwrap_or("sdpa"),
    );
    let mut r = json!({
        "name": name,
        "run": run,
        "config": config,
        "params_trainable": m.params_trainable,
        "params_total": m.params_total,
        "step_time_s": m.step_seconds,
        "tokens_per_s": m.tokens_per_second,
        "peak_by_step": m.peak_by_step,
        "measure": "ftplan measure (harness/measure.py)",
        "device": device_name(device),
        "environment": environment,
    });
    let key = match device {
        Device::Cuda => "peak_run",
        Device::Cpu => "peak_bytes",
    };
    r.as_object_mut()
        .expect("an object")
        .insert(key.into(), json!(m.peak));
    r
}
