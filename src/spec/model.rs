//! A validated model architecture: everything the memory and time models need, no `Option`s.
//!
//! Built from a Hugging Face `config.json` or from a `models/*.toml` file that uses the same field
//! names (see `spec::hf`), so a published config value pastes straight in.

use serde::Serialize;

/// Which Hugging Face implementation the architecture follows; decides the block's op sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `LlamaForCausalLM` (also TinyLlama): pre-RMSNorm, rotary, SwiGLU.
    Llama,
    /// `MistralForCausalLM`: the Llama block with sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: the Llama block with q/k/v biases.
    Qwen2,
    /// `GemmaForCausalLM`: Llama-like, GeGLU, (1 + w) RMSNorm, scaled embeddings.
    Gemma,
    /// `GPT2LMHeadModel`: pre-LayerNorm, learned positions, fused qkv `Conv1D`, GELU (tanh).
    Gpt2,
    /// `OPTForCausalLM`: pre-LayerNorm, learned positions, ReLU.
    Opt,
    /// `PhiForCausalLM`: parallel attention and MLP, partial rotary, GELU (tanh).
    Phi,
    /// `FalconForCausalLM`: parallel attention and MLP, multi-query, fused qkv.
    Falcon,
    /// `T5ForConditionalGeneration`: encoder-decoder, T5 RMSNorm, relative position bias.
    T5,
    /// `BartForConditionalGeneration`: encoder-decoder, post-LayerNorm, learned positions.
    Bart,
    /// `MixtralForCausalLM`: the Mistral block with a sparse mixture-of-experts FFN.
    Mixtral,
    /// `Phi3ForCausalLM`: the Llama block with fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// `Qwen3ForCausalLM`: the Llama block with per-head q/k RMSNorm and explicit `head_dim`.
    Qwen3,
    /// `GPTNeoXForCausalLM` (Pythia, GPT-NeoX-20B): parallel attention and MLP, two norms.
    GptNeox,
    /// PaLM (Chowdhery et al. 2022, sec. 2; no transformers class): a parallel attention + FFN
    /// block, SwiGLU, multi-query attention, rotary, shared embeddings, LayerNorm, no biases.
    Palm,
}

impl Family {
    pub const ALL: [(&'static str, Family); 15] = [
        ("llama", Family::Llama),
        ("mistral", Family::Mistral),
        ("qwen2", Family::Qwen2),
        ("gemma", Family::Gemma),
        ("gpt2", Family::Gpt2),
        ("opt", Family::Opt),
        ("phi", Family::Phi),
        ("falcon", Family::Falcon),
        ("t5", Family::T5),
        ("bart", Family::Bart),
        ("palm", Family::Palm),
        ("mixtral", Family::Mixtral),
        ("phi3", Family::Phi3),
        ("qwen3", Family::Qwen3),
        ("gpt_neox", Family::GptNeox),
    ];

    pub fn model_type(self) -> &'static str {
        Family::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("llama")
    }
}

/// Element-wise activation of the feed-forward network, as the framework implements it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `F.silu` (one kernel; saves its input).
    Silu,
    /// `F.gelu` exact or `approximate="tanh"` (one kernel; saves its input).
    Gelu,
    /// transformers' `NewGELUActivation` (`gelu_new`): a chain of Python element-wise ops, each
    /// saving its own operands, with `pow` autocast to fp32.
    GeluNewPython,
    /// `F.relu` (saves its output).
    Relu,
}

/// Normalisation layer implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// `nn.LayerNorm` (autocast runs it in fp32; saves its input, mean and rstd).
    LayerNorm,
    /// `nn.LayerNorm(bias=False)`: the same op with a scale only (PaLM).
    LayerNormWithoutBias,
    /// `LlamaRMSNorm`: upcast to fp32, normalise, cast back, multiply by the weight.
    RmsNorm,
    /// `GemmaRMSNorm`: fp32 throughout, `* (1 + weight)`, cast back.
    GemmaRmsNorm,
    /// `T5LayerNorm`: fp32 variance, input times rsqrt, cast to the weight dtype.
    T5RmsNorm,
}

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Positions {
    /// Rotary embeddings on the first `fraction` of each head's dimensions.
    Rotary { fraction: f64 },
    /// A learned table of `rows` positions (`offset` extra rows, as OPT and BART keep 2).
    Learned { rows: u64 },
    /// T5's learned relative-position bias: `buckets` x heads in the first layer of each stack.
    RelativeBias { buckets: u64 },
}

/// Dropout probabilities; a non-zero one stores a mask for backward.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Dropouts {
    /// After the embeddings.
    pub embedding: f64,
    /// On attention probabilities.
    pub attention: f64,
    /// On each sub-layer's output before the residual add.
    pub residual: f64,
    /// Inside the FFN, after the activation.
    pub activation: f64,
}

/// One stack of identical blocks (a decoder-only model has one; encoder-decoder has two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stack {
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
}

/// A validated model description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
    pub hidden_size: u64,
    pub vocab_size: u64,
    /// The decoder (or the only) stack.
    pub decoder: Stack,
    /// The encoder stack of an encoder-decoder model.
    pub encoder: Option<Stack>,
    pub gated_ffn: bool,
    pub activation: Activation,
    pub norm: Norm,
    /// BART puts the norm after the residual add.
    pub post_norm: bool,
    pub positions: Positions,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Biases on the attention output projection, the FFN linears and the norms.
    pub linear_bias: bool,
    /// Attention and FFN read the same norm output and add to the residual together.
    pub parallel_block: bool,
    /// q, k and v come from one projection (GPT-2 `c_attn`, Falcon `query_key_value`).
    pub fused_qkv: bool,
    /// Phi-2's LM head has a bias.
    pub lm_head_bias: bool,
    pub dropout: Dropouts,
    /// Published total parameter count, when the file states one (checked by the tests).
    pub published_params: Option<u64>,
    /// The context the model was trained for (`max_position_embeddings`, `n_positions`), where
    /// the config states one: longer sequences run but are out of distribution.
    pub context: Option<u64>,
    /// A mixture-of-experts FFN in every block (Mixtral), in place of the dense one.
    pub moe: Option<Moe>,
    /// RMSNorm on each head of q and k before rotary (Qwen3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// A parallel block whose attention and MLP each normalise the input with their own norm
    /// (GPT-NeoX), rather than sharing one (Phi, Falcon).
    pub parallel_two_norms: bool,
}

/// A sparse mixture-of-experts FFN (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): `experts`
/// gated FFNs of `intermediate_size` each, a linear router, each token sent to `top_k` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Moe {
    pub experts: u64,
    pub top_k: u64,
}

impl ModelSpec {
    pub fn is_encoder_decoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// What one of `tp` tensor-parallel ranks holds (Shoeybi et al. 2019, sec. 3): attention
    /// split by heads (q/k/v column-parallel, output row-parallel), the FFN by its intermediate
    /// width, the embedding, LM head and cross-entropy by vocabulary (vocab-parallel). The hidden
    /// width, norms and the residual stream stay whole on every rank (without sequence
    /// parallelism their activations are replicated).
    pub fn tensor_parallel_rank(&self, tp: u64) -> ModelSpec {
        let tp = tp.max(1);
        let split = |s: Stack| Stack {
            heads: s.heads / tp,
            kv_heads: s.kv_heads / tp,
            intermediate_size: s.intermediate_size.div_ceil(tp),
            ..s
        };
        ModelSpec {
            vocab_size: self.vocab_size.div_ceil(tp),
            decoder: split(self.decoder),
            encoder: self.encoder.map(split),
            ..self.clone()
        }
    }

    /// Parameters a token runs through: all, less the experts it is not routed to.
    pub fn active_params(&self, total: u64) -> u64 {
        match self.moe {
            Some(m) if m.experts > 0 => {
                let per_expert = 3 * self.hidden_size * self.decoder.intermediate_size;
                let idle = self.decoder.layers * per_expert * m.experts.saturating_sub(m.top_k);
                total.saturating_sub(idle)
            }
            _ => total,
        }
    }

    /// The largest of `pp` pipeline stages: `ceil(layers / pp)` decoder layers.
    pub fn pipeline_stage(&self, pp: u64) -> ModelSpec {
        ModelSpec {
            decoder: Stack {
                layers: self.decoder.layers.div_ceil(pp.max(1)),
                ..self.decoder
            },
            ..self.clone()
        }
    }
}

/// What a parameter is, for parameter counting and the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    /// Token or position embedding table.
    Embedding,
    /// A linear layer's weight.
    Linear,
    /// A bias vector.
    Bias,
    /// A norm's scale.
    Norm,
    /// A norm's shift (LayerNorm's bias): a bias to BitFit, a norm parameter to LN tuning.
    NormBias,
    /// A parameter a PEFT method adds (LoRA A/B, adapters, prefixes, prompts, IA3 vectors).
    Adapter,
}
