//! A training plan: method, precision, optimizer, shapes and kernels.

use crate::spec::model::ParamRole;
use serde::Serialize;

/// Which projections LoRA wraps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTargets {
    /// Attention query and value projections (peft's default for most models; GPT-2's fused
    /// `c_attn` as a whole).
    QueryValue,
    /// Every linear inside the blocks (peft's `all-linear`; the LM head excluded).
    AllLinear,
    /// Named projections.
    Named(Vec<Proj>),
}

/// A projection inside a block, by role rather than by module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// The projections of a Gated DeltaNet mixer, by their module names: Qwen3.5's
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b` and `in_proj_a`, Qwen3-Next's fused
    /// `in_proj_qkvz` and `in_proj_ba`, and the mixer's `out_proj`. No role names them: LoRA
    /// reaches them through `all-linear` or by these names, as peft's target names do.
    InProjQkv,
    InProjZ,
    InProjB,
    InProjA,
    InProjQkvz,
    InProjBa,
    /// The module named `out_proj`: a linear-attention mixer's output projection where the
    /// model has one (its attention's is `o_proj`), otherwise the attention output of the
    /// families that name it so (`Family::attention_out_proj`: BART, OPT, GPT-Neo, MPT, ...);
    /// in the others it names no attention module, as in peft's name matching.
    OutProj,
    /// The module named `in_proj`: Mamba's mixer input (x and the gate) and LFM2's short
    /// convolution input (B, C and x).
    InProj,
    /// Mamba's `x_proj` (the step size's low-rank input and the input-dependent B and C).
    XProj,
    /// Mamba's `dt_proj`. Its forward reads `dt_proj.weight` directly (`self.dt_proj.weight @
    /// time_step`), so LoRA factors peft puts on it never take part (transformers 5.17).
    DtProj,
    /// Multi-head latent attention's projections (DeepSeek-V2/V3, GLM-4.7-Flash, Mistral 4,
    /// MiniCPM3), by their module names: the query bottleneck's `q_a_proj` and `q_b_proj`, the
    /// joint key/value latent with the shared rotary key `kv_a_proj_with_mqa`, and its
    /// up-projection to keys and values `kv_b_proj`. peft matches a target name against the
    /// module's own name, so each is reached by its name alone (`q_proj` finds no `q_a_proj`,
    /// `v_proj` no `kv_b_proj`). A query without the bottleneck is `q_proj` (`Q`).
    #[serde(rename = "q_a_proj")]
    QA,
    #[serde(rename = "q_b_proj")]
    QB,
    #[serde(rename = "kv_a_proj_with_mqa")]
    KvA,
    #[serde(rename = "kv_b_proj")]
    KvB,
}

impl Proj {
    pub const NAMES: [(&'static str, Proj); 7] = [
        ("q", Proj::Q),
        ("k", Proj::K),
        ("v", Proj::V),
        ("o", Proj::O),
        ("gate", Proj::Gate),
        ("up", Proj::Up),
        ("down", Proj::Down),
    ];

    /// Hugging Face module names (as peft's `target_modules` names them) by role. GPT-2's
    /// `c_proj` names both the attention output and the FFN output projection.
    pub const MODULES: [(&'static str, &'static [Proj]); 44] = [
        ("q", &[Proj::Q]),
        ("k", &[Proj::K]),
        ("v", &[Proj::V]),
        ("o", &[Proj::O]),
        ("query", &[Proj::Q]),
        ("key", &[Proj::K]),
        ("value", &[Proj::V]),
        ("out_proj", &[Proj::OutProj]),
        ("dense", &[Proj::O]),
        ("c_attn", &[Proj::Q, Proj::K, Proj::V]),
        ("query_key_value", &[Proj::Q, Proj::K, Proj::V]),
        ("qkv_proj", &[Proj::Q, Proj::K, Proj::V]),
        // MPT's fused projection (peft's LoRA default for `mpt`).
        ("Wqkv", &[Proj::Q, Proj::K, Proj::V]),
        ("c_proj", &[Proj::O, Proj::Down]),
        ("gate", &[Proj::Gate]),
        ("w1", &[Proj::Gate]),
        ("wi_0", &[Proj::Gate]),
        ("up", &[Proj::Up]),
        ("w3", &[Proj::Up]),
        ("wi", &[Proj::Up]),
        ("wi_1", &[Proj::Up]),
        ("c_fc", &[Proj::Up]),
        ("fc1", &[Proj::Up]),
        ("dense_h_to_4h", &[Proj::Up]),
        ("down", &[Proj::Down]),
        ("w2", &[Proj::Down]),
        ("wo", &[Proj::Down]),
        ("fc2", &[Proj::Down]),
        ("dense_4h_to_h", &[Proj::Down]),
        ("gate_up_proj", &[Proj::Gate, Proj::Up]),
        // DeepSeek's multi-head latent attention: the query bottleneck, the joint key/value
        // latent (with the shared rotary key) and its up-projection to keys and values.
        ("q_a_proj", &[Proj::QA]),
        ("q_b_proj", &[Proj::QB]),
        ("kv_a_proj_with_mqa", &[Proj::KvA]),
        ("kv_b_proj", &[Proj::KvB]),
        // Gated DeltaNet's projections (Qwen3.5, Qwen3-Next).
        ("in_proj_qkv", &[Proj::InProjQkv]),
        ("in_proj_z", &[Proj::InProjZ]),
        ("in_proj_b", &[Proj::InProjB]),
        ("in_proj_a", &[Proj::InProjA]),
        ("in_proj_qkvz", &[Proj::InProjQkvz]),
        ("in_proj_ba", &[Proj::InProjBa]),
        // Mamba's mixer projections.
        ("in_proj", &[Proj::InProj]),
        ("x_proj", &[Proj::XProj]),
        ("dt_proj", &[Proj::DtProj]),
        (
            "all-linear",
            &[
                Proj::Q,
                Proj::K,
                Proj::V,
                Proj::O,
                Proj::Gate,
                Proj::Up,
                Proj::Down,
                Proj::InProjQkv,
                Proj::InProjZ,
                Proj::InProjB,
                Proj::InProjA,
                Proj::InProjQkvz,
                Proj::InProjBa,
                Proj::OutProj,
                Proj::InProj,
                Proj::XProj,
                Proj::DtProj,
                Proj::QA,
                Proj::QB,
                Proj::KvA,
                Proj::KvB,
            ],
        ),
    ];

    /// The short name a role has (`q`, `down`), or the module name of a mixer's projection.
    pub fn label(self) -> &'static str {
        Proj::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or(self.module(), |(n, _)| n)
    }

    /// The Hugging Face module name a target list writes for this projection.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
            Proj::InProjQkv => "in_proj_qkv",
            Proj::InProjZ => "in_proj_z",
            Proj::InProjB => "in_proj_b",
            Proj::InProjA => "in_proj_a",
            Proj::InProjQkvz => "in_proj_qkvz",
            Proj::InProjBa => "in_proj_ba",
            Proj::OutProj => "out_proj",
            Proj::InProj => "in_proj",
            Proj::XProj => "x_proj",
            Proj::DtProj => "dt_proj",
            Proj::QA => "q_a_proj",
            Proj::QB => "q_b_proj",
            Proj::KvA => "kv_a_proj_with_mqa",
            Proj::KvB => "kv_b_proj",
        }
    }
}

impl LoraTargets {
    /// Whether these targets name the module of role `proj` (peft's `all-linear` names every
    /// linear; the default q and v).
    pub fn reaches(&self, proj: Proj) -> bool {
        match self {
            LoraTargets::AllLinear => true,
            // On latent attention, which has no `v_proj` (and no `q_proj` behind a query
            // bottleneck), the query projections and `kv_b_proj` (whose output holds the values).
            LoraTargets::QueryValue => {
                matches!(proj, Proj::Q | Proj::V | Proj::QA | Proj::QB | Proj::KvB)
            }
            LoraTargets::Named(list) => list.contains(&proj),
        }
    }

    /// `qv`, `all`, or a list of roles (`q`, `gate`) or Hugging Face module names (`q_proj`,
    /// `c_attn`, `wo`): the projections each names, or the unknown name with a suggestion.
    pub fn parse<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<LoraTargets, (String, Option<String>)> {
        let items: Vec<&str> = items
            .into_iter()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        match items.as_slice() {
            ["qv"] => return Ok(LoraTargets::QueryValue),
            ["all"] | ["all-linear"] => return Ok(LoraTargets::AllLinear),
            [] => {
                return Err((
                    String::new(),
                    Some("use qv, all or q,k,v,o,gate,up,down".into()),
                ));
            }
            _ => {}
        }
        let mut projs = Vec::new();
        for item in items {
            // `model.layers.0.self_attn.q_proj` -> `q_proj`; `q_proj` -> `q`.
            let leaf = item.rsplit('.').next().unwrap_or(item);
            let short = leaf
                .strip_suffix("_proj")
                .filter(|s| !s.is_empty())
                .unwrap_or(leaf);
            let found = Proj::MODULES
                .iter()
                .find(|(n, _)| *n == leaf || *n == short);
            match found {
                Some((_, roles)) => {
                    for r in roles.iter() {
                        if !projs.contains(r) {
                            projs.push(*r);
                        }
                    }
                }
                None => {
                    const PROJ: [&str; 7] = [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ];
                    let names = Proj::MODULES.iter().map(|(n, _)| *n).chain(PROJ);
                    let hint = crate::error::did_you_mean(leaf, names)
                        .map(|s| format!("did you mean `{s}`?"));
                    return Err((item.to_string(), hint));
                }
            }
        }
        Ok(LoraTargets::Named(projs))
    }
}

/// LoRA's settings (Hu et al. 2021).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lora {
    pub rank: u64,
    pub alpha: f64,
    pub targets: LoraTargets,
    /// Weight-decomposed LoRA (DoRA; Liu et al. 2024; peft's `use_dora=True`).
    pub dora: bool,
}

/// How the model is fine-tuned.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum Method {
    /// Every parameter trains.
    Full,
    /// Frozen base plus trainable low-rank A/B matrices beside chosen projections.
    Lora(Lora),
    /// LoRA over an NF4 4-bit base with double quantization (Dettmers et al. 2023).
    Qlora(Lora),
    /// A bottleneck adapter (hidden -> size -> hidden, ReLU, residual) after each block's FFN
    /// (Houlsby et al. 2019; Pfeiffer placement).
    Adapter { size: u64 },
    /// Trainable key/value prefixes in every attention layer (Li & Liang 2021), as peft
    /// implements it: an embedding of `virtual_tokens x layers x 2 x hidden`.
    Prefix { virtual_tokens: u64 },
    /// Trainable input embeddings prepended to the sequence (Lester et al. 2021).
    Prompt { virtual_tokens: u64 },
    /// Learned scaling vectors on keys, values and the FFN (Liu et al. 2022), peft's targets.
    Ia3,
    /// Bias terms only (BitFit; Ben Zaken et al. 2022).
    #[serde(rename = "bitfit")]
    BitFit,
    /// Norm scales and shifts only (LN tuning; peft's `LNTuningConfig`).
    LnTuning,
    /// The top `top_layers` blocks (and the final norm) train, with the token embeddings when
    /// `embeddings`; everything below is frozen and backward stops at the lowest trainable layer.
    /// With a `side`, only that stack of an encoder-decoder trains (its top `top_layers`
    /// blocks, all of them when None).
    Freeze {
        top_layers: Option<u64>,
        embeddings: bool,
        side: Option<Side>,
    },
}

/// One stack of an encoder-decoder model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Encoder,
    Decoder,
}

impl Side {
    /// The names flags, plan files and run records give each side.
    pub const NAMES: [(&'static str, Side); 2] =
        [("encoder", Side::Encoder), ("decoder", Side::Decoder)];
}

/// Where a parameter sits: its block (numbered across the encoder, then the decoder; None
/// outside the blocks) and the model's block counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    pub layer: Option<u64>,
    pub layers: u64,
    pub encoder_layers: u64,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora(_) => "lora",
            Method::Qlora(_) => "qlora",
            Method::Adapter { .. } => "adapter",
            Method::Prefix { .. } => "prefix",
            Method::Prompt { .. } => "prompt",
            Method::Ia3 => "ia3",
            Method::BitFit => "bitfit",
            Method::LnTuning => "ln-tuning",
            Method::Freeze { .. } => "freeze",
        }
    }

    /// Whether a base-model parameter of `role` trains, in block `layer` of `layers` (`None`:
    /// outside the blocks: embeddings, final norm, head). The one place trainability is
    /// decided; PEFT methods train only what they add.
    pub fn trains(&self, role: ParamRole, at: Depth) -> bool {
        let Depth {
            layer,
            layers,
            encoder_layers,
        } = at;
        match self {
            Method::Full => true,
            Method::Lora(_)
            | Method::Qlora(_)
            | Method::Adapter { .. }
            | Method::Prefix { .. }
            | Method::Prompt { .. }
            | Method::Ia3 => false,
            Method::BitFit => matches!(role, ParamRole::Bias | ParamRole::NormBias),
            Method::LnTuning => matches!(role, ParamRole::Norm | ParamRole::NormBias),
            Method::Freeze {
                top_layers,
                embeddings,
                side,
            } => {
                // The blocks [from, to) of the chosen side; its top `top_layers` train.
                let (from, to) = match side {
                    None => (0, layers),
                    Some(Side::Encoder) => (0, encoder_layers),
                    Some(Side::Decoder) => (encoder_layers, layers),
                };
                let top = top_layers.unwrap_or(if side.is_some() { to - from } else { 1 });
                match (role, layer) {
                    (ParamRole::Embedding, _) => *embeddings,
                    // Nothing else lies outside the blocks (final norms go with their stack's
                    // top block).
                    (_, None) => top > 0,
                    (_, Some(i)) => i >= from && i < to && i + top >= to,
                }
            }
        }
    }

    /// Whether the base model is frozen with a PEFT method's additions training (peft's regime:
    /// a bf16 base, fp32 adapters under autocast). Partial tuning trains base parameters and
    /// follows full fine-tuning's regime.
    pub fn frozen_base(&self) -> bool {
        match self {
            Method::Full | Method::BitFit | Method::LnTuning | Method::Freeze { .. } => false,
            Method::Lora(_)
            | Method::Qlora(_)
            | Method::Adapter { .. }
            | Method::Prefix { .. }
            | Method::Prompt { .. }
            | Method::Ia3 => true,
        }
    }

    pub fn lora(&self) -> Option<&Lora> {
        match self {
            Method::Lora(l) | Method::Qlora(l) => Some(l),
            Method::Full
            | Method::Adapter { .. }
            | Method::Prefix { .. }
            | Method::Prompt { .. }
            | Method::Ia3
            | Method::BitFit
            | Method::LnTuning
            | Method::Freeze { .. } => None,
        }
    }

    /// Virtual tokens prepended to the input sequence (prompt tuning lengthens the sequence).
    pub fn prompt_tokens(&self) -> u64 {
        match self {
            Method::Prompt { virtual_tokens } => *virtual_tokens,
            _ => 0,
        }
    }

    /// Virtual tokens prepended to every layer's keys and values (prefix tuning).
    pub fn prefix_tokens(&self) -> u64 {
        match self {
            Method::Prefix { virtual_tokens } => *virtual_tokens,
            _ => 0,
        }
    }
}

/// The dtype regime of the model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// fp32 weights, forward under bf16 autocast (Hugging Face Trainer's `bf16=True`).
    MixedBf16,
    /// fp32 weights, forward under fp16 autocast with a dynamic loss scaler (Trainer's
    /// `fp16=True`, `torch.amp.GradScaler`): for GPUs without bf16 (V100, T4). The same bytes
    /// as mixed bf16 (the scaler's state is two scalars; `unscale_` divides the gradients in
    /// place), fp16 tensor-core rates, and one more pass over the gradients per step.
    MixedFp16,
    /// bf16 weights. Full fine-tuning runs without autocast (pure bf16, bf16 optimizer states);
    /// PEFT methods keep peft's fp32 adapters and run under bf16 autocast.
    Bf16,
    /// Everything fp32, no autocast.
    Fp32,
}

impl Precision {
    /// Names in measured-run records for the precisions a record states (`ftplan measure`'s
    /// `precision`); the others follow from the method and `base_fp32`.
    pub const RECORD_NAMES: [(&'static str, Precision); 2] = [
        ("fp32", Precision::Fp32),
        ("mixed_fp16", Precision::MixedFp16),
    ];

    /// This precision's name in measured-run records, if a record states it.
    pub fn record_name(self) -> Option<&'static str> {
        super::name_in(&Precision::RECORD_NAMES, self)
    }
}

/// The optimizer and its implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// `torch.optim.AdamW(fused=True)`: two states per parameter, no step temporaries
    /// (Hugging Face Trainer's default on torch >= 2.8).
    Adamw,
    /// `torch.optim.AdamW` default (foreach) on a GPU: two states plus a temporary the size of
    /// one state (`_foreach_sqrt` of the second moment) while it steps.
    AdamwForeach,
    /// bitsandbytes `AdamW8bit`: two 1-byte states plus fp32 block-wise absmax per 2048 values
    /// (Dettmers et al. 2022).
    Adamw8bit,
    /// bitsandbytes `PagedAdamW8bit` (`paged_adamw_8bit`): AdamW8bit's states in CUDA unified
    /// memory (`F.get_paged` -> `cudaMallocManaged`), outside PyTorch's caching allocator; the
    /// driver evicts them to host memory under pressure (Dettmers et al. 2023, QLoRA sec. 2,
    /// "paged optimizers").
    #[serde(rename = "paged-adamw-8bit")]
    PagedAdamw8bit,
    /// bitsandbytes `PagedAdamW32bit` (`paged_adamw_32bit`): two fp32 states per parameter in
    /// unified memory.
    #[serde(rename = "paged-adamw-32bit")]
    PagedAdamw32bit,
    /// `torch.optim.SGD(momentum=0.9)`: one momentum buffer per parameter.
    Sgd,
    /// `torch.optim.Adafactor`: factored second moments (a row and a column vector per matrix),
    /// no first moment (Shazeer & Stern 2018).
    Adafactor,
}

impl Optimizer {
    /// Each optimizer's name in a measured run's record (the harnesses' `optimizer` field;
    /// absent means fused AdamW).
    pub const RECORD_NAMES: [(&'static str, Optimizer); 7] = [
        ("fused", Optimizer::Adamw),
        ("foreach", Optimizer::AdamwForeach),
        ("adamw8bit", Optimizer::Adamw8bit),
        ("paged_adamw_8bit", Optimizer::PagedAdamw8bit),
        ("paged_adamw_32bit", Optimizer::PagedAdamw32bit),
        ("sgd", Optimizer::Sgd),
        ("adafactor", Optimizer::Adafactor),
    ];

    /// Its name in a measured run's record.
    pub fn record_name(self) -> &'static str {
        super::name_in(&Optimizer::RECORD_NAMES, self).unwrap_or("fused")
    }

    /// Whether bitsandbytes implements it.
    pub fn bitsandbytes(self) -> bool {
        matches!(
            self,
            Optimizer::Adamw8bit | Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit
        )
    }

    /// Whether its states live in CUDA unified memory (paged), outside PyTorch's allocator.
    pub fn paged(self) -> bool {
        matches!(self, Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit)
    }
}

/// Which attention implementation the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    /// `F.scaled_dot_product_attention`: flash / memory-efficient kernels, memory linear in the
    /// sequence length.
    Sdpa,
    /// `flash_attention_2` (Dao 2023; the `flash-attn` package): causality, sliding windows
    /// and soft-capping are kernel arguments, never a mask tensor; grouped KV heads native.
    Flash2,
    /// transformers' eager attention: materialised score and probability matrices.
    Eager,
}

impl AttentionKernel {
    /// The names measured-run records use for each kernel (`run.attn`: what the harnesses pass
    /// to transformers' `attn_implementation`, `flash2` for `flash_attention_2`): `ftplan
    /// measure` writes them and `ftplan validate` reads them.
    pub const RECORD_NAMES: [(&'static str, AttentionKernel); 3] = [
        ("sdpa", AttentionKernel::Sdpa),
        ("flash2", AttentionKernel::Flash2),
        ("eager", AttentionKernel::Eager),
    ];

    /// This kernel's name in measured-run records.
    pub fn record_name(self) -> &'static str {
        super::name_in(&AttentionKernel::RECORD_NAMES, self).unwrap_or("sdpa")
    }
}

/// How linear-attention layers (Qwen3.5's and Qwen3-Next's Gated DeltaNet) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearKernel {
    /// transformers' own PyTorch code (`torch_chunk_gated_delta_rule`, `F.conv1d`): what a
    /// plain install runs.
    #[default]
    Torch,
    /// The flash-linear-attention and causal-conv1d kernels, which transformers uses when those
    /// packages are installed: a fused rule that keeps its normalised inputs and recomputes
    /// the states in backward, and a convolution (LFM2's too) with its activation fused.
    Fla,
}

/// Everything about one training step except the model and the hardware.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub method: Method,
    pub precision: Precision,
    pub optimizer: Optimizer,
    /// Micro-batch per GPU.
    pub batch: u64,
    /// Tokens per sample (encoder-decoder: source length).
    pub seq: u64,
    /// Target length of an encoder-decoder model.
    pub target_seq: u64,
    pub grad_ckpt: bool,
    pub attention: AttentionKernel,
    /// The busiest expert's share of routed tokens over the mean (1: uniform routing), as the
    /// plan states it. The estimate does not depend on it: transformers 5 runs every routed row
    /// through one grouped matmul per projection (`grouped_mm_experts_forward`), so a layer's
    /// buffers and FLOPs are those of all routed rows however the router spreads them. Kept so
    /// plan files and the JSON contract stay stable.
    pub expert_load: f64,
    /// The linear-attention kernels (models with Gated DeltaNet layers).
    pub linear_kernel: LinearKernel,
    /// The parallel layout (one GPU by default).
    pub parallel: crate::spec::parallel::Parallel,
}

impl Plan {
    /// Whether the forward pass runs under bf16 autocast.
    pub fn autocast(&self) -> bool {
        match self.precision {
            Precision::MixedBf16 | Precision::MixedFp16 => true,
            Precision::Bf16 => self.method.frozen_base(),
            // QLoRA computes in bf16 under autocast whatever the other weights' dtype.
            Precision::Fp32 if matches!(self.method, Method::Qlora(_)) => true,
            Precision::Fp32 => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_targets_take_roles_and_hugging_face_module_names() {
        assert_eq!(LoraTargets::parse(["qv"]), Ok(LoraTargets::QueryValue));
        assert_eq!(
            LoraTargets::parse(["all-linear"]),
            Ok(LoraTargets::AllLinear)
        );
        assert_eq!(
            LoraTargets::parse(["q_proj", "v_proj", "model.layers.0.mlp.down_proj"]),
            Ok(LoraTargets::Named(vec![Proj::Q, Proj::V, Proj::Down]))
        );
        // GPT-2's `c_proj` is both the attention output and the FFN output.
        assert_eq!(
            LoraTargets::parse(["c_attn", "c_proj"]),
            Ok(LoraTargets::Named(vec![
                Proj::Q,
                Proj::K,
                Proj::V,
                Proj::O,
                Proj::Down
            ]))
        );
        let (name, hint) = LoraTargets::parse(["q_prj"]).expect_err("unknown");
        assert_eq!(name, "q_prj");
        assert!(hint.is_some_and(|h| h.contains("q")));
    }
}
