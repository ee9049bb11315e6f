//! One estimate: build the graph for a model and plan, then run the memory (and time) models.

use crate::error::{Error, Result};
use crate::graph;
use crate::graph::arch::Stage;
use crate::memory::{self, MemoryEstimate};
use crate::spec::hardware::Hardware;
use crate::spec::model::ModelSpec;
use crate::spec::plan::{Method, Plan, Side};
use crate::time::{self, Rates, TimeEstimate};
use serde::Serialize;

/// Largest batch x sequence accepted: beyond it byte counts overflow and no GPU is that large.
const MAX_TOKENS: u64 = 1 << 34;
/// Largest sequence, adapter width or number of virtual tokens (attention scores grow with the
/// square of the sequence).
const MAX_WIDTH: u64 = 1 << 20;
/// Past this a figure is beyond any device (and near where saturating arithmetic would clamp).
const MAX_BYTES: u64 = 1 << 60;
/// Past this the whole job's memory (every GPU's, or every node's host memory) is refused too,
/// so its sum is a u64.
const MAX_JOB_BYTES: u128 = 1 << 63;

/// Everything computed for one model, plan and GPU.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub model: ModelSpec,
    pub plan: Plan,
    pub hardware: Hardware,
    pub memory: MemoryEstimate,
    pub time: TimeEstimate,
    /// Device memory the plan may use: the device's, less any headroom the user keeps free.
    pub budget: crate::units::Bytes,
    pub fits: bool,
}

impl Estimate {
    /// The whole job's memory: device memory over its GPUs (each GPU's required; with pipeline
    /// stages every stage counted as the largest, so at most that) and host memory over its
    /// nodes, bytes. The estimate refuses a job whose sums would pass 8 EiB.
    pub fn job_memory(&self) -> (crate::units::Bytes, crate::units::Bytes) {
        let par = &self.plan.parallel;
        // Never saturates for an estimate `estimate` made (it refuses those past 8 EiB).
        (
            crate::units::Bytes(self.memory.required.0.saturating_mul(par.gpus)),
            crate::units::Bytes(self.memory.host.0.saturating_mul(par.nodes())),
        )
    }
}

/// What LoRA can target in a model with Mamba or Mamba-2 mixers (peft refuses their `out_proj`
/// and `conv1d` for these model types), for the hint when a plan names nothing else.
fn mamba_targets(family: crate::spec::model::Family) -> Option<&'static str> {
    match family {
        // `dt_proj` is accepted, but its factors never train (the mixer reads its weight).
        crate::spec::model::Family::Mamba | crate::spec::model::Family::FalconMamba => {
            Some("name the mixer's input projections: --lora-targets in_proj,x_proj")
        }
        crate::spec::model::Family::Mamba2 => {
            Some("name the mixer's input projection: --lora-targets in_proj")
        }
        crate::spec::model::Family::NemotronH => Some(
            "name the linears but the Mamba `out_proj`: --lora-targets \
             q_proj,k_proj,v_proj,o_proj,in_proj,up_proj,down_proj",
        ),
        crate::spec::model::Family::FalconH1 => Some(
            "name the linears but the Mamba `out_proj`: --lora-targets \
             q_proj,k_proj,v_proj,o_proj,in_proj,gate_proj,up_proj,down_proj",
        ),
        _ => None,
    }
}

/// What is modelled for a multimodal checkpoint: text-only training of its language model, the
/// tower loaded beside it and never run, under full fine-tuning, LoRA (which peft also puts on
/// the tower's matching linears), adapters and freezing.
fn check_vision(
    model: &ModelSpec,
    tower: &crate::spec::model::VisionTower,
    plan: &Plan,
) -> Result<()> {
    let field = |f: &str, problem: String| Error::field(Error::PLAN, f, problem);
    let alone = "or plan its `text_config` as a config.json of its own (the tower's weights are \
                 then left out)";
    let modelled = matches!(
        plan.method,
        Method::Full | Method::Lora(_) | Method::Adapter { .. } | Method::Freeze { .. }
    );
    if !modelled {
        return Err(field(
            "method",
            format!(
                "`{}` is not modelled for `{}`, a multimodal checkpoint (its {} vision tower)",
                plan.method.name(),
                model.name,
                tower.model_type
            ),
        )
        .with_hint(format!("use full, lora, adapter or freeze, {alone}")));
    }
    if let Method::Lora(l) = &plan.method
        && l.targets == crate::spec::plan::LoraTargets::QueryValue
    {
        // peft 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING has `gemma3_text` but
        // not `gemma3`: get_peft_model raises "Please specify `target_modules`".
        return Err(field(
            "lora-targets",
            format!(
                "must name the modules: peft has no default LoRA targets for `{}`, a multimodal \
                 checkpoint (it asks for `target_modules`)",
                model.name
            ),
        )
        .with_hint(
            "name them, e.g. --lora-targets q,v (peft's names reach the vision tower's q_proj \
             and v_proj as well)",
        ));
    }
    if plan.parallel.tp > 1 || plan.parallel.pp > 1 {
        return Err(field(
            if plan.parallel.tp > 1 { "tp" } else { "pp" },
            format!(
                "tensor and pipeline parallelism are not modelled for `{}`'s vision tower",
                model.name
            ),
        )
        .with_hint(format!(
            "use data parallelism (--engine fsdp or zero3), {alone}"
        )));
    }
    Ok(())
}

/// Rejects plans that cannot be simulated (or run) on this model and GPU, naming the
/// offending setting.
pub fn check_plan(model: &ModelSpec, plan: &Plan, hardware: &Hardware) -> Result<()> {
    let field = |f: &str, problem: String| Error::field(Error::PLAN, f, problem);
    if plan.batch == 0 {
        return Err(field("batch", "must be at least 1".into()));
    }
    if plan.seq == 0 {
        return Err(field("seq", "must be at least 1".into()));
    }
    // A model whose transformers class declares no flash_attention_2 (`_supports_flash_attn`
    // false: T5's relative bias, BLOOM's and MPT's ALiBi, CodeGen): from_pretrained refuses it.
    if plan.attention == crate::spec::plan::AttentionKernel::Flash2 && !model.flash_attention {
        return Err(field(
            "attention",
            format!(
                "`{}` ({}) has no flash_attention_2 in transformers",
                model.name, model.model_type
            ),
        )
        .with_hint(if model.sdpa {
            "use --attention sdpa or eager"
        } else {
            "use --attention eager (it has no SDPA path either: sdpa plans the same eager code)"
        }));
    }
    if plan.attention == crate::spec::plan::AttentionKernel::Flash2 {
        // flash-attn's `mha_fwd` checks the device first ("FlashAttention only supports Ampere
        // GPUs or newer": sm80 and up, or its ROCm build on MI200/MI300), the GPUs with bf16
        // tensor cores; V100 (sm70) and T4 (sm75) have neither.
        if !hardware.has_bf16_tensor_cores() {
            return Err(field(
                "attention",
                format!(
                    "flash_attention_2 runs on Ampere-class GPUs and newer; `{}` is older \
                     (flash-attn refuses it)",
                    hardware.name
                ),
            )
            .with_hint("use --attention sdpa (its memory-efficient kernel runs there) or eager"));
        }
        // Then the dtype ("FlashAttention only support fp16 and bf16 data type"): transformers'
        // `get_target_dtype` casts fp32 queries to autocast's dtype, or else to the weights'
        // dtype, which an fp32 model without autocast keeps fp32.
        if plan.precision == crate::spec::plan::Precision::Fp32 && !plan.autocast() {
            return Err(field(
                "attention",
                "flash_attention_2 needs fp16 or bf16 inputs; an fp32 model without autocast \
                 hands it fp32 (flash-attn refuses it)"
                    .into(),
            )
            .with_hint("use --attention sdpa, or a bf16 or mixed precision"));
        }
    }
    // flash-linear-attention's chunked rule asserts 16-bit inputs ("ChunkGatedDeltaRuleFunction
    // does not support float32"): an fp32 model without autocast cannot use it.
    if plan.linear_kernel == crate::spec::plan::LinearKernel::Fla
        && model.has_linear_attention()
        && plan.precision == crate::spec::plan::Precision::Fp32
        && !plan.autocast()
    {
        return Err(field(
            "linear-kernel",
            "fla needs 16-bit inputs; flash-linear-attention refuses float32".into(),
        )
        .with_hint("use --linear-kernel torch, or a bf16 or mixed precision"));
    }
    // mamba-ssm's kernels (Mamba-2's `mamba_split_conv1d_scan_combined`, Mamba's
    // `mamba_inner_fn`) are each one autograd Function whose saves ftplan has not read; the
    // PyTorch path is what it plans.
    if plan.linear_kernel == crate::spec::plan::LinearKernel::Fla && model.has_state_space_layers()
    {
        return Err(field(
            "linear-kernel",
            format!(
                "fla is not modelled for `{}`'s Mamba layers (mamba-ssm's fused kernels)",
                model.name
            ),
        )
        .with_hint("use --linear-kernel torch: transformers' PyTorch path, without mamba-ssm"));
    }
    if let Some(tower) = model.vision {
        check_vision(model, &tower, plan)?;
    }
    let heads = model.decoder.heads;
    let layers = model.decoder.layers + model.encoder.map_or(0, |e| e.layers);
    // Gemma 4's global layers have fewer KV heads than its local ones: tp divides both.
    let kv_heads = model.global_attention.map_or(model.decoder.kv_heads, |g| {
        g.kv_heads.min(model.decoder.kv_heads)
    });
    // A Mamba model has no attention heads for Megatron's split, and its mixers' tensor
    // parallelism is not modelled on their own.
    if plan.parallel.tp > 1 && !model.has_attention() {
        return Err(field(
            "tp",
            format!(
                "tensor parallelism is not modelled for `{}`, which has no attention layers",
                model.name
            ),
        )
        .with_hint(
            "split it by data parallelism (--engine fsdp or zero3) or pipeline stages (--pp)",
        ));
    }
    // Megatron splits Mamba-2 mixers by heads (modelled); no training framework ftplan knows
    // splits Mamba-1 mixers (Jamba's), which would stay whole on every rank.
    if plan.parallel.tp > 1 && model.has_mamba_layers() {
        return Err(field(
            "tp",
            format!(
                "tensor parallelism is not modelled for `{}`'s Mamba layers",
                model.name
            ),
        )
        .with_hint(
            "split it by data parallelism (--engine fsdp or zero3) or pipeline stages (--pp)",
        ));
    }
    crate::spec::parallel::check(&plan.parallel, layers, heads, kv_heads)
        .map_err(|(f, problem)| field(&f, problem))?;
    if plan.parallel.pp > 1 && model.is_encoder_decoder() {
        return Err(field(
            "pp",
            "pipeline stages of encoder-decoder models are not modelled".into(),
        ));
    }
    if plan.seq > MAX_WIDTH || plan.target_seq > MAX_WIDTH {
        return Err(field(
            "seq",
            format!(
                "must be at most {MAX_WIDTH} tokens, found {}",
                plan.seq.max(plan.target_seq)
            ),
        ));
    }
    let tokens = plan.batch.saturating_mul(plan.seq.max(plan.target_seq));
    if tokens > MAX_TOKENS {
        return Err(field(
            "batch",
            format!("x seq = {tokens} tokens per step is absurdly large"),
        ));
    }
    match &plan.method {
        Method::Lora(l) | Method::Qlora(l) => {
            if l.rank == 0 {
                return Err(field("lora-rank", "must be at least 1".into()));
            }
            if l.rank > model.hidden_size {
                return Err(field(
                    "lora-rank",
                    format!(
                        "({}) exceeds the hidden size ({})",
                        l.rank, model.hidden_size
                    ),
                ));
            }
            // peft refuses LoRA on a Mamba mixer's `out_proj` (and `conv1d`), which
            // `all-linear` includes (`_check_lora_target_modules_mamba`).
            let names_out = match &l.targets {
                crate::spec::plan::LoraTargets::AllLinear => true,
                // `o_proj` names the mixer's `out_proj` where no layer attends.
                crate::spec::plan::LoraTargets::Named(list) => {
                    (list.contains(&crate::spec::plan::Proj::O) && !model.has_attention())
                        || list.contains(&crate::spec::plan::Proj::OutProj)
                }
                crate::spec::plan::LoraTargets::QueryValue => false,
            };
            if let Some(hint) = mamba_targets(model.family).filter(|_| names_out) {
                return Err(field(
                    "lora-targets",
                    format!(
                        "peft refuses LoRA on `{}`'s mixer `out_proj` (`all-linear` includes it)",
                        model.name
                    ),
                )
                .with_hint(hint));
            }
            // PhiMoE's and Llama 4's routers are `nn.Linear` subclasses whose forward returns a
            // tuple: peft's `all-linear` wraps them, and the LoRA layer fails adding its delta
            // to that tuple (peft 0.21.2, transformers 5.17). Their experts are 3-D parameters
            // peft does not convert, so the named linears are all LoRA can reach.
            if model.family.router_returns_tuple()
                && l.targets == crate::spec::plan::LoraTargets::AllLinear
            {
                return Err(field(
                    "lora-targets",
                    format!(
                        "peft's `all-linear` wraps `{}`'s router (an nn.Linear returning a tuple), and LoRA fails on it",
                        model.name
                    ),
                )
                .with_hint("name the linears: --lora-targets q_proj,k_proj,v_proj,o_proj (and gate_proj,up_proj,down_proj where the model has dense or shared MLPs)"));
            }
            // peft converts the gate and up names onto the experts' one fused `gate_up_proj`
            // and raises when a target list names one without the other ("Cannot convert PEFT
            // target(s) gate_proj without also targeting up_proj", peft 0.21's
            // `_convert_peft_config_moe`).
            if let crate::spec::plan::LoraTargets::Named(list) = &l.targets
                && model.moe.is_some()
                && model.family.peft_converts_experts()
                && list.contains(&crate::spec::plan::Proj::Gate)
                    != list.contains(&crate::spec::plan::Proj::Up)
            {
                let (gate, up) = if model.family == crate::spec::model::Family::Mixtral {
                    ("w1", "w3")
                } else {
                    ("gate_proj", "up_proj")
                };
                return Err(field(
                    "lora-targets",
                    format!(
                        "peft fuses `{gate}` and `{up}` into `{}`'s experts' `gate_up_proj` and raises when only one is named",
                        model.name
                    ),
                )
                .with_hint(format!(
                    "name both {gate} and {up}, or neither (ftplan's short name `gate` is the {gate} role; peft's `gate` is the router, which ftplan plans under `all` only)"
                )));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0 && l.alpha <= 1e6) {
                return Err(field(
                    "lora-alpha",
                    format!("must be a positive number up to 1e6, found {}", l.alpha),
                ));
            }
        }
        Method::Prefix { .. } | Method::Ia3 | Method::Adapter { .. } if !model.has_attention() => {
            return Err(field(
                "method",
                format!(
                    "`{}` does not apply to `{}`: its blocks have no attention keys and values or FFN for it to reach",
                    plan.method.name(),
                    model.name
                ),
            )
            .with_hint("prompt tuning, LoRA (--lora-targets in_proj) or a partial method apply"));
        }
        // peft hands prefix tuning's keys and values to the model as a `DynamicCache` of
        // attention layers; the recurrent layers of a hybrid (LFM2's convolutions, Qwen3.5's
        // and Qwen3-Next's Gated DeltaNet, the Mamba-2 layers of Granite 4.0 and Nemotron-H,
        // Jamba's Mamba layers)
        // ask that cache for their own state (`has_previous_state`) and transformers 5.17
        // raises (checked on toys of each).
        Method::Prefix { .. } if model.has_recurrent_layers() => {
            let kind = if model.has_ssd() {
                "Mamba-2"
            } else if model.has_state_space_layers() {
                "Mamba"
            } else if model.has_linear_attention() {
                "linear-attention"
            } else {
                "convolution"
            };
            return Err(field(
                "method",
                format!(
                    "peft's prefix tuning fails on `{}`: its {kind} layers reject the cache the prefix arrives in (transformers 5.17)",
                    model.name,
                ),
            )
            .with_hint("prompt tuning, LoRA or IA3 apply"));
        }
        Method::Prefix { .. } if let Err(reason) = model.peft_prefix_width() => {
            return Err(field(
                "method",
                format!("peft's prefix tuning fails on `{}`: {reason}", model.name),
            )
            .with_hint("prompt tuning, LoRA or IA3 apply"));
        }
        Method::Freeze {
            top_layers, side, ..
        } => {
            let enc = model.encoder.map_or(0, |e| e.layers);
            let (layers, what) = match side {
                None => (model.decoder.layers + enc, "model's"),
                Some(_) if !model.is_encoder_decoder() => {
                    return Err(field(
                        "train-side",
                        format!(
                            "`{}` has one stack; --train-side needs an encoder-decoder model",
                            model.name
                        ),
                    )
                    .with_hint("use --train-layers top:N on a decoder-only model"));
                }
                Some(Side::Encoder) => (enc, "encoder's"),
                Some(Side::Decoder) => (model.decoder.layers, "decoder's"),
            };
            if let Some(top) = top_layers
                && *top > layers
            {
                return Err(field(
                    "train-layers",
                    format!("({top}) exceeds the {what} {layers} layers"),
                ));
            }
        }
        // peft's prefix tuning hands the model its virtual keys and values as a `Cache`, which
        // each layer's attention appends to; a checkpointed layer's recomputation would append
        // again, so peft refuses the pair when it wraps the model ("PREFIX_TUNING does not work
        // with gradient checkpointing", `PeftModel._setup_prompt_encoder`), and turning
        // checkpointing on after wrapping fails in the first backward (keys one prefix longer
        // than the mask).
        Method::Prefix { .. } if plan.grad_ckpt => {
            return Err(field(
                "grad-ckpt",
                "prefix tuning cannot be checkpointed: peft refuses it (the recomputation would append the prefix's keys and values again)".into(),
            )
            .with_hint("drop --grad-ckpt, or use prompt tuning or LoRA, which checkpoint"));
        }
        Method::Adapter { size } if *size == 0 || *size > MAX_WIDTH => {
            return Err(field(
                "adapter-size",
                format!("must be 1 to {MAX_WIDTH}, found {size}"),
            ));
        }
        Method::Prefix { virtual_tokens } | Method::Prompt { virtual_tokens }
            if *virtual_tokens == 0 || *virtual_tokens > MAX_WIDTH =>
        {
            return Err(field(
                "virtual-tokens",
                format!("must be 1 to {MAX_WIDTH}, found {virtual_tokens}"),
            ));
        }
        _ => {}
    }
    // A learned position table has one row per position: longer sequences index past it
    // (transformers raises); prompt tuning's virtual tokens take positions too.
    if let Some(rows) = model.positions.table_rows() {
        let longest = plan.seq.max(plan.target_seq) + plan.method.prompt_tokens();
        if longest > rows {
            return Err(field(
                "seq",
                format!(
                    "({longest} tokens) exceeds `{}`'s {rows} learned positions",
                    model.name
                ),
            )
            .with_hint(format!(
                "use --seq {} or less",
                rows - plan.method.prompt_tokens().min(rows)
            )));
        }
    }
    if model.is_encoder_decoder() && plan.target_seq == 0 {
        return Err(field(
            "target-seq",
            "must be at least 1 for an encoder-decoder model".into(),
        ));
    }
    Ok(())
}

/// Runs the whole pipeline for one plan against `budget` (device memory less any headroom).
pub fn estimate_within(
    model: &ModelSpec,
    plan: &Plan,
    hardware: &Hardware,
    rates: &Rates,
    budget: crate::units::Bytes,
) -> Result<Estimate> {
    let mut e = estimate(model, plan, hardware, rates)?;
    e.budget = budget;
    e.fits = e.memory.required <= budget;
    Ok(e)
}

/// Runs the whole pipeline for one plan.
pub fn estimate(
    model: &ModelSpec,
    plan: &Plan,
    hardware: &Hardware,
    rates: &Rates,
) -> Result<Estimate> {
    check_plan(model, plan, hardware)?;
    let par = plan.parallel;
    // One rank's model: its tensor-parallel share of the largest pipeline stage.
    let rank_model = model.tensor_parallel_rank(par.tp).pipeline_stage(par.pp);
    let stages: Vec<(Stage, u64)> = if par.pp == 1 {
        vec![(Stage::WHOLE, 1)]
    } else {
        // 1F1B: stage s of p holds the activations of min(p - s, M) micro-batches at its peak
        // (Narayanan et al. 2021, sec. 2.2); the first holds the embeddings, the last the head.
        vec![
            (
                Stage {
                    first: true,
                    last: false,
                },
                par.pp.min(par.micro_batches),
            ),
            (
                Stage {
                    first: false,
                    last: true,
                },
                1,
            ),
        ]
    };
    let mut worst: Option<(graph::OpGraph, MemoryEstimate)> = None;
    for (stage, in_flight) in stages {
        let g = graph::arch::build_stage(&rank_model, plan, stage);
        // The graph's invariants are checked for every shipped model and method by the tests;
        // debug builds recheck them on every estimate.
        if cfg!(debug_assertions) {
            g.verify().map_err(|e| Error::Plan {
                message: format!("internal: op graph invalid: {e}"),
                hint: None,
            })?;
        }
        let mut m = memory::estimate(&g, plan, hardware);
        let more = m.saved_after_forward * (in_flight - 1);
        m.at_peak.activations += more;
        m.peak += more;
        m.required += more;
        if worst.as_ref().is_none_or(|(_, w)| m.required > w.required) {
            worst = Some((g, m));
        }
    }
    let Some((graph, mut memory)) = worst else {
        return Err(Error::Plan {
            message: "internal: no pipeline stage".into(),
            hint: None,
        });
    };
    if par.tp > 1 || par.pp > 1 {
        // Parameter counts are the model's, not one rank's.
        let whole = graph::build(model, plan);
        let (total, base, trainable) = graph::op::counts(&whole);
        memory.total_params = total;
        memory.base_params = base;
        memory.trainable_params = trainable;
    }
    let mut time = time::estimate(&graph, plan, hardware, rates);
    if memory.paged > crate::units::Bytes::ZERO {
        // Paged states the device has no room for live on the host; every optimizer step
        // touches all of them, so the evicted pages migrate in and back out over the host link
        // (CUDA unified memory's on-demand migration).
        let resident = memory.required + memory.paged;
        memory.paged_evicted =
            crate::units::Bytes(resident.0.saturating_sub(hardware.memory.0)).min(memory.paged);
        time.add_paging(2.0 * memory.paged_evicted.0 as f64 / (hardware.host_link_gbps * 1e9));
    }
    // No saturated or non-finite figure is ever shown as a result.
    let absurd = memory.required.0 >= MAX_BYTES
        || memory.host.0 >= MAX_BYTES
        || u128::from(memory.required.0) * u128::from(par.gpus) >= MAX_JOB_BYTES
        || u128::from(memory.host.0) * u128::from(par.nodes()) >= MAX_JOB_BYTES
        || memory.total_params >= 1 << 50
        || !(time.step_seconds.is_finite() && time.step_seconds > 0.0)
        || !(time.tokens_per_second.is_finite() && time.mfu.is_finite());
    if absurd {
        return Err(Error::Plan {
            message: format!(
                "`{}` with this plan needs more than 1 EiB per GPU (or 8 EiB for the job), or more parameters than exist; nothing is reported",
                model.name
            ),
            hint: Some("check the model's sizes and the plan's batch and sequence".into()),
        });
    }
    if memory.trainable_params == 0 {
        // peft raises when its targets match no module (and BitFit on a model without biases
        // trains nothing); so does ftplan.
        return Err(Error::field(
            Error::PLAN,
            if plan.method.lora().is_some() {
                "lora-targets"
            } else {
                "method"
            },
            format!(
                "`{}` finds nothing to train in `{}`",
                plan.method.name(),
                model.name
            ),
        )
        .with_hint(match (plan.method.lora(), model.mla) {
            (Some(_), Some(mla)) => format!(
                "latent attention's linears are {}, `kv_a_proj_with_mqa`, `kv_b_proj` and \
                 `o_proj` (LoRA's `all` covers every linear in the blocks)",
                mla.query_modules()
            ),
            (lora, _) => mamba_targets(model.family)
                .filter(|_| lora.is_some())
                .unwrap_or(
                    "choose what the model has (LoRA's `all` covers every linear in the blocks)",
                )
                .to_string(),
        }));
    }
    let fits = memory.required <= hardware.memory;
    Ok(Estimate {
        model: model.clone(),
        plan: plan.clone(),
        hardware: hardware.clone(),
        memory,
        time,
        budget: hardware.memory,
        fits,
    })
}
