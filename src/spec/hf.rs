//! Reading a Hugging Face `config.json` (or a `models/*.toml` with the same field names) into a
//! [`ModelSpec`]. Field names and defaults follow each transformers configuration class.

use crate::error::{Error, Result, did_you_mean};
use crate::spec::model::{Activation, Dropouts, Family, ModelSpec, Moe, Norm, Positions, Stack};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;

/// Largest size accepted for any one dimension; beyond it products overflow and nothing real is
/// that large.
const MAX_DIM: u64 = 1 << 24;
const MAX_LAYERS: u64 = 10_000;

/// Keys that describe a file rather than the architecture (TOML model files only).
/// Most parameters a model may have (100 T: a hundred times the largest trained) so that no
/// count or byte figure can wrap.
pub const MAX_PARAMS: u128 = 100_000_000_000_000;

/// Refuses models whose size, computed without wrapping, is beyond any that exists.
fn check_size(path: &str, spec: &ModelSpec) -> Result<()> {
    let h = u128::from(spec.hidden_size);
    let stack = |s: &Stack| {
        let attention =
            2 * h * u128::from(s.heads * s.head_dim) + 2 * h * u128::from(s.kv_heads * s.head_dim);
        let experts = spec.moe.map_or(1, |m| u128::from(m.experts.max(1)));
        let ffn = 3 * h * u128::from(s.intermediate_size) * experts;
        u128::from(s.layers) * (attention + ffn)
    };
    let total = stack(&spec.decoder)
        + spec.encoder.as_ref().map_or(0, stack)
        + 2 * h * u128::from(spec.vocab_size);
    if total > MAX_PARAMS {
        return Err(Error::field(
            path,
            "hidden_size",
            format!(
                "with these sizes the model has about {total} parameters; the most accepted is 1e14"
            ),
        ));
    }
    Ok(())
}

const META_KEYS: [&str; 4] = ["name", "source", "params", "aliases"];

/// A config being read, remembering which keys were looked at so that a TOML file's unknown keys
/// can be reported.
struct Reader<'a> {
    path: &'a str,
    map: &'a Map<String, Value>,
    seen: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Reader<'a> {
    fn raw(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        let mut seen = self.seen.borrow_mut();
        seen.extend(keys.iter().copied());
        keys.iter()
            .find_map(|k| self.map.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
    }

    fn opt_u64(&self, keys: &[&'static str]) -> Result<Option<u64>> {
        let Some((key, value)) = self.raw(keys) else {
            return Ok(None);
        };
        let number = value.as_f64().ok_or_else(|| {
            Error::field(self.path, key, format!("must be a number, found `{value}`"))
        })?;
        if number.fract() != 0.0 || number < 1.0 {
            return Err(Error::field(
                self.path,
                key,
                format!("must be a positive whole number, found `{value}`"),
            ));
        }
        let limit = if key.contains("layers") || key == "n_layer" {
            MAX_LAYERS
        } else {
            MAX_DIM
        };
        if number > limit as f64 {
            return Err(Error::field(
                self.path,
                key,
                format!("is absurdly large ({value}); the most accepted is {limit}"),
            ));
        }
        Ok(Some(number as u64))
    }

    fn u64(&self, keys: &[&'static str]) -> Result<u64> {
        self.opt_u64(keys)?
            .ok_or_else(|| Error::field(self.path, keys[0], "is missing"))
    }

    fn f64_or(&self, keys: &[&'static str], default: f64) -> Result<f64> {
        match self.raw(keys) {
            None => Ok(default),
            Some((key, value)) => {
                let p = value.as_f64().ok_or_else(|| {
                    Error::field(self.path, key, format!("must be a number, found `{value}`"))
                })?;
                // The one place config floats get their ranges.
                let (ok, range) = if key.contains("drop") {
                    ((0.0..1.0).contains(&p), "a probability in [0, 1)")
                } else if key.contains("rotary") {
                    (p > 0.0 && p <= 1.0, "a fraction in (0, 1]")
                } else {
                    (
                        p.is_finite() && p > 0.0 && p <= 1e12,
                        "a positive number up to 1e12",
                    )
                };
                if !ok {
                    return Err(Error::field(
                        self.path,
                        key,
                        format!("must be {range}, found {p}"),
                    ));
                }
                Ok(p)
            }
        }
    }

    fn bool_or(&self, keys: &[&'static str], default: bool) -> Result<bool> {
        match self.raw(keys) {
            None => Ok(default),
            Some((key, value)) => value.as_bool().ok_or_else(|| {
                Error::field(
                    self.path,
                    key,
                    format!("must be true or false, found `{value}`"),
                )
            }),
        }
    }

    fn str_or(&self, keys: &[&'static str], default: &'static str) -> Result<String> {
        match self.raw(keys) {
            None => Ok(default.to_string()),
            Some((key, value)) => value.as_str().map(str::to_string).ok_or_else(|| {
                Error::field(self.path, key, format!("must be a string, found `{value}`"))
            }),
        }
    }
}

/// Parses an already-decoded config object.
///
/// `strict` (TOML model files): keys the reader does not know are errors with a suggestion;
/// `config.json` files carry many irrelevant keys and are read leniently.
pub fn parse_config(path: &str, value: &Value, name: &str, strict: bool) -> Result<ModelSpec> {
    let map = value.as_object().ok_or_else(|| Error::Parse {
        path: path.into(),
        message: "expected an object".into(),
    })?;
    let r = Reader {
        path,
        map,
        seen: RefCell::new(BTreeSet::new()),
    };
    let model_type = r.str_or(&["model_type"], "")?;
    if model_type.is_empty() {
        return Err(Error::field(path, "model_type", "is missing").with_hint(supported()));
    }
    let family = Family::ALL
        .iter()
        .find(|(n, _)| *n == model_type)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            Error::field(
                path,
                "model_type",
                format!("`{model_type}` is not supported"),
            )
            .with_hint(supported())
        })?;
    let mut spec = match family {
        Family::Llama
        | Family::Mistral
        | Family::Qwen2
        | Family::Gemma
        | Family::Mixtral
        | Family::Phi3
        | Family::Qwen3 => llama_like(&r, family)?,
        Family::Gpt2 => gpt2(&r)?,
        Family::Opt => opt(&r)?,
        Family::Phi => phi(&r)?,
        Family::Falcon => falcon(&r)?,
        Family::T5 => t5(&r)?,
        Family::Bart => bart(&r)?,
        Family::Palm => palm(&r)?,
        Family::GptNeox => gpt_neox(&r)?,
    };
    spec.name = name.to_string();
    spec.published_params = map.get("params").and_then(serde_json::Value::as_u64);
    spec.context = ["max_position_embeddings", "n_positions", "n_ctx"]
        .iter()
        .find_map(|k| map.get(*k).and_then(serde_json::Value::as_u64))
        .filter(|&c| c > 0);
    check_size(path, &spec)?;
    check_heads(path, &spec.decoder, spec.hidden_size, &r)?;
    if let Some(enc) = &spec.encoder {
        check_heads(path, enc, spec.hidden_size, &r)?;
    }
    if strict {
        let seen = r.seen.borrow();
        for key in map.keys() {
            if !seen.contains(key.as_str()) && !META_KEYS.contains(&key.as_str()) {
                let hint = did_you_mean(key, seen.iter().copied().chain(META_KEYS))
                    .map(|s| format!("did you mean `{s}`?"));
                let err = Error::field(path, key, "is not a known field");
                return Err(match hint {
                    Some(h) => err.with_hint(h),
                    None => err,
                });
            }
        }
    }
    Ok(spec)
}

fn supported() -> String {
    let names: Vec<&str> = Family::ALL.iter().map(|(n, _)| *n).collect();
    format!("supported model types: {}", names.join(", "))
}

/// Heads must tile the hidden size when no explicit head_dim is given, and KV heads must divide
/// heads (grouped-query attention shares each KV head among a whole group).
fn check_heads(path: &str, s: &Stack, hidden: u64, r: &Reader) -> Result<()> {
    let explicit_head_dim = r.map.contains_key("head_dim") || r.map.contains_key("d_kv");
    if !explicit_head_dim && !hidden.is_multiple_of(s.heads) {
        return Err(Error::field(
            path,
            "num_attention_heads",
            format!("({}) does not divide the hidden size ({hidden})", s.heads),
        )
        .with_hint("set `head_dim` explicitly or fix the head count"));
    }
    if !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::field(
            path,
            "num_key_value_heads",
            format!(
                "({}) does not divide num_attention_heads ({})",
                s.kv_heads, s.heads
            ),
        ));
    }
    Ok(())
}

fn activation(path: &str, name: &str, key: &str) -> Result<Activation> {
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_python" | "gelu_accurate" => {
            Activation::Gelu
        }
        "gelu_new" => Activation::GeluNewPython,
        "relu" => Activation::Relu,
        other => {
            return Err(
                Error::field(path, key, format!("activation `{other}` is not supported"))
                    .with_hint("one of silu, gelu, gelu_new, gelu_pytorch_tanh, relu"),
            );
        }
    })
}

fn llama_like(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let kv_heads = r.opt_u64(&["num_key_value_heads"])?.unwrap_or(heads);
    let head_dim = r.opt_u64(&["head_dim"])?.unwrap_or(hidden / heads.max(1));
    let act_default = if family == Family::Gemma {
        "gelu_pytorch_tanh"
    } else {
        "silu"
    };
    let act_key = if r.map.contains_key("hidden_activation") {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = r.str_or(&["hidden_activation", "hidden_act"], act_default)?;
    let attention_dropout = r.f64_or(&["attention_dropout"], 0.0)?;
    // Qwen2 always has q/k/v biases; Llama and Mistral follow `attention_bias`.
    let qkv_bias = family == Family::Qwen2 || r.bool_or(&["attention_bias"], false)?;
    let mlp_bias = r.bool_or(&["mlp_bias"], false)?;
    r.raw(&[
        "rms_norm_eps",
        "max_position_embeddings",
        "sliding_window",
        "rope_theta",
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
        "original_max_position_embeddings",
        "rope_scaling",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    ]);
    // Phi-3 keeps GPT-style residual and embedding dropout (`resid_pdrop`, `embd_pdrop`).
    let (residual, embedding) = if family == Family::Phi3 {
        (
            r.f64_or(&["resid_pdrop"], 0.0)?,
            r.f64_or(&["embd_pdrop"], 0.0)?,
        )
    } else {
        (0.0, 0.0)
    };
    let moe = if family == Family::Mixtral {
        let experts = r.u64(&["num_local_experts"])?;
        let top_k = r.u64(&["num_experts_per_tok"])?;
        if experts > 1024 || top_k > experts {
            return Err(Error::field(
                r.path,
                "num_experts_per_tok",
                format!("({top_k}) must be at most the experts ({experts}), at most 1024"),
            ));
        }
        Some(Moe { experts, top_k })
    } else {
        None
    };
    Ok(ModelSpec {
        name: String::new(),
        family,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads,
            head_dim,
            intermediate_size: r.u64(&["intermediate_size"])?,
        },
        encoder: None,
        gated_ffn: true,
        activation: activation(r.path, &act, act_key)?,
        norm: if family == Family::Gemma {
            Norm::GemmaRmsNorm
        } else {
            Norm::RmsNorm
        },
        post_norm: false,
        positions: Positions::Rotary { fraction: 1.0 },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], family == Family::Gemma)?,
        qkv_bias,
        linear_bias: mlp_bias,
        parallel_block: false,
        // Phi-3's `qkv_proj` (and `gate_up_proj`, the same bytes as two projections).
        fused_qkv: family == Family::Phi3,
        lm_head_bias: false,
        dropout: Dropouts {
            attention: attention_dropout,
            residual,
            embedding,
            ..Dropouts::default()
        },
        published_params: None,
        context: None,
        moe,
        qk_norm: family == Family::Qwen3,
        parallel_two_norms: false,
    })
}

fn gpt2(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["n_embd", "hidden_size"])?;
    let heads = r.u64(&["n_head", "num_attention_heads"])?;
    let act = r.str_or(&["activation_function"], "gelu_new")?;
    r.raw(&["layer_norm_epsilon"]);
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Gpt2,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["n_layer", "num_hidden_layers"])?,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: r.opt_u64(&["n_inner"])?.unwrap_or(4 * hidden),
        },
        encoder: None,
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        post_norm: false,
        positions: Positions::Learned {
            rows: r.u64(&["n_positions", "max_position_embeddings"])?,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        parallel_block: false,
        fused_qkv: true,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: r.f64_or(&["embd_pdrop"], 0.1)?,
            attention: r.f64_or(&["attn_pdrop"], 0.1)?,
            residual: r.f64_or(&["resid_pdrop"], 0.1)?,
            activation: 0.0,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

fn opt(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let act = r.str_or(&["activation_function"], "relu")?;
    if let Some(proj) = r.opt_u64(&["word_embed_proj_dim"])?
        && proj != hidden
    {
        return Err(
            Error::field(r.path, "word_embed_proj_dim", "must equal hidden_size")
                .with_hint("OPT-350m's projected embeddings are not modelled"),
        );
    }
    r.raw(&[
        "do_layer_norm_before",
        "enable_bias",
        "layer_norm_elementwise_affine",
    ]);
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Opt,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: r.u64(&["ffn_dim"])?,
        },
        encoder: None,
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        post_norm: false,
        // OPTLearnedPositionalEmbedding keeps 2 extra rows (the offset).
        positions: Positions::Learned {
            rows: r.u64(&["max_position_embeddings"])? + 2,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        parallel_block: false,
        fused_qkv: false,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: r.f64_or(&["dropout"], 0.1)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["dropout"], 0.1)?,
            activation: r.f64_or(&["activation_dropout"], 0.0)?,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

/// `GPTNeoXForCausalLM` (Pythia, GPT-NeoX-20B): a parallel block whose attention and MLP each
/// normalise the input with their own LayerNorm, a fused biased `query_key_value`, partial rotary,
/// a biased GELU MLP, an untied `embed_out`.
fn gpt_neox(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let act = r.str_or(&["hidden_act"], "gelu")?;
    r.raw(&[
        "layer_norm_eps",
        "rotary_emb_base",
        "rope_theta",
        "max_position_embeddings",
        "rope_scaling",
        "classifier_dropout",
    ]);
    let parallel = r.bool_or(&["use_parallel_residual"], true)?;
    Ok(ModelSpec {
        name: String::new(),
        family: Family::GptNeox,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: r.u64(&["intermediate_size"])?,
        },
        encoder: None,
        gated_ffn: false,
        activation: activation(r.path, &act, "hidden_act")?,
        norm: Norm::LayerNorm,
        post_norm: false,
        positions: Positions::Rotary {
            fraction: r.f64_or(&["rotary_pct", "partial_rotary_factor"], 0.25)?,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: r.bool_or(&["attention_bias"], true)?,
        linear_bias: true,
        parallel_block: parallel,
        fused_qkv: true,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: 0.0,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["hidden_dropout"], 0.0)?,
            activation: 0.0,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: parallel,
    })
}

fn phi(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let act = r.str_or(&["hidden_act"], "gelu_new")?;
    r.raw(&[
        "layer_norm_eps",
        "qk_layernorm",
        "max_position_embeddings",
        "rope_theta",
    ]);
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Phi,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: r.opt_u64(&["num_key_value_heads"])?.unwrap_or(heads),
            head_dim: hidden / heads.max(1),
            intermediate_size: r.u64(&["intermediate_size"])?,
        },
        encoder: None,
        gated_ffn: false,
        activation: activation(r.path, &act, "hidden_act")?,
        norm: Norm::LayerNorm,
        post_norm: false,
        positions: Positions::Rotary {
            fraction: r.f64_or(&["partial_rotary_factor"], 0.5)?,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: true,
        linear_bias: true,
        parallel_block: true,
        fused_qkv: false,
        lm_head_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["embd_pdrop"], 0.0)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["resid_pdrop"], 0.0)?,
            activation: 0.0,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

/// PaLM has no transformers implementation: the keys are Llama's names, and what the paper fixes
/// (Chowdhery et al. 2022, sec. 2: parallel layers, SwiGLU, multi-query attention, RoPE, shared
/// input-output embeddings, no biases in dense kernels or layer norms) is not configurable.
fn palm(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    r.raw(&["max_position_embeddings", "layer_norm_eps"]);
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Palm,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: r.opt_u64(&["num_key_value_heads"])?.unwrap_or(1),
            head_dim: r.opt_u64(&["head_dim"])?.unwrap_or(hidden / heads.max(1)),
            intermediate_size: r.opt_u64(&["intermediate_size"])?.unwrap_or(4 * hidden),
        },
        encoder: None,
        gated_ffn: true,
        activation: Activation::Silu,
        norm: Norm::LayerNormWithoutBias,
        post_norm: false,
        positions: Positions::Rotary { fraction: 1.0 },
        tie_word_embeddings: true,
        qkv_bias: false,
        linear_bias: false,
        parallel_block: true,
        fused_qkv: false,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: 0.0,
            attention: 0.0,
            residual: 0.0,
            activation: 0.0,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

fn falcon(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    if r.bool_or(&["new_decoder_architecture"], false)? {
        return Err(
            Error::field(r.path, "new_decoder_architecture", "is not supported")
                .with_hint("Falcon-7B's original architecture is modelled; 40B/180B are not"),
        );
    }
    if r.bool_or(&["alibi"], false)? {
        return Err(Error::field(r.path, "alibi", "is not supported"));
    }
    let multi_query = r.bool_or(&["multi_query"], true)?;
    let kv_heads = if multi_query {
        1
    } else {
        r.opt_u64(&["num_kv_heads"])?.unwrap_or(heads)
    };
    r.raw(&[
        "parallel_attn",
        "layer_norm_epsilon",
        "max_position_embeddings",
        "rope_theta",
    ]);
    let bias = r.bool_or(&["bias"], false)?;
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Falcon,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: r.opt_u64(&["ffn_hidden_size"])?.unwrap_or(4 * hidden),
        },
        encoder: None,
        gated_ffn: false,
        activation: Activation::Gelu,
        norm: Norm::LayerNorm,
        post_norm: false,
        positions: Positions::Rotary { fraction: 1.0 },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: bias,
        linear_bias: bias,
        parallel_block: r.bool_or(&["parallel_attn"], true)?,
        fused_qkv: true,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: 0.0,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["hidden_dropout"], 0.0)?,
            activation: 0.0,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

fn t5(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["d_model"])?;
    let heads = r.u64(&["num_heads"])?;
    let head_dim = r.u64(&["d_kv"])?;
    let ff = r.u64(&["d_ff"])?;
    let layers = r.u64(&["num_layers"])?;
    let proj = r.str_or(&["feed_forward_proj"], "relu")?;
    let (gated, act_name) = match proj.strip_prefix("gated-") {
        Some(a) => (true, a.to_string()),
        None => (false, proj.clone()),
    };
    let act = if act_name == "gelu" && gated {
        // T5Config maps "gated-gelu" to gelu_new (the tanh approximation, Python ops).
        Activation::GeluNewPython
    } else {
        activation(r.path, &act_name, "feed_forward_proj")?
    };
    let drop = r.f64_or(&["dropout_rate"], 0.1)?;
    r.raw(&[
        "layer_norm_epsilon",
        "relative_attention_max_distance",
        "decoder_start_token_id",
    ]);
    let stack = |layers| Stack {
        layers,
        heads,
        kv_heads: heads,
        head_dim,
        intermediate_size: ff,
    };
    Ok(ModelSpec {
        name: String::new(),
        family: Family::T5,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: stack(r.opt_u64(&["num_decoder_layers"])?.unwrap_or(layers)),
        encoder: Some(stack(layers)),
        gated_ffn: gated,
        activation: act,
        norm: Norm::T5RmsNorm,
        post_norm: false,
        positions: Positions::RelativeBias {
            buckets: r
                .opt_u64(&["relative_attention_num_buckets"])?
                .unwrap_or(32),
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: false,
        linear_bias: false,
        parallel_block: false,
        fused_qkv: false,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: drop,
            attention: drop,
            residual: drop,
            activation: drop,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}

fn bart(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["d_model"])?;
    let act = r.str_or(&["activation_function"], "gelu")?;
    let enc_heads = r.u64(&["encoder_attention_heads"])?;
    let dec_heads = r.u64(&["decoder_attention_heads"])?;
    r.raw(&["scale_embedding", "init_std"]);
    let stack = |layers, heads: u64, ff| Stack {
        layers,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads.max(1),
        intermediate_size: ff,
    };
    Ok(ModelSpec {
        name: String::new(),
        family: Family::Bart,
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: stack(
            r.u64(&["decoder_layers"])?,
            dec_heads,
            r.u64(&["decoder_ffn_dim"])?,
        ),
        encoder: Some(stack(
            r.u64(&["encoder_layers"])?,
            enc_heads,
            r.u64(&["encoder_ffn_dim"])?,
        )),
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        post_norm: true,
        // BartLearnedPositionalEmbedding keeps 2 extra rows (the offset).
        positions: Positions::Learned {
            rows: r.u64(&["max_position_embeddings"])? + 2,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        parallel_block: false,
        fused_qkv: false,
        lm_head_bias: false,
        dropout: Dropouts {
            embedding: r.f64_or(&["dropout"], 0.1)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["dropout"], 0.1)?,
            activation: r.f64_or(&["activation_dropout"], 0.0)?,
        },
        published_params: None,
        context: None,
        moe: None,
        qk_norm: false,
        parallel_two_norms: false,
    })
}
