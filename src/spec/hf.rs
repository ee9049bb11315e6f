//! Reading a Hugging Face `config.json` (or a `models/*.toml` with the same field names) into a
//! [`ModelSpec`]. Field names and defaults follow each transformers configuration class.

use crate::error::{Error, Result, did_you_mean};
use crate::spec::model::{
    Activation, AttentionGate, DeltaNet, Dropouts, DtBcNorms, ExpertGate, Family, FfnKind,
    GatedNorm, GlobalAttention, Indexer, Mixer, Mla, ModelSpec, Moe, Multipliers, Norm,
    NormPlacement, PerLayerInput, Positions, QkNorm, QueryScale, ReturnedWeights, RotaryApply,
    RouterPrecision, Routing, RoutingWeights, ShortConv, Softcap, Ssd, Ssm, Stack, VisionTower,
};
use crate::units::Bytes;
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
    /// The config's `model_type`, which tells apart the types one reader serves.
    fn model_type(&self) -> Option<&'a str> {
        self.map.get("model_type").and_then(Value::as_str)
    }

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

    /// A count that configs may also give as "auto" (Mamba's `time_step_rank`, the Mamba-2
    /// head width): `auto` when absent or "auto", the count otherwise.
    fn u64_or_auto(&self, key: &'static str, auto: u64) -> Result<u64> {
        match self.raw(&[key]) {
            Some((_, Value::String(s))) if s == "auto" => Ok(auto),
            _ => Ok(self.opt_u64(&[key])?.unwrap_or(auto)),
        }
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
                self.in_range(key, p)
            }
        }
    }

    /// The one place config floats get their ranges, by what the key names.
    fn in_range(&self, key: &str, p: f64) -> Result<f64> {
        let (ok, range) = if key.contains("drop") || key.contains("noise") {
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

    fn opt_f64(&self, keys: &[&'static str]) -> Result<Option<f64>> {
        match self.raw(keys) {
            None => Ok(None),
            Some(_) => self.f64_or(keys, 0.0).map(Some),
        }
    }

    fn bool_or(&self, keys: &[&'static str], default: bool) -> Result<bool> {
        Ok(self.opt_bool(keys)?.unwrap_or(default))
    }

    fn opt_bool(&self, keys: &[&'static str]) -> Result<Option<bool>> {
        match self.raw(keys) {
            None => Ok(None),
            Some((key, value)) => value.as_bool().map(Some).ok_or_else(|| {
                Error::field(
                    self.path,
                    key,
                    format!("must be true or false, found `{value}`"),
                )
            }),
        }
    }

    /// Reads the nested object under `key` (MPT's `attn_config`) with its own reader; errors name
    /// the field as `key.field`. `None` when the key is absent or null.
    fn nested<T>(
        &self,
        key: &'static str,
        read: impl FnOnce(&Reader) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some((_, value)) = self.raw(&[key]) else {
            return Ok(None);
        };
        let map = value.as_object().ok_or_else(|| {
            Error::field(
                self.path,
                key,
                format!("must be an object, found `{value}`"),
            )
        })?;
        let inner = Reader {
            path: self.path,
            map,
            seen: RefCell::new(BTreeSet::new()),
        };
        read(&inner)
            .map(Some)
            .map_err(|e| e.map_field(|field| format!("{key}.{field}")))
    }

    fn str_or(&self, keys: &[&'static str], default: &'static str) -> Result<String> {
        match self.raw(keys) {
            None => Ok(default.to_string()),
            Some((key, value)) => value.as_str().map(str::to_string).ok_or_else(|| {
                Error::field(self.path, key, format!("must be a string, found `{value}`"))
            }),
        }
    }

    /// A string that must be one of `choices` (the first is the default), as a config class
    /// that raises on any other value reads it.
    fn one_of(&self, key: &'static str, choices: &[&'static str]) -> Result<&'static str> {
        let value = self.str_or(&[key], choices[0])?;
        choices
            .iter()
            .find(|c| **c == value)
            .copied()
            .ok_or_else(|| {
                let listed: Vec<String> = choices.iter().map(|c| format!("`{c}`")).collect();
                Error::field(
                    self.path,
                    key,
                    format!("`{value}` is not {}", listed.join(" or ")),
                )
            })
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
    if model_type == "gemma3" {
        return gemma3_checkpoint(path, map, name);
    }
    // Multimodal checkpoints that `AutoModelForCausalLM` builds as their language model alone
    // (transformers 5.17's MODEL_FOR_CAUSAL_LM_MAPPING: `llama4` -> Llama4ForCausalLM, `qwen3_5`
    // -> Qwen3_5ForCausalLM, `qwen3_5_moe` -> Qwen3_5MoeForCausalLM; the same parameter count as
    // the text config's own model, checked on the meta device): the `text_config` is the model.
    let text_only = match model_type.as_str() {
        "llama4" => Some("llama4_text"),
        "qwen3_5" => Some("qwen3_5_text"),
        "qwen3_5_moe" => Some("qwen3_5_moe_text"),
        _ => None,
    };
    if let Some(text_type) = text_only {
        let mut text = nested(path, map, "text_config", &model_type)?.clone();
        text.entry("model_type")
            .or_insert_with(|| Value::from(text_type));
        return parse_config(path, &Value::Object(text), name, false)
            .map_err(|e| e.map_field(|f| format!("text_config.{f}")));
    }
    // The table's entry: its static name (kept on the spec for peft's tables) and family.
    let entry = Family::ALL.iter().find(|(n, _)| *n == model_type).copied();
    let (known_type, family) = entry.ok_or_else(|| {
        let error = Error::field(
            path,
            "model_type",
            format!("`{model_type}` is not supported"),
        );
        // A multimodal wrapper (Gemma-3 4B and up, Llama-4, Qwen2.5-VL, ...) nests its language
        // model's config; that one may be readable on its own.
        let text = r
            .map
            .get("text_config")
            .and_then(|t| t.get("model_type"))
            .and_then(Value::as_str);
        match text {
            Some(t) if super::value_in(&Family::ALL, t).is_some() => error.with_hint(format!(
                "`{model_type}` wraps a `{t}` language model in `text_config`: save that object \
                 as its own config.json to plan the text model (the vision tower's weights are \
                 then not counted)"
            )),
            _ => error.with_hint(supported()),
        }
    })?;
    let mut spec = match family {
        Family::Llama
        | Family::Mistral
        | Family::Qwen2
        | Family::Gemma
        | Family::Mixtral
        | Family::Phimoe
        | Family::Nemotron
        | Family::Arcee
        | Family::Apertus
        | Family::MinimaxM2
        | Family::Dots1
        | Family::Gemma4
        | Family::Lfm2
        | Family::Lfm2Moe
        | Family::GraniteMoeHybrid
        | Family::GraniteMoe
        | Family::Bamba
        | Family::Llama4
        | Family::Ernie45
        | Family::Ministral3
        | Family::Ernie45Moe
        | Family::HunyuanMoe
        | Family::Qwen35
        | Family::Qwen35Moe
        | Family::Qwen3Next
        | Family::Phi3
        | Family::Qwen3
        | Family::Gemma2
        | Family::VaultGemma
        | Family::Gemma3
        | Family::Olmo2
        | Family::NanoChat
        | Family::Granite
        | Family::Exaone4
        | Family::ExaoneMoe
        | Family::Afmoe
        | Family::Qwen2Moe
        | Family::Qwen3Moe
        | Family::Mellum
        | Family::HyV3
        | Family::GptOss
        | Family::Glm4Moe
        | Family::SolarOpen
        | Family::Glm4
        | Family::Glm
        | Family::Jais2
        | Family::SeedOss
        | Family::HunyuanDense
        | Family::Helium
        | Family::Olmoe
        | Family::FlexOlmo
        | Family::Cohere
        | Family::Cohere2
        | Family::Cohere2Moe
        | Family::Cwm
        | Family::HyperClovaX
        | Family::StableLm
        | Family::Olmo => llama_like(&r, family)?,
        Family::Starcoder2 => starcoder2(&r)?,
        Family::Bloom => bloom(&r)?,
        Family::Mpt => mpt(&r)?,
        Family::Deepseek | Family::Mistral4 | Family::MiniCpm3 | Family::Youtu | Family::Axk1 => {
            deepseek(&r, family)?
        }
        Family::Mamba | Family::FalconMamba => mamba(&r, family)?,
        Family::Mamba2 => mamba2(&r)?,
        Family::NemotronH => nemotron_h(&r)?,
        Family::FalconH1 => falcon_h1(&r)?,
        Family::Jamba => jamba(&r)?,
        Family::Gpt2 | Family::GptBigcode => gpt2(&r, family)?,
        Family::Opt => opt(&r)?,
        Family::Phi => phi(&r)?,
        Family::GptNeo => gpt_neo(&r)?,
        Family::Gptj | Family::Codegen => gptj(&r, family)?,
        Family::Falcon => falcon(&r)?,
        Family::T5 | Family::Mt5 => t5(&r, family)?,
        Family::Bart | Family::Mbart | Family::Marian | Family::Pegasus => bart(&r, family)?,
        Family::Palm => palm(&r)?,
        Family::GptNeox => gpt_neox(&r)?,
    };
    spec.name = name.to_string();
    spec.model_type = known_type;
    spec.published_params = map.get("params").and_then(serde_json::Value::as_u64);
    spec.context = [
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "max_seq_len",
    ]
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

/// A multimodal checkpoint's nested config object (`text_config`, `vision_config`).
fn nested<'a>(
    path: &str,
    map: &'a Map<String, Value>,
    key: &str,
    model_type: &str,
) -> Result<&'a Map<String, Value>> {
    match map.get(key) {
        Some(Value::Object(o)) => Ok(o),
        found => Err(Error::field(
            path,
            key,
            match found {
                None | Some(Value::Null) => "is missing".to_string(),
                Some(v) => format!("must be an object, found `{v}`"),
            },
        )
        .with_hint(format!(
            "a `{model_type}` checkpoint nests its language model in `text_config` and its \
             vision tower in `vision_config`"
        ))),
    }
}

/// A Gemma 3 multimodal checkpoint (`Gemma3Config`, 4B and up): the language model from
/// `text_config` and the SigLIP tower from `vision_config`, which text-only training loads and
/// never runs. A saved config keeps only the values that differ from the defaults, so the
/// keys `text_config` leaves out take `Gemma3TextConfig`'s (transformers 5.17).
fn gemma3_checkpoint(path: &str, map: &Map<String, Value>, name: &str) -> Result<ModelSpec> {
    let nested = |key: &str| nested(path, map, key, "gemma3");
    let mut text: Map<String, Value> = [
        ("vocab_size", serde_json::json!(262_208)),
        ("hidden_size", serde_json::json!(2304)),
        ("intermediate_size", serde_json::json!(9216)),
        ("num_hidden_layers", serde_json::json!(26)),
        ("num_attention_heads", serde_json::json!(8)),
        ("num_key_value_heads", serde_json::json!(4)),
        ("head_dim", serde_json::json!(256)),
        ("hidden_activation", serde_json::json!("gelu_pytorch_tanh")),
        ("max_position_embeddings", serde_json::json!(131_072)),
        ("query_pre_attn_scalar", serde_json::json!(256)),
        ("sliding_window", serde_json::json!(4096)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    text.extend(nested("text_config")?.clone());
    text.insert("model_type".into(), Value::from("gemma3_text"));
    // The tie is the checkpoint's (`Gemma3Config.tie_word_embeddings`, true by default; the
    // LM head shares `language_model.embed_tokens`).
    let tie = map
        .get("tie_word_embeddings")
        .cloned()
        .unwrap_or(Value::Bool(true));
    text.insert("tie_word_embeddings".into(), tie);
    let mut spec = parse_config(path, &Value::Object(text), name, false)
        .map_err(|e| e.map_field(|f| format!("text_config.{f}")))?;
    let vision = nested("vision_config")?;
    let tower = siglip(path, vision, spec.hidden_size)
        .map_err(|e| e.map_field(|f| format!("vision_config.{f}")))?;
    // `SiglipVisionEmbeddings` registers `position_ids`, an int64 `arange` over the patches,
    // as a (non-persistent) buffer: it moves to the GPU with the model.
    spec.buffers += Bytes(tower.patches.saturating_mul(8));
    spec.vision = Some(tower);
    Ok(spec)
}

/// transformers' `SiglipVisionModel` (5.17) and Gemma 3's projector, counted from their modules:
/// the patch embedding (a `Conv2d` of `patch_size` with a bias) and a position table of
/// `(image_size / patch_size)^2` rows; per encoder layer two LayerNorms, biased `q_proj`,
/// `k_proj`, `v_proj` and `out_proj`, and the MLP's biased `fc1` and `fc2`; the final LayerNorm;
/// the attention-pooling head unless `vision_use_head` is false (a probe, an
/// `nn.MultiheadAttention`, a LayerNorm and an MLP); then `Gemma3MultiModalProjector`'s
/// `mm_input_projection_weight` (vision width by text width) and its RMSNorm's scale.
fn siglip(path: &str, map: &Map<String, Value>, text_hidden: u64) -> Result<VisionTower> {
    let r = Reader {
        path,
        map,
        seen: RefCell::new(BTreeSet::new()),
    };
    let kind = r.str_or(&["model_type"], "siglip_vision_model")?;
    if kind != "siglip_vision_model" {
        return Err(Error::field(
            path,
            "model_type",
            format!("`{kind}` is not modelled as a vision tower"),
        )
        .with_hint("Gemma 3's tower is `siglip_vision_model`"));
    }
    let size = |key: &'static str, default: u64| -> Result<u64> {
        Ok(r.opt_u64(&[key])?.unwrap_or(default))
    };
    let h = size("hidden_size", 768)?;
    let i = size("intermediate_size", 3072)?;
    let layers = size("num_hidden_layers", 12)?;
    let channels = size("num_channels", 3)?;
    let image = size("image_size", 224)?;
    let patch = size("patch_size", 16)?;
    if patch > image {
        return Err(Error::field(
            path,
            "patch_size",
            format!("({patch}) is larger than the image ({image})"),
        ));
    }
    // `SiglipVisionModel`: `vision_use_head` where the config has it, the head otherwise.
    let head = match r.raw(&["vision_use_head"]) {
        None => true,
        Some((key, v)) => v.as_bool().ok_or_else(|| {
            Error::field(path, key, format!("must be true or false, found `{v}`"))
        })?,
    };
    let (h, i) = (u128::from(h), u128::from(i));
    let patches = u128::from(image / patch).pow(2);
    let mlp = (h * i + i) + (i * h + h);
    let layer = 2 * 2 * h + 4 * (h * h + h) + mlp;
    let pooling = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + mlp;
    let params = u128::from(channels) * h * u128::from(patch).pow(2)
        + h
        + patches * h
        + u128::from(layers) * layer
        + 2 * h
        + if head { pooling } else { 0 }
        + h * u128::from(text_hidden)
        + h;
    if params > MAX_PARAMS {
        return Err(Error::field(
            path,
            "hidden_size",
            format!(
                "with these sizes the tower has about {params} parameters; the most accepted is 1e14"
            ),
        ));
    }
    Ok(VisionTower {
        model_type: "siglip_vision_model",
        params: params as u64,
        patches: patches as u64,
        layers,
        hidden: h as u64,
        intermediate: i as u64,
        head,
    })
}

fn supported() -> String {
    let names: Vec<&str> = Family::ALL.iter().map(|(n, _)| *n).collect();
    format!("supported model types: {}", names.join(", "))
}

/// Heads must tile the hidden size when no explicit head_dim is given, and KV heads must divide
/// heads (grouped-query attention shares each KV head among a whole group).
fn check_heads(path: &str, s: &Stack, hidden: u64, r: &Reader) -> Result<()> {
    // Multi-head latent attention's heads are `qk_nope_head_dim + qk_rope_head_dim` wide
    // whatever the hidden size (GLM-4.7-Flash: 20 heads of 256 over 2,048).
    let explicit_head_dim = r.map.contains_key("head_dim")
        || r.map.contains_key("d_kv")
        || r.map.contains_key("qk_nope_head_dim");
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
        // `GELUActivation` (`nn.functional.gelu`) and `GELUTanh` (its tanh form); the Python
        // forms are chains of element-wise ops (transformers' `activations.py`).
        "gelu" | "gelu_pytorch_tanh" => Activation::Gelu,
        "gelu_new" | "gelu_accurate" | "gelu_python_tanh" => Activation::GeluNewPython,
        "gelu_fast" => Activation::GeluFastPython,
        "gelu_python" => Activation::GeluErfPython,
        "quick_gelu" => Activation::QuickGelu,
        "relu" => Activation::Relu,
        "relu2" => Activation::Relu2,
        "xielu" => Activation::Xielu,
        other => {
            return Err(
                Error::field(path, key, format!("activation `{other}` is not supported"))
                    .with_hint(
                        "one of silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, gelu_python, \
                         gelu_accurate, gelu_python_tanh, quick_gelu, relu, relu2, xielu",
                    ),
            );
        }
    })
}

/// A per-layer list (`layer_types`, `no_rope_layers`) must have one entry per layer.
fn one_per_layer(r: &Reader, key: &str, list: &[Value], layers: u64) -> Result<()> {
    if list.len() as u64 == layers {
        return Ok(());
    }
    Err(Error::field(
        r.path,
        key,
        format!("lists {} layers; the model has {layers}", list.len()),
    ))
}

/// Gated DeltaNet's sizes for a family with linear-attention layers (Qwen3_5TextConfig's
/// `linear_*` keys and defaults), `None` for every other family.
fn delta_net(r: &Reader, family: Family) -> Result<Option<DeltaNet>> {
    if !family.gated_delta_net() {
        return Ok(None);
    }
    let d = DeltaNet {
        key_heads: r.opt_u64(&["linear_num_key_heads"])?.unwrap_or(16),
        value_heads: r.opt_u64(&["linear_num_value_heads"])?.unwrap_or(32),
        key_dim: r.opt_u64(&["linear_key_head_dim"])?.unwrap_or(128),
        value_dim: r.opt_u64(&["linear_value_head_dim"])?.unwrap_or(128),
        conv: r.opt_u64(&["linear_conv_kernel_dim"])?.unwrap_or(4),
        fused: family == Family::Qwen3Next,
    };
    // `repeat_interleave(num_v_heads // num_k_heads)` gives every value head a query and key
    // head: anything else fails in the model's forward.
    if !d.value_heads.is_multiple_of(d.key_heads) {
        return Err(Error::field(
            r.path,
            "linear_num_value_heads",
            format!(
                "({}) is not a multiple of linear_num_key_heads ({})",
                d.value_heads, d.key_heads
            ),
        ));
    }
    Ok(Some(d))
}

/// Granite 4.0's Mamba-2 layers (`GraniteMoeHybridConfig`'s `mamba_*` keys and defaults:
/// 128 heads, `mamba_d_head` "auto" = expand x hidden / heads, state 256, one group, a 4-tap
/// convolution with a bias, chunks of 256, no projection biases), `None` for other families.
fn granite_ssd(r: &Reader, family: Family) -> Result<Option<Ssd>> {
    // BambaMixer is GraniteMoeHybridMambaLayer under the same keys and defaults.
    if !matches!(family, Family::GraniteMoeHybrid | Family::Bamba) {
        return Ok(None);
    }
    let hidden = r.u64(&["hidden_size"])?;
    let inner = hidden.saturating_mul(r.opt_u64(&["mamba_expand"])?.unwrap_or(2));
    let ssd = mamba_prefixed_ssd(r, (inner, "expand x hidden_size"))?;
    r.raw(&["time_step_limit", "normalization_function", "init_method"]);
    Ok(Some(ssd))
}

/// A Mamba-2 mixer under the `mamba_*` keys Granite 4.0 and Falcon-H1 share (their config
/// classes' defaults: 128 heads, `mamba_d_head` "auto" = inner / heads, state 256, one group, a
/// 4-tap convolution with a bias, chunks of 256, no projection bias), `inner` channels wide.
fn mamba_prefixed_ssd(r: &Reader, inner: (u64, &str)) -> Result<Ssd> {
    let heads = r.opt_u64(&["mamba_n_heads"])?.unwrap_or(128);
    let head_dim = r.u64_or_auto("mamba_d_head", inner.0 / heads.max(1))?;
    read_ssd(
        r,
        (heads, head_dim, inner),
        [
            (&["mamba_d_state"], 256),
            (&["mamba_n_groups"], 1),
            (&["mamba_d_conv"], 4),
            (&["mamba_chunk_size"], 256),
        ],
        [
            &["mamba_n_heads"],
            &["mamba_proj_bias"],
            &["mamba_conv_bias"],
        ],
    )
}

/// Mamba-2's mixer sizes under each config class's key names and defaults (Mamba2Config's,
/// GraniteMoeHybridConfig's `mamba_*`): heads, their width and the inner width they must tile
/// as read by the caller; the state, groups, convolution taps and chunk, keys with defaults;
/// the heads' key (for errors), the projections' and the convolution's bias keys. Checked as
/// `validate_architecture` checks them (the heads tile the inner width), and as the scan needs
/// (the groups divide the heads, a chunk holds a token).
fn read_ssd(
    r: &Reader,
    (heads, head_dim, (inner, inner_name)): (u64, u64, (u64, &str)),
    [state, groups, conv, chunk]: [(&[&'static str], u64); 4],
    [heads_key, bias_key, conv_bias_key]: [&[&'static str]; 3],
) -> Result<Ssd> {
    let bias = r.bool_or(bias_key, false)?;
    let ssd = Ssd {
        heads,
        head_dim,
        state: r.opt_u64(state.0)?.unwrap_or(state.1),
        groups: r.opt_u64(groups.0)?.unwrap_or(groups.1),
        conv: r.opt_u64(conv.0)?.unwrap_or(conv.1),
        chunk: r.opt_u64(chunk.0)?.unwrap_or(chunk.1),
        bias,
        conv_bias: r.bool_or(conv_bias_key, true)?,
        norm_groups: 1,
        gated_norm: GatedNorm::GateThenNorm,
        out_bias: bias,
        mup: false,
    };
    let (heads_key, groups_key, chunk_key) = (heads_key[0], groups.0[0], chunk.0[0]);
    if ssd.heads.checked_mul(ssd.head_dim) != Some(inner) || inner == 0 {
        return Err(Error::field(
            r.path,
            heads_key,
            format!(
                "x the head width ({} x {}) must equal the inner width, {inner_name} ({inner})",
                ssd.heads, ssd.head_dim
            ),
        ));
    }
    if ssd.groups == 0 || !ssd.heads.is_multiple_of(ssd.groups) {
        return Err(Error::field(
            r.path,
            groups_key,
            format!("({}) must divide the heads ({})", ssd.groups, ssd.heads),
        ));
    }
    if ssd.chunk == 0 {
        return Err(Error::field(r.path, chunk_key, "must be at least 1"));
    }
    Ok(ssd)
}

/// LFM2's short-convolution sizes (Lfm2Config's `conv_L_cache`, 3, and `conv_bias`, false),
/// `None` for every other family.
fn lfm2_short_conv(r: &Reader, family: Family) -> Result<Option<ShortConv>> {
    if !family.is_lfm2() {
        return Ok(None);
    }
    Ok(Some(ShortConv {
        taps: r.opt_u64(&["conv_L_cache"])?.unwrap_or(3),
        bias: r.bool_or(&["conv_bias"], false)?,
    }))
}

/// Llama 4's chunked layers (`attention_chunk_size`, 8,192 when absent, none when null), `None`
/// for every other family. Each query sees the keys of its own chunk only; modelled as a window
/// of the chunk's length: both take SDPA's causal path when the sequence fits in one, and an
/// explicit mask when it does not (where a window's keys per query are the chunk's at most).
fn llama4_chunked(r: &Reader, family: Family) -> Result<Option<Mixer>> {
    if family != Family::Llama4 {
        return Ok(None);
    }
    Ok(Some(match r.map.get("attention_chunk_size") {
        Some(Value::Null) => {
            r.raw(&["attention_chunk_size"]);
            Mixer::Attention
        }
        _ => Mixer::SlidingWindow {
            window: r.opt_u64(&["attention_chunk_size"])?.unwrap_or(8192),
        },
    }))
}

/// LFM2's MLP width (`Lfm2MLP.__init__`): `block_ff_dim` (or `intermediate_size`), and with
/// `block_auto_adjust_ff_dim` (the default) two thirds of it, times `block_ffn_dim_multiplier`
/// when set, rounded up to a multiple of `block_multiple_of` (Llama's SwiGLU sizing).
fn lfm2_intermediate(r: &Reader) -> Result<u64> {
    let stated = r
        .opt_u64(&["block_ff_dim", "intermediate_size"])?
        .unwrap_or(12288);
    if !r.bool_or(&["block_auto_adjust_ff_dim"], true)? {
        return Ok(stated);
    }
    let two_thirds = 2 * stated / 3;
    // An explicit null skips the multiplier and the rounding; absent, it is 1.0.
    if r.map
        .get("block_ffn_dim_multiplier")
        .is_some_and(Value::is_null)
    {
        return Ok(two_thirds);
    }
    let m = match r.raw(&["block_ffn_dim_multiplier"]) {
        None => 1.0,
        Some((key, m)) => m
            .as_f64()
            .filter(|m| m.is_finite() && *m > 0.0)
            .ok_or_else(|| {
                Error::field(
                    r.path,
                    key,
                    format!("must be a positive number, found `{m}`"),
                )
            })?,
    };
    let multiple = r.opt_u64(&["block_multiple_of"])?.unwrap_or(256);
    // `int(multiplier * size)` truncates, then the rounding up.
    let scaled = m * two_thirds as f64;
    (scaled < 2f64.powi(53))
        .then(|| (scaled as u64).div_ceil(multiple).checked_mul(multiple))
        .flatten()
        .ok_or_else(|| {
            Error::field(
                r.path,
                "block_ffn_dim_multiplier",
                format!("({m}) makes the MLP wider than any model"),
            )
        })
}

/// Attention mixers by layer: the config's `layer_types` where it lists them (transformers 5
/// writes it for every family with local layers), else the family's rule over `sliding_window`.
/// A rule's period is cut at the model's depth: a model shallower than it has only the layers
/// its config derives (a 1-layer Gemma 3's `layer_types` is one sliding layer), and the
/// per-type parts read the whole period (`ModelSpec::attention_kinds`: a rotary table pair and
/// eager attention's mask per type present).
fn mixers(r: &Reader, family: Family, layers: u64) -> Result<Vec<Mixer>> {
    let mut v = mixer_rule(r, family, layers)?;
    v.truncate(layers.max(1) as usize);
    Ok(v)
}

fn mixer_rule(r: &Reader, family: Family, layers: u64) -> Result<Vec<Mixer>> {
    // Qwen2-MoE writes `sliding_window: 0` when it is off.
    let window = match r.raw(&["sliding_window"]) {
        Some((_, v)) if v.as_u64() == Some(0) => None,
        // CwmConfig and MellumConfig: windows of 8,192 and 1,024 when the key is absent.
        None if family == Family::Cwm => Some(8192),
        None if family == Family::Mellum => Some(1024),
        _ => r.opt_u64(&["sliding_window"])?,
    };
    // `use_sliding_window: false` turns the window off; absent, it is on where `layer_types`
    // lists sliding layers and by the family's rule, except Qwen's, whose configs default it off.
    let qwen = matches!(
        family,
        Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe
    );
    let flag = r.opt_bool(&["use_sliding_window"])?;
    let linear = delta_net(r, family)?;
    let short_conv = lfm2_short_conv(r, family)?;
    let chunked = llama4_chunked(r, family)?;
    let ssd = granite_ssd(r, family)?;
    // Qwen3_5TextConfig: without `layer_types`, layer i is full attention when (i + 1) is a
    // multiple of `full_attention_interval` (4), linear otherwise (read either way: configs
    // write both).
    let every = match linear {
        Some(_) => r.opt_u64(&["full_attention_interval"])?.unwrap_or(4),
        None => 1,
    };
    if let Some((key, Value::Array(list))) = r.raw(&["layer_types"]) {
        let window = window.filter(|_| flag != Some(false));
        one_per_layer(r, key, list, layers)?;
        return list
            .iter()
            .map(|t| match (t.as_str(), window, linear) {
                (Some("full_attention"), _, _) => Ok(Mixer::Attention),
                // GraniteMoeHybridConfig's names, which transformers remaps to these
                // (`remap_legacy_layer_types`).
                (Some("attention"), _, _) if ssd.is_some() => Ok(Mixer::Attention),
                (Some("mamba" | "linear_attention"), _, _) if let Some(s) = ssd => {
                    Ok(Mixer::Ssd(s))
                }
                (Some("conv"), _, _) if let Some(c) = short_conv => Ok(Mixer::ShortConv(c)),
                (Some("chunked_attention"), _, _) if let Some(c) = chunked => Ok(c),
                (Some("sliding_attention"), Some(w), _) => Ok(Mixer::SlidingWindow { window: w }),
                (Some("sliding_attention"), None, _) => Err(Error::field(
                    r.path,
                    "sliding_window",
                    "is missing; `layer_types` has sliding_attention layers",
                )),
                (Some("linear_attention"), _, Some(d)) => Ok(Mixer::GatedDeltaNet(d)),
                _ => Err(
                    Error::field(r.path, key, format!("`{t}` is not a known layer type"))
                        .with_hint(if linear.is_some() || ssd.is_some() {
                            "full_attention or linear_attention"
                        } else if short_conv.is_some() {
                            "full_attention or conv"
                        } else {
                            "full_attention or sliding_attention"
                        }),
                ),
            })
            .collect();
    }
    if let Some(s) = ssd {
        // BambaConfig without `layer_types`: attention at `attn_layer_indices`, Mamba-2
        // elsewhere (all of them when it is absent); GraniteMoeHybridConfig without
        // `layer_types`: every layer is Mamba-2.
        if family == Family::Bamba
            && let Some((key, indices)) =
                r.raw(&["attn_layer_indices"]).filter(|(_, v)| !v.is_null())
        {
            let Value::Array(indices) = indices else {
                return Err(Error::field(r.path, key, "must be a list of layer indices"));
            };
            return attention_at(r, (key, indices), layers, Mixer::Ssd(s));
        }
        return Ok(vec![Mixer::Ssd(s)]);
    }
    if let Some(d) = linear {
        let mut v = vec![Mixer::GatedDeltaNet(d); every.saturating_sub(1).min(layers) as usize];
        v.push(Mixer::Attention);
        return Ok(v);
    }
    if let Some(chunked) = chunked {
        // Llama4TextConfig without `layer_types`: chunked where rotary applies, full on the
        // NoPE layers.
        let rope = rope_layers(r, family, (&[], 0), layers)?;
        return Ok(rope
            .iter()
            .map(|&rope| if rope { chunked } else { Mixer::Attention })
            .collect());
    }
    if let Some(c) = short_conv {
        // Lfm2Config without `layer_types`: attention on the layers `full_attn_idxs` lists
        // (all of them when it is absent), convolutions elsewhere.
        let Some((key, Value::Array(idxs))) = r.raw(&["full_attn_idxs"]) else {
            return Ok(vec![Mixer::Attention]);
        };
        return attention_at(r, (key, idxs), layers, Mixer::ShortConv(c));
    }
    let Some(w) = window.filter(|_| flag.unwrap_or(!qwen)) else {
        return Ok(vec![Mixer::Attention]);
    };
    let local = Mixer::SlidingWindow { window: w };
    Ok(match family {
        // Gemma2Config and VaultGemmaConfig: even layers (0, 2, ...) slide, odd ones attend
        // globally.
        Family::Gemma2 | Family::VaultGemma => vec![local, Mixer::Attention],
        // Exaone4Config (and ExaoneMoeConfig, its subclass): `sliding_window_pattern` 4 (or
        // "LLLG"): every fourth layer global.
        Family::Exaone4 | Family::ExaoneMoe => {
            let pattern: Vec<Mixer> = match r.raw(&["sliding_window_pattern"]) {
                Some((_, Value::String(p))) => p
                    .chars()
                    .map(|c| if c == 'G' { Mixer::Attention } else { local })
                    .collect(),
                _ => every_nth_global(local, r.opt_u64(&["sliding_window_pattern"])?.unwrap_or(4)),
            };
            if pattern.is_empty() {
                vec![local]
            } else {
                pattern
            }
        }
        // Cohere2MoeConfig without `layer_types`: the `first_k_dense_replace` dense layers by
        // `prefix_dense_sliding_window_pattern` (1: all global), the others by
        // `sliding_window_pattern` (4), each counted from its own first layer.
        Family::Cohere2Moe => {
            let prefix = r
                .opt_u64(&["first_k_dense_replace"])?
                .unwrap_or(0)
                .min(layers);
            let prefix_every = r
                .opt_u64(&["prefix_dense_sliding_window_pattern"])?
                .unwrap_or(1);
            let every = r.opt_u64(&["sliding_window_pattern"])?.unwrap_or(4);
            let (head, rest) = (
                every_nth_global(local, prefix_every),
                every_nth_global(local, every),
            );
            head.iter()
                .cycle()
                .take(prefix as usize)
                .chain(rest.iter().cycle().take((layers - prefix) as usize))
                .copied()
                .collect()
        }
        // CwmConfig without `layer_types`: layer i global when i is a multiple of 4 (the first
        // of each four), local otherwise.
        Family::Cwm => {
            let mut v = vec![local; 4.min(layers) as usize];
            if let Some(first) = v.first_mut() {
                *first = Mixer::Attention;
            }
            v
        }
        // Gemma3TextConfig: `sliding_window_pattern` (6): five local layers, then a global one;
        // Cohere2Config the same rule with 4, AfmoeConfig with `global_attn_every_n_layers` (4).
        Family::Gemma3 | Family::Gemma4 | Family::Cohere2 | Family::Afmoe => {
            let pattern = match family {
                Family::Afmoe => r.opt_u64(&["global_attn_every_n_layers"])?.unwrap_or(4),
                Family::Cohere2 => r.opt_u64(&["sliding_window_pattern"])?.unwrap_or(4),
                _ => r.opt_u64(&["sliding_window_pattern"])?.unwrap_or(6),
            };
            every_nth_global(local, pattern)
        }
        // Qwen2/Qwen3 (and Dots1Config, which derives `layer_types` the same way): the window
        // on the layers from `max_window_layers` up.
        _ if qwen || family == Family::Dots1 => {
            let from = r.opt_u64(&["max_window_layers"])?.unwrap_or(layers);
            (0..layers)
                .map(|l| if l >= from { local } else { Mixer::Attention })
                .collect()
        }
        _ => vec![local],
    })
}

/// One period of "every `every`-th layer global, the others `local`" (layer i is global when
/// i + 1 is a multiple of `every`): `every - 1` local layers, then a global one ([`mixers`]
/// cuts it at the model's depth).
fn every_nth_global(local: Mixer, every: u64) -> Vec<Mixer> {
    let mut v = vec![local; every.saturating_sub(1) as usize];
    v.push(Mixer::Attention);
    v
}

/// `layers` mixers, `other` but attention at the layer indices the config's `key` lists
/// (LFM2's `full_attn_idxs`, Bamba's `attn_layer_indices`).
fn attention_at(
    r: &Reader,
    (key, indices): (&'static str, &[Value]),
    layers: u64,
    other: Mixer,
) -> Result<Vec<Mixer>> {
    let mut v = vec![other; layers as usize];
    for i in indices {
        match i.as_u64().filter(|&i| i < layers) {
            Some(i) => v[i as usize] = Mixer::Attention,
            None => {
                return Err(Error::field(
                    r.path,
                    key,
                    format!("`{i}` is not a layer index below {layers}"),
                ));
            }
        }
    }
    Ok(v)
}

/// Reads the shared mixture-of-experts keys (Mixtral, Qwen2/3-MoE, DeepSeek).
fn moe(r: &Reader, family: Family, intermediate: u64) -> Result<Option<Moe>> {
    let (experts_key, expert_inter) = match family {
        // MiniMaxM2Config: `intermediate_size` is each expert's width; every layer is sparse.
        Family::Mixtral | Family::Phimoe | Family::MinimaxM2 => ("num_local_experts", intermediate),
        Family::Deepseek | Family::Axk1 | Family::Mistral4 | Family::Glm4Moe | Family::Dots1 => {
            ("n_routed_experts", r.u64(&["moe_intermediate_size"])?)
        }
        // SolarOpenConfig: 128 routed experts of 1,280 by default.
        Family::SolarOpen => (
            "n_routed_experts",
            r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(1280),
        ),
        Family::Qwen2Moe
        | Family::Qwen3Moe
        | Family::Mellum
        | Family::Qwen35Moe
        | Family::Qwen3Next => ("num_experts", r.u64(&["moe_intermediate_size"])?),
        // Llama4TextConfig: `num_local_experts` (16) of `intermediate_size` (8,192); the dense
        // layers' width is `intermediate_size_mlp`.
        Family::Llama4 => (
            "num_local_experts",
            r.opt_u64(&["intermediate_size"])?.unwrap_or(8192),
        ),
        // Lfm2MoeConfig: 32 experts of 1,792 by default.
        Family::Lfm2Moe => (
            "num_experts",
            r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(1792),
        ),
        // OlmoeConfig and FlexOlmoConfig: `intermediate_size` is each expert's width; every
        // layer is sparse.
        Family::Olmoe | Family::FlexOlmo => ("num_experts", intermediate),
        // ExaoneMoeConfig: 64 routed experts of 1,024 by default.
        Family::ExaoneMoe => (
            "num_experts",
            r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(1024),
        ),
        // Cohere2MoeConfig: 8 of MixtralExperts, `intermediate_size` wide, 2 per token, by
        // default (the dense prefix's MLPs are `prefix_dense_intermediate_size` wide).
        Family::Cohere2Moe => ("num_experts", r.u64(&["intermediate_size"])?),
        // HYV3Config: 192 routed experts of 1,536 by default.
        Family::HyV3 => (
            "num_experts",
            r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(1536),
        ),
        // AfmoeConfig: 64 routed experts of 1,408, 6 per token, by default.
        Family::Afmoe => (
            "num_experts",
            r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(1408),
        ),
        // GraniteMoeHybridConfig: 8 experts of `intermediate_size` (11,008) by default, none
        // (the shared MLP alone) with `num_local_experts` 0.
        Family::GraniteMoeHybrid => {
            if r.raw(&["num_local_experts"])
                .is_some_and(|(_, v)| v.as_u64() == Some(0))
            {
                r.raw(&["num_experts_per_tok", "intermediate_size"]);
                return Ok(None);
            }
            (
                "num_local_experts",
                r.opt_u64(&["intermediate_size"])?.unwrap_or(11008),
            )
        }
        Family::GptOss => ("num_local_experts", intermediate),
        // GraniteMoeConfig: 8 experts of `intermediate_size` in every layer.
        Family::GraniteMoe => ("num_local_experts", intermediate),
        Family::Ernie45Moe => ("moe_num_experts", r.u64(&["moe_intermediate_size"])?),
        // HunYuanMoEV1Experts (MixtralExperts) and its shared MLP are `intermediate_size` wide;
        // the published configs' per-layer `moe_intermediate_size` list is not read by it.
        Family::HunyuanMoe => ("num_experts", intermediate),
        // Gemma4TextConfig: `enable_moe_block` adds the experts beside every layer's MLP.
        Family::Gemma4 if r.bool_or(&["enable_moe_block"], false)? => (
            "num_experts",
            r.u64(&["moe_intermediate_size", "expert_intermediate_size"])?,
        ),
        _ => return Ok(None),
    };
    // transformers 5 names Qwen3-MoE's count `num_local_experts` (`num_experts` maps to it).
    let experts = match (family, experts_key) {
        (Family::HunyuanMoe, key) => uniform_per_layer(r, key)?,
        (_, "n_routed_experts") => r.u64(&["n_routed_experts"])?,
        (_, "moe_num_experts") => r.u64(&["moe_num_experts", "num_experts"])?,
        (Family::Afmoe, _) => r.opt_u64(&["num_experts"])?.unwrap_or(64),
        (Family::Cohere2Moe, _) => r.opt_u64(&["num_experts"])?.unwrap_or(8),
        (Family::GraniteMoeHybrid | Family::GraniteMoe, _) => {
            r.opt_u64(&["num_local_experts"])?.unwrap_or(8)
        }
        _ => r.u64(&["num_experts", "num_local_experts"])?,
    };
    // GPT-OSS's published config also writes `experts_per_token` (the original checkpoint's
    // name); GptOssConfig's own key and default (4) is `num_experts_per_tok`.
    let top_k = match family {
        Family::GptOss => r
            .opt_u64(&["num_experts_per_tok", "experts_per_token"])?
            .unwrap_or(4),
        Family::Ernie45Moe => r.u64(&["moe_k", "num_experts_per_tok"])?,
        Family::HunyuanMoe => uniform_per_layer(r, "moe_topk")?,
        Family::Gemma4 => r.u64(&["top_k_experts", "num_experts_per_tok"])?,
        Family::Llama4 => r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(1),
        Family::Afmoe => r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(6),
        Family::Cohere2Moe => r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(2),
        Family::GraniteMoeHybrid | Family::GraniteMoe => {
            r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(2)
        }
        _ => r.u64(&["num_experts_per_tok"])?,
    };
    check_top_k(r, experts, top_k)?;
    // Input jitter, in training only: MixtralSparseMoeBlock multiplies its input by noise when
    // `router_jitter_noise` > 0; PhimoeSparseMoeBlock and then PhimoeTopKRouter each do when
    // `input_jitter_noise` > 0 (PhiMoE's `router_jitter_noise` is sparsemixer's threshold).
    let input_jitter = match family {
        Family::Mixtral | Family::MinimaxM2 if r.f64_or(&["router_jitter_noise"], 0.0)? > 0.0 => 1,
        Family::Phimoe if r.f64_or(&["input_jitter_noise"], 0.0)? > 0.0 => 2,
        _ => 0,
    };
    r.raw(&[
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
        "input_jitter_noise",
        "norm_topk_prob",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "topk_method",
        "scoring_func",
        "moe_layer_freq",
        "aux_loss_alpha",
        "seq_aux",
        // AFMoE's `top_scores * route_scale`: one multiply of the (tokens, k) weights.
        "route_scale",
        // Hy3's `top_k_weights * router_scaling_factor`, the same.
        "router_scaling_factor",
    ]);
    let (shared, gate) = match family {
        // Qwen3_5MoeSparseMoeBlock and Qwen3NextSparseMoeBlock are Qwen2-MoE's.
        Family::Qwen2Moe | Family::Qwen35Moe | Family::Qwen3Next => {
            (r.u64(&["shared_expert_intermediate_size"])?, true)
        }
        Family::Deepseek | Family::Axk1 | Family::Mistral4 | Family::Glm4Moe | Family::Dots1 => (
            r.opt_u64(&["n_shared_experts"])?.unwrap_or(0) * expert_inter,
            false,
        ),
        // ExaoneMoeSparseMoEBlock: one MLP of `moe_intermediate_size` x `num_shared_experts` (1).
        Family::ExaoneMoe => (
            r.opt_u64(&["num_shared_experts"])?.unwrap_or(1) * expert_inter,
            false,
        ),
        // HYV3MoE: one HYV3MLP of `moe_intermediate_size` x `num_shared_experts` (1).
        Family::HyV3 => (
            r.opt_u64(&["num_shared_experts"])?.unwrap_or(1) * expert_inter,
            false,
        ),
        // AfmoeSparseMoeBlock: one AfmoeMLP of `moe_intermediate_size` x `num_shared_experts`
        // (2), no gate on its output.
        Family::Afmoe => (
            r.opt_u64(&["num_shared_experts"])?.unwrap_or(2) * expert_inter,
            false,
        ),
        // Cohere2MoeSparseMoeBlock: one Cohere2MoeMLP of `intermediate_size` x
        // `num_shared_experts` (0 by default), no gate.
        Family::Cohere2Moe => match r.raw(&["num_shared_experts"]) {
            Some((_, v)) if v.as_u64() == Some(0) => (0, false),
            _ => (
                r.opt_u64(&["num_shared_experts"])?.unwrap_or(0) * expert_inter,
                false,
            ),
        },
        // SolarOpenConfig: one shared expert by default.
        Family::SolarOpen => (
            r.opt_u64(&["n_shared_experts"])?.unwrap_or(1) * expert_inter,
            false,
        ),
        // Ernie4_5_MoeSparseMoeBlock: one MLP of `moe_intermediate_size` x shared experts.
        Family::Ernie45Moe => (
            r.opt_u64(&["moe_num_shared_experts"])?.unwrap_or(2) * expert_inter,
            false,
        ),
        // Llama4TextMoe: one `shared_expert`, a Llama4TextMLP of `intermediate_size`.
        Family::Llama4 => (expert_inter, false),
        // GraniteMoeHybridDecoderLayer: `moe(x) + shared_mlp(x)`, the shared MLP after.
        Family::GraniteMoeHybrid => (intermediate, false),
        // GraniteMoeSharedDecoderLayer likewise, with no shared MLP at 0 (GraniteMoe's).
        Family::GraniteMoe => match r.raw(&["shared_intermediate_size"]) {
            Some((_, v)) if v.as_u64() == Some(0) => (0, false),
            _ => (
                r.opt_u64(&["shared_intermediate_size"])?.unwrap_or(0),
                false,
            ),
        },
        // HunYuanMoEV1Moe: one `shared_mlp` whatever `num_shared_expert` says.
        Family::HunyuanMoe => {
            r.raw(&[
                "num_shared_expert",
                "moe_intermediate_size",
                "use_mixed_mlp_moe",
            ]);
            (expert_inter, false)
        }
        _ => (0, false),
    };
    // Which layers are sparse: DeepSeek's from `first_k_dense_replace` on, Qwen2-MoE's every
    // `decoder_sparse_step`-th; ERNIE's every `moe_layer_interval`-th from
    // `moe_layer_start_index` (default 1) to `moe_layer_end_index` (default -1: the last).
    let (first_dense, every) = if family == Family::Ernie45Moe {
        let layers = r.u64(&["num_hidden_layers"])?;
        let end = r
            .raw(&["moe_layer_end_index"])
            .and_then(|(_, v)| v.as_i64());
        if let Some(end) = end.filter(|&e| e != -1 && e as i128 != i128::from(layers) - 1) {
            return Err(Error::field(
                r.path,
                "moe_layer_end_index",
                format!("{end} (dense layers after the sparse ones) is not supported"),
            )
            .with_hint(format!(
                "-1 or {} (the last layer) is",
                layers.saturating_sub(1)
            )));
        }
        r.raw(&["moe_norm_min"]);
        (
            r.opt_u64(&["moe_layer_start_index"])?.unwrap_or(1),
            r.opt_u64(&["moe_layer_interval"])?.unwrap_or(1),
        )
    } else if family == Family::Llama4 {
        // Llama4TextConfig: `moe_layers` defaults to every `interleave_moe_layer_step`-th layer
        // (step - 1, 2 step - 1, ...), which is the rule the blocks follow; another list is not.
        let layers = r.u64(&["num_hidden_layers"])?;
        let step = r.opt_u64(&["interleave_moe_layer_step"])?.unwrap_or(1);
        if let Some((key, Value::Array(list))) = r.raw(&["moe_layers"]) {
            let rule = (1..=layers).filter(|l| l % step == 0).map(|l| Some(l - 1));
            if !list.iter().map(Value::as_u64).eq(rule) {
                return Err(Error::field(
                    r.path,
                    key,
                    format!("must be every {step}th layer from {}, as `interleave_moe_layer_step` makes it", step - 1),
                )
                .with_hint("other sparse-layer lists are not modelled"));
            }
        }
        (0, step)
    } else if family == Family::Lfm2Moe {
        // Lfm2MoeDecoderLayer: dense MLPs below `num_dense_layers` (2), experts from there.
        r.raw(&["use_expert_bias"]);
        (r.opt_u64(&["num_dense_layers"])?.unwrap_or(2), 1)
    } else if family == Family::Afmoe {
        // AfmoeDecoderLayer: `moe_enabled = layer_idx >= config.num_dense_layers` (1).
        (r.opt_u64(&["num_dense_layers"])?.unwrap_or(1), 1)
    } else if family == Family::SolarOpen {
        // SolarOpenDecoderLayer builds `SolarOpenMoE` in every layer; its config removes
        // `first_k_dense_replace`, so a value left in a config.json builds nothing.
        r.raw(&["first_k_dense_replace"]);
        (0, 1)
    } else if let Some((key, types)) = r.raw(&["mlp_layer_types"]) {
        // Glm4MoeLiteConfig: a "dense" or "sparse" entry per layer (default one dense layer,
        // then sparse ones); ftplan models dense layers before the sparse ones.
        let types: Vec<Option<&str>> = types
            .as_array()
            .map(|a| a.iter().map(Value::as_str).collect())
            .unwrap_or_default();
        let dense = types.iter().take_while(|t| **t == Some("dense")).count();
        if types.is_empty() || types[dense..].iter().any(|t| *t != Some("sparse")) {
            return Err(Error::field(
                r.path,
                key,
                "must list \"dense\" layers, then only \"sparse\" ones",
            ));
        }
        (dense as u64, 1)
    } else {
        // Without `mlp_layer_types`, Glm4MoeLiteConfig's, ExaoneMoeConfig's, AXK1Config's and
        // HYV3Config's default is one dense layer first (`first_k_dense_replace` 1).
        // DeepseekV32Config's (and GlmMoeDsaConfig's) is three.
        let default_dense = if sparse_attention(r) {
            3
        } else {
            u64::from(
                glm4_moe_lite(r)
                    || matches!(family, Family::ExaoneMoe | Family::Axk1 | Family::HyV3),
            )
        };
        (
            r.opt_u64(&["first_k_dense_replace"])?
                .unwrap_or(default_dense),
            r.opt_u64(&["decoder_sparse_step"])?.unwrap_or(1),
        )
    };
    if let Some((key, v)) = r.raw(&["mlp_only_layers"])
        && v.as_array().is_some_and(|a| !a.is_empty())
    {
        return Err(Error::field(r.path, key, "is not supported when non-empty")
            .with_hint("dense layers are modelled below `first_k_dense_replace` or between `decoder_sparse_step`s"));
    }
    Ok(Some(Moe {
        experts,
        top_k,
        expert_intermediate: expert_inter,
        shared_intermediate: shared,
        shared_gate: gate,
        first_dense,
        every,
        bias: family == Family::GptOss,
        gate: if family == Family::GptOss {
            // `swiglu_limit` (7.0) bounds values, not shapes.
            r.raw(&["swiglu_limit"]);
            ExpertGate::ClampedSwiglu
        } else {
            ExpertGate::Activation
        },
        routing: match family {
            Family::Phimoe => Routing::SparseMixer,
            Family::Llama4 => Routing::EveryExpert,
            // Qwen2-MoE's, Qwen3-MoE's, OLMoE's and Qwen3-Next's routers divide the top-k
            // weights by their sum only `if self.norm_topk_prob` (their configs default it to
            // false, false, false and true; transformers 5.17). Qwen1.5-MoE, Qwen2-57B-A14B
            // and OLMoE-1B-7B ship false.
            Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::Olmoe
            | Family::FlexOlmo
            | Family::Qwen3Next
            | Family::Mellum
                if !r.bool_or(
                    &["norm_topk_prob"],
                    matches!(family, Family::Qwen3Next | Family::Mellum),
                )? =>
            {
                Routing::TopKUnnormalised
            }
            // GraniteMoeHybridTopKRouter: `softmax(top_k_logits)`.
            Family::GptOss | Family::GraniteMoeHybrid | Family::GraniteMoe => {
                Routing::SoftmaxOfTopK
            }
            // Cohere2MoeTopKRouter: top-k of the logits, then `expert_selection_fn`.
            Family::Cohere2Moe => {
                let normalised = r.bool_or(&["norm_topk_prob"], true)?;
                match r.one_of("expert_selection_fn", &["softmax", "sigmoid"])? {
                    "sigmoid" => Routing::SigmoidOfTopK { normalised },
                    _ => Routing::SoftmaxOfTopK,
                }
            }
            _ => Routing::TopK,
        },
        input_jitter,
        beside_mlp: family == Family::Gemma4,
        // Cohere2MoeSparseMoeBlock: `(final + shared) / 2` unless the strategy is "sum".
        shared_average: family == Family::Cohere2Moe
            && r.one_of("shared_expert_combination_strategy", &["average", "sum"])? == "average"
            && shared > 0,
        // AfmoeSparseMoeBlock's `expert_bias` and Ernie4_5_MoeStatics' `e_score_correction_bias`.
        frozen_score_bias: matches!(family, Family::Afmoe | Family::Ernie45Moe),
        // AXK1MoE: `post_mlp_layernorm` on the sum of the routed and shared experts.
        output_norm: family == Family::Axk1,
        // HYV3MoE: `(routed.float() + shared.float()).to(dtype)` unless switched off.
        fp32_combine: family == Family::HyV3
            && r.bool_or(&["enable_moe_fp32_combine"], true)?
            && shared > 0,
        latent: None,
        weights: match family {
            // AfmoeTokenChoiceRouter: the sigmoid of fp32 logits (`self.gate(x).to(float32)`),
            // gathered, normalised and scaled in fp32.
            // HYV3TopKRouter: the fp32 sigmoid's scores gathered, normalised and scaled in fp32.
            Family::Mixtral | Family::MinimaxM2 | Family::Gemma4 | Family::Afmoe | Family::HyV3 => {
                RoutingWeights::Fp32
            }
            // DeepSeek-V2's router softmaxes in fp32; V3's (and GLM-4.7-Flash's) takes a
            // sigmoid of the logits.
            Family::Deepseek if r.model_type() == Some("deepseek_v2") => RoutingWeights::Fp32,
            Family::Mistral4 | Family::Phimoe => RoutingWeights::Softmax,
            // GraniteMoeHybridTopKRouter: `.type_as(hidden_states)`; Cohere2MoeTopKRouter:
            // `.to(hidden_states.dtype)`.
            Family::Ernie45Moe
            | Family::GraniteMoeHybrid
            | Family::GraniteMoe
            | Family::Cohere2Moe => RoutingWeights::Hidden,
            _ => RoutingWeights::Logits,
        },
        router: match family {
            Family::Ernie45Moe => RouterPrecision::Fp32Module,
            Family::Deepseek
            | Family::Axk1
            | Family::HyV3
            | Family::Glm4Moe
            | Family::SolarOpen
            | Family::ExaoneMoe
            | Family::Dots1 => RouterPrecision::Fp32Operands,
            Family::HunyuanMoe => RouterPrecision::Fp32Weight,
            _ => RouterPrecision::Model,
        },
    }))
}

/// Experts and top-k as a router can use them: at most 1,024 experts, top-k at most that
/// (both at least 1, as every count is read).
fn check_top_k(r: &Reader, experts: u64, top_k: u64) -> Result<()> {
    if experts > 1024 || top_k > experts {
        return Err(Error::field(
            r.path,
            "num_experts_per_tok",
            format!("({top_k}) must be at most the experts ({experts}), at most 1024"),
        ));
    }
    Ok(())
}

/// A count HunYuan's config may give per layer (`num_experts`, `moe_topk`: an integer or a
/// list); ftplan builds one kind of sparse layer, so a list must repeat one value.
fn uniform_per_layer(r: &Reader, key: &'static str) -> Result<u64> {
    match r.raw(&[key]) {
        Some((_, Value::Array(items))) => {
            let values: Vec<Option<u64>> = items.iter().map(Value::as_u64).collect();
            match values.first() {
                Some(Some(v)) if values.iter().all(|x| *x == Some(*v)) => Ok(*v),
                _ => Err(
                    Error::field(r.path, key, "must be one count for every layer")
                        .with_hint("layers with different expert counts are not modelled"),
                ),
            }
        }
        _ => r.u64(&[key]),
    }
}

fn llama_like(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    // Ernie4_5Config's defaults are 2 KV heads of 128 (the 0.3B model's); the others default to
    // one KV head per head of hidden / heads.
    let (kv_default, head_dim_default) = match family {
        Family::Ernie45 => (2, 128),
        // Ernie4_5_MoeConfig: 4 KV heads (the 21B-A3B's), no `head_dim` key.
        Family::Ernie45Moe => (4, hidden / heads.max(1)),
        // Qwen3_5TextConfig: 4 KV heads of 256.
        Family::Qwen35 => (4, 256),
        // Qwen3_5MoeTextConfig and Qwen3NextConfig: 2 KV heads of 256.
        Family::Qwen35Moe | Family::Qwen3Next => (2, 256),
        // Gemma4TextConfig: 4 KV heads of 256 on the local layers.
        Family::Gemma4 => (4, 256),
        // Lfm2Config: 8 KV heads.
        Family::Lfm2 | Family::Lfm2Moe => (8, hidden / heads.max(1)),
        // Llama4TextConfig: 8 KV heads of 128.
        Family::Llama4 => (8, 128),
        // AfmoeConfig and Cohere2MoeConfig: heads of 128.
        Family::Afmoe | Family::Cohere2Moe => (heads, 128),
        // JambaConfig and BambaConfig: 8 KV heads.
        Family::Jamba | Family::Bamba => (8, hidden / heads.max(1)),
        // CwmConfig: 8 KV heads of 128.
        Family::Cwm => (8, 128),
        _ => (heads, hidden / heads.max(1)),
    };
    let kv_heads = r.opt_u64(&["num_key_value_heads"])?.unwrap_or(kv_default);
    let head_dim = r.opt_u64(&["head_dim"])?.unwrap_or(head_dim_default);
    let gemma = matches!(
        family,
        Family::Gemma | Family::Gemma2 | Family::VaultGemma | Family::Gemma3 | Family::Gemma4
    );
    let global_attention = gemma4_global_attention(r, family, kv_heads)?;
    let (per_layer_input, kv_shared_layers, double_wide_shared_mlp) = gemma4_small(r, family)?;
    let act_default = match family {
        _ if gemma => "gelu_pytorch_tanh",
        // ArceeConfig's and NemotronConfig's default.
        Family::Arcee | Family::Nemotron | Family::Jais2 | Family::NanoChat => "relu2",
        Family::Apertus => "xielu",
        _ => "silu",
    };
    let act_key = if r.map.contains_key("hidden_activation") {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = r.str_or(&["hidden_activation", "hidden_act"], act_default)?;
    let attention_dropout = r.f64_or(
        &["attention_dropout"],
        if family == Family::SeedOss { 0.1 } else { 0.0 },
    )?;
    // Which biases each attention and MLP class builds (transformers 5.17, checked by
    // instantiating each class): Qwen2 (and Qwen2-MoE) always bias q, k and v, never o; GLM-4,
    // GLM-4.5 and Helium put `attention_bias` on q, k and v only, Seed-OSS has its own key for
    // o; Mistral, Mixtral, Phi-3 and EXAONE-4 build no bias whatever the config says; the others
    // put `attention_bias` on q, k, v and o. Only Llama's, Granite's (SmolLM3's), Seed-OSS's,
    // Helium's, Nemotron's, Bamba's, Arcee's and Jais 2's MLPs read `mlp_bias`. GptOssConfig
    // defaults `attention_bias` to true, Jais2Config both.
    let attention_bias = r.bool_or(
        &["attention_bias"],
        matches!(family, Family::GptOss | Family::Jais2),
    )?;
    let mlp_bias = r.bool_or(&["mlp_bias"], family == Family::Jais2)?;
    let (qkv_bias, out_bias) = match family {
        Family::Qwen2 | Family::Qwen2Moe => (true, false),
        // Glm4Attention, Glm4MoeAttention: `attention_bias` on q, k and v; o never.
        // SolarOpenAttention: Llama's with a bias-free `o_proj`.
        Family::Glm4 | Family::Glm | Family::Glm4Moe | Family::SolarOpen | Family::Helium => {
            (attention_bias, false)
        }
        Family::SeedOss => (
            r.bool_or(&["attention_bias"], true)?,
            r.bool_or(&["attention_out_bias"], false)?,
        ),
        Family::Mistral
        | Family::Ministral3
        | Family::Mixtral
        | Family::Phi3
        | Family::Exaone4
        | Family::ExaoneMoe
        | Family::MinimaxM2
        | Family::Lfm2
        | Family::Lfm2Moe
        // CwmAttention rebuilds Qwen2Attention's q, k and v without biases (its o has none).
        | Family::Cwm => (false, false),
        // StableLmAttention: `use_qkv_bias` on q, k and v; o never.
        Family::StableLm => (r.bool_or(&["use_qkv_bias"], false)?, false),
        // Ernie4_5Attention and Ernie4_5MLP: `use_bias` on every linear.
        Family::Ernie45 | Family::Ernie45Moe => {
            let b = r.bool_or(&["use_bias"], false)?;
            (b, b)
        }
        _ => (attention_bias, attention_bias),
    };
    if family == Family::StableLm && r.bool_or(&["qk_layernorm"], false)? {
        // StableLM-2-12B's `StableLmLayerNormPerHead`: one LayerNorm module per head, split
        // and concatenated again, which no norm kind here describes.
        return Err(Error::field(
            r.path,
            "qk_layernorm",
            "true (a LayerNorm module per head, StableLM-2-12B) is not modelled",
        )
        .with_hint("StableLM configs with qk_layernorm = false are supported"));
    }
    let mlp_bias = match family {
        Family::Llama
        | Family::Cwm
        | Family::HyV3
        | Family::Granite
        | Family::HyperClovaX
        | Family::SeedOss
        | Family::Helium
        | Family::Nemotron
        | Family::Bamba
        | Family::Arcee
        | Family::Jais2 => mlp_bias,
        // The same `use_bias` as the attention's (ERNIE-MoE's dense and shared-expert MLPs).
        Family::Ernie45 | Family::Ernie45Moe => qkv_bias,
        _ => false,
    };
    r.raw(&[
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "rope_local_base_freq",
        "original_max_position_embeddings",
        "rope_scaling",
        "rope_parameters",
        "max_window_layers",
        "query_pre_attn_scalar",
        "sliding_window_pattern",
        "use_bidirectional_attention",
        // GPT-OSS: the original checkpoint's context and its MXFP4 storage, which training
        // dequantizes to bf16 (see `Family::GptOss`).
        "initial_context_length",
        "quantization_config",
        // GLM-4.5's multi-token-prediction layer: in the checkpoint, not in transformers' model.
        "num_nextn_predict_layers",
        // OLMoE's optional in-place clamp of q, k and v: no memory.
        "clip_qkv",
        // Qwen3.5's checkpoints: the multi-token-prediction layer transformers does not build
        // (`_keys_to_ignore_on_load_unexpected = ["^mtp.*"]`), the always-on output gate and
        // the recurrent state's dtype for generation (neither read by Qwen3_5TextModel).
        "mtp_num_hidden_layers",
        "mtp_use_dedicated_embeddings",
        "attn_output_gate",
        "mamba_ssm_dtype",
        "pretraining_tp",
        "eod_token_id",
        "layer_norm_eps",
        "norm_eps",
    ]);
    // Phi-3 keeps GPT-style residual and embedding dropout (`resid_pdrop`, `embd_pdrop`).
    let (residual, embedding) = match family {
        Family::Phi3 => (
            r.f64_or(&["resid_pdrop"], 0.0)?,
            r.f64_or(&["embd_pdrop"], 0.0)?,
        ),
        // SeedOssConfig's defaults: 0.1 on each sub-layer's output and in attention.
        Family::SeedOss => (r.f64_or(&["residual_dropout"], 0.1)?, 0.0),
        // StableLmDecoderLayer drops the MLP's output only (`hidden_dropout`).
        Family::StableLm => (r.f64_or(&["hidden_dropout"], 0.0)?, 0.0),
        _ => (0.0, 0.0),
    };
    let layers = r.u64(&["num_hidden_layers"])?;
    // Qwen3_5MoeTextConfig has no dense layer and no `intermediate_size`.
    let intermediate = match family {
        Family::Qwen35Moe => r.opt_u64(&["intermediate_size"])?.unwrap_or(0),
        // SolarOpenConfig has no `intermediate_size` (every layer is sparse; the shared expert
        // is `moe_intermediate_size` wide, read by `moe`).
        Family::SolarOpen => {
            r.raw(&["intermediate_size"]);
            0
        }
        Family::Lfm2 => lfm2_intermediate(r)?,
        // Cohere2MoeMLP in the dense prefix: `prefix_dense_intermediate_size`, or
        // `intermediate_size` (the experts' width, read by `moe`) when it is null.
        Family::Cohere2Moe => match r.opt_u64(&["prefix_dense_intermediate_size"])? {
            Some(i) => i,
            None => r.u64(&["intermediate_size"])?,
        },
        // Lfm2MoeMLP: `intermediate_size` as it is (7,168 by default), no auto-adjust.
        Family::Lfm2Moe => r.opt_u64(&["intermediate_size"])?.unwrap_or(7168),
        // Llama4TextMLP in the dense layers: `intermediate_size_mlp` (16,384); the experts and
        // the shared expert are `intermediate_size` wide (read by `moe`).
        Family::Llama4 => r.opt_u64(&["intermediate_size_mlp"])?.unwrap_or(16384),
        // GraniteMoeHybridMLP (`shared_mlp`, in every layer): `shared_intermediate_size`; the
        // experts are `intermediate_size` wide (read by `moe`).
        Family::GraniteMoeHybrid => r.opt_u64(&["shared_intermediate_size"])?.unwrap_or(1024),
        _ => r.u64(&["intermediate_size"])?,
    };
    let stack = Stack::new(layers, heads, kv_heads, head_dim, intermediate);
    let base = ModelSpec::decoder_only(family, hidden, r.u64(&["vocab_size"])?, stack);
    // Gemma-2 soft-caps scores at 50 and logits at 30 by default (Gemma2Config, and
    // VaultGemmaConfig's same defaults); a null cap (Gemma-3) is none.
    // NanoChatForCausalLM is Gemma2ForCausalLM's head: `final_logit_softcapping` 15 by default
    // (NanoChatConfig), no attention soft-capping.
    let (attn_cap, logit_cap) = match family {
        Family::Gemma2 | Family::VaultGemma => (50.0, 30.0),
        Family::NanoChat => (0.0, 15.0),
        _ => (0.0, 0.0),
    };
    let softcap = Softcap {
        attention: r.opt_f64(&["attn_logit_softcapping"])?.unwrap_or(attn_cap),
        logits: r
            .opt_f64(&["final_logit_softcapping"])?
            .unwrap_or(logit_cap),
    };
    // Scalar multipliers, one multiply each where they are not 1.
    let multipliers = if matches!(
        family,
        Family::Cohere | Family::Cohere2 | Family::Cohere2Moe
    ) {
        // `logits * logit_scale` (CohereConfig's 0.0625): the same one op as a divisor.
        Multipliers {
            logits_divisor: 1.0 / r.f64_or(&["logit_scale"], 0.0625)?,
            ..Multipliers::default()
        }
    } else if matches!(
        family,
        Family::Granite | Family::GraniteMoeHybrid | Family::GraniteMoe | Family::HyperClovaX
    ) {
        // GraniteConfig's defaults are 1 (none); `attention_multiplier` is SDPA's `scale`
        // argument and costs nothing. HyperCLOVAXForCausalLM multiplies the logits by
        // `logits_scaling` where Granite divides: the same one op.
        r.raw(&["attention_multiplier"]);
        let scaling = r.f64_or(&["logits_scaling"], 1.0)?;
        Multipliers {
            embedding: r.f64_or(&["embedding_multiplier"], 1.0)?,
            residual: r.f64_or(&["residual_multiplier"], 1.0)?,
            logits_divisor: if family == Family::HyperClovaX {
                1.0 / scaling
            } else {
                scaling
            },
            ..Multipliers::default()
        }
    } else if family == Family::Afmoe {
        // AfmoeModel: `hidden_states * hidden_size**0.5` after the embeddings when
        // `mup_enabled` (off by default).
        Multipliers {
            embedding: if r.bool_or(&["mup_enabled"], false)? {
                (hidden as f64).sqrt()
            } else {
                1.0
            },
            ..Multipliers::default()
        }
    } else {
        Multipliers::default()
    };
    // BambaForCausalLM adds `z_loss_coefficient x logsumexp(logits)^2` to the loss when it is
    // positive: ops on the logits ftplan does not build.
    if family == Family::Bamba
        && let Some((key, v)) = r.raw(&["z_loss_coefficient"])
        && v.as_f64() != Some(0.0)
    {
        return Err(
            Error::field(r.path, key, format!("({v}): a z-loss is not modelled"))
                .with_hint("0, the default, is (no z-loss)"),
        );
    }
    if family == Family::Mellum {
        mellum_full_rotary(r)?;
    }
    let mixers = mixers(r, family, layers)?;
    let moe = moe(r, family, intermediate)?;
    let dense_prefix = moe.map_or(0, |m| m.first_dense);
    let rope_layers = rope_layers(r, family, (&mixers, dense_prefix), layers)?;
    Ok(ModelSpec {
        activation: activation(r.path, &act, act_key)?,
        norm: match family {
            // Qwen3_5RMSNorm: `(x.float() * rsqrt) * (1 + weight.float())`, Gemma's.
            _ if gemma || family.gated_delta_net() => Norm::GemmaRmsNorm,
            // GptOssRMSNorm multiplies by its weight in fp32 before casting back, as OLMo-2's.
            // AfmoeRMSNorm is GptOssRMSNorm.
            Family::Olmo2 | Family::FlexOlmo | Family::GptOss | Family::Helium | Family::Afmoe => {
                Norm::Olmo2RmsNorm
            }
            // Cohere2MoeDecoderLayer and Cohere2MoeModel: LlamaRMSNorm where `rms_norm_eps` is
            // set, Cohere's LayerNorm otherwise.
            Family::Cohere2Moe if r.opt_f64(&["rms_norm_eps"])?.is_some() => Norm::RmsNorm,
            Family::Cohere | Family::Cohere2 | Family::Cohere2Moe => Norm::CohereLayerNorm,
            // PhimoeDecoderLayer, PhimoeModel, Jais2DecoderLayer and Jais2Model use
            // `nn.LayerNorm` (weight and bias).
            Family::StableLm | Family::Phimoe | Family::Jais2 => Norm::LayerNorm,
            Family::Nemotron => Norm::LayerNorm1P,
            Family::Olmo => Norm::OlmoLayerNorm,
            Family::NanoChat => Norm::UnscaledRmsNorm,
            _ => Norm::RmsNorm,
        },
        norm_placement: match family {
            // AfmoeDecoderLayer: `input_layernorm` and `post_attention_layernorm` around the
            // attention, `pre_mlp_layernorm` and `post_mlp_layernorm` around the MLP.
            Family::Gemma2 | Family::Gemma3 | Family::Gemma4 | Family::Glm4 | Family::Afmoe => {
                NormPlacement::Sandwich
            }
            Family::Olmo2 | Family::FlexOlmo | Family::Exaone4 => NormPlacement::Output,
            // HyperCLOVAXDecoderLayer: `post_norm1` and `post_norm2` on each sub-layer's output
            // (before the residual multiplier) where `use_post_norm`, the default.
            Family::HyperClovaX if r.bool_or(&["use_post_norm"], true)? => NormPlacement::Sandwich,
            _ => NormPlacement::Pre,
        },
        // Lfm2Config reads LFM2's own `tie_embedding` over `tie_word_embeddings`.
        tie_word_embeddings: r.bool_or(
            if family.is_lfm2() {
                &["tie_embedding", "tie_word_embeddings"]
            } else {
                &["tie_word_embeddings"]
            },
            gemma
                || matches!(
                    family,
                    Family::Cohere
                        | Family::Cohere2
                        | Family::Cohere2Moe
                        | Family::Ernie45
                        | Family::Ernie45Moe
                        | Family::Lfm2
                        | Family::Lfm2Moe
                ),
        )?,
        // Cohere (and StableLM's `use_parallel_residual`): attention and the MLP read one norm's
        // output and add to the residual together.
        parallel_block: matches!(
            family,
            Family::Cohere | Family::Cohere2 | Family::Cohere2Moe
        ) || (family == Family::StableLm
            && r.bool_or(&["use_parallel_residual"], false)?),
        qkv_bias,
        linear_bias: mlp_bias,
        out_bias: Some(out_bias),
        // Phi-3's `qkv_proj`; its and GLM-4's `gate_up_proj`.
        fused_qkv: family == Family::Phi3,
        fused_gate_up: matches!(
            family,
            Family::Phi3
                | Family::Glm4
                | Family::Glm
                | Family::GraniteMoeHybrid
                | Family::GraniteMoe
        ),
        dropout: Dropouts {
            attention: attention_dropout,
            residual,
            residual_ffn_only: family == Family::StableLm,
            embedding,
            ..Dropouts::default()
        },
        moe,
        qk_norm: match family {
            Family::Qwen3
            | Family::Qwen3Moe
            | Family::Mellum
            | Family::Qwen35
            | Family::Qwen35Moe
            | Family::Qwen3Next
            | Family::Gemma3
            | Family::Exaone4
            | Family::ExaoneMoe
            | Family::Afmoe
            | Family::HunyuanDense
            | Family::HunyuanMoe
            | Family::Apertus
            | Family::HyV3
            | Family::Dots1
            | Family::Lfm2
            | Family::Lfm2Moe
            | Family::Gemma4 => QkNorm::PerHead,
            Family::Olmoe | Family::MinimaxM2 => QkNorm::Full,
            // NanoChatAttention: `NanoChatRMSNorm` (Llama 4's L2 norm) on the rotated q and k.
            Family::NanoChat => QkNorm::L2AfterRotary,
            // Llama4TextAttention: `Llama4TextL2Norm` on the rotary layers' q and k.
            Family::Llama4 if r.bool_or(&["use_qk_norm"], true)? => QkNorm::L2AfterRotary,
            // Command R+'s `use_qk_norm`: a CohereLayerNorm per head with a weight for every
            // head and channel, as many weights as one norm over the whole projection.
            Family::Cohere if r.bool_or(&["use_qk_norm"], false)? => QkNorm::Full,
            Family::Glm4Moe if r.bool_or(&["use_qk_norm"], false)? => QkNorm::PerHead,
            // FlexOlmoAttention is Olmo2Attention.
            Family::Olmo2 | Family::FlexOlmo => QkNorm::Full,
            _ => QkNorm::None,
        },
        // Ministral3Attention: `query_states * get_llama_4_attn_scale(position_ids, ...)`.
        query_scale: match family {
            Family::Ministral3 => QueryScale::Every,
            // Llama 4's `attn_temperature_tuning` scales the NoPE layers' queries.
            // (`attn_scale` and `floor_scale` set its values, not its shapes.)
            Family::Llama4 => {
                r.raw(&["attn_scale", "floor_scale"]);
                if r.bool_or(&["attn_temperature_tuning"], true)? {
                    QueryScale::NopeLayers
                } else {
                    QueryScale::None
                }
            }
            _ => QueryScale::None,
        },
        // Qwen3_5Attention: `q_proj` gives queries and a gate, `attn * sigmoid(gate)`;
        // AfmoeAttention: `output * torch.sigmoid(self.gate_proj(hidden_states))`.
        attention_output_gate: match family {
            _ if family.gated_delta_net() => AttentionGate::QueryHalf,
            Family::Afmoe => AttentionGate::Projection,
            _ => AttentionGate::None,
        },
        global_attention,
        value_norm: family == Family::Gemma4,
        per_layer_input,
        kv_shared_layers,
        double_wide_shared_mlp,
        rotary_apply: match family {
            Family::Glm4 | Family::Glm => RotaryApply::Interleaved,
            Family::Ernie45 | Family::Ernie45Moe => RotaryApply::InterleavedFp32,
            Family::Llama4 => RotaryApply::ComplexFp32,
            _ => RotaryApply::Shared,
        },
        mixers,
        softcap,
        multipliers,
        rope_layers,
        // NemotronMLP, ArceeMLP, ApertusMLP and Jais2MLP: `down_proj(act(up_proj(x)))`, no
        // gate; NanoChatMLP the same as `fc2(act(fc1(x)))`.
        gated_ffn: !matches!(
            family,
            Family::Nemotron | Family::Arcee | Family::Apertus | Family::Jais2 | Family::NanoChat
        ),
        // NanoChatModel: `hidden_states = self.norm(inputs_embeds)` before the layers.
        embedding_norm: family == Family::NanoChat,
        // PhimoeForCausalLM: `lm_head_bias` (true in Phi-3.5-MoE's config).
        lm_head_bias: family == Family::Phimoe && r.bool_or(&["lm_head_bias"], false)?,
        attention_sinks: family == Family::GptOss,
        // GptOssPreTrainedModel: `_supports_sdpa = False` (SDPA has no sink logit).
        sdpa: family != Family::GptOss,
        positions: if matches!(family, Family::Glm4 | Family::Glm | Family::Glm4Moe) {
            rotary_fraction(r, 0.5)?
        } else if family == Family::StableLm || family.gated_delta_net() {
            // Qwen3_5TextConfig sets `partial_rotary_factor` 0.25 when absent.
            rotary_fraction(r, 0.25)?
        } else if family == Family::Nemotron {
            // NemotronConfig's default `partial_rotary_factor` is 0.5.
            rotary_fraction(r, 0.5)?
        } else if family == Family::Gemma4 {
            // Gemma 4's global layers use "proportional" rotary: inverse frequencies for
            // `partial_rotary_factor` of the head and zeros for the rest, so cos and sin span
            // the whole head and rotary runs over all of it, as on the local layers.
            Positions::Rotary { fraction: 1.0 }
        } else if family == Family::Bamba {
            // BambaConfig sets `partial_rotary_factor` to 0.5 whatever the config says.
            r.raw(&["partial_rotary_factor"]);
            Positions::Rotary { fraction: 0.5 }
        } else if family == Family::GraniteMoeHybrid {
            // GraniteMoeHybridModel builds a rotary embedding only for "rope"; Granite 4.0's
            // published configs say "nope".
            match r.str_or(&["position_embedding_type"], "nope")?.as_str() {
                "rope" => Positions::Rotary { fraction: 1.0 },
                _ => Positions::None,
            }
        } else if family == Family::SolarOpen {
            // SolarOpenConfig sets `partial_rotary_factor` 1.0 when absent, and Llama's
            // `apply_rotary_pos_emb` multiplies the whole head by the tables, so a smaller
            // fraction fails in transformers.
            let fraction = rotary_fraction(r, 1.0)?;
            if fraction != (Positions::Rotary { fraction: 1.0 }) {
                return Err(Error::field(
                    r.path,
                    "partial_rotary_factor",
                    "must be 1: SolarOpenAttention applies Llama's rotary to the whole head",
                ));
            }
            fraction
        } else if matches!(family, Family::MinimaxM2 | Family::Phi3) {
            // MiniMaxM2RotaryEmbedding (GLM-4.5's) and Phi3RotaryEmbedding:
            // `partial_rotary_factor` (Phi-4-mini's 0.75), 1.0 when absent.
            rotary_fraction(r, 1.0)?
        } else {
            base.positions
        },
        ..base
    })
}

/// MellumRotaryEmbedding (Laguna's) sizes each layer type's table by that type's
/// `rope_parameters[type]["partial_rotary_factor"]` (1.0 when absent, as in MellumConfig's
/// defaults); a partial factor per layer type is not modelled, so one below 1 is refused.
fn mellum_full_rotary(r: &Reader) -> Result<()> {
    let Some(Value::Object(types)) = r.map.get("rope_parameters") else {
        return Ok(());
    };
    for (kind, params) in types {
        if let Some(f) = params.get("partial_rotary_factor")
            && f.as_f64() != Some(1.0)
        {
            return Err(Error::field(
                r.path,
                "rope_parameters",
                format!("`{kind}` rotates a fraction ({f}) of each head, which is not modelled"),
            )
            .with_hint("a factor of 1 (or none, MellumConfig's default) is"));
        }
    }
    Ok(())
}

/// Gemma 4's global layers (`Gemma4TextConfig.__post_init__`'s `per_layer_config`): heads of
/// `global_head_dim` (512) and, with `attention_k_eq_v`, `num_global_key_value_heads` KV heads
/// whose keys are the values too. The small models' per-layer embeddings and shared KV layers
/// are read by `gemma4_small`.
fn gemma4_global_attention(
    r: &Reader,
    family: Family,
    kv_heads: u64,
) -> Result<Option<GlobalAttention>> {
    if family != Family::Gemma4 {
        return Ok(None);
    }
    if let Some((key, v)) = r.raw(&["use_bidirectional_attention"])
        && v.as_str() == Some("all")
    {
        return Err(Error::field(
            r.path,
            key,
            "\"all\" (bidirectional text attention) is not modelled yet",
        )
        .with_hint("causal (None) or \"vision\", as Gemma 4's published configs are"));
    }
    let keys_as_values = r.bool_or(&["attention_k_eq_v"], false)?;
    // A config transformers saved writes the resolved geometry per global layer in
    // `per_layer_config` and nulls `global_head_dim` and `num_global_key_value_heads`; the
    // published configs write those two keys instead.
    if let Some((key, Value::Object(layers))) = r.raw(&["per_layer_config"]) {
        let mut geometry = None;
        for entry in layers.values() {
            let read = |k: &str| entry.get(k).and_then(Value::as_u64).filter(|&v| v > 0);
            let this = (read("head_dim"), read("num_key_value_heads"));
            if this.0.is_none() || geometry.is_some_and(|g| g != this) {
                return Err(Error::field(
                    r.path,
                    key,
                    "must give every global layer one positive head_dim (and num_key_value_heads)",
                ));
            }
            geometry = Some(this);
        }
        if let Some((Some(head_dim), kv)) = geometry {
            return Ok(Some(GlobalAttention {
                head_dim,
                kv_heads: kv.unwrap_or(kv_heads),
                keys_as_values,
            }));
        }
    }
    let global_kv = r.opt_u64(&["num_global_key_value_heads"])?;
    Ok(Some(GlobalAttention {
        head_dim: r.opt_u64(&["global_head_dim"])?.unwrap_or(512),
        kv_heads: if keys_as_values {
            global_kv.unwrap_or(kv_heads)
        } else {
            kv_heads
        },
        keys_as_values,
    }))
}

/// Gemma 4 E2B/E4B's per-layer embeddings (`hidden_size_per_layer_input`, 256 by
/// Gemma4TextConfig's default, 0 in the larger models' configs; `vocab_size_per_layer_input`)
/// and its shared-KV layers (`num_kv_shared_layers`, with `use_double_wide_mlp` doubling their
/// MLPs).
fn gemma4_small(r: &Reader, family: Family) -> Result<(Option<PerLayerInput>, u64, bool)> {
    if family != Family::Gemma4 {
        return Ok((None, 0, false));
    }
    let whole = |key: &'static str, default: u64| -> Result<u64> {
        match r.raw(&[key]) {
            None => Ok(default),
            Some((_, v)) => v.as_u64().filter(|&n| n <= 1 << 24).ok_or_else(|| {
                Error::field(
                    r.path,
                    key,
                    format!("must be a whole number up to 2^24, found `{v}`"),
                )
            }),
        }
    };
    let width = whole("hidden_size_per_layer_input", 256)?;
    let vocab = whole("vocab_size_per_layer_input", 262_144)?;
    let shared = whole("num_kv_shared_layers", 0)?;
    let layers = r.u64(&["num_hidden_layers"])?;
    if shared >= layers && shared > 0 {
        return Err(Error::field(
            r.path,
            "num_kv_shared_layers",
            format!(
                "({shared}) must leave at least one of the {layers} layers its own keys and values"
            ),
        ));
    }
    let per_layer = (width > 0 && vocab > 0).then_some(PerLayerInput { width, vocab });
    Ok((
        per_layer,
        shared,
        r.bool_or(&["use_double_wide_mlp"], false)?,
    ))
}

/// Rotary on a fraction of each head: `partial_rotary_factor` at the top level or, as
/// transformers 5 writes it, inside `rope_parameters`.
fn rotary_fraction(r: &Reader, default: f64) -> Result<Positions> {
    rotary_fraction_of(r, &["partial_rotary_factor"], default)
}

/// `rotary_fraction` for a family whose top-level key has another name first (GPT-NeoX's
/// `rotary_pct`): the first of `keys` at the top level, else `rope_parameters`'
/// `partial_rotary_factor`, else `default`.
fn rotary_fraction_of(r: &Reader, keys: &[&'static str], default: f64) -> Result<Positions> {
    let nested = r
        .map
        .get("rope_parameters")
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64);
    let fraction = match nested {
        Some(f) if r.raw(keys).is_none() => {
            r.in_range("rope_parameters.partial_rotary_factor", f)?
        }
        _ => r.f64_or(keys, default)?,
    };
    Ok(Positions::Rotary { fraction })
}

/// Which layers apply rotary (empty: all). EXAONE-4 (and K-EXAONE's `exaone_moe`) and Cohere2
/// apply it on their windowed layers only once a window is set (global NoPE). SmolLM3
/// (`SmolLM3Config`): `no_rope_layers` lists 1 for a layer that applies rotary and 0 for one
/// that does not; absent, every `no_rope_layer_interval`-th layer (4) goes without. Other
/// families apply rotary everywhere.
fn rope_layers(
    r: &Reader,
    family: Family,
    (mixers, dense_prefix): (&[Mixer], u64),
    layers: u64,
) -> Result<Vec<bool>> {
    let windowed = |m: &Mixer| matches!(m, Mixer::SlidingWindow { .. });
    // Cohere2MoeAttention: rotary on the windowed layers, and on the dense prefix's
    // (`mlp_layer_types`) where `prefix_dense_sliding_window_pattern` is 1 (`force_rope`).
    if family == Family::Cohere2Moe {
        let prefix_rope = r
            .opt_u64(&["prefix_dense_sliding_window_pattern"])?
            .unwrap_or(1)
            == 1;
        return Ok((0..layers)
            .map(|i| {
                mixers
                    .get(i as usize % mixers.len().max(1))
                    .is_some_and(windowed)
                    || (prefix_rope && i < dense_prefix)
            })
            .collect());
    }
    // AfmoeAttention applies rotary `if self.is_local_attention` whatever the window.
    if family == Family::Afmoe {
        r.raw(&["global_attn_every_n_layers"]);
        return Ok(mixers.iter().map(windowed).collect());
    }
    if matches!(
        family,
        Family::Exaone4 | Family::ExaoneMoe | Family::Cohere2
    ) && mixers.iter().any(windowed)
    {
        return Ok(mixers.iter().map(windowed).collect());
    }
    // Llama4TextConfig reads an empty `no_rope_layers` as absent (its interval applies).
    let listed = |v: &Value| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty());
    if let Some((key, value)) = r.raw(&["no_rope_layers"]).filter(|(_, v)| listed(v)) {
        let Value::Array(list) = value else {
            return Err(Error::field(
                r.path,
                key,
                "must be a list of 0 and 1 per layer",
            ));
        };
        one_per_layer(r, key, list, layers)?;
        return list
            .iter()
            .map(|v| match v.as_u64() {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                _ => Err(Error::field(
                    r.path,
                    key,
                    format!("`{v}` is not 0 or 1 (1: the layer applies rotary)"),
                )),
            })
            .collect();
    }
    if family != Family::Llama4 && r.model_type() != Some("smollm3") {
        return Ok(Vec::new());
    }
    let interval = r.opt_u64(&["no_rope_layer_interval"])?.unwrap_or(4).max(1);
    Ok((0..interval).map(|l| (l + 1) % interval != 0).collect())
}

/// `Starcoder2ForCausalLM`: the Mistral layout with LayerNorm, biases on every linear
/// (`use_bias`), a two-matrix GELU MLP and GPT-style dropouts.
fn starcoder2(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let layers = r.u64(&["num_hidden_layers"])?;
    let act = r.str_or(&["hidden_act"], "gelu_pytorch_tanh")?;
    let bias = r.bool_or(&["use_bias"], true)?;
    r.raw(&[
        "norm_epsilon",
        "max_position_embeddings",
        "rope_theta",
        "rope_parameters",
    ]);
    let stack = Stack::new(
        layers,
        heads,
        r.opt_u64(&["num_key_value_heads"])?.unwrap_or(heads),
        hidden / heads.max(1),
        r.u64(&["intermediate_size"])?,
    );
    Ok(ModelSpec {
        gated_ffn: false,
        activation: activation(r.path, &act, "hidden_act")?,
        norm: Norm::LayerNorm,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: bias,
        linear_bias: bias,
        dropout: Dropouts {
            embedding: r.f64_or(&["embedding_dropout"], 0.0)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["residual_dropout"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        mixers: mixers(r, Family::Starcoder2, layers)?,
        ..ModelSpec::decoder_only(Family::Starcoder2, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `BloomForCausalLM`: ALiBi instead of position embeddings, LayerNorm after the embeddings, a
/// fused biased `query_key_value`, a 4h GELU MLP, tied embeddings.
fn bloom(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size", "n_embed"])?;
    let heads = r.u64(&["n_head", "num_attention_heads"])?;
    r.raw(&[
        "layer_norm_epsilon",
        "apply_residual_connection_post_layernorm",
        "slow_but_exact",
        "pretraining_tp",
        "seq_length",
    ]);
    let stack = Stack::new(
        r.u64(&["n_layer", "num_hidden_layers"])?,
        heads,
        heads,
        hidden / heads.max(1),
        4 * hidden,
    );
    Ok(ModelSpec {
        gated_ffn: false,
        activation: Activation::Gelu,
        norm: Norm::LayerNorm,
        positions: Positions::Alibi,
        // BloomPreTrainedModel declares neither SDPA nor flash_attention_2: its attention is
        // the eager `baddbmm` with the ALiBi bias.
        sdpa: false,
        flash_attention: false,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        fused_qkv: true,
        embedding_norm: true,
        returned_weights: ReturnedWeights::Cast,
        dropout: Dropouts {
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["hidden_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        ..ModelSpec::decoder_only(Family::Bloom, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `MptForCausalLM` (MPT-7B, MPT-30B) as transformers writes it, which is not MosaicML's remote
/// code: pre-norm blocks whose LayerNorms have their bias removed, one bias-free `Wqkv`, ALiBi
/// added to eager scores (no SDPA path), a 4 x `d_model` GELU MLP whatever `expansion_ratio`
/// says, a tied head, and `attn_config.attn_pdrop` used for all three dropouts (probabilities,
/// the attention output, the MLP output); `resid_pdrop`, `emb_pdrop`, `no_bias`, `qk_ln`,
/// `attn_type` and `alibi` are not read by that code. Each block returns its probabilities to the
/// model's loop, as GPT-Neo's does.
fn mpt(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["d_model", "hidden_size"])?;
    let heads = r.u64(&["n_heads", "num_attention_heads"])?;
    let layers = r.u64(&["n_layers", "num_hidden_layers"])?;
    let expansion = r.opt_u64(&["expansion_ratio"])?.unwrap_or(4);
    if expansion != 4 {
        return Err(Error::field(
            r.path,
            "expansion_ratio",
            format!("is {expansion}; transformers' MptMLP is always 4 x d_model wide"),
        )
        .with_hint("a checkpoint with another ratio loads only with MosaicML's remote code, which ftplan does not model"));
    }
    r.raw(&[
        "resid_pdrop",
        "emb_pdrop",
        "no_bias",
        "learned_pos_emb",
        "embedding_fraction",
        "norm_type",
        "logit_scale",
        "init_device",
        "layer_norm_epsilon",
        "max_seq_len",
    ]);
    let attn_pdrop = r
        .nested("attn_config", |a| {
            if let Some((key, value)) = a.raw(&["clip_qkv"]) {
                return Err(Error::field(
                    a.path,
                    key,
                    format!("is {value}: clamping q, k and v is not modelled"),
                )
                .with_hint("remove `clip_qkv` (or set it to null) to plan the unclamped model"));
            }
            a.f64_or(&["attn_pdrop"], 0.0)
        })?
        .unwrap_or(0.0);
    Ok(ModelSpec {
        gated_ffn: false,
        activation: Activation::Gelu,
        norm: Norm::LayerNormWithoutBias,
        positions: Positions::Alibi,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        fused_qkv: true,
        sdpa: false,
        flash_attention: false,
        returned_weights: ReturnedWeights::Cast,
        dropout: Dropouts {
            attention: attn_pdrop,
            residual: attn_pdrop,
            ..Dropouts::default()
        },
        ..ModelSpec::decoder_only(
            Family::Mpt,
            hidden,
            r.u64(&["vocab_size"])?,
            Stack::new(layers, heads, heads, hidden / heads.max(1), 4 * hidden),
        )
    })
}

/// `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`: multi-head latent attention, dense FFNs
/// in the first `first_k_dense_replace` layers, then shared plus routed experts.
/// GLM-4.7-Flash's `glm4_moe_lite`, read as DeepSeek's family with its own defaults.
fn glm4_moe_lite(r: &Reader) -> bool {
    r.model_type() == Some("glm4_moe_lite")
}

/// DeepSeek-V3.2's `deepseek_v32` and GLM-5's `glm_moe_dsa`: DeepSeek-V3 with DeepSeek Sparse
/// Attention's lightning indexer in every attention layer ([`Indexer`]).
fn sparse_attention(r: &Reader) -> bool {
    matches!(r.model_type(), Some("deepseek_v32" | "glm_moe_dsa"))
}

/// The lightning indexer of a `deepseek_v32` or `glm_moe_dsa` config, and, for GLM-5, the
/// layers that reuse the previous layer's top-k.
fn indexer(r: &Reader, mla: &Mla, layers: u64) -> Result<Option<(Indexer, Vec<bool>)>> {
    if !sparse_attention(r) {
        return Ok(None);
    }
    let glm5 = r.model_type() == Some("glm_moe_dsa");
    // DeepseekV32Attention always runs `q_a_proj` (it drops V3's `q_proj` formulation) and the
    // indexer's `wq_b` reads its normed output.
    if mla.q_rank.is_none() {
        return Err(Error::field(
            r.path,
            "q_lora_rank",
            "must be set for DeepSeek Sparse Attention",
        )
        .with_hint("its indexer's `wq_b` reads the query bottleneck `q_a_proj`"));
    }
    let indexer = Indexer {
        // DeepseekV32Config's defaults (64 heads of 128, top 2,048); GlmMoeDsaConfig's heads: 32.
        heads: r
            .opt_u64(&["index_n_heads"])?
            .unwrap_or(if glm5 { 32 } else { 64 }),
        head_dim: r.opt_u64(&["index_head_dim"])?.unwrap_or(128),
        topk: r.opt_u64(&["index_topk"])?.unwrap_or(2048),
        returns_topk: glm5,
    };
    // `torch.split(q, [qk_rope_head_dim, head_dim - qk_rope_head_dim])` needs the rotary part
    // to fit in the indexer's head.
    if indexer.head_dim < mla.rope_dim {
        return Err(Error::field(
            r.path,
            "index_head_dim",
            format!(
                "({}) is narrower than qk_rope_head_dim ({})",
                indexer.head_dim, mla.rope_dim
            ),
        ));
    }
    // Every layer is `"deepseek_sparse_attention"`, the one key of the model's mask mapping.
    if let Some((key, list)) = r.raw(&["layer_types"]) {
        let list = list.as_array().map_or(&[][..], Vec::as_slice);
        one_per_layer(r, key, list, layers)?;
        if list
            .iter()
            .any(|t| t.as_str() != Some("deepseek_sparse_attention"))
        {
            return Err(Error::field(
                r.path,
                key,
                "must list \"deepseek_sparse_attention\" for every layer",
            ));
        }
    }
    let shared = if glm5 {
        topk_shared_layers(r, layers)?
    } else {
        Vec::new()
    };
    Ok(Some((indexer, shared)))
}

/// GlmMoeDsaConfig's `indexer_types`, or the pattern it derives them from
/// (`index_topk_pattern`, else `index_topk_freq` and `index_skip_topk_offset`): true where a
/// layer reuses the previous layer's top-k (`"shared"`).
fn topk_shared_layers(r: &Reader, layers: u64) -> Result<Vec<bool>> {
    let listed = |key: &'static str, list: &[Value]| -> Result<Vec<bool>> {
        one_per_layer(r, key, list, layers)?;
        list.iter()
            .map(|t| match t.as_str() {
                Some("full" | "F") => Ok(false),
                Some("shared" | "S") => Ok(true),
                _ => Err(Error::field(
                    r.path,
                    key,
                    format!("must list \"full\" or \"shared\" per layer, found `{t}`"),
                )),
            })
            .collect()
    };
    let shared = if let Some((key, v)) = r.raw(&["indexer_types"]) {
        listed(key, v.as_array().map_or(&[][..], Vec::as_slice))?
    } else if let Some((key, v)) = r.raw(&["index_topk_pattern"]) {
        match v {
            Value::String(p) => {
                let chars: Vec<Value> = p.chars().map(|c| Value::String(c.to_string())).collect();
                listed(key, &chars)?
            }
            Value::Array(list) => listed(key, list)?,
            _ => {
                return Err(Error::field(
                    r.path,
                    key,
                    "must be a string of F and S or a list",
                ));
            }
        }
    } else {
        // `"full" if max(i - offset + 1, 0) % freq == 0 else "shared"`.
        let freq = r.opt_u64(&["index_topk_freq"])?.unwrap_or(1);
        let offset = match r.raw(&["index_skip_topk_offset"]) {
            Some((key, v)) => v.as_u64().filter(|&o| o <= layers.max(1)).ok_or_else(|| {
                Error::field(r.path, key, format!("must be a layer index, found `{v}`"))
            })?,
            None => 2,
        };
        (0..layers)
            .map(|i| !(i + 1).saturating_sub(offset).is_multiple_of(freq))
            .collect()
    };
    // A shared first layer has no earlier top-k: the forward raises.
    if shared.first() == Some(&true) {
        let key = ["indexer_types", "index_topk_pattern", "index_topk_freq"]
            .into_iter()
            .find(|k| r.map.contains_key(*k))
            .unwrap_or("indexer_types");
        return Err(
            Error::field(r.path, key, "makes the first layer \"shared\"").with_hint(
                "a shared layer reuses an earlier layer's top-k; the first must be \"full\"",
            ),
        );
    }
    Ok(shared)
}

fn deepseek(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    let intermediate = r.u64(&["intermediate_size"])?;
    // `q_lora_rank`: transformers' default is 1536 (DeepseekV2Config, V3 alike; 768 in
    // Glm4MoeLiteConfig); V2-Lite's config says null (no query bottleneck), which a TOML file
    // writes as 0.
    let q_rank = match r.map.get("q_lora_rank") {
        // MiniCPM3Config's default is 768 too.
        None => Some(if glm4_moe_lite(r) || family == Family::MiniCpm3 {
            768
        } else if family == Family::Mistral4 {
            1024
        } else if r.model_type() == Some("glm_moe_dsa") {
            2048
        } else {
            1536
        }),
        Some(Value::Null) => None,
        Some(v) if v.as_u64() == Some(0) => {
            r.raw(&["q_lora_rank"]);
            None
        }
        Some(_) => r.opt_u64(&["q_lora_rank"])?,
    };
    let minicpm3 = family == Family::MiniCpm3;
    // MiniCPM3Config has defaults (MiniCPM3-4B's): a latent of 256, heads of 64 + 32, values of
    // `hidden_size / num_attention_heads` when `v_head_dim` is null; DeepSeek's keys are required.
    let width = |key: &'static str, default: u64| {
        if minicpm3 {
            Ok(r.opt_u64(&[key])?.unwrap_or(default))
        } else {
            r.u64(&[key])
        }
    };
    let mut mla = Mla {
        q_rank,
        kv_rank: width("kv_lora_rank", 256)?,
        rope_dim: width("qk_rope_head_dim", 32)?,
        nope_dim: width("qk_nope_head_dim", 64)?,
        v_dim: width("v_head_dim", hidden / heads.max(1))?,
        indexer: None,
    };
    let layers = r.u64(&["num_hidden_layers"])?;
    let mut topk_shared_layers = Vec::new();
    if let Some((indexer, shared)) = indexer(r, &mla, layers)? {
        mla.indexer = Some(indexer);
        topk_shared_layers = shared;
    }
    let multipliers = if minicpm3 {
        // MiniCPM3Config.__post_init__: a null `scale_depth` is sqrt(layers) (a residual scale
        // of 1) and a null `dim_model_base` is `hidden_size` (a divisor of 1); `f64_or` takes
        // positive numbers only.
        // (`Reader::raw` reads null as absent, so the map is asked directly.)
        let scalar = |key: &'static str, if_null: f64, default: f64| {
            if r.map.get(key).is_some_and(Value::is_null) {
                r.raw(&[key]);
                Ok(if_null)
            } else {
                r.f64_or(&[key], default)
            }
        };
        let depth = scalar("scale_depth", (layers as f64).sqrt(), 1.4)?;
        let base = scalar("dim_model_base", hidden as f64, 256.0)?;
        Multipliers {
            token_embedding: r.f64_or(&["scale_emb"], 12.0)?,
            residual: depth / (layers.max(1) as f64).sqrt(),
            head_input_divisor: hidden as f64 / base,
            ..Multipliers::default()
        }
    } else {
        Multipliers::default()
    };
    r.raw(&[
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "num_key_value_heads",
        "head_dim",
        "rope_interleave",
        "attention_bias",
        "num_nextn_predict_layers",
        "ep_size",
        // MiniCPM3Config.__post_init__ writes `qk_head_dim` (nope + rope) beside `head_dim`.
        "qk_head_dim",
        // YoutuConfig's embedding initialiser: values, not shapes.
        "embedding_initializer_range",
    ]);
    let stack = Stack::new(
        layers,
        heads,
        heads,
        mla.nope_dim + mla.rope_dim,
        intermediate,
    );
    // DeepseekV2MLP, DeepseekV3MLP, their experts and MiniCPM3MLP (LlamaMLP) all apply
    // `ACT2FN[config.hidden_act]`.
    let act = r.str_or(&["hidden_act"], "silu")?;
    Ok(ModelSpec {
        activation: activation(r.path, &act, "hidden_act")?,
        // MiniCPM3Config and YoutuConfig tie the embeddings by default.
        tie_word_embeddings: r.bool_or(
            &["tie_word_embeddings"],
            minicpm3 || family == Family::Youtu,
        )?,
        dropout: Dropouts {
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        moe: moe(r, family, intermediate)?,
        // DeepseekV32PreTrainedModel: `_supports_flash_attn = False` (its FlashMLA path is not
        // wired up).
        flash_attention: mla.indexer.is_none(),
        mla: Some(mla),
        topk_shared_layers,
        multipliers,
        // Mistral4Attention: `query_states * get_llama_4_attn_scale(...)` after the
        // concatenation, in every layer.
        query_scale: if family == Family::Mistral4 {
            QueryScale::Every
        } else {
            QueryScale::None
        },
        ..ModelSpec::decoder_only(family, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `MambaForCausalLM`: blocks of RMSNorm, the selective-scan mixer and a residual; no FFN, no
/// attention, tied embeddings by default. `FalconMambaForCausalLM` is the same model under
/// the same keys, with weightless norms on dt, B and C (`mixer_rms_eps`).
fn mamba(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let expand = r.opt_u64(&["expand"])?.unwrap_or(2);
    let dt_rank = r.u64_or_auto("time_step_rank", hidden.div_ceil(16))?;
    if r.bool_or(&["use_bias"], false)? {
        return Err(Error::field(r.path, "use_bias", "is not supported")
            .with_hint("the published Mamba checkpoints have no linear biases"));
    }
    r.raw(&[
        "layer_norm_epsilon",
        "use_conv_bias",
        "residual_in_fp32",
        "hidden_act",
        "time_step_scale",
        "time_step_min",
        "time_step_max",
        "time_step_init_scheme",
        "time_step_floor",
        "rescale_prenorm_residual",
        "use_mambapy",
        "use_associative_scan",
        "mixer_rms_eps",
    ]);
    // The mixer's width. `MambaConfig.__post_init__` (and Falcon Mamba's) sets
    // `intermediate_size = expand x hidden_size`, but transformers 5.17 then sets the config's
    // other keys as they are, so a stated `intermediate_size` wins. Falcon Mamba 7B's config
    // states expand 16 but `intermediate_size` 8,192 (2 x 4,096), which is what its 7.27 B
    // parameters hold.
    let inner = match r.opt_u64(&["intermediate_size"])? {
        Some(i) => i,
        None => hidden.saturating_mul(expand),
    };
    let ssm = Ssm {
        inner,
        state: r.opt_u64(&["state_size"])?.unwrap_or(16),
        conv: r.opt_u64(&["conv_kernel"])?.unwrap_or(4),
        dt_rank,
        dt_bc_norms: if family == Family::FalconMamba {
            DtBcNorms::Weightless
        } else {
            DtBcNorms::None
        },
    };
    let stack = Stack::new(r.u64(&["num_hidden_layers"])?, 1, 1, hidden, 0);
    Ok(ModelSpec {
        positions: Positions::None,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        mixers: vec![Mixer::Ssm(ssm)],
        ..ModelSpec::decoder_only(family, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `JambaForCausalLM` (transformers 5.17's `JambaConfig` keys and defaults): Llama's blocks
/// (RMSNorms, GQA without bias, a SwiGLU MLP) with no positions; layer i attends when
/// `i % attn_layer_period == attn_layer_offset` (8, 4) and runs a Mamba mixer otherwise
/// (`mamba_expand x hidden` channels, `mamba_d_state`, `mamba_d_conv`, `mamba_dt_rank`, with
/// weighted RMSNorms on dt, B and C); its FFN is `num_experts` fused experts when `i %
/// expert_layer_period == expert_layer_offset` (2, 1) and there is more than one expert, the
/// MLP otherwise. The router (`nn.Linear`) softmaxes in fp32, takes the top k and casts them
/// to the hidden states' dtype without renormalising.
fn jamba(r: &Reader) -> Result<ModelSpec> {
    let base = llama_like(r, Family::Jamba)?;
    let hidden = base.hidden_size;
    let layers = base.decoder.layers;
    let periodic = |period_key: &'static str, offset_key: &'static str, defaults: (u64, u64)| {
        let period = r.opt_u64(&[period_key])?.unwrap_or(defaults.0);
        let offset = r.opt_u64(&[offset_key])?.unwrap_or(defaults.1);
        if offset >= period {
            return Err(Error::field(
                r.path,
                offset_key,
                format!("({offset}) must be smaller than `{period_key}` ({period})"),
            ));
        }
        Ok((period, offset))
    };
    let (attn_period, attn_offset) = periodic("attn_layer_period", "attn_layer_offset", (8, 4))?;
    let (expert_period, expert_offset) =
        periodic("expert_layer_period", "expert_layer_offset", (2, 1))?;
    for (key, default) in [("mamba_conv_bias", true), ("mamba_proj_bias", false)] {
        if r.bool_or(&[key], default)? != default {
            return Err(
                Error::field(r.path, key, format!("{} is not supported", !default))
                    .with_hint(format!("the published Jamba checkpoints use {default}")),
            );
        }
    }
    let dt_rank = r.u64_or_auto("mamba_dt_rank", hidden.div_ceil(16))?;
    let ssm = Ssm {
        inner: r.opt_u64(&["mamba_expand"])?.unwrap_or(2) * hidden,
        state: r.opt_u64(&["mamba_d_state"])?.unwrap_or(16),
        conv: r.opt_u64(&["mamba_d_conv"])?.unwrap_or(4),
        dt_rank,
        dt_bc_norms: DtBcNorms::Weighted,
    };
    let experts = r.opt_u64(&["num_experts"])?.unwrap_or(16);
    let top_k = r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(2);
    // One expert makes every FFN the dense MLP (JambaConfig keeps its top-k of 2 regardless).
    if experts > 1 {
        check_top_k(r, experts, top_k)?;
    }
    r.raw(&[
        "use_mamba_kernels",
        "use_mambapy",
        "use_associative_scan",
        "router_aux_loss_coef",
        "output_router_logits",
        "num_logits_to_keep",
    ]);
    let mixers = (0..layers)
        .map(|i| {
            if i % attn_period == attn_offset {
                Mixer::Attention
            } else {
                Mixer::Ssm(ssm)
            }
        })
        .collect();
    let sparse = |i: u64| experts > 1 && i % expert_period == expert_offset;
    let ffns = (0..layers)
        .map(|i| {
            if sparse(i) {
                FfnKind::Moe
            } else {
                FfnKind::Dense
            }
        })
        .collect();
    let moe = (0..layers).any(sparse).then_some(Moe {
        experts,
        top_k,
        expert_intermediate: base.decoder.intermediate_size,
        shared_intermediate: 0,
        shared_gate: false,
        first_dense: 0,
        every: 1,
        bias: false,
        gate: ExpertGate::Activation,
        routing: Routing::TopKUnnormalised,
        input_jitter: 0,
        router: RouterPrecision::Model,
        weights: RoutingWeights::Hidden,
        beside_mlp: false,
        shared_average: false,
        frozen_score_bias: false,
        output_norm: false,
        fp32_combine: false,
        latent: None,
    });
    Ok(ModelSpec {
        positions: Positions::None,
        rope_layers: Vec::new(),
        mixers,
        ffns,
        moe,
        ..base
    })
}

/// `Mamba2ForCausalLM`: Mamba's blocks (RMSNorm, mixer, fp32 residual) around Mamba-2's
/// mixer; no FFN, no attention, no positions.
fn mamba2(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let expand = r.opt_u64(&["expand"])?.unwrap_or(2);
    let ssd = read_ssd(
        r,
        (
            r.opt_u64(&["num_heads"])?.unwrap_or(128),
            r.opt_u64(&["head_dim"])?.unwrap_or(64),
            (hidden.saturating_mul(expand), "expand x hidden_size"),
        ),
        [
            (&["state_size"], 128),
            (&["n_groups"], 8),
            (&["conv_kernel"], 4),
            (&["chunk_size"], 256),
        ],
        [&["num_heads"], &["use_bias"], &["use_conv_bias"]],
    )?;
    if !r.bool_or(&["residual_in_fp32"], true)? {
        return Err(
            Error::field(r.path, "residual_in_fp32", "false is not supported")
                .with_hint("the published Mamba-2 checkpoints keep the residual in fp32"),
        );
    }
    r.raw(&[
        "layer_norm_epsilon",
        "hidden_act",
        "time_step_rank",
        "time_step_min",
        "time_step_max",
        "time_step_floor",
        "time_step_limit",
        "rescale_prenorm_residual",
        "norm_before_gate",
        "rms_norm",
    ]);
    let stack = Stack::new(r.u64(&["num_hidden_layers"])?, 1, 1, hidden, 0);
    Ok(ModelSpec {
        positions: Positions::None,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        mixers: vec![Mixer::Ssd(ssd)],
        ..ModelSpec::decoder_only(Family::Mamba2, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `NemotronHForCausalLM` (transformers 5.17's `NemotronHConfig` keys and defaults): one
/// sub-layer per `layers_block_type` entry (or `hybrid_override_pattern` character: M, *, -,
/// E), each `residual + mixer(norm(x))` with no fp32 residual:
/// - "linear_attention" (M, legacy "mamba"): `NemotronHMamba2Mixer`, Mamba-2's mixer of
///   `mamba_num_heads x mamba_head_dim` channels (not `expand x hidden`), biases from
///   `use_bias`, its gated norm per B/C group (`Zamba2RMSNormGated(group_size=inner /
///   n_groups)`);
/// - "full_attention" (*, legacy "attention"): GQA without biases or positions (no rotary:
///   `NemotronHAttention` applies none);
/// - "mlp" (-): `up_proj`, squared ReLU, `down_proj`, biases from `mlp_bias`;
/// - "moe" (E): `NemotronHMoE`, non-gated experts behind DeepSeek-V3's sigmoid router (fp32
///   operands, group-limited top-k, weights in the logits' dtype), a shared MLP after them.
fn nemotron_h(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let types: Vec<String> = match r.raw(&["layers_block_type", "layer_types"]) {
        Some((key, Value::Array(list))) => list
            .iter()
            .map(|t| match t.as_str() {
                Some("mamba") => Ok("linear_attention".to_string()),
                Some("attention") => Ok("full_attention".to_string()),
                Some(t) => Ok(t.to_string()),
                None => Err(Error::field(
                    r.path,
                    key,
                    format!("must list layer types as strings, found `{t}`"),
                )),
            })
            .collect::<Result<_>>()?,
        Some((key, v)) => {
            return Err(Error::field(
                r.path,
                key,
                format!("must be a list of layer types, found `{v}`"),
            ));
        }
        None => match r.raw(&["hybrid_override_pattern"]) {
            Some((key, Value::String(p))) => p
                .chars()
                .map(|c| match c {
                    'M' => Ok("linear_attention".to_string()),
                    '*' => Ok("full_attention".to_string()),
                    '-' => Ok("mlp".to_string()),
                    'E' => Ok("moe".to_string()),
                    other => Err(Error::field(
                        r.path,
                        key,
                        format!("`{other}` is not a layer (M, *, - or E)"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some((key, v)) => {
                return Err(Error::field(
                    r.path,
                    key,
                    format!("must be a string of M, *, - and E, found `{v}`"),
                ));
            }
            // NemotronHConfig's default.
            None => ["linear_attention", "moe", "full_attention", "mlp"]
                .map(String::from)
                .to_vec(),
        },
    };
    if types.is_empty() {
        return Err(Error::field(r.path, "layers_block_type", "lists no layers"));
    }
    // `num_hidden_layers` is derived from the list (a different stated count only warns).
    r.raw(&[
        "num_hidden_layers",
        "mtp_layers_block_type",
        "mtp_hybrid_override_pattern",
    ]);
    let heads = r.opt_u64(&["mamba_num_heads"])?.unwrap_or(128);
    let head_dim = r.opt_u64(&["mamba_head_dim"])?.unwrap_or(64);
    let ssd = read_ssd(
        r,
        (
            heads,
            head_dim,
            (
                heads.saturating_mul(head_dim),
                "mamba_num_heads x mamba_head_dim",
            ),
        ),
        [
            (&["ssm_state_size"], 128),
            (&["n_groups", "mamba_n_groups"], 8),
            (&["conv_kernel", "mamba_d_conv"], 4),
            (&["chunk_size", "mamba_chunk_size"], 128),
        ],
        [
            &["mamba_num_heads"],
            &["use_bias"],
            &["use_conv_bias", "mamba_conv_bias"],
        ],
    )?;
    let ssd = Ssd {
        norm_groups: ssd.groups,
        ..ssd
    };
    let act = r.str_or(&["mamba_hidden_act"], "silu")?;
    if act != "silu" {
        return Err(Error::field(
            r.path,
            "mamba_hidden_act",
            format!("`{act}` is not supported"),
        )
        .with_hint("the published Nemotron-H checkpoints use silu"));
    }
    // Nemotron 3 Super's latent experts: null (the default) keeps them on the hidden width.
    let latent = match r.raw(&["moe_latent_size"]) {
        Some((_, v)) if !v.is_null() => r.opt_u64(&["moe_latent_size"])?,
        _ => None,
    };
    r.raw(&[
        "mamba_expand",
        "expand",
        "mamba_proj_bias",
        "time_step_min",
        "time_step_max",
        "time_step_limit",
        "time_step_floor",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_limit",
        "mamba_dt_init_floor",
        "mamba_ssm_cache_dtype",
        "use_mamba_kernels",
        "residual_in_fp32",
        "rescale_prenorm_residual",
        "hidden_dropout",
        "attention_bias",
        "sliding_window",
        "layer_norm_epsilon",
        "num_logits_to_keep",
        "max_position_embeddings",
        "num_nextn_predict_layers",
        "moe_shared_expert_overlap",
        "n_shared_experts",
        "routed_scaling_factor",
        "n_group",
        "topk_group",
        "norm_topk_prob",
    ]);
    let mut mixers = Vec::with_capacity(types.len());
    let mut ffns = Vec::with_capacity(types.len());
    for t in &types {
        let (mixer, ffn) = match t.as_str() {
            "linear_attention" => (Mixer::Ssd(ssd), FfnKind::None),
            "full_attention" => (Mixer::Attention, FfnKind::None),
            "mlp" => (Mixer::None, FfnKind::Dense),
            "moe" => (Mixer::None, FfnKind::Moe),
            other => {
                return Err(Error::field(
                    r.path,
                    "layers_block_type",
                    format!("`{other}` is not a known layer type"),
                )
                .with_hint("linear_attention, full_attention, mlp or moe"));
            }
        };
        mixers.push(mixer);
        ffns.push(ffn);
    }
    let moe = if ffns.contains(&FfnKind::Moe) {
        let experts = r
            .opt_u64(&["n_routed_experts", "num_local_experts"])?
            .unwrap_or(8);
        let top_k = r.opt_u64(&["num_experts_per_tok"])?.unwrap_or(2);
        check_top_k(r, experts, top_k)?;
        Some(Moe {
            experts,
            top_k,
            expert_intermediate: r.opt_u64(&["moe_intermediate_size"])?.unwrap_or(7688),
            // NemotronHMoE builds one `shared_experts` MLP of this width whatever
            // `n_shared_experts` says.
            shared_intermediate: r
                .opt_u64(&["moe_shared_expert_intermediate_size"])?
                .unwrap_or(7688),
            shared_gate: false,
            first_dense: 0,
            every: 1,
            bias: false,
            gate: ExpertGate::None,
            routing: Routing::TopK,
            input_jitter: 0,
            router: RouterPrecision::Fp32Operands,
            weights: RoutingWeights::Logits,
            beside_mlp: false,
            shared_average: false,
            frozen_score_bias: false,
            output_norm: false,
            fp32_combine: false,
            latent,
        })
    } else {
        r.raw(&[
            "n_routed_experts",
            "num_local_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ]);
        None
    };
    let act = r.str_or(&["mlp_hidden_act"], "relu2")?;
    let stack = Stack::new(
        types.len() as u64,
        r.opt_u64(&["num_attention_heads"])?.unwrap_or(32),
        r.opt_u64(&["num_key_value_heads"])?.unwrap_or(8),
        r.opt_u64(&["head_dim"])?.unwrap_or(128),
        r.opt_u64(&["intermediate_size"])?.unwrap_or(21504),
    );
    Ok(ModelSpec {
        gated_ffn: false,
        activation: activation(r.path, &act, "mlp_hidden_act")?,
        positions: Positions::None,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        linear_bias: r.bool_or(&["mlp_bias"], false)?,
        out_bias: Some(false),
        dropout: Dropouts {
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        mixers,
        ffns,
        moe,
        ..ModelSpec::decoder_only(Family::NemotronH, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

/// `FalconH1ForCausalLM` (transformers 5.17's `FalconH1Config` keys and defaults): every layer
/// a Mamba-2 mixer (`mamba_d_ssm` channels, 1,024 by default, `expand x hidden` when null;
/// `mamba_n_heads` heads of `mamba_d_head`, "auto" dividing them evenly) beside GQA attention
/// with rotary, both on the input norm's output, then a SwiGLU MLP. The mixer's output is
/// gated by `FalconH1RMSNormGated` (per B/C group, `mamba_norm_before_gate` choosing the
/// order) or, with `mamba_rms_norm` false (the default), by `y * silu(z)` alone. The µP
/// multipliers always run as ops whatever their values; the logits' becomes Granite's divisor.
fn falcon_h1(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let inner = match r.raw(&["mamba_d_ssm"]) {
        None => 1024,
        Some((_, Value::Null)) => hidden.saturating_mul(r.opt_u64(&["mamba_expand"])?.unwrap_or(2)),
        Some(_) => r.u64(&["mamba_d_ssm"])?,
    };
    r.raw(&["mamba_expand"]);
    let ssd = mamba_prefixed_ssd(r, (inner, "mamba_d_ssm"))?;
    let gated_norm = match (
        r.bool_or(&["mamba_rms_norm"], false)?,
        r.bool_or(&["mamba_norm_before_gate"], true)?,
    ) {
        (false, _) => GatedNorm::GateOnly,
        (true, true) => GatedNorm::NormThenGate,
        (true, false) => GatedNorm::GateThenNorm,
    };
    let ssd = Ssd {
        norm_groups: ssd.groups,
        gated_norm,
        out_bias: r.bool_or(&["projectors_bias"], false)?,
        mup: true,
        ..ssd
    };
    let act = r.str_or(&["hidden_act"], "silu")?;
    if act != "silu" {
        return Err(
            Error::field(r.path, "hidden_act", format!("`{act}` is not supported"))
                .with_hint("the Mamba-2 convolution's activation is modelled as silu, which the published Falcon-H1 checkpoints use"),
        );
    }
    let lm_head = r.f64_or(&["lm_head_multiplier"], 1.0)?;
    r.raw(&[
        "time_step_limit",
        "rms_norm_eps",
        "num_logits_to_keep",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "mlp_multipliers",
        "ssm_multipliers",
        "key_multiplier",
        "attention_in_multiplier",
        "attention_out_multiplier",
        "ssm_in_multiplier",
        "ssm_out_multiplier",
    ]);
    let heads = r.opt_u64(&["num_attention_heads"])?.unwrap_or(32);
    let kv_heads = match r.raw(&["num_key_value_heads"]) {
        Some((_, Value::Null)) => heads,
        _ => r.opt_u64(&["num_key_value_heads"])?.unwrap_or(8),
    };
    let stack = Stack::new(
        r.opt_u64(&["num_hidden_layers"])?.unwrap_or(32),
        heads,
        kv_heads,
        r.opt_u64(&["head_dim"])?.unwrap_or(hidden / heads.max(1)),
        r.opt_u64(&["intermediate_size"])?.unwrap_or(14336),
    );
    let attention_bias = r.bool_or(&["attention_bias"], false)?;
    Ok(ModelSpec {
        activation: activation(r.path, &act, "hidden_act")?,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: attention_bias,
        out_bias: Some(attention_bias),
        linear_bias: r.bool_or(&["mlp_bias"], false)?,
        dropout: Dropouts {
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        multipliers: Multipliers {
            embedding: r.f64_or(&["embedding_multiplier"], 1.0)?,
            logits_divisor: 1.0 / lm_head,
            ..Multipliers::default()
        },
        parallel_ssd: Some(ssd),
        ..ModelSpec::decoder_only(Family::FalconH1, hidden, r.u64(&["vocab_size"])?, stack)
    })
}

fn gpt2(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["n_embd", "hidden_size"])?;
    let heads = r.u64(&["n_head", "num_attention_heads"])?;
    let bigcode = family == Family::GptBigcode;
    let act = r.str_or(
        &["activation_function"],
        if bigcode {
            "gelu_pytorch_tanh"
        } else {
            "gelu_new"
        },
    )?;
    r.raw(&["layer_norm_epsilon"]);
    // GPTBigCodeAttention: `multi_query` (true by default) gives one key/value head; its
    // softmax-precision flags only concern the legacy fused-softmax path.
    r.raw(&[
        "scale_attn_weights",
        "attention_softmax_in_fp32",
        "scale_attention_softmax_in_fp32",
    ]);
    let kv_heads = if bigcode && r.bool_or(&["multi_query"], true)? {
        1
    } else {
        heads
    };
    let positions = r.u64(&["n_positions", "max_position_embeddings"])?;
    // GPTBigCodeModel registers `bias`, an (n_positions x n_positions) bool lower-triangular
    // table (non-persistent, moved to the GPU with the model): 64 MiB for StarCoder's 8,192.
    // (`nn.Buffer` in GPTBigCodeModel.__init__; GPT-2 holds no such buffer in transformers 5.)
    let buffers = if bigcode {
        Bytes(positions.saturating_mul(positions))
    } else {
        Bytes::ZERO
    };
    Ok(ModelSpec {
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack::new(
            r.u64(&["n_layer", "num_hidden_layers"])?,
            heads,
            kv_heads,
            hidden / heads.max(1),
            r.opt_u64(&["n_inner"])?.unwrap_or(4 * hidden),
        ),
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        positions: Positions::Learned { rows: positions },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        buffers,
        qkv_bias: true,
        linear_bias: true,
        fused_qkv: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["embd_pdrop"], 0.1)?,
            attention: r.f64_or(&["attn_pdrop"], 0.1)?,
            residual: r.f64_or(&["resid_pdrop"], 0.1)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        ..ModelSpec::of_family(family)
    })
}

/// GPTNeoConfig (saved keys `num_layers`, `num_heads`). `attention_types` alternates global
/// and local layers, but the local ones differ only in their mask: the eager code multiplies
/// out every score and masks with the layer's own (positions x positions) bool buffer, and the
/// flash_attention_2 path passes no window at all, so every layer costs full causal attention;
/// the buffers stay on the GPU, one per layer (`GPTNeoSelfAttention.bias`, `nn.Buffer`).
fn gpt_neo(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_heads", "num_attention_heads"])?;
    let layers = r.u64(&["num_layers", "num_hidden_layers"])?;
    let positions = r.u64(&["max_position_embeddings"])?;
    let act = r.str_or(&["activation_function"], "gelu_new")?;
    r.raw(&[
        "attention_types",
        "attention_layers",
        "window_size",
        "layer_norm_epsilon",
        "classifier_dropout",
    ]);
    Ok(ModelSpec {
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack::new(
            layers,
            heads,
            heads,
            hidden / heads.max(1),
            r.opt_u64(&["intermediate_size"])?.unwrap_or(4 * hidden),
        ),
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        positions: Positions::Learned { rows: positions },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: false,
        linear_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["embed_dropout"], 0.0)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["resid_dropout"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        buffers: Bytes(layers.saturating_mul(positions.saturating_mul(positions))),
        ..gpt_neo_attention(ModelSpec::of_family(Family::GptNeo))
    })
}

/// The attention GPT-Neo's `GPTNeoSelfAttention._attn` set and GPT-J and CodeGen copied: no SDPA
/// path (`_supports_sdpa = False`), q and k cast to fp32 before the scores, and each block
/// returning its probabilities to the model's layer loop.
fn gpt_neo_attention(base: ModelSpec) -> ModelSpec {
    ModelSpec {
        sdpa: false,
        attention_upcast: true,
        returned_weights: ReturnedWeights::Cast,
        ..base
    }
}

/// GPTJConfig and CodeGenConfig. Each attention layer keeps its sin/cos table as an fp32 buffer
/// (`embed_positions`, `n_positions x rotary_dim`, built by `create_sinusoidal_positions`).
/// CodeGen fuses q, k and v into one `qkv_proj` and splits it as 4 model-parallel shards
/// (`mp_num = 4` in `CodeGenAttention.forward`), so its heads come in fours.
fn gptj(r: &Reader, family: Family) -> Result<ModelSpec> {
    let codegen = family == Family::Codegen;
    let hidden = r.u64(&["n_embd", "hidden_size"])?;
    let heads = r.u64(&["n_head", "num_attention_heads"])?;
    let layers = r.u64(&["n_layer", "num_hidden_layers"])?;
    let positions = r.u64(&["n_positions", "max_position_embeddings"])?;
    let head_dim = hidden / heads.max(1);
    let rotary_dim = r.opt_u64(&["rotary_dim"])?.unwrap_or(head_dim);
    if rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(Error::field(
            r.path,
            "rotary_dim",
            format!("({rotary_dim}) must be even and at most the head size ({head_dim})"),
        ));
    }
    if codegen && !heads.is_multiple_of(4) {
        return Err(Error::field(
            r.path,
            "n_head",
            format!("({heads}) is not a multiple of 4: CodeGen splits its qkv_proj into 4 shards"),
        ));
    }
    let act = r.str_or(&["activation_function"], "gelu_new")?;
    r.raw(&["layer_norm_epsilon", "n_ctx"]);
    Ok(ModelSpec {
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack::new(
            layers,
            heads,
            heads,
            head_dim,
            r.opt_u64(&["n_inner"])?.unwrap_or(4 * hidden),
        ),
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        positions: Positions::Rotary {
            fraction: rotary_dim as f64 / head_dim.max(1) as f64,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: false,
        linear_bias: true,
        out_bias: Some(false),
        fused_qkv: codegen,
        qkv_split_copies: codegen,
        // CodeGenPreTrainedModel declares no flash_attention_2 (GPTJPreTrainedModel does).
        flash_attention: !codegen,
        parallel_block: true,
        lm_head_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["embd_pdrop"], 0.0)?,
            attention: r.f64_or(&["attn_pdrop"], 0.0)?,
            residual: r.f64_or(&["resid_pdrop"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        buffers: Bytes(
            layers
                .saturating_mul(positions.saturating_mul(rotary_dim))
                .saturating_mul(4),
        ),
        ..gpt_neo_attention(ModelSpec::of_family(family))
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
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack::multi_head(
            r.u64(&["num_hidden_layers"])?,
            heads,
            hidden / heads.max(1),
            r.u64(&["ffn_dim"])?,
        ),
        gated_ffn: false,
        activation: activation(r.path, &act, "activation_function")?,
        norm: Norm::LayerNorm,
        // OPTLearnedPositionalEmbedding keeps 2 extra rows (the offset).
        positions: Positions::Learned {
            rows: r.u64(&["max_position_embeddings"])? + 2,
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["dropout"], 0.1)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["dropout"], 0.1)?,
            activation: r.f64_or(&["activation_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        ..ModelSpec::of_family(Family::Opt)
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
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack::multi_head(
            r.u64(&["num_hidden_layers"])?,
            heads,
            hidden / heads.max(1),
            r.u64(&["intermediate_size"])?,
        ),
        gated_ffn: false,
        activation: activation(r.path, &act, "hidden_act")?,
        norm: Norm::LayerNorm,
        // Hub configs write `rotary_pct`; transformers 5 saves `partial_rotary_factor`, in
        // `rope_parameters`.
        positions: rotary_fraction_of(r, &["rotary_pct", "partial_rotary_factor"], 0.25)?,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: r.bool_or(&["attention_bias"], true)?,
        linear_bias: true,
        parallel_block: parallel,
        fused_qkv: true,
        dropout: Dropouts {
            embedding: 0.0,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["hidden_dropout"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        parallel_two_norms: parallel,
        ..ModelSpec::of_family(Family::GptNeox)
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
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: r.opt_u64(&["num_key_value_heads"])?.unwrap_or(heads),
            head_dim: hidden / heads.max(1),
            intermediate_size: r.u64(&["intermediate_size"])?,
        },
        gated_ffn: false,
        activation: activation(r.path, &act, "hidden_act")?,
        norm: Norm::LayerNorm,
        // PhiConfig's default 0.5; top level or in `rope_parameters`.
        positions: rotary_fraction(r, 0.5)?,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], false)?,
        qkv_bias: true,
        linear_bias: true,
        parallel_block: true,
        lm_head_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["embd_pdrop"], 0.0)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["resid_pdrop"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        ..ModelSpec::of_family(Family::Phi)
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
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads: r.opt_u64(&["num_key_value_heads"])?.unwrap_or(1),
            head_dim: r.opt_u64(&["head_dim"])?.unwrap_or(hidden / heads.max(1)),
            intermediate_size: r.opt_u64(&["intermediate_size"])?.unwrap_or(4 * hidden),
        },
        norm: Norm::LayerNormWithoutBias,
        tie_word_embeddings: true,
        parallel_block: true,
        dropout: Dropouts {
            embedding: 0.0,
            attention: 0.0,
            residual: 0.0,
            activation: 0.0,
            ..Dropouts::default()
        },
        ..ModelSpec::of_family(Family::Palm)
    })
}

fn falcon(r: &Reader) -> Result<ModelSpec> {
    let hidden = r.u64(&["hidden_size"])?;
    let heads = r.u64(&["num_attention_heads"])?;
    // Falcon-40B/180B's new decoder: grouped KV heads (`num_kv_heads`) and a parallel block
    // whose attention and MLP have their own LayerNorms (`ln_attn`, `ln_mlp`).
    let new_decoder = r.bool_or(&["new_decoder_architecture"], false)?;
    if r.bool_or(&["alibi"], false)? {
        return Err(Error::field(r.path, "alibi", "is not supported"));
    }
    let multi_query = r.bool_or(&["multi_query"], true)?;
    let kv_heads = if new_decoder {
        r.opt_u64(&["num_kv_heads"])?.unwrap_or(heads)
    } else if multi_query {
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
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: Stack {
            layers: r.u64(&["num_hidden_layers"])?,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            intermediate_size: r.opt_u64(&["ffn_hidden_size"])?.unwrap_or(4 * hidden),
        },
        gated_ffn: false,
        activation: Activation::Gelu,
        norm: Norm::LayerNorm,
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: bias,
        linear_bias: bias,
        parallel_block: new_decoder || r.bool_or(&["parallel_attn"], true)?,
        fused_qkv: true,
        dropout: Dropouts {
            embedding: 0.0,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["hidden_dropout"], 0.0)?,
            activation: 0.0,
            ..Dropouts::default()
        },
        parallel_two_norms: new_decoder,
        kv_broadcast: new_decoder,
        returned_weights: ReturnedWeights::Softmax,
        ..ModelSpec::of_family(Family::Falcon)
    })
}

fn t5(r: &Reader, family: Family) -> Result<ModelSpec> {
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
    let stack = |layers| Stack::multi_head(layers, heads, head_dim, ff);
    Ok(ModelSpec {
        hidden_size: hidden,
        vocab_size: r.u64(&["vocab_size"])?,
        decoder: stack(r.opt_u64(&["num_decoder_layers"])?.unwrap_or(layers)),
        encoder: Some(stack(layers)),
        gated_ffn: gated,
        activation: act,
        norm: Norm::T5RmsNorm,
        // T5PreTrainedModel declares no flash_attention_2: the relative bias joins the scores.
        flash_attention: false,
        positions: Positions::RelativeBias {
            buckets: r
                .opt_u64(&["relative_attention_num_buckets"])?
                .unwrap_or(32),
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        dropout: Dropouts {
            embedding: drop,
            attention: drop,
            residual: drop,
            activation: drop,
            ..Dropouts::default()
        },
        ..ModelSpec::of_family(family)
    })
}

fn bart(r: &Reader, family: Family) -> Result<ModelSpec> {
    let hidden = r.u64(&["d_model"])?;
    let act = r.str_or(&["activation_function"], "gelu")?;
    let enc_heads = r.u64(&["encoder_attention_heads"])?;
    let dec_heads = r.u64(&["decoder_attention_heads"])?;
    r.raw(&["init_std"]);
    // mBART, Marian and Pegasus multiply the token embeddings by sqrt(d_model)
    // (`scale_embedding`, true in their configs); BART's configs say false, and its `* 1.0` is
    // left out as before.
    let pre_norm = matches!(family, Family::Mbart | Family::Pegasus);
    let embed_scale = if family != Family::Bart && r.bool_or(&["scale_embedding"], false)? {
        (hidden as f64).sqrt()
    } else {
        r.raw(&["scale_embedding"]);
        1.0
    };
    let positions = r.u64(&["max_position_embeddings"])?;
    // Marian and Pegasus: a fixed sinusoidal table per stack, no embedding LayerNorm; BART and
    // mBART: a learned table with 2 extra rows (BartLearnedPositionalEmbedding's offset) and
    // `layernorm_embedding`.
    let sinusoidal = matches!(family, Family::Marian | Family::Pegasus);
    if family == Family::Marian {
        // Marian's separate decoder vocabulary (`share_encoder_decoder_embeddings = false`,
        // `decoder_vocab_size`) gives the decoder its own table and head.
        let vocab = r.u64(&["vocab_size"])?;
        let decoder_vocab = r.opt_u64(&["decoder_vocab_size"])?.unwrap_or(vocab);
        if !r.bool_or(&["share_encoder_decoder_embeddings"], true)? || decoder_vocab != vocab {
            return Err(Error::field(
                r.path,
                "share_encoder_decoder_embeddings",
                "is false (or decoder_vocab_size differs from vocab_size): separate source and \
                 target vocabularies are not modelled",
            )
            .with_hint("plan with the shared-vocabulary OPUS-MT models"));
        }
    }
    let stack =
        |layers, heads: u64, ff| Stack::multi_head(layers, heads, hidden / heads.max(1), ff);
    Ok(ModelSpec {
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
        norm_placement: if pre_norm {
            NormPlacement::Pre
        } else {
            NormPlacement::Post
        },
        multipliers: Multipliers {
            embedding: embed_scale,
            ..Multipliers::default()
        },
        positions: if sinusoidal {
            Positions::Sinusoidal { rows: positions }
        } else {
            Positions::Learned {
                rows: positions + 2,
            }
        },
        tie_word_embeddings: r.bool_or(&["tie_word_embeddings"], true)?,
        qkv_bias: true,
        linear_bias: true,
        dropout: Dropouts {
            embedding: r.f64_or(&["dropout"], 0.1)?,
            attention: r.f64_or(&["attention_dropout"], 0.0)?,
            residual: r.f64_or(&["dropout"], 0.1)?,
            activation: r.f64_or(&["activation_dropout"], 0.0)?,
            ..Dropouts::default()
        },
        embedding_norm: !sinusoidal,
        // `BartForConditionalGeneration.final_logits_bias` (and its mBART, Marian and Pegasus
        // copies), an `nn.Buffer` of zeros.
        logits_buffer: true,
        ..ModelSpec::of_family(family)
    })
}
