//! Issue #8: blocks described by what they are made of (sliding windows per kernel, per-layer
//! patterns, mixture-of-experts, latent attention, a recurrent family) and partial tuning by side.

use ftplan::estimate::{Estimate, estimate};
use ftplan::graph::{self, op::OpKind};
use ftplan::spec::model::{BlockKind, FfnKind, GatedNorm, Mixer, ModelSpec};
use ftplan::spec::plan::{
    AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision, Side,
};
use ftplan::spec::registry::{model_files, parse_model_toml, resolve_hardware, resolve_model};
use ftplan::time::Rates;
use proptest::prelude::*;

fn model(name: &str) -> ModelSpec {
    resolve_model(name).expect("ships").value
}

fn lora() -> Method {
    Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    })
}

/// LoRA r16 on every linear (peft's `all-linear`).
fn lora_all() -> Method {
    Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::AllLinear,
        dora: false,
    })
}

fn plan(method: Method, batch: u64, seq: u64, attention: AttentionKernel) -> Plan {
    Plan {
        precision: if method.frozen_base() {
            Precision::Bf16
        } else {
            Precision::MixedBf16
        },
        method,
        optimizer: Optimizer::Adamw,
        batch,
        seq,
        target_seq: 128,
        grad_ckpt: false,
        attention,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    }
}

/// Full fine-tuning in `precision` with SDPA.
fn full(precision: Precision, batch: u64, seq: u64) -> Plan {
    Plan {
        precision,
        ..plan(Method::Full, batch, seq, AttentionKernel::Sdpa)
    }
}

fn run(m: &ModelSpec, p: &Plan) -> Estimate {
    let hw = resolve_hardware("h200").expect("ships").value;
    estimate(m, p, &hw, &Rates::from_datasheet(&hw)).expect("estimates")
}

/// What `ftplan estimate` of `model` with `method` (and `extra` flags) on an H200 prints on
/// stderr (its notes), asserting that it estimates.
fn estimate_notes(model: &str, method: &str, extra: &[&str]) -> String {
    let out = crate::ftplan()
        .args([
            "estimate", "--model", model, "--gpu", "h200", "--method", method,
        ])
        .args(extra)
        .assert()
        .success();
    crate::stderr_of(&out)
}

/// The error a plan is refused with, as text.
fn refusal(m: &ModelSpec, p: &Plan) -> String {
    let hw = resolve_hardware("h200").expect("ships").value;
    estimate(m, p, &hw, &Rates::from_datasheet(&hw))
        .expect_err("refused")
        .to_string()
}

/// LoRA r16 on the named modules.
fn lora_named(names: &[&str]) -> Method {
    Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::parse(names.iter().copied()).expect("parses"),
        dora: false,
    })
}

/// A toy's base parameters and what LoRA r16 trains on it with `all-linear` and with q,v: the
/// counts the architecture tests compare with transformers' builds and peft's wrapping.
fn lora_counts(m: &ModelSpec) -> (u64, u64, u64) {
    let all = run(m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa)).memory;
    let qv = run(m, &plan(lora(), 1, 64, AttentionKernel::Sdpa)).memory;
    (all.base_params, all.trainable_params, qv.trainable_params)
}

/// Forward FLOPs of the attention cores.
fn attention_flops(m: &ModelSpec, p: &Plan) -> f64 {
    let g = graph::build(m, p);
    g.ops()
        .filter(|o| o.kind == OpKind::Attention)
        .map(|o| o.cost.forward_flops.0 * f64::from(o.repeat.max(1)))
        .sum()
}

/// The same model with every layer attending to every earlier key.
/// A toy model read from a `config.json` object.
fn toy(config: &serde_json::Value) -> ModelSpec {
    ftplan::spec::hf::parse_config("config.json", config, "toy", false).expect("reads")
}

/// Asserts a toy `config.json` object is refused with an error naming `field`.
fn toy_refused(config: &serde_json::Value, field: &str) {
    let err =
        ftplan::spec::hf::parse_config("config.json", config, "toy", false).expect_err("refused");
    assert!(err.to_string().contains(field), "{err}");
}

/// Bytes the ops named `name` keep for backward, and their first parameter's bytes.
fn kept_at(m: &ModelSpec, p: &Plan, name: &str) -> (u64, u64) {
    let g = graph::build(m, p);
    let ops: Vec<_> = g.ops().filter(|o| g.name(o.name) == name).collect();
    assert!(!ops.is_empty(), "no op `{name}`");
    let kept = ops.iter().map(|o| crate::kept_bytes(&g, o)).sum();
    let param = ops[0]
        .params
        .first()
        .map_or(0, |&id| g.params[id.0 as usize].bytes().0);
    (kept, param)
}

/// Distinct activation bytes kept for backward by the ops whose names start with `prefix` (a
/// tensor two of them keep counts once; autocast's weight copies are not activations).
fn kept_under(m: &ModelSpec, p: &Plan, prefix: &str) -> u64 {
    let g = graph::build(m, p);
    let mut ids = std::collections::BTreeSet::new();
    for o in g.ops() {
        if g.name(o.name).starts_with(prefix) {
            ids.extend(o.saves.iter().copied());
        }
    }
    assert!(!ids.is_empty(), "nothing kept under `{prefix}`");
    ids.iter()
        .map(|&t| g.tensor(t))
        .filter(|t| t.kind == ftplan::graph::op::TensorKind::Activation)
        .map(|t| t.bytes.0)
        .sum()
}

/// What LoRA r16 on the modules `names` (peft's `target_modules`) trains on a toy.
fn lora_trainable(m: &ModelSpec, names: &[&str]) -> u64 {
    let mut p = plan(lora_named(names), 1, 64, AttentionKernel::Sdpa);
    if m.encoder.is_some() {
        p.target_seq = 16;
    }
    run(m, &p).memory.trainable_params
}

fn without_window(m: &ModelSpec) -> ModelSpec {
    ModelSpec {
        mixers: vec![Mixer::Attention],
        ..m.clone()
    }
}

#[test]
fn sliding_window_costs_what_each_kernel_makes_of_it() {
    // Mistral-7B: a 4096-token window on all 32 layers, 8 KV heads of 32.
    let m = model("mistral-7b");
    assert_eq!(m.mixers, vec![Mixer::SlidingWindow { window: 4096 }]);
    let full = without_window(&m);
    // flash_attention_2 takes the window as kernel arguments: no mask, and the FLOPs fall to
    // the pairs inside it. At seq 8192: each query sees min(i + 1, 4096) keys,
    // 4096 x 4097 / 2 + 4096 x 4096 = 25,167,872 pairs against 8192 x 8193 / 2 = 33,558,528.
    let flash = plan(lora(), 1, 8192, AttentionKernel::Flash2);
    let ratio = attention_flops(&m, &flash) / attention_flops(&full, &flash);
    assert!(
        (ratio - 25_167_872.0 / 33_558_528.0).abs() < 1e-9,
        "{ratio}"
    );
    assert_eq!(run(&m, &flash).memory.peak, run(&full, &flash).memory.peak);
    // SDPA: below the window transformers passes no mask (is_causal); at or past it,
    // `sdpa_mask` materialises one, SDPA converts it to an additive bf16 mask that the
    // memory-efficient kernel keeps (1 x 8192 x 8192 x 2 B = 128 MiB per layer) and
    // `repeat_kv` expands the 8 KV heads to 32 for the masked call (2 x 3 x 8192 x 1024 x 2 B
    // = 96 MiB more per layer): at least 32 x 224 MiB over full attention.
    let sdpa = plan(lora(), 1, 8192, AttentionKernel::Sdpa);
    let masked = run(&m, &sdpa).memory.peak.0 - run(&full, &sdpa).memory.peak.0;
    assert!(masked >= (32 * 224) << 20, "{masked}");
    let short = plan(lora(), 1, 2048, AttentionKernel::Sdpa);
    assert_eq!(run(&m, &short).memory.peak, run(&full, &short).memory.peak);
    // Eager computes every score whatever the window: the same FLOPs as full attention.
    let eager = plan(lora(), 1, 8192, AttentionKernel::Eager);
    assert_eq!(attention_flops(&m, &eager), attention_flops(&full, &eager));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// With flash2 a window never costs more memory or FLOPs than full attention, and costs the
    /// same once it covers the sequence.
    #[test]
    fn flash2_window_never_costs_more_than_full_attention(window in 1u64..6000, seq in 16u64..5000, batch in 1u64..4) {
        let base = model("tinyllama-1.1b");
        let windowed = ModelSpec { mixers: vec![Mixer::SlidingWindow { window }], ..base.clone() };
        let p = plan(lora(), batch, seq, AttentionKernel::Flash2);
        let (w, f) = (run(&windowed, &p), run(&base, &p));
        prop_assert!(w.memory.peak <= f.memory.peak);
        let (wf, ff) = (attention_flops(&windowed, &p), attention_flops(&base, &p));
        prop_assert!(wf <= ff * (1.0 + 1e-12));
        if window >= seq {
            prop_assert_eq!(w.memory.peak, f.memory.peak);
            prop_assert!((wf - ff).abs() <= ff * 1e-12);
        }
    }
}

#[test]
fn layers_follow_their_published_patterns() {
    let kinds = |m: &ModelSpec| -> Vec<BlockKind> {
        (0..m.decoder.layers).map(|l| m.block_kind(l)).collect()
    };
    let local = |w| Mixer::SlidingWindow { window: w };
    // Gemma-2: layer 0 slides (4096), layer 1 is global, alternating (Gemma2Config.layer_types).
    let g2 = kinds(&model("gemma-2-9b"));
    assert_eq!(g2.len(), 42);
    assert!(g2.iter().step_by(2).all(|k| k.mixer == local(4096)));
    assert!(
        g2.iter()
            .skip(1)
            .step_by(2)
            .all(|k| k.mixer == Mixer::Attention)
    );
    // Gemma-3: five local layers (512) to each global one: layers 5, 11, 17, 23 are global.
    let g3 = kinds(&model("gemma-3-1b"));
    let global: Vec<usize> = (0..g3.len())
        .filter(|&l| g3[l].mixer == Mixer::Attention)
        .collect();
    assert_eq!(global, vec![5, 11, 17, 23]);
    // DeepSeek-V3: the first 3 layers dense, the other 58 sparse; V2-Lite: the first one.
    let v3 = kinds(&model("deepseek-v3"));
    assert!(v3[..3].iter().all(|k| k.ffn == FfnKind::Dense));
    assert!(v3[3..].iter().all(|k| k.ffn == FfnKind::Moe));
    assert_eq!(model("deepseek-v2-lite").moe_layers(), 26);
    // Mamba: no attention, no FFN.
    let mamba = model("mamba-130m");
    assert!(!mamba.has_attention());
    assert!(kinds(&mamba).iter().all(|k| k.ffn == FfnKind::None));
    // An explicit `layer_types` wins over the family rule, and must list every layer.
    let cfg = |types: &str| {
        format!(
            r#"{{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 100,
            "sliding_window": 32, "layer_types": [{types}]}}"#
        )
    };
    let parse = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).expect("json");
        ftplan::spec::hf::parse_config("c.json", &v, "c", false)
    };
    let m = parse(&cfg(
        r#""full_attention", "sliding_attention", "full_attention""#,
    ))
    .expect("parses");
    assert_eq!(
        m.mixers,
        vec![Mixer::Attention, local(32), Mixer::Attention]
    );
    let err = parse(&cfg(r#""full_attention""#)).expect_err("too short");
    assert!(
        err.to_string().contains("lists 1 layers; the model has 3"),
        "{err}"
    );
    // Qwen2-MoE's `decoder_sparse_step` 2: layers 1, 3, 5, ... are sparse.
    let v: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100,
        "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2}"#,
    )
    .expect("json");
    let m = ftplan::spec::hf::parse_config("c.json", &v, "c", false).expect("parses");
    let sparse: Vec<u64> = (0..4)
        .filter(|&l| m.block_kind(l).ffn == FfnKind::Moe)
        .collect();
    assert_eq!(sparse, vec![1, 3]);
}

#[test]
fn qwen_moe_routers_renormalise_only_with_norm_topk_prob() {
    // Qwen2MoeTopKRouter: softmax, topk, then `if self.norm_topk_prob: router_top_value /=
    // router_top_value.sum(...)`, which Qwen2-MoE's config defaults to false. Renormalising
    // launches the sum and the in-place division's clone and divide forward (3) and the
    // division's four kernels, the sum's expand and the fork's add backward (6), per sparse
    // layer: 4 layers here, so 12 and 24 kernels more per step. Memory does not move.
    let config = |norm: Option<bool>| {
        let mut v = serde_json::json!({
            "model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100,
            "num_experts": 8, "num_experts_per_tok": 2
        });
        if let Some(n) = norm {
            v["norm_topk_prob"] = serde_json::json!(n);
        }
        toy(&v)
    };
    let p = plan(lora(), 1, 64, AttentionKernel::Sdpa);
    let kernels = |m: &ModelSpec| {
        let g = graph::build(m, &p);
        g.ops().fold((0, 0), |(f, b), o| {
            let r = o.repeat.max(1);
            (
                f + o.cost.forward_kernels * r,
                b + o.cost.backward_kernels * r,
            )
        })
    };
    let (plain, normed) = (config(None), config(Some(true)));
    assert_eq!(kernels(&config(Some(false))), kernels(&plain));
    let ((f0, b0), (f1, b1)) = (kernels(&plain), kernels(&normed));
    assert_eq!((f1 - f0, b1 - b0), (12, 24));
    assert_eq!(run(&plain, &p).memory.peak, run(&normed, &p).memory.peak);
}

#[test]
fn mixture_of_experts_active_parameters_match_the_model_cards() {
    // Active per token, from the model cards: Qwen3-30B-A3B 3.3 B, Qwen1.5-MoE-A2.7B 2.7 B,
    // DeepSeek-V2-Lite 2.4 B, DeepSeek-V3 37 B, Mixtral 12.9 B. DeepSeek's cards leave out the
    // input embedding (102,400 x 2,048 = 0.21 B for V2-Lite), which a token does pass through.
    for (name, low, high) in [
        ("qwen3-30b-a3b", 3.2e9, 3.4e9),
        ("qwen1.5-moe-a2.7b", 2.6e9, 2.75e9),
        ("deepseek-v2-lite", 2.6e9, 2.7e9),
        ("deepseek-v3", 36.5e9, 38.0e9),
        ("mixtral-8x7b", 12.8e9, 13.0e9),
        // GPT-OSS's card: 3.6 B and 5.1 B, counting one of its two untied 201,088 x 2,880
        // tables (0.58 B); a token passes through both.
        ("gpt-oss-20b", 4.15e9, 4.25e9),
        ("gpt-oss-120b", 5.6e9, 5.8e9),
        // GLM-4.5-Air's card: 12 B, without its two 151,552 x 4,096 tables (1.24 B).
        ("glm-4.5-air", 13.3e9, 13.5e9),
    ] {
        let m = model(name);
        let total = m.published_params.expect("states its params");
        let active = m.active_params(total) as f64;
        assert!((low..high).contains(&active), "{name}: {active}");
    }
    // Every shipped model: active never exceeds total.
    for (stem, text) in model_files() {
        let m = parse_model_toml(stem, stem, text).expect("loads");
        let total = m.published_params.expect("states its params");
        assert!(m.active_params(total) <= total, "{stem}");
    }
}

#[test]
fn grouped_experts_hold_every_routed_row_at_once_whatever_the_routing() {
    // transformers 5's `grouped_mm_experts_forward` sorts the S = tokens x top_k routed rows by
    // expert and runs each projection as one `_grouped_mm` over all of them against the whole
    // [E, out, in] stack, masking each output into a new tensor (`masked_fill`). Mixtral-8x7B,
    // full fine-tuning in pure bf16, batch 1 x 128 tokens, top 2: S = 256 rows.
    let m = model("mixtral-8x7b");
    let p = full(Precision::Bf16, 1, 128);
    let g = graph::build(&m, &p);
    let layer_op = |name: &str| {
        g.ops()
            .find(|o| g.name(o.name) == format!("decoder.layers.1+30.mlp.experts.{name}"))
            .expect("the experts' op")
    };
    // gate_up_proj: one op for all 8 experts, its stack 8 x 28,672 x 4,096 = 939,524,096
    // weights; it keeps its input, the gathered rows, 256 x 4,096 x 2 = 2,097,152 bytes; and
    // does 2 x 256 x 4,096 x 28,672 = 60,129,542,144 FLOPs forward.
    let gate_up = layer_op("gate_up_proj");
    let stack: u64 = gate_up.params.iter().map(|&id| g.param(id).elements).sum();
    assert_eq!(stack, 939_524_096);
    assert_eq!(crate::kept_bytes(&g, gate_up), 2_097_152);
    assert_eq!(gate_up.cost.forward_flops.0, 60_129_542_144.0);
    // Its output, 256 x 28,672 x 2 = 14,680,064 bytes, and the masked copy are both live while
    // `masked_fill` runs, and in backward the incoming gradient and the masked one: 29,360,128.
    let mask = layer_op("gate_up_mask");
    assert_eq!(mask.forward_transient.0, 29_360_128);
    assert_eq!(mask.backward_transient.0, 29_360_128);
    // The activation keeps the gate half and the product the up half: views of the one masked
    // output (14,680,064), and the activation's output, 256 x 14,336 x 2 = 7,340,032.
    assert_eq!(crate::kept_bytes(&g, layer_op("act")), 14_680_064);
    assert_eq!(
        crate::kept_bytes(&g, layer_op("mul")),
        7_340_032 + 14_680_064
    );
    // So routing skew moves nothing: the same peak and FLOPs with the busiest expert at 3x.
    let skewed = Plan {
        expert_load: 3.0,
        ..p.clone()
    };
    let (a, b) = (run(&m, &p), run(&m, &skewed));
    assert_eq!(a.memory.peak, b.memory.peak);
    assert_eq!(a.time.flops, b.time.flops);
}

#[test]
fn mamba_keeps_the_convolutions_recast_input_and_the_d_skips_input() {
    // transformers 5.17's torch path of `MambaMixer`, full fine-tuning under bf16 autocast with
    // fp32 weights, batch 2 x 1,024 tokens (2,048), inner 1,536, state 16:
    // - `causal_conv1d_fn` convolves `hidden_states.to(weight.dtype)`: an fp32 copy, which
    //   autocast casts back to bf16 for `conv1d`, a new tensor the convolution keeps for its
    //   weight's gradient: 2,048 x 1,536 x 2 = 6,291,456 B, not in_proj's output.
    // - The scan keeps, beyond its 14 B per (batch, inner, position, state) element (14 x
    //   50,331,648 = 704,643,072): softplus' fp32 input (autocast's copy of dt) and the fp32
    //   copy of the input that `deltaB_u` multiplies, 2 x 2,048 x 1,536 x 4 = 25,165,824; the
    //   fp32 B, 2,048 x 16 x 4 = 131,072; softplus' output dt, 12,582,912; and the D skip's bf16
    //   input (`hidden_states * D`, for D's gradient), 6,291,456: 748,814,336 in all.
    let m = model("mamba-130m");
    let g = graph::build(&m, &plan(Method::Full, 2, 1024, AttentionKernel::Sdpa));
    let op = |name: &str| {
        g.ops()
            .find(|o| g.name(o.name) == format!("decoder.layers.1+22.mixer.{name}"))
            .expect("the mixer's op")
    };
    let conv = op("conv1d");
    assert_eq!(crate::kept_bytes(&g, conv), 6_291_456);
    let in_proj = op("in_proj");
    assert!(conv.saves.iter().all(|t| !in_proj.saves.contains(t)));
    assert_eq!(crate::kept_bytes(&g, op("selective_scan")), 748_814_336);
    // In pure bf16 the `.to(weight.dtype)` is the input itself: the convolution keeps no copy
    // but the view of in_proj's output (2,048 x 3,072 x 2 = 12,582,912, kept whole).
    let g = graph::build(&m, &full(Precision::Bf16, 2, 1024));
    let conv = g
        .ops()
        .find(|o| g.name(o.name) == "decoder.layers.1+22.mixer.conv1d")
        .expect("the convolution");
    assert_eq!(crate::kept_bytes(&g, conv), 12_582_912);
    // And without autocast softplus runs in bf16: it keeps `dt + bias` and the products keep
    // its output, 2 x 2,048 x 1,536 x 2 = 12,582,912, where autocast's fp32 pair took twice
    // that: 704,643,072 + 12,582,912 (fp32 x) + 131,072 (fp32 B) + 12,582,912 + 6,291,456 (the
    // D skip's input) = 736,231,424. (Replayed at 4 x 256 tokens: +2.7 % before this and the
    // norm's 16-bit input below, +0.7 % after.)
    let scan = g
        .ops()
        .find(|o| g.name(o.name) == "decoder.layers.1+22.mixer.selective_scan")
        .expect("the scan");
    assert_eq!(crate::kept_bytes(&g, scan), 736_231_424);
    // `self.norm(hidden_states.to(dtype=self.norm.weight.dtype))`: past the first block the
    // fp32 residual stream is cast to bf16 first, and the RMSNorm keeps its own fp32 upcast of
    // that copy (2,048 x 768 x 4 = 6,291,456), its statistics (16,384) and, for the weight's
    // gradient, the bf16 normalised tensor (3,145,728): not the fp32 stream itself with an fp32
    // normalised tensor.
    let norm = g
        .ops()
        .find(|o| g.name(o.name) == "decoder.layers.1+22.norm")
        .expect("the norm");
    assert_eq!(crate::kept_bytes(&g, norm), 6_291_456 + 16_384 + 3_145_728);
}

#[test]
fn a_recurrent_layer_keeps_memory_linear_in_the_sequence() {
    let m = model("mamba-130m");
    let peak = |seq| {
        run(&m, &plan(Method::Full, 2, seq, AttentionKernel::Sdpa))
            .memory
            .peak
            .0
    };
    let (a, b, c) = (peak(1024), peak(2048), peak(3072));
    // Equal steps in sequence, equal steps in memory (no seq^2 term).
    let (d1, d2) = ((b - a) as f64, (c - b) as f64);
    assert!((d1 - d2).abs() <= d1 * 1e-3, "{d1} vs {d2}");
    // The scan keeps exp(A dt) and dt B in fp32 (8 B) and, per step, the fp32 state and its
    // bf16 copy (6 B) per (batch, inner, position, state) element: with batch 2, inner
    // 2 x 768, seq 1024, state 16, 14 x 50,331,648 B = 672 MiB per layer.
    let p = plan(Method::Full, 2, 1024, AttentionKernel::Sdpa);
    let g = graph::build(&m, &p);
    let scan = g
        .ops()
        .find(|o| g.name(o.name).contains("selective_scan"))
        .expect("a scan op");
    let saved = crate::kept_bytes(&g, scan);
    let bisn = 2 * 1536 * 1024 * 16;
    assert!(
        saved >= 14 * bisn && saved <= 14 * bisn + 64 * 2 * 1024 * 1536,
        "{saved}"
    );
    // Methods that need attention or an FFN are refused, as peft finds nothing to wrap.
    let hw = resolve_hardware("h200").expect("ships").value;
    let prefix = plan(
        Method::Prefix { virtual_tokens: 10 },
        1,
        512,
        AttentionKernel::Sdpa,
    );
    assert!(estimate(&m, &prefix, &hw, &Rates::from_datasheet(&hw)).is_err());
}

#[test]
fn freezing_one_side_trains_exactly_that_stack() {
    // T5-small: d_model 512, d_ff 2048, 8 heads x 64, 6 + 6 layers (ReLU FFN).
    // A decoder block: self- and cross-attention 2 x 4 x 512^2 = 2,097,152, FFN 2 x 512 x
    // 2048 = 2,097,152, three norms 1,536: 4,195,840; six of them and the final norm 512 =
    // 25,175,552. An encoder block: 1,048,576 + 2,097,152 + 1,024 = 3,146,752; six and the
    // final norm: 18,881,024. (The relative-position tables are embeddings: frozen.)
    let m = model("t5-small");
    let side = |side, top| Method::Freeze {
        top_layers: top,
        embeddings: false,
        side: Some(side),
    };
    let trained = |method| {
        run(&m, &plan(method, 4, 512, AttentionKernel::Sdpa))
            .memory
            .trainable_params
    };
    assert_eq!(trained(side(Side::Decoder, None)), 25_175_552);
    assert_eq!(trained(side(Side::Encoder, None)), 18_881_024);
    assert_eq!(trained(side(Side::Decoder, Some(2))), 2 * 4_195_840 + 512);
    // Training only the decoder, backward never enters the encoder: fewer saved activations
    // than training only the encoder, and less than full fine-tuning.
    let act = |method| {
        run(&m, &plan(method, 4, 512, AttentionKernel::Sdpa))
            .memory
            .saved_after_forward
            .0
    };
    assert!(act(side(Side::Decoder, None)) < act(side(Side::Encoder, None)));
    assert!(act(side(Side::Encoder, None)) < act(Method::Full));
    // A decoder-only model has no side to choose.
    let hw = resolve_hardware("h200").expect("ships").value;
    let p = plan(side(Side::Decoder, None), 1, 512, AttentionKernel::Sdpa);
    let err =
        estimate(&model("gpt2"), &p, &hw, &Rates::from_datasheet(&hw)).expect_err("one stack");
    assert!(err.to_string().contains("encoder-decoder"), "{err}");
}

#[test]
fn partial_methods_never_hold_more_optimizer_state_than_full_fine_tuning() {
    for name in [
        "gemma-2-2b",
        "bloom-560m",
        "olmo-2-1b",
        "starcoder2-3b",
        "t5-small",
        "gpt2",
    ] {
        let m = model(name);
        let full = run(&m, &plan(Method::Full, 1, 512, AttentionKernel::Sdpa));
        for method in [
            Method::BitFit,
            Method::LnTuning,
            Method::Freeze {
                top_layers: Some(2),
                embeddings: false,
                side: None,
            },
        ] {
            let hw = resolve_hardware("h200").expect("ships").value;
            // BitFit on a model without biases is refused (nothing to train).
            let Ok(e) = estimate(
                &m,
                &plan(method.clone(), 1, 512, AttentionKernel::Sdpa),
                &hw,
                &Rates::from_datasheet(&hw),
            ) else {
                continue;
            };
            assert!(
                e.memory.model_states <= full.memory.model_states,
                "{name} {}",
                method.name()
            );
            assert!(e.memory.trainable_params < full.memory.trainable_params);
        }
    }
}

#[test]
fn flash_attention_2_is_refused_where_transformers_has_none() {
    let hw = resolve_hardware("h200").expect("ships").value;
    let p = plan(lora(), 1, 512, AttentionKernel::Flash2);
    // `_supports_flash_attn` is false (or unset) on these classes in transformers 5.17.
    for name in ["t5-small", "bloom-560m", "mpt-7b", "codegen-350m-mono"] {
        let err =
            estimate(&model(name), &p, &hw, &Rates::from_datasheet(&hw)).expect_err("no flash2");
        assert!(err.to_string().contains("flash_attention_2"), "{err}");
    }
    // GPT-J has no SDPA path but does have a flash_attention_2 class.
    assert!(estimate(&model("gpt-j-6b"), &p, &hw, &Rates::from_datasheet(&hw)).is_ok());
}

#[test]
fn gpt_oss_sinks_widen_the_eager_softmax_by_one_column() {
    // gpt-oss-20b (24 layers, 64 query heads of 64, 8 KV heads), LoRA on q and v, batch 1 x 128,
    // eager attention, bf16. Per layer, `eager_attention_forward` keeps for backward:
    // - q after rotary, and k and v repeated to all 64 heads: 3 x 128 x 4,096 x 2 B = 3,145,728;
    // - the softmax of `cat([scores, sinks])`, one column wider than the scores, in bf16 (the
    //   cat's dtype): 64 x 128 x 129 x 2 B = 2,113,536 (the matmul with v keeps a view of it);
    // - `max(dim=-1)`'s int64 indices: 64 x 128 x 8 B = 65,536.
    // 5,324,800 bytes per layer. The first layer's input has no gradient (frozen embeddings),
    // so its keys have none either and the scores' matmul does not keep q (autograd keeps
    // `bmm`'s first operand only for the second's gradient): 1,048,576 less there.
    let m = model("gpt-oss-20b");
    let p = plan(lora(), 1, 128, AttentionKernel::Eager);
    let g = graph::build(&m, &p);
    let kept: u64 = g
        .ops()
        .filter(|o| o.kind == OpKind::Attention)
        .map(|o| crate::kept_bytes(&g, o) * u64::from(o.repeat.max(1)))
        .sum();
    assert_eq!(kept, 24 * 5_324_800 - 1_048_576);
    // Backward's worst moment is softmax's: the sliced gradient widened back and `max`'s
    // scattered gradient, 2 x 2,113,536, beside v's gradient from the product with v (v is
    // repeated to 64 heads: 1,048,576); that product's backward has run and freed the v it
    // kept (-1,048,576; a replay of GPT-OSS-20B over 8 FSDP2 ranks holds k's repeated copy
    // there and not v's): 4,227,072.
    let core = g
        .ops()
        .find(|o| o.kind == OpKind::Attention && o.repeat > 1)
        .expect("a repeated block's attention");
    assert_eq!(
        core.backward_transient.0,
        2 * 2_113_536 + 1_048_576 - 1_048_576
    );
    // The sink is one parameter per head and layer.
    let without = ModelSpec {
        attention_sinks: false,
        ..m.clone()
    };
    let params = |m: &ModelSpec| run(m, &p).memory.total_params;
    assert_eq!(params(&m) - params(&without), 24 * 64);
    // SDPA has no sink: transformers runs GPT-OSS's eager code, and so does the plan.
    let sdpa = plan(lora(), 1, 128, AttentionKernel::Sdpa);
    assert_eq!(run(&m, &sdpa).memory.peak, run(&m, &p).memory.peak);
}

#[test]
fn gpt_oss_all_linear_stops_at_the_attention_projections() {
    // peft's `all-linear` on GPT-OSS wraps q, k, v and o only (its experts are 3-D parameters
    // and its router is not an `nn.Linear`). Rank 16, hidden 2,880, q and o 4,096 wide, k and
    // v 512: q and o 16 x (2,880 + 4,096) = 111,616 each, k and v 16 x (2,880 + 512) = 54,272
    // each; 331,776 per layer, 7,962,624 over 24 layers (what peft 0.21 reports).
    let m = model("gpt-oss-20b");

    let e = run(&m, &plan(lora_all(), 1, 256, AttentionKernel::Eager));
    assert_eq!(e.memory.trainable_params, 7_962_624);
    // The base: 20,914,757,184 parameters as transformers builds them, sinks and the router's
    // and experts' biases included (276,576 per layer).
    assert_eq!(e.memory.total_params - 7_962_624, 20_914_757_184);
}

#[test]
fn gpt_oss_plans_eager_attention_and_says_why() {
    // The default `--attention sdpa` cannot take GPT-OSS's sink: the plan says eager, and a
    // note on stderr says why (exit 0: LoRA on q and v fits on an H200).
    let out = crate::ftplan()
        .args([
            "estimate",
            "--model",
            "gpt-oss-20b",
            "--gpu",
            "h200",
            "--method",
            "lora",
        ])
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(stdout.contains("eager attention"), "{stdout}");
    assert!(crate::stderr_of(&out).contains("attention sinks, which SDPA cannot take"));
}

#[test]
fn lora_reaches_moe_experts_as_peft_converts_each_model_type() {
    // peft 0.21 on transformers 5 (`convert_peft_config_for_transformers`): for the model types
    // in its conversion table the FFN names move onto the fused experts; Qwen2-MoE is not in
    // that table, so its LoRA stays on `nn.Linear` modules. Rank 16, `all-linear`; the totals
    // are what peft wraps on each model built from the shipped config.
    let all = |m: &str| {
        run(&model(m), &plan(lora_all(), 1, 128, AttentionKernel::Sdpa))
            .memory
            .trainable_params
    };
    // Qwen1.5-MoE-A2.7B, 24 layers, hidden 2,048: q, k, v, o (2,048 -> 2,048) 4 x 16 x 4,096
    // = 262,144; the shared expert's gate, up and down (5,632 wide) 3 x 16 x 7,680 = 368,640;
    // `shared_expert_gate` (2,048 -> 1) 16 x 2,049 = 32,784. 663,568 x 24 = 15,925,632; the
    // 60 experts and the router carry none.
    assert_eq!(all("qwen1.5-moe-a2.7b"), 15_925_632);
    // DeepSeek-V2-Lite, 27 layers (the first dense), hidden 2,048, 16 heads:
    // - attention, per layer: q_proj (-> 3,072) 16 x 5,120 = 81,920, kv_a_proj_with_mqa
    //   (-> 576) 16 x 2,624 = 41,984, kv_b_proj (512 -> 4,096) 16 x 4,608 = 73,728, o_proj
    //   16 x 4,096 = 65,536: 263,168 x 27 = 7,105,536;
    // - 26 sparse layers of 64 experts (1,408 wide), factors shared across experts: gate_up
    //   A 2,048 x 2,048 and B 2,816 x 2,048, down A 1,024 x 1,408 and B 2,048 x 1,024:
    //   13,500,416 x 26 = 351,010,816; the router 16 x (2,048 + 64) x 26 = 878,592;
    // - the dense first layer and the shared experts: none (their names moved to the experts).
    // 358,994,944.
    assert_eq!(all("deepseek-v2-lite"), 358_994_944);
}

#[test]
fn lora_on_fused_experts_folds_its_factors_without_a_stack_sized_delta() {
    // peft 0.21.2 wraps transformers 5's 3-D expert stacks with `_LoraFactorsProxy`:
    // `baddbmm(W, lhs, rhs)` in W's dtype, so forward holds no delta the size of the stack,
    // only the merged weights the experts' matmuls keep, and the factors' bf16 casts
    // `baddbmm` keeps; each grouped matmul keeps its input (the stack needs a gradient), as
    // its own tensor. Each stack is merged where it is read, so backward holds one merged
    // weight's gradient at a time, from its grouped matmul's backward, which makes it, until
    // `baddbmm`'s backward folds it into the factors' (`Op::grads` of both ops).
    // Mixtral-8x7B, LoRA r16 on every linear, batch 1 x 128 (top 2: 256 routed rows):
    // - gate_up: 8 x 2 x 14,336 x 4,096 = 939,524,096 bf16 elements, 1,879,048,192 bytes;
    //   factors of 2 x 16 x 8 = 256 rows, 256 x (4,096 + 28,672) x 2 = 16,777,216: the merge
    //   keeps 1,895,825,408; the matmul its input, 256 x 4,096 x 2 = 2,097,152.
    // - down: 8 x 4,096 x 14,336 x 2 = 939,524,096; factors of 128 rows, 128 x (14,336 +
    //   4,096) x 2 = 4,718,592: 944,242,688; the matmul its input, 256 x 14,336 x 2 = 7,340,032.
    // (Each op's own output is a 2-byte placeholder.)
    let m = model("mixtral-8x7b");
    let p = plan(lora_all(), 1, 128, AttentionKernel::Sdpa);
    let g = graph::build(&m, &p);
    let gate_up = crate::op_ending(&g, "experts.gate_up_lora_merge");
    assert_eq!(gate_up.forward_transient.0, 2);
    assert_eq!(gate_up.backward_transient.0, 2);
    let held = |op: &ftplan::graph::op::Op| -> Vec<u64> {
        op.grads.iter().map(|&t| g.tensor(t).bytes.0).collect()
    };
    assert_eq!(held(gate_up), [1_879_048_192]);
    assert_eq!(
        held(crate::op_ending(&g, "experts.gate_up_proj")),
        [1_879_048_192]
    );
    assert_eq!(crate::kept_bytes(&g, gate_up), 1_895_825_408);
    assert_eq!(
        crate::kept_bytes(&g, crate::op_ending(&g, "experts.gate_up_proj")),
        2_097_152
    );
    let down = crate::op_ending(&g, "experts.down_lora_merge");
    assert_eq!(down.backward_transient.0, 2);
    assert_eq!(held(down), [939_524_096]);
    assert_eq!(crate::kept_bytes(&g, down), 944_242_688);
    assert_eq!(
        crate::kept_bytes(&g, crate::op_ending(&g, "experts.down_proj")),
        7_340_032
    );
}

#[test]
fn a_moe_layer_launches_its_grouped_kernels_once_whatever_its_expert_count() {
    // transformers 5 runs all experts with `grouped_mm` (its default experts implementation), so
    // a sparse layer dispatches the same kernels for 8 experts as for 128. Counted with a
    // dispatch mode on each block (torch 2.15, views and `empty_like` left out), with the
    // residual add after it:
    // - Mixtral, 30: the router's linear, the cast to fp32, softmax, topk, the weights' sum and
    //   the clone and division of the in-place `/=` (7); sort, floor_divide, two gathers, the
    //   int cast, histc, cumsum, the sentinel compare, clamp_, masked_fill_, two grouped
    //   matmuls, two masked_fills, SiLU, two multiplies, arange, index_put_, the reorder
    //   gather, the sum and the cast of the fp32 sum (its routing weights are fp32) to the
    //   hidden dtype (22); the residual add (1);
    // - Qwen3-30B-A3B, 30: its router casts the weights back to the logits' dtype (8), so the
    //   experts' sum is bf16 already and needs no cast (21);
    // - GPT-OSS, 34: its router is the biased linear, topk and a softmax of the k (3); its
    //   gate adds the clamps, sigmoid and products, its biases their gathers and adds (30).
    // One module call each for the block, the experts and (Mixtral's) activation.
    let per_layer = |name: &str| {
        let m = model(name);
        let g = graph::build(&m, &plan(lora(), 1, 128, AttentionKernel::Eager));
        g.ops()
            .filter(|o| o.repeat > 1 && g.name(o.name).contains(".mlp"))
            .fold((0, 0), |(k, md), o| {
                (k + o.cost.forward_kernels, md + o.cost.modules)
            })
    };
    assert_eq!(per_layer("mixtral-8x7b"), (30, 3));
    assert_eq!(per_layer("qwen3-30b-a3b"), (30, 3));
    // GPT-OSS repeats two blocks (a banded layer, a dense one): 34 each.
    assert_eq!(per_layer("gpt-oss-20b").0, 2 * 34);
}

#[test]
fn qlora_leaves_fused_experts_unquantized_and_upcast() {
    // bitsandbytes through transformers 5.17 (`replace_with_bnb_linear`) swaps `nn.Linear`
    // modules only; MoE experts are 3-D parameters, so they stay bf16, and peft's
    // `prepare_model_for_kbit_training` upcasts every parameter it did not quantize to fp32
    // (a CPU replay of a small Mixtral agrees: its experts end fp32, its attention 4-bit).
    // Mixtral-8x7B: 32 layers x 8 experts x 3 x 4,096 x 14,336 = 45,097,156,608 expert
    // weights, 4 bytes each: 180,388,626,432 bytes; never NF4.
    let qlora = Method::Qlora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    });
    let m = model("mixtral-8x7b");
    let g = graph::build(&m, &plan(qlora, 1, 128, AttentionKernel::Sdpa));
    let experts = g
        .params
        .iter()
        .filter(|p| g.name(p.name).contains(".experts."));
    assert!(
        experts
            .clone()
            .all(|p| p.dtype == ftplan::units::DType::F32)
    );
    assert_eq!(experts.map(|p| p.bytes().0).sum::<u64>(), 180_388_626_432);
}

/// QLoRA r16 on q,v at rank 16, batch 1 x 64 tokens (32 target tokens).
fn qlora_qv() -> Method {
    Method::Qlora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    })
}

/// Elements of a graph's frozen linear weights by dtype: (NF4, fp32).
fn frozen_linear_elements(m: &ModelSpec, p: &Plan) -> (u64, u64) {
    let g = graph::build(m, p);
    g.params
        .iter()
        .filter(|q| q.role == ftplan::graph::op::ParamRole::Linear && !q.trainable)
        .fold((0, 0), |(nf4, f32), q| match q.dtype {
            ftplan::units::DType::Nf4 => (nf4 + q.count(), f32),
            ftplan::units::DType::F32 => (nf4, f32 + q.count()),
            other => panic!("{} is {other:?}", g.name(q.name)),
        })
}

#[test]
fn qlora_quantizes_what_bitsandbytes_swaps_and_upcasts_the_rest() {
    // transformers 5.17's `replace_with_bnb_linear` swaps a module only when `type(module) is
    // nn.Linear`, and skips `_keep_in_fp32_modules`; peft's `prepare_model_for_kbit_training`
    // upcasts what stays 16-bit to fp32. Loading these toys with bitsandbytes 0.50.2 on CPU
    // agrees element for element.
    //
    // Falcon (hidden 64, 4 heads of 16, 2 KV heads, 2 layers, new decoder architecture):
    // every linear is a `FalconLinear`, so none is swapped. Per layer qkv 64 x (4 + 2 x 2) x 16
    // = 8,192, dense 4,096, h_to_4h and 4h_to_h 16,384 each: 45,056; two layers 90,112, all
    // fp32 (the toy's 98,944 parameters add embeddings and LayerNorms, all fp32 too).
    let falcon = toy(&serde_json::json!({
        "model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4,
        "num_kv_heads": 2, "num_hidden_layers": 2, "vocab_size": 128,
        "new_decoder_architecture": true
    }));
    let p = plan(qlora_qv(), 1, 64, AttentionKernel::Sdpa);
    assert_eq!(frozen_linear_elements(&falcon, &p), (0, 90_112));
    let g = graph::build(&falcon, &p);
    assert_eq!(ftplan::graph::op::counts(&g).1, 98_944);
    assert!(
        g.params
            .iter()
            .all(|q| q.dtype == ftplan::units::DType::F32)
    );
    // T5 with a gated FFN (d_model 64, d_ff 128, 4 heads of 16, 2 + 2 layers) keeps `wo`
    // (`_keep_in_fp32_modules = ["wo"]`): 4 x 128 x 64 = 32,768 fp32. Swapped: q, k, v, o
    // (4 x 4,096) and wi_0, wi_1 (2 x 8,192) in each encoder layer, 32,768, plus the
    // cross-attention's 16,384 in each decoder layer: 2 x 32,768 + 2 x 49,152 = 163,840 NF4
    // (81,920 bytes of packed `uint8` in the loaded model).
    let t5 = toy(&serde_json::json!({
        "model_type": "t5", "d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16,
        "num_layers": 2, "num_decoder_layers": 2, "vocab_size": 128,
        "feed_forward_proj": "gated-gelu"
    }));
    assert_eq!(frozen_linear_elements(&t5, &p), (163_840, 32_768));
    // The CLI says so beside the estimate.
    let err = estimate_notes("falcon-7b", "qlora", &[]);
    assert!(err.contains("nothing is quantized"), "{err}");
    // A Llama keeps no linear out: every one is 4-bit.
    assert_eq!(frozen_linear_elements(&model("tinyllama-1.1b"), &p).1, 0);
}

#[test]
fn qlora_quantizes_plain_linears_that_no_target_names() {
    // Qwen2-MoE's `shared_expert_gate` (hidden -> 1) is an `nn.Linear`: bitsandbytes swaps it
    // like the named projections (a toy loaded on CPU shows `Linear4bit` (32, 1), 64 weights
    // packed two to a byte). Qwen1.5-MoE-A2.7B: 24 layers x 2,048 = 49,152 elements, NF4.
    let m = model("qwen1.5-moe-a2.7b");
    let g = graph::build(&m, &plan(qlora_qv(), 1, 64, AttentionKernel::Sdpa));
    let gates: Vec<_> = g
        .params
        .iter()
        .filter(|q| g.name(q.name).contains("shared_expert_gate"))
        .collect();
    assert!(gates.iter().all(|q| q.dtype == ftplan::units::DType::Nf4));
    assert_eq!(gates.iter().map(|q| q.count()).sum::<u64>(), 49_152);
}

#[test]
fn a_fused_gate_up_projection_takes_one_lora_pair() {
    // Phi-3's (and GLM-4's) `gate_up_proj` is one `nn.Linear` to both halves, so LoRA wraps it
    // once: Phi-3-mini, rank 16 on every linear, per layer qkv_proj (3,072 -> 9,216)
    // 16 x 12,288 = 196,608, o_proj 16 x 6,144 = 98,304, gate_up_proj (3,072 -> 16,384)
    // 16 x 19,456 = 311,296, down_proj (8,192 -> 3,072) 16 x 11,264 = 180,224: 786,432 x 32
    // layers = 25,165,824, what peft wraps (two separate pairs would add 16 x 3,072 a layer).
    let m = model("phi-3-mini");

    let e = run(&m, &plan(lora_all(), 1, 128, AttentionKernel::Sdpa));
    assert_eq!(e.memory.trainable_params, 25_165_824);
}

#[test]
fn lora_on_mamba_refuses_what_peft_refuses() {
    // peft raises for LoRA on a Mamba mixer's `out_proj` (`_check_lora_target_modules_mamba`),
    // which `all-linear` includes: exit 2 with the field and the names that work.
    let out = crate::ftplan()
        .args([
            "estimate",
            "--model",
            "mamba-130m",
            "--gpu",
            "h200",
            "--method",
            "lora",
            "--lora-targets",
            "all",
        ])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("`lora-targets`") && err.contains("out_proj"),
        "{err}"
    );
    assert!(err.contains("in_proj,x_proj"), "{err}");
    // The plan's notes (the PyTorch scan) qualify results; a refusal is its error alone.
    assert!(!err.contains("note:"), "{err}");
    // in_proj, x_proj and dt_proj, rank 16, 24 layers (d_model 768, inner 1,536, dt rank 48,
    // state 16): in_proj (768 -> 3,072) 16 x 3,840 = 61,440, x_proj (1,536 -> 80) 16 x 1,616 =
    // 25,856, dt_proj (48 -> 1,536) 16 x 1,584 = 25,344: 112,640 x 24 = 2,703,360, what peft
    // wraps and counts as trainable.
    let named = |names: &[&str]| {
        run(
            &model("mamba-130m"),
            &plan(lora_named(names), 1, 64, AttentionKernel::Sdpa),
        )
    };
    let three = named(&["in_proj", "x_proj", "dt_proj"]);
    assert_eq!(three.memory.trainable_params, 2_703_360);
    // `x_proj` names x_proj alone: 25,856 x 24 = 620,544.
    assert_eq!(named(&["x_proj"]).memory.trainable_params, 620_544);
    // MambaMixer computes `self.dt_proj.weight @ time_step`, never calling the wrapped module:
    // dt_proj's factors (25,344 x 24 = 608,256) get no gradient and AdamW no state for them
    // (a toy's `dt_proj.lora_A.grad is None` after backward, transformers 5.17, peft 0.21.2).
    // Beside in_proj and x_proj alone, only their fp32 weights (2,433,024 B) are added.
    let two = named(&["in_proj", "x_proj"]);
    assert_eq!(
        three.memory.trainable_params - two.memory.trainable_params,
        608_256
    );
    let grads = |e: &Estimate| e.memory.model_states - e.memory.persistent;
    assert_eq!(grads(&three), grads(&two));
    assert_eq!(
        three.memory.persistent - two.memory.persistent,
        ftplan::units::Bytes(2_433_024)
    );
    // DDP's reducer raises on the second step for a trainable parameter that got no gradient
    // unless built with `find_unused_parameters=True`: a note says so over 2 GPUs, not on one.
    let ddp_note = |gpus: &str| {
        let targets = ["--lora-targets", "in_proj,x_proj,dt_proj", "--gpus", gpus];
        estimate_notes("mamba-130m", "lora", &targets).contains("find_unused_parameters=True")
    };
    assert!(ddp_note("2"));
    assert!(!ddp_note("1"));
}

/// A 2-layer Mamba-2 at toy widths: hidden 128, inner 256 as 4 heads of 64, state 16, one
/// group, chunks of 64 tokens.
fn mamba2_toy() -> ModelSpec {
    toy(&serde_json::json!({
        "model_type": "mamba2", "hidden_size": 128, "num_hidden_layers": 2, "vocab_size": 512,
        "num_heads": 4, "head_dim": 64, "state_size": 16, "n_groups": 1, "expand": 2,
        "conv_kernel": 4, "chunk_size": 64, "tie_word_embeddings": true
    }))
}

#[test]
fn mamba2s_chunk_scan_keeps_its_chunked_operands_and_backward_holds_two_products() {
    // transformers 5.17's `mamba2_chunk_scan`, full fine-tuning under bf16 autocast, batch 1 x
    // 128 tokens: T = P = 128 (two chunks of l = 64, c + 1 = 3), I = 256, h = 4, N = 16.
    // Kept, in fp32 (4 B): x.float() for dt's gradient, 128 x 256 x 4 = 131,072; the padded
    // clone D's product keeps, 131,072; softplus' fp32 input and output and the clamp's
    // output, 3 x 128 x 4 x 4 = 6,144; x chunked 131,072, B and C chunked (repeated to the 4
    // heads) 2 x 128 x 4 x 16 x 4 = 65,536, L, G and M (l per head and position) 3 x 128 x 4
    // x 64 x 4 = 393,216, the two decays 2 x 2,048, B_decay 32,768, the concatenated and the
    // recurred states 2 x 3 x 256 x 16 x 4 = 98,304, C_times_states' sum 131,072:
    // 1,124,352 in all.
    let m = mamba2_toy();
    let g = graph::build(&m, &plan(Method::Full, 1, 128, AttentionKernel::Sdpa));
    let scan = crate::op_ending(&g, "mixer.chunk_scan");
    assert_eq!(crate::kept_bytes(&g, scan), 1_124_352);
    // With N = 16 < p = 64, Y_diag's product (c l l h p = 128 x 64 x 256 x 4 = 8,388,608 B) is
    // the largest; its backward makes two of them and sums M's down (131,072), beside what is
    // still kept (the early 268,288; x, B, C, L, G and M, 589,824) and the gradients held:
    // the scan's own, x's (from the states), B's and C's first parts, 327,680. 18,094,080 at
    // that moment, 16,969,728 beyond the scan's saves. Forward holds one such product.
    assert_eq!(scan.backward_transient.0, 16_969_728);
    assert_eq!(scan.forward_transient.0, 8_388_608);
    // 100 tokens pad to the same two chunks: the output (and its gradient) stays 128 x 256.
    let g = graph::build(&m, &plan(Method::Full, 1, 100, AttentionKernel::Sdpa));
    let scan = crate::op_ending(&g, "mixer.chunk_scan");
    assert_eq!(scan.out.0, 131_072);
}

#[test]
fn lora_on_mamba2_reaches_in_proj_only_and_the_fused_kernels_are_refused() {
    // peft's Mamba check covers `mamba2` too; the hint names what is left.
    for (extra, field, want) in [
        (
            ["--lora-targets", "all"],
            "`lora-targets`",
            "--lora-targets in_proj",
        ),
        (
            ["--linear-kernel", "fla"],
            "`linear-kernel`",
            "--linear-kernel torch",
        ),
    ] {
        let out = crate::ftplan()
            .args([
                "estimate",
                "--model",
                "mamba2-2.7b",
                "--gpu",
                "h200",
                "--method",
                "lora",
            ])
            .args(extra)
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        assert!(err.contains(field) && err.contains(want), "{err}");
    }
    // in_proj (2,560 -> 5,120 + 5,376 + 80 = 10,576), rank 16: 16 x (2,560 + 10,576) =
    // 210,176 a layer, 64 layers: 13,451,264.
    let named = Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::parse(["in_proj"]).expect("known name"),
        dora: false,
    });
    let e = run(
        &model("mamba2-2.7b"),
        &plan(named, 1, 256, AttentionKernel::Sdpa),
    );
    assert_eq!(e.memory.trainable_params, 13_451_264);
}

/// A 2-layer Granite 4.0 hybrid at toy widths: hidden 64, a Mamba-2 layer (4 heads, "auto"
/// width 2 x 64 / 4 = 32, state 16) then an attention layer (4 heads of 16, 2 KV heads), 4
/// experts of 32 (top 2) and a shared MLP of 48 in each, no positions.
fn granite_hybrid_toy(experts: u64) -> ModelSpec {
    toy(&serde_json::json!({
        "model_type": "granitemoehybrid", "hidden_size": 64, "num_hidden_layers": 2,
        "layer_types": ["mamba", "attention"], "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "mamba_n_heads": 4, "mamba_d_state": 16,
        "mamba_n_groups": 1, "num_local_experts": experts, "num_experts_per_tok": 2,
        "intermediate_size": 32, "shared_intermediate_size": 48,
        "position_embedding_type": "nope"
    }))
}

#[test]
fn granite_4_hybrid_layers_are_mamba2_or_attention_each_with_experts_and_a_shared_mlp() {
    let kinds = |m: &ModelSpec| -> Vec<BlockKind> {
        (0..m.decoder.layers).map(|l| m.block_kind(l)).collect()
    };
    let m = granite_hybrid_toy(4);
    let k = kinds(&m);
    assert!(matches!(k[0].mixer, Mixer::Ssd(s) if s.head_dim == 32 && s.state == 16));
    assert_eq!(k[1].mixer, Mixer::Attention);
    assert!(k.iter().all(|k| k.ffn == FfnKind::Moe));
    assert_eq!(m.positions, ftplan::spec::model::Positions::None);
    // transformers 5.17 builds 141,292 parameters from this config (checked on CPU).
    let e = run(&m, &full(Precision::MixedBf16, 1, 64));
    assert_eq!(e.memory.trainable_params, 141_292);
    // peft's `all-linear` (peft 0.21.2 wraps 24,640, checked): the Mamba layer's in_proj
    // (64 -> 128 + 160 + 4 = 292) 16 x 356 = 5,696 and out_proj (128 -> 64) 3,072, each
    // layer's input_linear (64 -> 96) 2,560 and output_linear (48 -> 64) 1,792, the
    // attention's q and o 2,048 each, k and v 1,536 each; not the experts' 3-D parameters, not
    // the router's bare weight, and not refused on out_proj as Mamba's is.
    let e = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert_eq!(e.memory.trainable_params, 24_640);
    // Tensor parallelism splits the Mamba heads as it splits the attention heads.
    let rank = m.tensor_parallel_rank(2);
    assert!(matches!(rank.block_kind(0).mixer, Mixer::Ssd(s) if s.heads == 2 && s.groups == 1));
    // With no experts, the shared MLP is each layer's dense FFN.
    let dense = granite_hybrid_toy(0);
    assert!(dense.moe.is_none());
    assert!(kinds(&dense).iter().all(|k| k.ffn == FfnKind::Dense));
}

/// What peft refuses on a model type its Mamba check lists (`nemotron_h`, `falcon_h1`): LoRA's
/// `all-linear`, which includes the Mamba `out_proj`; and prefix tuning, whose attention cache
/// the Mamba-2 layers ask for their state (`has_previous_state` raises in transformers 5.17;
/// checked on toys of both and on Granite 4.0's).
fn mamba_hybrid_refusals(m: &ModelSpec) {
    let err = refusal(m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert!(err.contains("out_proj"), "{err}");
    let prefix = Method::Prefix { virtual_tokens: 4 };
    let err = refusal(m, &plan(prefix, 1, 64, AttentionKernel::Sdpa));
    assert!(err.contains("Mamba-2 layers reject"), "{err}");
}

/// A Nemotron-H toy of `pattern` (M Mamba-2, - MLP, * attention, E experts): hidden 64, 4 heads
/// (2 KV) of 16, an MLP of 96, 4 Mamba heads of 16 with state 8 in 2 groups, 4 experts of 32
/// (top 2) beside a shared MLP of 48.
fn nemotron_h_toy(pattern: &str) -> ModelSpec {
    toy(&nemotron_h_config(pattern))
}

/// The `config.json` object of `nemotron_h_toy(pattern)`.
fn nemotron_h_config(pattern: &str) -> serde_json::Value {
    serde_json::json!({
        "model_type": "nemotron_h", "hybrid_override_pattern": pattern, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 96, "mamba_num_heads": 4, "mamba_head_dim": 16,
        "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4, "chunk_size": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 48, "vocab_size": 256
    })
}

#[test]
fn nemotron_h_layers_are_one_sub_layer_each_mamba2_attention_mlp_or_experts() {
    let m = nemotron_h_toy("M-*E");
    let k: Vec<BlockKind> = (0..4).map(|l| m.block_kind(l)).collect();
    assert!(matches!(k[0].mixer, Mixer::Ssd(s) if s.groups == 2 && s.norm_groups == 2));
    assert_eq!(
        (k[0].ffn, k[1].mixer, k[1].ffn),
        (FfnKind::None, Mixer::None, FfnKind::Dense)
    );
    assert_eq!((k[2].mixer, k[2].ffn), (Mixer::Attention, FfnKind::None));
    assert_eq!((k[3].mixer, k[3].ffn), (Mixer::None, FfnKind::Moe));
    assert!(k.iter().all(|k| k.single()));
    assert_eq!(m.positions, ftplan::spec::model::Positions::None);
    // transformers 5.17 builds 95,596 parameters from this config (checked on CPU): the
    // embeddings and the untied head 2 x 256 x 64 = 32,768; the Mamba layer 15,212 (its norm
    // 64, dt_bias, A_log and D 12, the convolution over 64 + 2 x 2 x 8 = 96 channels 384 + 96,
    // in_proj 64 -> 64 + 96 + 4 = 164 10,496, the gated norm 64, out_proj 4,096); the MLP
    // layer 64 + 2 x 64 x 96 = 12,352; the attention layer 64 + q 4,096 + k 2,048 + v 2,048 +
    // o 4,096 = 12,352; the MoE layer 64 + 4 experts x (32 x 64 up + 64 x 32 down) 16,384 +
    // the router 256 + the shared MLP 2 x 48 x 64 = 6,144, 22,848; the final norm 64.
    let e = run(&m, &full(Precision::MixedBf16, 1, 64));
    assert_eq!(e.memory.trainable_params, 95_596);
    // peft 0.21.2 wraps 19,520 with r16 on every linear peft accepts (checked): in_proj 16 x
    // (64 + 164) = 3,648, the MLP's up and down 2,560 each, q 2,048, k and v 1,536 each, o
    // 2,048, the shared MLP's up and down 1,792 each; not the experts' 3-D parameters (peft
    // has no conversion pattern for nemotron_h) and not the router's bare weight.
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj",
        "up_proj",
        "down_proj",
    ];
    assert_eq!(lora_trainable(&m, &names), 19_520);
    mamba_hybrid_refusals(&m);
    // The gated norm normalises each of the 2 groups on its own (`Zamba2RMSNormGated`): its
    // rsqrt keeps one fp32 value per token and group, 64 x 2 x 4 = 512 B, beside the fp32
    // gated input 64 x 64 x 4 = 16,384 B.
    let (kept, _) = kept_at(
        &m,
        &full(Precision::MixedBf16, 1, 64),
        "decoder.layers.0.mixer.norm.rms",
    );
    assert_eq!(kept, 16_384 + 512);
}

#[test]
fn falcon_h1_layers_run_mamba2_beside_attention_with_mup_multipliers() {
    // A toy Falcon-H1: hidden 64, 2 layers, 4 heads (2 KV) of 16, an MLP of 96; Mamba-2 of 64
    // channels in 4 heads, state 8 in 2 groups, its gated RMSNorm applied before the gate.
    let config = serde_json::json!({
        "model_type": "falcon_h1", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
        "vocab_size": 256, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": "auto",
        "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_chunk_size": 16,
        "mamba_rms_norm": true, "mamba_norm_before_gate": true, "embedding_multiplier": 5.6,
        "lm_head_multiplier": 0.04
    });
    let m = toy(&config);
    assert!(m.has_attention() && m.has_ssd());
    assert!(matches!(m.parallel_ssd, Some(s) if s.gated_norm == GatedNorm::NormThenGate));
    // transformers 5.17 builds 124,824 parameters (checked on CPU): per layer the MLP 3 x 96 x
    // 64 = 18,432; the Mamba mixer 15,148 (dt_bias, A_log and D 12, the convolution over 64 +
    // 2 x 2 x 8 = 96 channels 384 + 96, in_proj 64 -> 64 + 96 + 4 = 164 10,496, its norm 64,
    // out_proj 4,096); attention q 4,096, k 2,048, v 2,048, o 4,096; two norms 128: 45,996
    // twice; the untied embeddings and head 32,768; the final norm 64.
    let e = run(&m, &full(Precision::MixedBf16, 1, 64));
    assert_eq!(e.memory.trainable_params, 124_824);
    // peft 0.21.2 wraps 36,992 with r16 on every linear it accepts (checked): per layer in_proj
    // 16 x (64 + 164) = 3,648, q 2,048, k and v 1,536 each, o 2,048, gate, up and down 2,560
    // each.
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    assert_eq!(lora_trainable(&m, &names), 36_992);
    mamba_hybrid_refusals(&m);
    // The µP multipliers run as ops whatever their values: the Mamba projection times its fp32
    // `mup_vector` buffer is an fp32 tensor of 100 tokens x 164 x 4 = 65,600 B that keeps
    // nothing; the gated norm (norm, then gate) keeps the fp32 scan output, a view of the
    // scan's output over the sequence padded to whole 16-token chunks (112 x 64 x 4 = 28,672
    // B), and one rsqrt per token and group (100 x 2 x 4 = 800 B).
    let p = full(Precision::MixedBf16, 1, 100);
    let g = graph::build(&m, &p);
    let mup = g
        .ops()
        .find(|o| g.name(o.name) == "decoder.layers.0.mamba.mup_vector")
        .expect("the mup product");
    assert_eq!((mup.out.0, crate::kept_bytes(&g, mup)), (65_600, 0));
    assert_eq!(
        kept_at(&m, &p, "decoder.layers.0.mamba.norm.rms").0,
        28_672 + 800
    );
    // Without `mamba_rms_norm` (the default), `y * silu(z)`: SiLU keeps z's slice of that fp32
    // projection, the product the padded scan output (28,672) and SiLU's fp32 output (100 x
    // 64 x 4 = 25,600).
    let mut plain = config.clone();
    plain["mamba_rms_norm"] = serde_json::json!(false);
    let plain = toy(&plain);
    assert_eq!(
        kept_at(&plain, &p, "decoder.layers.0.mamba.gate.gate_mul").0,
        28_672 + 25_600
    );
}

#[test]
fn layers_below_the_first_adapted_one_record_no_autograd_and_keep_nothing() {
    // LoRA on q and v of a frozen bf16 base: the embedding's output needs no gradient, so
    // until the attention layer no op records autograd. The Mamba and MLP layers below it keep
    // nothing, whatever kinds repeat after it (the MLP below is a copy of the one above, which
    // keeps its activations): "M-*-" keeps exactly what "*-" keeps.
    let p = plan(lora(), 2, 64, AttentionKernel::Sdpa);
    let below = run(&nemotron_h_toy("M-*-"), &p).memory.saved_after_forward;
    let none_below = run(&nemotron_h_toy("*-"), &p).memory.saved_after_forward;
    assert_eq!(below, none_below);
    assert!(none_below.0 > 0);
}

#[test]
fn prefix_tuning_with_checkpointing_is_refused_as_peft_refuses_it() {
    // peft 0.21 raises "PREFIX_TUNING does not work with gradient checkpointing" when it wraps
    // a checkpointed model, and checkpointing turned on after wrapping fails in the first
    // backward (the recomputation appends the prefix to the cache again: 16 + 4 + 4 keys
    // against a 16 + 4 mask, checked on a 2-layer Llama on CPU). Exit 2, naming the field.
    let checkpointed = |method: &str, code: i32| {
        crate::ftplan()
            .args(["estimate", "--model", "tinyllama-1.1b", "--gpu", "h200"])
            .args(["--method", method, "--grad-ckpt"])
            .assert()
            .code(code)
    };
    let err = crate::stderr_of(&checkpointed("prefix", 2));
    assert!(
        err.contains("`grad-ckpt`") && err.contains("prefix"),
        "{err}"
    );
    assert!(err.contains("hint"), "{err}");
    // Prompt tuning checkpoints (the virtual tokens are part of the input, not a cache).
    checkpointed("prompt", 0);
}

#[test]
fn prefix_tuning_takes_the_width_peft_gives_it_and_is_refused_where_it_fails() {
    // peft 0.21 sizes each layer's prefix keys and values as `head_dim x num_key_value_heads`
    // where the config has `num_key_value_heads`, else as `hidden_size` over the attention
    // heads; a layer whose cache has another shape fails at the concatenation. Checked with a
    // forward and backward on toys (transformers 5.17, CPU).
    let prefix = plan(
        Method::Prefix { virtual_tokens: 20 },
        1,
        64,
        AttentionKernel::Sdpa,
    );
    // Falcon-40B's config names its 8 KV heads `num_kv_heads`, so peft's prefix is
    // `hidden_size` wide, and the new decoder broadcasts its KV heads to all 128 before the
    // cache, which takes it: 20 tokens x 60 layers x 2 x 8,192 = 19,660,800 (the KV width,
    // 8 x 64, would give 1,228,800).
    let falcon = run(&model("falcon-40b"), &prefix).memory.trainable_params;
    assert_eq!(falcon, 19_660_800);
    // Refused: Falcon-7B's multi-query cache (1 head of 64 against 71), DeepSeek's latent
    // attention (keys of 192, values of 128 per head), and a T5 whose `d_model` (512) is not
    // `num_heads x d_kv` (6 x 64, Flan-T5-small's shape).
    for (m, why) in [
        (model("falcon-7b"), "caches 1 x 64"),
        (model("deepseek-v2-lite"), "latent attention"),
        (
            toy(&serde_json::json!({
                "model_type": "t5", "d_model": 512, "d_ff": 1024, "num_heads": 6, "d_kv": 64,
                "num_layers": 2, "vocab_size": 100, "feed_forward_proj": "gated-gelu"
            })),
            "caches 6 x 64",
        ),
    ] {
        let err = refusal(&m, &prefix);
        assert!(
            err.contains("prefix tuning fails") && err.contains(why),
            "{err}"
        );
    }
    // A Llama's prefix is its KV width: TinyLlama 20 x 22 layers x 2 x (4 x 64) = 225,280.
    let llama = run(&model("tinyllama-1.1b"), &prefix)
        .memory
        .trainable_params;
    assert_eq!(llama, 225_280);
    // MPT's config says `n_heads`, which peft does not look for: it raises until the user
    // passes `num_attention_heads`, and a note says so.
    let mpt = estimate_notes("mpt-7b", "prompt", &[]);
    assert!(mpt.contains("pass num_attention_heads to its PromptTuningConfig"));
    // peft's IA3 and LN-tuning tables have no `phi3` entry: it raises until targets are
    // given, and a note says what the plan assumed. Llama's entry needs no note.
    let notes = |model: &str, method: &str| estimate_notes(model, method, &[]);
    assert!(notes("phi-3-mini", "ia3").contains("no IA3 defaults for model type `phi3`"));
    assert!(notes("phi-3-mini", "ln-tuning").contains("no LN-tuning defaults"));
    assert!(!notes("llama2-7b", "ia3").contains("defaults"));
}

#[test]
fn fit_on_a_model_without_attention_skips_the_changes_it_cannot_take() {
    // Mamba-1.4B, full fine-tuning at 8 x 2048 on a T4: nothing fits, and the candidate "switch
    // to LoRA on q and v" has nothing to adapt; `fit` reports the other changes and exits 1
    // (does not fit), not 2.
    crate::ftplan()
        .args([
            "fit",
            "--model",
            "mamba-1.4b",
            "--gpu",
            "t4",
            "--batch",
            "8",
            "--seq",
            "2048",
        ])
        .assert()
        .code(1);
}

#[test]
fn fp32_experts_run_grouped_mm_in_fp32_without_autocast_copies() {
    // transformers 5 runs experts as `grouped_mm(input.to(weight.dtype), weight)`, which
    // autocast leaves alone: a frozen fp32 base (LoRA over fp32 weights, QLoRA's upcast
    // experts) computes its experts in fp32 and keeps no bf16 copy of their weights. Mixtral's
    // experts would need 45,097,156,608 x 2 B = 90 GB of such copies. What autocast does keep
    // at 1 x 128 tokens is the attention projections' copies (32 layers x 4,096 x 10,240 x 2 B
    // = 2.68 GB), the LM head's (0.26 GB) and the routers': with the activations, under 5 GiB.
    let m = model("mixtral-8x7b");
    let p = Plan {
        precision: Precision::MixedBf16,
        ..plan(lora(), 1, 128, AttentionKernel::Sdpa)
    };
    let kept = run(&m, &p).memory.saved_after_forward.0;
    assert!((2_946_498_560..5 << 30).contains(&kept), "{kept}");
}

#[test]
fn seq2seq_prefix_reaches_the_decoder_self_attention_only() {
    // peft 0.21 hands a seq2seq model's prefix to the decoder's self-attention cache and empties
    // the cross-attention cache; the encoder takes none. BART-base (d_model 768, 12 heads of 64,
    // 6 + 6 layers), prefix 16, batch 1 x 64 source / 32 target tokens, eager attention, bf16:
    // - trainable: one table for the decoder, 16 x (6 layers x 2 x 768) = 147,456;
    // - the encoder trains nothing and its output feeds only frozen key/value projections, so no
    //   encoder op keeps anything for backward;
    // - decoder self-attention sees 16 + 32 keys, cross-attention the 64 source tokens;
    // - each cross-attention core keeps k and v (64 x 768 x 2 B = 98,304 each) and the fp32
    //   softmax (12 x 32 x 64 x 4 B = 98,304) and, with bart-base's attention dropout of 0.1,
    //   dropout's bool mask (24,576); not q or the dropped bf16 probabilities, which only the
    //   keys' and values' (absent) gradients need: 319,488 per layer.
    let m = model("bart-base");
    let p = Plan {
        target_seq: 32,
        ..plan(
            Method::Prefix { virtual_tokens: 16 },
            1,
            64,
            AttentionKernel::Eager,
        )
    };
    assert_eq!(run(&m, &p).memory.trainable_params, 147_456);
    let g = graph::build(&m, &p);
    // Bytes kept by the ops whose name contains `part` (only attention cores if `cores`).
    let kept = |part: &str, cores: bool| -> u64 {
        g.ops()
            .filter(|o| (!cores || o.kind == OpKind::Attention) && g.name(o.name).contains(part))
            .map(|o| crate::kept_bytes(&g, o) * u64::from(o.repeat.max(1)))
            .sum()
    };
    assert_eq!(kept("encoder.", false), 0);
    assert_eq!(kept("encoder_attn", true), 6 * 319_488);
    // The self-attention core's flops: 12 heads x 32 queries x 48 keys x (64 + 64) x 2, all
    // scores (eager), per decoder layer.
    let self_flops: f64 = g
        .ops()
        .filter(|o| {
            let n = g.name(o.name);
            o.kind == OpKind::Attention && n.starts_with("decoder.") && n.contains("self_attn")
        })
        .map(|o| o.cost.forward_flops.0 * f64::from(o.repeat.max(1)))
        .sum();
    assert_eq!(self_flops, 6.0 * 2.0 * 12.0 * 32.0 * 48.0 * 128.0);
}

#[test]
fn ia3_scales_the_projections_peft_names_for_each_model_type() {
    // peft 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: Llama k, v and down_proj;
    // Gemma (and Qwen2/3, BART, Phi) q, v and down_proj; down_proj scales its input.
    // TinyLlama (22 layers, k and v 4 x 64 = 256 wide, FFN 5,632): 22 x (256 + 256 + 5,632)
    // = 135,168. Gemma-2B (18 layers, q 8 x 256 = 2,048, one KV head: v 256, FFN 16,384):
    // 18 x (2,048 + 256 + 16,384) = 336,384 (keys and values would give 301,824).
    let p = plan(Method::Ia3, 1, 128, AttentionKernel::Sdpa);
    assert_eq!(
        run(&model("tinyllama-1.1b"), &p).memory.trainable_params,
        135_168
    );
    assert_eq!(run(&model("gemma-2b"), &p).memory.trainable_params, 336_384);
    // mT5's entry: k, v and `wi_1` (the gated FFN's linear half, ftplan's up projection),
    // scaled at their outputs, no feed-forward module. mt5-small (8 + 8 layers, k and v
    // 6 x 64 = 384 wide, FFN 1,024): 8 x (384 + 384 + 1,024) + 8 x (4 x 384 + 1,024) = 34,816,
    // as peft counts it (`ftplan measure --tiny` agrees at toy size). T5's `wo` input scaling
    // has the same width, so the graph's sites tell them apart.
    let mt5 = model("mt5-small");
    assert_eq!(run(&mt5, &p).memory.trainable_params, 34_816);
    let g = ftplan::graph::build(&mt5, &p);
    let sites: Vec<String> = g
        .ops()
        .map(|o| g.name(o.name))
        .filter(|n| n.ends_with(".ia3"))
        .collect();
    assert!(sites.iter().any(|n| n.contains("up_proj")), "{sites:?}");
    assert!(!sites.iter().any(|n| n.contains("down_proj")), "{sites:?}");
    let t5 = ftplan::graph::build(&model("flan-t5-base"), &p);
    assert!(t5.ops().any(|o| t5.name(o.name).ends_with("down_proj.ia3")));
}

#[test]
fn ln_tuning_trains_the_norms_peft_names_for_each_model_type() {
    // peft 0.21's LNTuningConfig wraps TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING's
    // modules: Llama every norm, Qwen2 only `post_attention_layernorm` (the FFN's input norm).
    // TinyLlama (22 layers, width 2,048): 2 x 22 + 1 final norms, 45 x 2,048 = 92,160.
    // Qwen2.5-0.5B (24 layers, width 896): 24 x 896 = 21,504 (all norms would be 43,904).
    // Both as peft counts them (ftplan measure, CPU, 2 x 256 tokens: peaks equal to 0.1 MiB).
    let p = Plan {
        precision: Precision::MixedBf16,
        ..plan(Method::LnTuning, 1, 128, AttentionKernel::Sdpa)
    };
    assert_eq!(
        run(&model("tinyllama-1.1b"), &p).memory.trainable_params,
        92_160
    );
    assert_eq!(
        run(&model("qwen2.5-0.5b"), &p).memory.trainable_params,
        21_504
    );
}

#[test]
fn stablelm_drops_the_mlp_output_only() {
    // StableLmDecoderLayer has one `nn.Dropout(hidden_dropout)`, applied to the MLP's output;
    // attention's output goes to the residual undropped. With hidden_dropout 0.1 every block
    // keeps one bool mask of batch x seq x hidden = 1 x 128 x 2,048 bytes, not two.
    let mut m = model("stablelm-2-1.6b");
    m.dropout.residual = 0.1;
    let p = plan(Method::Full, 1, 128, AttentionKernel::Sdpa);
    let g = graph::build(&m, &p);
    let names: Vec<String> = g.ops().map(|o| g.name(o.name)).collect();
    assert!(
        names.iter().any(|n| n.ends_with("mlp.dropout")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.ends_with("self_attn.dropout")));
    assert!(!names.iter().any(|n| n.ends_with("attn.dropout")));
}

#[test]
fn mbart_normalises_before_each_sub_layer_and_after_each_stack() {
    // MBartEncoderLayer / MBartDecoderLayer: LayerNorm before self-attention, cross-attention and
    // the FFN; each stack ends in `layer_norm` beside BART's `layernorm_embedding`; token
    // embeddings times sqrt(1,024) = 32. LN tuning (no peft entry: every norm) on
    // mbart-large-50 trains weight and bias of 12 x 2 + 12 x 3 + 2 + 2 = 64 norms of width 1,024:
    // 64 x 2 x 1,024 = 131,072 (`ftplan measure --tiny` agrees at toy size).
    let m = model("mbart-large-50");
    assert_eq!(m.multipliers.embedding, 32.0);
    let p = plan(Method::LnTuning, 1, 128, AttentionKernel::Sdpa);
    assert_eq!(run(&m, &p).memory.trainable_params, 131_072);
    let g = graph::build(&m, &p);
    let names: Vec<String> = g.ops().map(|o| g.name(o.name)).collect();
    for want in [
        "encoder.final_norm",
        "decoder.final_norm",
        "encoder.embed.multiplier",
        "decoder.layers.1+10.cross_layernorm",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let bart = graph::build(&model("bart-large"), &p);
    assert!(
        !bart
            .ops()
            .any(|o| bart.name(o.name).ends_with("final_norm"))
    );
}

#[test]
fn gpt_bigcode_keeps_its_causal_mask_table_on_the_gpu() {
    // GPTBigCodeModel registers `bias`, an (n_positions x n_positions) bool lower triangle,
    // moved to the GPU with the model: StarCoderBase-1B's 8,192 positions give
    // 8,192^2 = 67,108,864 bytes beside its 1,137,207,296 parameters. Multi-query attention:
    // one key/value head of 128 for 16 query heads, so `c_attn` is 2,048 x (2,048 + 2 x 128).
    let m = model("starcoderbase-1b");
    assert_eq!(m.decoder.kv_heads, 1);
    let p = full(Precision::Bf16, 1, 128);
    let e = run(&m, &p);
    assert_eq!(e.memory.total_params, 1_137_207_296);
    assert_eq!(e.memory.at_peak.weights.0, 1_137_207_296 * 2 + 67_108_864);
}

#[test]
fn olmo_layer_norm_has_nothing_to_train_and_keeps_an_fp32_copy() {
    // OlmoLayerNorm: F.layer_norm(x.to(float32), no weight, no bias).to(x.dtype). OLMo-1B's
    // 1,176,764,416 parameters hold no norm weights, so LN tuning finds nothing; on a frozen bf16
    // base under LoRA each norm keeps its fp32 upcast (4 bytes per element) and mean and rstd
    // (2 x 4 bytes per token): at batch 1 x 128 and width 2,048, 128 x (2,048 x 4 + 8) bytes.
    let m = model("olmo-1b");
    let p = plan(Method::LnTuning, 1, 128, AttentionKernel::Sdpa);
    let hw = resolve_hardware("h200").expect("ships").value;
    assert!(estimate(&m, &p, &hw, &Rates::from_datasheet(&hw)).is_err());
    let p = plan(
        Method::Lora(ftplan::spec::plan::Lora {
            rank: 16,
            alpha: 32.0,
            targets: ftplan::spec::plan::LoraTargets::QueryValue,
            dora: false,
        }),
        1,
        128,
        AttentionKernel::Sdpa,
    );
    let e = run(&m, &p);
    assert_eq!(e.memory.base_params, 1_176_764_416);
    let g = graph::build(&m, &p);
    let op = g
        .ops()
        .find(|o| g.name(o.name) == "decoder.layers.1+14.input_layernorm")
        .expect("norm");
    assert!(op.params.is_empty());
    assert_eq!(crate::kept_bytes(&g, op), 128 * (2_048 * 4 + 8));
}

#[test]
fn gpt_neo_keeps_a_mask_buffer_per_layer_and_runs_its_eager_attention() {
    // GPTNeoSelfAttention registers `bias`, a (2,048 x 2,048) bool mask (the local layers' a
    // band of 256), in every one of GPT-Neo-125M's 12 layers: 12 x 2,048^2 = 50,331,648 bytes
    // beside its 125,198,592 bf16 parameters. It has no SDPA path: asking for SDPA plans the
    // eager code, so both plans are the same estimate.
    let m = model("gpt-neo-125m");
    assert!(!m.sdpa);
    let sdpa = full(Precision::Bf16, 1, 128);
    let eager = Plan {
        attention: AttentionKernel::Eager,
        ..sdpa.clone()
    };
    let e = run(&m, &sdpa);
    assert_eq!(e.memory.total_params, 125_198_592);
    assert_eq!(e.memory.at_peak.weights.0, 125_198_592 * 2 + 50_331_648);
    assert_eq!(e.memory.peak, run(&m, &eager).memory.peak);
}

#[test]
fn gpt_neo_scores_in_fp32_from_fp32_queries_and_keys_without_autocast() {
    // `_attn` casts q and k to fp32: with bf16 weights and no autocast the score matmul keeps
    // fp32 q and k, 128 tokens x 768 x 4 bytes = 393,216 each; v stays bf16 (196,608); softmax
    // keeps its fp32 output, 12 heads x 128 x 128 x 4 = 786,432, and the matmul with v its bf16
    // copy, 393,216. Under autocast (fp32 weights) the matmul casts them back: bf16 q and k.
    let m = model("gpt-neo-125m");
    let core_saves = |p: &Plan| {
        let g = graph::build(&m, p);
        let op = crate::op_ending(&g, "self_attn.core");
        crate::kept_bytes(&g, op)
    };
    let pure = Plan {
        precision: Precision::Bf16,
        ..plan(Method::Full, 1, 128, AttentionKernel::Eager)
    };
    assert_eq!(core_saves(&pure), 393_216 * 2 + 196_608 + 786_432 + 393_216);
    let mixed = plan(Method::Full, 1, 128, AttentionKernel::Eager);
    assert_eq!(core_saves(&mixed), 196_608 * 3 + 786_432 + 393_216);
}

#[test]
fn gpt_j_keeps_a_sin_cos_table_per_layer_and_a_biased_head() {
    // GPTJAttention's `embed_positions`: fp32 sin and cos for 2,048 positions x rotary_dim 64,
    // in each of 28 layers: 28 x 2,048 x 64 x 4 = 14,680,064 bytes. Rotary covers 64 of each
    // 256-wide head; q, k, v and out carry no bias, the LM head does (50,400 more parameters):
    // 6,050,882,784 in all, as transformers counts GPT-J-6B.
    let m = model("gpt-j-6b");
    assert!(!m.sdpa && m.parallel_block && m.lm_head_bias);
    assert_eq!(
        m.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 0.25 }
    );
    let p = Plan {
        precision: Precision::Bf16,
        ..plan(Method::Full, 1, 128, AttentionKernel::Eager)
    };
    let e = run(&m, &p);
    assert_eq!(e.memory.total_params, 6_050_882_784);
    assert_eq!(e.memory.at_peak.weights.0, 6_050_882_784 * 2 + 14_680_064);
}

#[test]
fn marian_and_pegasus_positions_are_frozen_sinusoidal_tables() {
    // MarianSinusoidalPositionalEmbedding is an `nn.Embedding(_freeze=True)`: each stack keeps
    // a 512 x 512 table that no method trains. OPUS-MT en-de has 74,410,496 parameters, full
    // fine-tuning trains 74,410,496 - 2 x 512 x 512 = 73,886,208 of them, and the tables get
    // no AdamW states: what stays between steps is 74,410,496 fp32 weights and 73,886,208 x 8
    // bytes of moments. Pegasus-large: 2 x 1,024 x 1,024 of 570,797,056 frozen; pre-norm (a final norm
    // per stack) and no embedding norm.
    let m = model("opus-mt-en-de");
    assert_eq!(
        m.positions,
        ftplan::spec::model::Positions::Sinusoidal { rows: 512 }
    );
    assert!(!m.embedding_norm);
    assert!((m.multipliers.embedding - 512f64.sqrt()).abs() < 1e-12);
    let mut p = plan(Method::Full, 8, 128, AttentionKernel::Sdpa);
    p.target_seq = 128;
    let e = run(&m, &p);
    assert_eq!(e.memory.total_params, 74_410_496);
    assert_eq!(e.memory.trainable_params, 73_886_208);
    // Fused AdamW also keeps a 4-byte `step` per trainable tensor: the shared embedding, 16
    // per encoder layer and 26 per decoder layer, 1 + 6 x 16 + 6 x 26 = 253.
    assert_eq!(
        e.memory.persistent.0,
        74_410_496 * 4 + 73_886_208 * 8 + 253 * 4
    );
    let m = model("pegasus-large");
    assert_eq!(m.norm_placement, ftplan::spec::model::NormPlacement::Pre);
    let e = run(&m, &p);
    assert_eq!(e.memory.total_params, 570_797_056);
    assert_eq!(e.memory.trainable_params, 570_797_056 - 2 * 1_024 * 1_024);
}

#[test]
fn codegen_copies_its_qkv_shards_and_gpt_neo_holds_the_last_probabilities() {
    // CodeGen reshapes q, k and v out of a non-contiguous split of `qkv_proj`'s output, so the
    // eager core keeps three 128 x 1,024 bf16 parts (262,144 bytes each), not the fused
    // 3,072-wide output; plus softmax's fp32 probabilities (16 heads x 128 x 128 x 4 =
    // 1,048,576) and their bf16 copy (524,288).
    let m = model("codegen-350m-mono");
    assert!(m.fused_qkv && m.qkv_split_copies);
    let p = plan(Method::Full, 1, 128, AttentionKernel::Eager);
    let g = graph::build(&m, &p);
    let core = crate::op_ending(&g, "attn.core");
    assert_eq!(
        crate::kept_bytes(&g, core),
        3 * 262_144 + 1_048_576 + 524_288
    );
    // GPT-Neo's layer loop holds the previous block's returned probabilities while the next
    // runs: under checkpointing nothing else keeps them, so each attention's forward carries
    // one more 12 x 128 x 128 bf16 matrix, 393,216 bytes.
    let m = model("gpt-neo-125m");
    let transient = |p: &Plan| {
        let g = graph::build(&m, p);
        crate::op_ending(&g, "self_attn.core").forward_transient.0
    };
    let mut ckpt = p.clone();
    ckpt.grad_ckpt = true;
    assert_eq!(transient(&ckpt) - transient(&p), 393_216);
}

#[test]
fn mpt_reads_transformers_block_and_its_nested_attention_config() {
    // transformers' MptForCausalLM: ALiBi on eager scores (no SDPA or flash class), one
    // bias-free `Wqkv`, a tied head, and `attn_config.attn_pdrop` for the probabilities and
    // both sub-layer outputs; `resid_pdrop` is read by nothing.
    let config = serde_json::json!({
        "model_type": "mpt", "d_model": 256, "n_heads": 4, "n_layers": 2, "vocab_size": 512,
        "max_seq_len": 128, "resid_pdrop": 0.3, "attn_config": {"attn_pdrop": 0.1}
    });
    let m =
        ftplan::spec::hf::parse_config("config.json", &config, "mpt-toy", false).expect("reads");
    assert!(!m.sdpa && !m.flash_attention && m.fused_qkv && m.tie_word_embeddings);
    assert_eq!((m.dropout.attention, m.dropout.residual), (0.1, 0.1));
    assert_eq!(m.context, Some(128));
    // Parameters: 512 x 256 tied embedding; per layer Wqkv 3 x 256^2, out_proj 256^2, the MLP
    // 2 x 4 x 256^2, two bias-free norms 2 x 256; the final norm 256.
    let per_layer = 12 * 256 * 256 + 2 * 256;
    let total = run(&m, &plan(Method::Full, 1, 64, AttentionKernel::Eager))
        .memory
        .total_params;
    assert_eq!(total, 512 * 256 + 2 * per_layer + 256);
}

#[test]
fn eager_attention_over_a_fused_projection_keeps_part_sized_copies() {
    // MPT-7B (32 heads of 128, hidden 4,096, one fused `Wqkv`), prefix tuning with 32 virtual
    // tokens, batch 1 x 64, bf16, eager attention. `matmul` on the head-split views of the
    // fused output copies each operand for `bmm` and autograd keeps the copies, not the fused
    // output. A layer past the first (everything requires grad there) keeps:
    // - q: 64 x 4,096 x 2 B = 524,288; k and v with the prefix in front, 96 x 4,096 x 2 B =
    //   786,432 each;
    // - softmax's fp32 output, 32 x 64 x 96 x 4 B = 786,432, and its bf16 copy for v's
    //   gradient, 393,216:
    // 3,276,800 bytes, where keeping the fused output (3 x 524,288) beside k and v would be
    // 4,325,376. Without the prefix (LoRA q,v) the three copies are the fused output's bytes:
    // 3 x 524,288 + 32 x 64 x 64 x 6 B = 2,359,296.
    let m = model("mpt-7b");
    let core = |method: Method| -> u64 {
        let p = plan(method, 1, 64, AttentionKernel::Eager);
        let g = graph::build(&m, &p);
        let op = g
            .ops()
            .find(|o| o.repeat > 1 && o.kind == OpKind::Attention)
            .expect("a repeated attention core");
        crate::kept_bytes(&g, op)
    };
    assert_eq!(core(Method::Prefix { virtual_tokens: 32 }), 3_276_800);
    assert_eq!(core(lora()), 2_359_296);
}

#[test]
fn moe_input_jitter_keeps_one_noise_tensor_per_multiply() {
    // Phi-3.5-MoE (hidden 4,096) with `input_jitter_noise` 0.01, LoRA q,v, batch 1 x 64:
    // PhimoeSparseMoeBlock and then PhimoeTopKRouter multiply the block's input in place by
    // fresh uniform noise, and each `mul_` keeps its noise for backward. The input is
    // `post_attention_layernorm`'s output, an `nn.LayerNorm` that autocast runs in fp32:
    // 2 x 64 x 4,096 x 4 B = 2,097,152 bytes per layer. Mixtral's block does it once when
    // `router_jitter_noise` is set, on its RMSNorm's bf16 output: 64 x 4,096 x 2 B = 524,288.
    // With no jitter there is no such op.
    let kept = |m: &ModelSpec| -> u64 {
        let g = graph::build(m, &plan(lora(), 1, 64, AttentionKernel::Sdpa));
        g.ops()
            .filter(|o| g.name(o.name).contains(".jitter"))
            .filter(|o| g.name(o.name).contains("layers.1"))
            .map(|o| crate::kept_bytes(&g, o))
            .sum()
    };
    let phimoe = model("phi-3.5-moe");
    assert_eq!(phimoe.moe.expect("moe").input_jitter, 2);
    assert_eq!(kept(&phimoe), 2_097_152);
    let mut still = phimoe.clone();
    still.moe = phimoe.moe.map(|m| ftplan::spec::model::Moe {
        input_jitter: 0,
        ..m
    });
    assert_eq!(kept(&still), 0);
    let mixtral = model("mixtral-8x7b");
    assert_eq!(mixtral.moe.expect("moe").input_jitter, 0);
    let mut jittered = mixtral.clone();
    jittered.moe = mixtral.moe.map(|m| ftplan::spec::model::Moe {
        input_jitter: 1,
        ..m
    });
    assert_eq!(kept(&jittered), 524_288);
}

#[test]
fn phimoe_routes_with_sparsemixer_and_refuses_all_linear_as_peft_fails() {
    // sparsemixer's forward is 47 kernels beyond the router's linear and the cast (a dispatch
    // count of PhimoeTopKRouter), top-k routing's 5: 42 more per MoE layer, 32 layers.
    let m = model("phi-3.5-moe");
    let p = plan(lora(), 1, 64, AttentionKernel::Sdpa);
    let kernels = |m: &ModelSpec| -> u64 {
        let g = graph::build(m, &p);
        g.ops()
            .filter(|o| g.name(o.name).ends_with("router.softmax"))
            .map(|o| u64::from(o.cost.forward_kernels) * u64::from(o.repeat.max(1)))
            .sum()
    };
    let mut topk = m.clone();
    topk.moe = m.moe.map(|x| ftplan::spec::model::Moe {
        routing: ftplan::spec::model::Routing::TopK,
        ..x
    });
    assert_eq!(kernels(&m) - kernels(&topk), 32 * 42);
    // peft's `all-linear` wraps the router (an nn.Linear subclass returning a tuple) and fails.
    let hw = resolve_hardware("h200").expect("ships").value;
    let err = estimate(
        &m,
        &plan(lora_all(), 1, 64, AttentionKernel::Sdpa),
        &hw,
        &Rates::from_datasheet(&hw),
    )
    .expect_err("peft fails");
    assert!(err.to_string().contains("router"), "{err}");
}
#[test]
fn nemotron_norm_runs_in_half_precision_and_relu2_keeps_an_fp32_copy() {
    // A toy Nemotron (hidden 256, intermediate 768, 4 heads of 64), full fine-tuning in mixed
    // bf16, batch 1 x 64. Per layer past the first:
    // - NemotronLayerNorm1P casts its arguments to autocast's bf16 itself: layer_norm keeps the
    //   bf16 copy of the fp32 residual (64 x 256 x 2 B = 32,768) and fp32 mean and rstd
    //   (2 x 64 x 4 B = 512), 33,280, where nn.LayerNorm would keep the fp32 input (65,536);
    //   its bf16 output feeds q, k and v with no autocast copy of its own.
    // - relu2: `relu` keeps its bf16 output (64 x 768 x 2 B = 98,304), and `torch.square`,
    //   which autocast runs as fp32 `pow`, keeps its fp32 copy (196,608).
    let config = serde_json::json!({
        "model_type": "nemotron", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "head_dim": 64, "vocab_size": 512, "hidden_act": "relu2"
    });
    let m = ftplan::spec::hf::parse_config("config.json", &config, "toy", false).expect("reads");
    assert!(!m.gated_ffn);
    assert_eq!(
        m.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 0.5 }
    );
    let p = full(Precision::MixedBf16, 1, 64);
    let g = graph::build(&m, &p);
    let kept = |suffix: &str| -> u64 {
        g.ops()
            .filter(|o| g.name(o.name) == format!("decoder.layers.1.{suffix}"))
            .map(|o| crate::kept_bytes(&g, o))
            .sum()
    };
    assert_eq!(kept("input_layernorm"), 33_280);
    assert_eq!(kept("mlp.act"), 98_304);
    assert_eq!(kept("mlp.act.square"), 196_608);
}

#[test]
fn python_gelus_keep_what_their_chains_of_ops_keep() {
    // A toy GPT-NeoX (hidden 256, intermediate 1,024), full fine-tuning in mixed bf16, batch 1
    // x 64: fc1's output x is bf16 under autocast, 64 x 1,024 x 2 B = 131,072 per tensor, and
    // none of these ops is on autocast's lists (transformers' `activations.py`).
    // - gelu (`F.gelu`): one kernel keeping x: 131,072.
    // - gelu_fast, `0.5 * x * (1.0 + tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))`:
    //   `(0.044715 * x) * x` keeps both, `(x * 0.797...) * (1 + ...)` both, tanh its output,
    //   the last product `0.5 * x` and `1 + tanh`: seven tensors, 917,504.
    // - gelu_python, `x * 0.5 * (1.0 + erf(x / sqrt(2)))`: erf keeps `x / sqrt(2)`, the product
    //   `x * 0.5` and `1 + erf`: three, 393,216.
    // - quick_gelu, `x * sigmoid(1.702 * x)`: sigmoid keeps its output, the product x and it:
    //   two, 262,144.
    // - gelu_accurate is gelu_new's chain: pow's fp32 copy of x (262,144), tanh's fp32 output
    //   (262,144), bf16 `0.5 * x` (131,072) and fp32 `1 + tanh` (262,144): 917,504.
    let kept = |act: &str| {
        let m = toy(&serde_json::json!({
            "model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
            "hidden_act": act, "rotary_pct": 0.25, "tie_word_embeddings": false
        }));
        kept_under(
            &m,
            &full(Precision::MixedBf16, 1, 64),
            "decoder.layers.1.mlp.act",
        )
    };
    assert_eq!(kept("gelu"), 131_072);
    assert_eq!(kept("gelu_fast"), 917_504);
    assert_eq!(kept("gelu_python"), 393_216);
    assert_eq!(kept("quick_gelu"), 262_144);
    assert_eq!(kept("gelu_accurate"), 917_504);
    assert_eq!(kept("gelu_python_tanh"), 917_504);
    toy_refused(
        &serde_json::json!({
            "model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
            "hidden_act": "gelu_10"
        }),
        "hidden_act",
    );
}

#[test]
fn a_linear_modules_input_and_peft_cast_copy_live_through_its_call() {
    // A toy GPT-NeoX (hidden 256, intermediate 1,024) under LoRA r16 on every linear, bf16
    // base, batch 1 x 64. fc2's input is the bf16 activation (64 x 1,024 x 2 B = 131,072),
    // which the frozen base matmul does not keep; the caller still holds it while fc2 runs.
    // peft's `Linear.forward` rebinds `x` to its fp32 cast for the adapter's dtype (262,144),
    // bound until it returns, so both are alive while autocast makes lora_A's bf16 copy.
    let m = toy(&serde_json::json!({
        "model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
        "hidden_act": "gelu", "rotary_pct": 0.25, "tie_word_embeddings": false
    }));
    let g = graph::build(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    let named = |suffix: &str| -> Vec<u64> {
        let op = crate::op_ending(&g, suffix);
        g.named(op).map(|t| g.tensor(t).bytes.0).collect()
    };
    let base = named("layers.1.mlp.fc2");
    assert!(base.contains(&131_072), "{base:?}");
    let cast = named("layers.1.mlp.fc2.lora_autocast");
    assert!(
        cast.contains(&131_072) && cast.contains(&262_144),
        "{cast:?}"
    );
    // Once fc2 returns, neither is named by the block's frames.
    let after = named("layers.1.parallel.add");
    assert!(!after.contains(&262_144), "{after:?}");
}

#[test]
fn falcon_multi_query_sdpa_runs_the_math_path() {
    // FalconAttention calls `F.scaled_dot_product_attention` with its one key/value head and
    // no `enable_gqa`; every fused kernel requires equal head counts for dense inputs, so SDPA
    // takes its math path, which upcasts q, k and v to fp32 and keeps q, k, v and the fp32
    // probabilities (`Family::sdpa_without_gqa`). A toy Falcon-7B (hidden 256, 4 heads of 64,
    // one KV head) under LoRA, batch 2 x 64:
    // - q in fp32: 2 x 64 x 256 x 4 B = 131,072;
    // - k and v broadcast to the 4 heads by the matmuls, copied to fold batch and heads for
    //   `bmm`: 131,072 each;
    // - the probabilities: 2 x 4 x 64 x 64 x 4 B = 131,072.
    // At batch 1 the single head folds as a stride-0 view: k and v stay one head (64 x 64 x 4
    // B = 16,384 each), q is 65,536 and the probabilities 65,536.
    let config = |multi_query: bool, kv_heads: u64| {
        toy(&serde_json::json!({
            "model_type": "falcon", "hidden_size": 256, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 512, "multi_query": multi_query,
            "new_decoder_architecture": false, "num_kv_heads": kv_heads, "parallel_attn": true,
            "bias": false, "alibi": false
        }))
    };
    let mq = config(true, 4);
    let at = |m: &ModelSpec, batch: u64| {
        kept_at(
            m,
            &plan(lora(), batch, 64, AttentionKernel::Sdpa),
            "decoder.layers.1.attn.core",
        )
        .0
    };
    assert_eq!(at(&mq, 2), 524_288);
    assert_eq!(at(&mq, 1), 163_840);
    // With as many KV heads as query heads the fused kernel runs: bf16 q and k (rotated, 2 x
    // 64 x 256 x 2 B = 65,536 each), v (a view of the fused projection's output, whose whole
    // storage it keeps: 196,608), the output (65,536), the fp32 logsumexp (2 x 4 x 64 x 4
    // B = 2,048) and the additive copy of Falcon's materialised mask (2 x 64 x 64 x 2 B =
    // 16,384).
    assert_eq!(at(&config(false, 4), 2), 411_648);
}

#[test]
fn arcee_is_llama_with_a_non_gated_relu2_mlp() {
    // ArceeConfig: `hidden_act` defaults to relu2, the MLP is `down_proj(act(up_proj(x)))` with
    // `mlp_bias`, the norms are Llama's RMSNorm. A toy (hidden 256, intermediate 1,024, 4 heads
    // of 64, 2 KV heads, 2 layers, vocabulary 512, untied): per layer q and o 256^2 each, k and v
    // 256 x 128 each, up and down 256 x 1,024 each, two norms 256; the embedding and head
    // 512 x 256 each and the final norm 256.
    let config = serde_json::json!({
        "model_type": "arcee", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512
    });
    let m = ftplan::spec::hf::parse_config("config.json", &config, "toy", false).expect("reads");
    assert!(!m.gated_ffn);
    assert_eq!(m.activation, ftplan::spec::model::Activation::Relu2);
    assert_eq!(m.norm, ftplan::spec::model::Norm::RmsNorm);
    let per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 256 * 1024 + 2 * 256;
    let total = run(&m, &plan(Method::Full, 1, 64, AttentionKernel::Sdpa))
        .memory
        .total_params;
    assert_eq!(total, 2 * per_layer + 2 * 512 * 256 + 256);
}

#[test]
fn ernie_biases_every_linear_and_keeps_interleaved_fp32_rotary_tables_per_layer() {
    // A toy ERNIE 4.5 (hidden 256, intermediate 768, 4 heads of 64, 2 KV heads, 2 layers,
    // vocabulary 512, `use_bias`, tied by Ernie4_5Config's default), full fine-tuning in mixed
    // bf16, batch 2 x 64.
    // - `use_bias` biases q, k, v, o and the three MLP linears: per layer q and o 256^2 + 256,
    //   k and v 256 x 128 + 128, gate and up 256 x 768 + 768, down 768 x 256 + 256, two norms
    //   of 256; the tied embedding 512 x 256 and the final norm 256.
    // - Its `apply_rotary_pos_emb` builds `cos[..., :32].repeat_interleave(2, dim=-1)` and the
    //   same of sin in every layer, from fp32 tables of one sequence's positions (position_ids
    //   are (1, 64)): two (1, 1, 64, 64) fp32 tensors, 16,384 B each, that `q.float() * cos`
    //   and `rotate_half(q).float() * sin` keep: 32,768 B. Llama's multiplies keep only the
    //   model's shared tables, nothing per layer.
    let config = serde_json::json!({
        "model_type": "ernie4_5", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "use_bias": true
    });
    let m = toy(&config);
    assert!(m.tie_word_embeddings && m.qkv_bias && m.linear_bias);
    let per_layer = 2 * (256 * 256 + 256)
        + 2 * (256 * 128 + 128)
        + 2 * (256 * 768 + 768)
        + (768 * 256 + 256)
        + 2 * 256;
    let p = full(Precision::MixedBf16, 2, 64);
    assert_eq!(
        run(&m, &p).memory.total_params,
        2 * per_layer + 512 * 256 + 256
    );
    let rotary = "decoder.layers.1.self_attn.rotary_q";
    assert_eq!(kept_at(&m, &p, rotary).0, 32_768);
    let llama = ModelSpec {
        family: ftplan::spec::model::Family::Llama,
        rotary_apply: ftplan::spec::model::RotaryApply::Shared,
        ..m.clone()
    };
    assert_eq!(kept_at(&llama, &p, rotary).0, 0);
}

/// The norms a toy's first decoder layer runs, by the part of their names.
fn layer_norms(m: &ModelSpec) -> Vec<String> {
    let p = full(Precision::MixedBf16, 1, 64);
    let g = graph::build(m, &p);
    let mut names: Vec<String> = g
        .ops()
        .map(|o| g.name(o.name).to_string())
        .filter(|n| n.starts_with("decoder.layers.0.") && n.ends_with("layernorm"))
        .map(|n| n.trim_start_matches("decoder.layers.0.").to_string())
        .collect();
    names.dedup();
    names
}

#[test]
fn glm_is_glm4_without_its_output_norms() {
    // `GlmDecoderLayer` (GLM-4-9B-Chat, transformers 5.17) builds GLM-4-0414's block less its
    // `post_self_attn_layernorm` and `post_mlp_layernorm`: the same q/k/v biases, fused
    // `gate_up_proj`, and interleaved rotary on half of each head. A toy (hidden 256,
    // intermediate 512, 4 heads of 64, 2 KV heads, 2 layers, vocabulary 512, untied): per
    // layer q 256^2 + 256, k and v 256 x 128 + 128 each, o 256^2 (no bias), gate_up
    // 256 x 1,024, down 512 x 256, and two norms of 256; the embedding and head 512 x 256 each
    // and the final norm 256. GLM-4 adds two norms of 256 per layer.
    let config = |model_type: &str| {
        serde_json::json!({
            "model_type": model_type, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 512, "attention_bias": true,
            "tie_word_embeddings": false
        })
    };
    let (glm, glm4) = (toy(&config("glm")), toy(&config("glm4")));
    let per_layer =
        (256 * 256 + 256) + 2 * (256 * 128 + 128) + 256 * 256 + 256 * 1024 + 512 * 256 + 2 * 256;
    let p = full(Precision::MixedBf16, 1, 64);
    let total = |m: &ModelSpec| run(m, &p).memory.total_params;
    assert_eq!(total(&glm), 2 * per_layer + 2 * 512 * 256 + 256);
    assert_eq!(total(&glm4), total(&glm) + 2 * 2 * 256);
    assert_eq!(
        layer_norms(&glm),
        ["input_layernorm", "pre_feedforward_layernorm"]
    );
    assert_eq!(
        layer_norms(&glm4),
        [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm"
        ]
    );
    assert!(glm.fused_gate_up && glm.qkv_bias);
    assert_eq!(glm.rotary_apply, glm4.rotary_apply);
}

#[test]
fn vaultgemma_is_gemma2_with_pre_norms_only_and_no_ia3_entry() {
    // `VaultGemmaDecoderLayer` deletes Gemma-2's `post_attention_layernorm` and
    // `post_feedforward_layernorm`; the windows (even layers slide), soft-capping (50 and 30 by
    // default) and the (1 + w) RMSNorm stay. A toy (hidden 256, intermediate 512, 4 heads of 64,
    // 2 KV heads, 2 layers, vocabulary 512, tied by default): per layer q and o 256^2 each, k and v
    // 256 x 128 each, gate and up 256 x 512 each, down 512 x 256, and two norms of 256; the tied
    // embedding 512 x 256 and the final norm 256.
    // peft 0.21's IA3 table has `gemma2` (q, v and down) but not `vaultgemma`, so peft asks for
    // `target_modules` and the plan takes Llama's entry (k, v and down): per layer k's and v's
    // outputs, 128 each, and down's input, 512: 2 x 768 = 1,536 (Gemma-2's entry: q's 256 in
    // place of k's 128, 1,792).
    let config = |model_type: &str| {
        serde_json::json!({
            "model_type": model_type, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 512, "sliding_window": 32
        })
    };
    let (vault, gemma2) = (toy(&config("vaultgemma")), toy(&config("gemma2")));
    let per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&vault, &p).memory.total_params,
        2 * per_layer + 512 * 256 + 256
    );
    assert_eq!(
        layer_norms(&vault),
        ["input_layernorm", "pre_feedforward_layernorm"]
    );
    assert_eq!(vault.mixers, gemma2.mixers);
    assert_eq!(vault.softcap, gemma2.softcap);
    assert_eq!(vault.norm, gemma2.norm);
    let ia3 = |m: &ModelSpec| {
        run(m, &plan(Method::Ia3, 1, 64, AttentionKernel::Sdpa))
            .memory
            .trainable_params
    };
    assert_eq!(ia3(&vault), 1_536);
    assert_eq!(ia3(&gemma2), 1_792);
}

#[test]
fn jais2_is_llama_with_layer_norms_and_a_biased_relu2_mlp() {
    // Jais2Config defaults `attention_bias` and `mlp_bias` to true and `hidden_act` to relu2;
    // Jais2DecoderLayer swaps Llama's RMSNorms for `nn.LayerNorm`s and its MLP is
    // `down_proj(act(up_proj(x)))`. A toy (hidden 256, intermediate 1,024, 4 heads of 64, 2 KV
    // heads, 2 layers, vocabulary 512, untied by default): per layer q and o 256^2 + 256 each,
    // k and v 256 x 128 + 128 each, up 256 x 1,024 + 1,024, down 1,024 x 256 + 256, two norms of
    // 2 x 256 (weight and bias); the embedding and head 512 x 256 each and the final norm 2 x 256.
    let config = serde_json::json!({
        "model_type": "jais2", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512
    });
    let m = toy(&config);
    assert!(!m.gated_ffn && m.qkv_bias && m.linear_bias);
    assert_eq!(m.activation, ftplan::spec::model::Activation::Relu2);
    assert_eq!(m.norm, ftplan::spec::model::Norm::LayerNorm);
    let per_layer = 2 * (256 * 256 + 256)
        + 2 * (256 * 128 + 128)
        + (256 * 1024 + 1024)
        + (1024 * 256 + 256)
        + 2 * 2 * 256;
    let total = run(&m, &plan(Method::Full, 1, 64, AttentionKernel::Sdpa))
        .memory
        .total_params;
    assert_eq!(total, 2 * per_layer + 2 * 512 * 256 + 2 * 256);
    // `"attention_bias": false, "mlp_bias": false` leaves only the norms' biases.
    let plain = toy(&serde_json::json!({
        "model_type": "jais2", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "attention_bias": false, "mlp_bias": false
    }));
    let plain_total = run(&plain, &plan(Method::Full, 1, 64, AttentionKernel::Sdpa))
        .memory
        .total_params;
    assert_eq!(total - plain_total, 2 * (2 * 256 + 2 * 128 + 1024 + 256));
}

#[test]
fn solar_open_is_glm45s_sparse_block_in_every_layer_under_llamas_attention() {
    // SolarOpenConfig (Solar Open 100B) is Glm4MoeConfig without `intermediate_size`,
    // `first_k_dense_replace` and `use_qk_norm`: `Glm4MoeMoE` in every layer, Llama's attention
    // with a bias-free `o_proj` and rotary over the whole head. A toy (hidden 256, 4 heads of
    // 64, 2 KV heads, 2 layers, vocabulary 512, 4 experts of 128, top 2, one shared expert,
    // untied), built by transformers 5.17 on the meta device: 1,641,728 parameters, per layer
    // q and o 256^2 each, k and v 256 x 128 each, the experts' gate_up 4 x 256 x 256 and down
    // 4 x 256 x 128, the router 4 x 256, the shared expert's three 256 x 128 matrices and two
    // norms of 256; the embedding and head 512 x 256 each and the final norm 256. LoRA r16 on
    // q and v trains 16 x (256 + 256) + 16 x (256 + 128) per layer: 28,672 (peft 0.21).
    let config = serde_json::json!({
        "model_type": "solar_open", "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 512, "n_routed_experts": 4, "moe_intermediate_size": 128,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1
    });
    let m = toy(&config);
    let moe = m.moe.expect("sparse");
    assert_eq!((moe.first_dense, moe.every), (0, 1), "every layer sparse");
    assert_eq!(
        m.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 1.0 }
    );
    let per_layer = 2 * 256 * 256
        + 2 * 256 * 128
        + 4 * 256 * 256
        + 4 * 256 * 128
        + 4 * 256
        + 3 * 256 * 128
        + 2 * 256;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&m, &p).memory.total_params,
        2 * per_layer + 2 * 512 * 256 + 256
    );
    assert_eq!(2 * per_layer + 2 * 512 * 256 + 256, 1_641_728);
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 28_672);
    // Llama's `apply_rotary_pos_emb` multiplies the whole head, so a partial fraction fails in
    // transformers and is refused here.
    let mut partial = config.clone();
    partial["partial_rotary_factor"] = serde_json::json!(0.5);
    toy_refused(&partial, "partial_rotary_factor");
}

#[test]
fn flex_olmo_is_olmoes_sparse_block_under_olmo2s_attention_and_output_norms() {
    // `FlexOlmoDecoderLayer` (transformers 5.17) is OLMoE's layer with `Olmo2Attention` (an
    // `Olmo2RMSNorm` over the whole q and k projections, no `clip_qkv`), `input_layernorm`
    // deleted and `Olmo2RMSNorm`s on each sub-layer's output. A toy (hidden 256, 4 heads of 64,
    // 2 KV heads, 2 layers, vocabulary 512, 4 experts of 128, top 2, untied), which transformers
    // builds on the meta device with 1,445,888 parameters: per layer q and o 256^2 each, k and
    // v 256 x 128 each, the q norm 256 and the k norm 128, the router 4 x 256, the experts'
    // gate_up 4 x 256 x 256 and down 4 x 256 x 128, two norms of 256; the embedding and head
    // 512 x 256 each and the final norm 256. LoRA r16 on q and v trains 16 x (256 + 256) +
    // 16 x (256 + 128) per layer: 28,672 (peft 0.21).
    let config = |model_type: &str| {
        serde_json::json!({
            "model_type": model_type, "hidden_size": 256, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "num_experts": 4, "num_experts_per_tok": 2,
            "norm_topk_prob": false, "clip_qkv": null, "tie_word_embeddings": false
        })
    };
    let (flex, olmoe) = (toy(&config("flex_olmo")), toy(&config("olmoe")));
    let per_layer = 2 * 256 * 256
        + 2 * 256 * 128
        + (256 + 128)
        + 4 * 256
        + 4 * 256 * 256
        + 4 * 256 * 128
        + 2 * 256;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&flex, &p).memory.total_params,
        2 * per_layer + 2 * 512 * 256 + 256
    );
    assert_eq!(2 * per_layer + 2 * 512 * 256 + 256, 1_445_888);
    assert_eq!(lora_trainable(&flex, &["q_proj", "v_proj"]), 28_672);
    // OLMo-2's norms where OLMoE has Llama's, on the outputs; OLMoE's router.
    use ftplan::spec::model::{Norm, NormPlacement, QkNorm, Routing};
    assert_eq!(
        (flex.norm, flex.norm_placement, flex.qk_norm),
        (Norm::Olmo2RmsNorm, NormPlacement::Output, QkNorm::Full)
    );
    assert_eq!(
        (olmoe.norm, olmoe.norm_placement, olmoe.qk_norm),
        (Norm::RmsNorm, NormPlacement::Pre, QkNorm::Full)
    );
    let moe = flex.moe.expect("sparse");
    assert_eq!(moe.routing, Routing::TopKUnnormalised);
    assert_eq!(moe.routing, olmoe.moe.expect("sparse").routing);
    assert_ne!(layer_norms(&flex), layer_norms(&olmoe));
    // peft converts LoRA's FFN names onto the experts (`flex_olmo` maps to Qwen2-MoE's pattern).
    assert!(flex.family.peft_converts_experts());
}

#[test]
fn exaone_moe_is_exaone4s_attention_in_a_pre_norm_layer_with_deepseek_v3s_experts() {
    // `ExaoneMoeDecoderLayer` (transformers 5.17): `Exaone4Attention` (per-head q/k norms,
    // windows, rotary on the windowed layers only) in OLMoE's pre-norm layer, a dense
    // `Qwen2MoeMLP` below `first_k_dense_replace` and `DeepseekV3MoE` above it. A toy (hidden
    // 256, intermediate 512, 4 heads of 64, 2 KV heads, 3 layers, vocabulary 512, 4 experts of
    // 128, top 2, one shared expert, one dense layer, window 64, pattern 3: local, local,
    // global), which transformers builds with 2,232,448 parameters: per layer q and o 256^2
    // each, k and v 256 x 128 each, the two per-head norms 64 each and two norms of 256
    // (197,248); the dense layer's MLP 3 x 256 x 512; a sparse layer's experts 4 x 256 x 256 +
    // 4 x 256 x 128, router 4 x 256 and shared expert 3 x 256 x 128; the embedding and head
    // 512 x 256 each and the final norm 256. LoRA r16 on q and v: 3 x 14,336 = 43,008.
    let config = serde_json::json!({
        "model_type": "exaone_moe", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "num_experts": 4,
        "num_experts_per_tok": 2, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "sliding_window": 64, "sliding_window_pattern": 3, "tie_word_embeddings": false
    });
    let m = toy(&config);
    let attention = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 64 + 2 * 256;
    let dense = attention + 3 * 256 * 512;
    let sparse = attention + 4 * 256 * 256 + 4 * 256 * 128 + 4 * 256 + 3 * 256 * 128;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&m, &p).memory.total_params,
        dense + 2 * sparse + 2 * 512 * 256 + 256
    );
    assert_eq!(dense + 2 * sparse + 2 * 512 * 256 + 256, 2_232_448);
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 43_008);
    let local = Mixer::SlidingWindow { window: 64 };
    assert_eq!(m.mixers, vec![local, local, Mixer::Attention]);
    assert_eq!(m.rope_layers, vec![true, true, false]);
    use ftplan::spec::model::{NormPlacement, QkNorm, RouterPrecision};
    assert_eq!(
        (m.norm_placement, m.qk_norm),
        (NormPlacement::Pre, QkNorm::PerHead)
    );
    let moe = m.moe.expect("sparse");
    assert_eq!((moe.first_dense, moe.shared_intermediate), (1, 128));
    assert_eq!(moe.router, RouterPrecision::Fp32Operands);
    // Without `first_k_dense_replace` (or `mlp_layer_types`), ExaoneMoeConfig's one dense layer.
    let mut absent = config.clone();
    absent
        .as_object_mut()
        .expect("an object")
        .remove("first_k_dense_replace");
    assert_eq!(toy(&absent).moe.expect("sparse").first_dense, 1);
    // EXAONE-4 norms each sub-layer's output instead.
    let mut exaone4 = config.clone();
    exaone4["model_type"] = serde_json::json!("exaone4");
    assert_eq!(toy(&exaone4).norm_placement, NormPlacement::Output);
}

#[test]
fn afmoe_gates_attention_with_its_own_projection_and_freezes_the_expert_bias() {
    // `AfmoeForCausalLM` (transformers 5.17, Arcee's Trinity): Llama's attention with per-head
    // q/k norms, `output * sigmoid(gate_proj(x))` before `o_proj`, rotary on the sliding layers
    // only; `GptOssRMSNorm` before and after each sub-layer; dense MLPs below
    // `num_dense_layers` (1), then Qwen2-MoE's experts under a sigmoid router with a frozen
    // `expert_bias` and one shared MLP of 2 x 128. A toy (hidden 256, MLP 512, 4 heads of 64,
    // 2 KV heads, 4 layers, vocabulary 512, 8 experts of 128, top 2, window 32, every fourth
    // layer global), which transformers builds with 4,664,088 parameters: per layer q, o and
    // gate_proj 256^2 each, k and v 256 x 128 each, the two per-head norms 64 each and four
    // norms of 256 (263,296); the dense MLP 3 x 256 x 512; a sparse layer's router 8 x 256, its
    // `expert_bias` 8, shared MLP 3 x 256 x 256, experts 8 x 256 x 256 + 8 x 256 x 128
    // (985,096); the embedding and head 512 x 256 each and the final norm. Full fine-tuning
    // trains all but the three frozen biases: 4,664,064.
    let config = serde_json::json!({
        "model_type": "afmoe", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512, "num_experts": 8,
        "num_experts_per_tok": 2, "num_shared_experts": 2, "sliding_window": 32
    });
    let m = toy(&config);
    let attention = 3 * 256 * 256 + 2 * 256 * 128 + 2 * 64 + 4 * 256;
    let sparse = attention + 8 * 256 + 8 + 3 * 256 * 256 + 8 * 256 * 256 + 8 * 256 * 128;
    let total = attention + 3 * 256 * 512 + 3 * sparse + 2 * 512 * 256 + 256;
    assert_eq!(total, 4_664_088);
    let p = full(Precision::Bf16, 1, 64);
    let e = run(&m, &p);
    assert_eq!(
        (e.memory.total_params, e.memory.trainable_params),
        (total, total - 3 * 8)
    );
    // peft 0.21 on the meta device. `all-linear`: q, k, v and o (16 x (512 + 384 + 384 + 512)
    // = 28,672 per layer), the routers (16 x (256 + 8) = 4,224 each) and the experts, whose
    // factors peft sizes to 256 x 256 twice on the fused gate_up stack (rank doubled for its
    // two names) and 128 x 128 plus 256 x 128 on the down stack (180,224 per sparse layer):
    // 668,032. peft moved `gate_proj`, `up_proj` and `down_proj` onto the experts and out of the
    // targets, so neither the dense and shared MLPs nor the attention's `gate_proj` take LoRA:
    // `gate_proj,up_proj` trains the three gate_up stacks only (393,216), `o_proj,down_proj`
    // o and the down stacks (4 x 8,192 + 3 x 49,152 = 180,224).
    assert_eq!(lora_trainable(&m, &["all-linear"]), 668_032);
    assert_eq!(lora_trainable(&m, &["gate_proj", "up_proj"]), 3 * 131_072);
    assert_eq!(lora_trainable(&m, &["o_proj", "down_proj"]), 180_224);
    // IA3 with Llama's entry (peft has none for `afmoe`): k and v outputs in every layer, the
    // dense MLP's and the shared MLPs' `down_proj` inputs: 4 x 256 + 512 + 3 x 256 = 2,304.
    let ia3 = run(&m, &plan(Method::Ia3, 1, 64, AttentionKernel::Sdpa));
    assert_eq!(ia3.memory.trainable_params, 2_304);
    // peft raises on `gate_proj` without `up_proj`: they are fused into the experts' stack.
    let why = refusal(
        &m,
        &plan(lora_named(&["gate_proj"]), 1, 64, AttentionKernel::Sdpa),
    );
    assert!(why.contains("gate_up_proj"), "{why}");
    let local = Mixer::SlidingWindow { window: 32 };
    assert_eq!(m.mixers, vec![local, local, local, Mixer::Attention]);
    assert_eq!(m.rope_layers, vec![true, true, true, false]);
    use ftplan::spec::model::{AttentionGate, Norm, NormPlacement, QkNorm, RoutingWeights};
    assert_eq!(
        (m.norm, m.norm_placement, m.qk_norm),
        (Norm::Olmo2RmsNorm, NormPlacement::Sandwich, QkNorm::PerHead)
    );
    assert_eq!(m.attention_output_gate, AttentionGate::Projection);
    let moe = m.moe.expect("sparse");
    assert!(moe.frozen_score_bias && moe.weights == RoutingWeights::Fp32);
    assert_eq!((moe.first_dense, moe.shared_intermediate), (1, 256));
    // The gate's sigmoid keeps its bf16 output for the product's backward: 64 x 256 x 2 B.
    assert_eq!(
        kept_at(&m, &p, "decoder.layers.0.self_attn.gate_sigmoid").0,
        32_768
    );
    // `mup_enabled` scales the embeddings by sqrt(hidden).
    let mut mup = config.clone();
    mup["mup_enabled"] = serde_json::json!(true);
    assert_eq!(toy(&mup).multipliers.embedding, 16.0);
    // Without `layer_types`, every `global_attn_every_n_layers`-th layer is global (NoPE).
    mup["global_attn_every_n_layers"] = serde_json::json!(2);
    assert_eq!(toy(&mup).rope_layers, vec![true, false]);
}

#[test]
fn cohere2_moe_routes_top_k_logits_and_averages_its_shared_expert() {
    // `Cohere2MoeForCausalLM` (transformers 5.17; Command A+, North): Cohere2's parallel block
    // (one norm feeding attention and MLP, Cohere's weight-only LayerNorm unless `rms_norm_eps`
    // is set), a dense prefix of `prefix_dense_intermediate_size` MLPs, then MixtralExperts of
    // `intermediate_size` under a router that takes top-k of the logits before its softmax, and
    // a shared MLP averaged in: `(routed + shared) / 2`. A toy (hidden 256, experts of 128,
    // prefix MLP 512, 4 heads of 64, 2 KV heads, 5 layers, vocabulary 512 tied, 8 experts, top
    // 2, one shared expert, `first_k_dense_replace` 1, window 32), which transformers builds
    // with 5,056,000 parameters: per layer q and o 256^2 each, k and v 256 x 128 each and one
    // norm of 256 (196,864); the dense MLP 3 x 256 x 512; a sparse layer's router 8 x 256,
    // experts 8 x 256 x 256 + 8 x 256 x 128 and shared MLP 3 x 256 x 128 (886,784); the
    // embedding 512 x 256 (the head shares it) and the final norm.
    let config = serde_json::json!({
        "model_type": "cohere2_moe", "hidden_size": 256, "intermediate_size": 128,
        "prefix_dense_intermediate_size": 512, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512,
        "num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1,
        "first_k_dense_replace": 1, "sliding_window": 32
    });
    let m = toy(&config);
    let attention = 2 * 256 * 256 + 2 * 256 * 128 + 256;
    let sparse = attention + 8 * 256 + 8 * 256 * 256 + 8 * 256 * 128 + 3 * 256 * 128;
    let total = attention + 3 * 256 * 512 + 4 * sparse + 512 * 256 + 256;
    assert_eq!(total, 5_056_000);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    // peft 0.21 on the meta device: `all-linear` wraps q, k, v, o (28,672 per layer), the
    // router's weight (16 x (256 + 8) = 4,224) and the experts (180,224 per sparse layer, as
    // for AFMoE's toy of the same widths): 881,152. q,v 5 x 14,336; gate,up the four gate_up
    // stacks (4 x 131,072); o,down 5 x 8,192 + 4 x 49,152 (the dense and shared MLPs lose
    // `down_proj` to the experts). IA3 with Llama's entry: k and v outputs (5 x 256) and the
    // dense and shared `down_proj` inputs (512 + 4 x 128): 2,304.
    assert_eq!(lora_trainable(&m, &["all-linear"]), 881_152);
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 71_680);
    assert_eq!(lora_trainable(&m, &["gate_proj", "up_proj"]), 524_288);
    assert_eq!(lora_trainable(&m, &["o_proj", "down_proj"]), 237_568);
    let ia3 = run(&m, &plan(Method::Ia3, 1, 64, AttentionKernel::Sdpa));
    assert_eq!(ia3.memory.trainable_params, 2_304);
    // The prefix's window pattern 1 makes its layer global but `force_rope` keeps its rotary;
    // the rest slide three layers in four, rotary on the sliding ones only.
    let local = Mixer::SlidingWindow { window: 32 };
    assert_eq!(
        m.mixers,
        vec![Mixer::Attention, local, local, local, Mixer::Attention]
    );
    assert_eq!(m.rope_layers, vec![true, true, true, true, false]);
    use ftplan::spec::model::{Norm, Routing, RoutingWeights};
    assert!(m.parallel_block && m.norm == Norm::CohereLayerNorm);
    let moe = m.moe.expect("sparse");
    assert_eq!(
        (moe.routing, moe.weights, moe.first_dense),
        (Routing::SoftmaxOfTopK, RoutingWeights::Hidden, 1)
    );
    assert!(moe.shared_average && moe.shared_intermediate == 128);
    // The average is one more tensor of the block's output size, kept by nothing: 64 x 256 bf16.
    let g = graph::build(&m, &p);
    let avg = crate::op_ending(&g, "shared_average");
    assert_eq!((avg.out.0, crate::kept_bytes(&g, avg)), (32_768, 0));
    // North's choices: RMSNorm, a sigmoid router without renormalisation, no shared expert.
    let mut north = config.clone();
    north["rms_norm_eps"] = serde_json::json!(1e-6);
    north["expert_selection_fn"] = serde_json::json!("sigmoid");
    north["norm_topk_prob"] = serde_json::json!(false);
    north["num_shared_experts"] = serde_json::json!(0);
    let n = toy(&north);
    let moe = n.moe.expect("sparse");
    assert_eq!(n.norm, Norm::RmsNorm);
    assert_eq!(moe.routing, Routing::SigmoidOfTopK { normalised: false });
    assert!(!moe.shared_average && moe.shared_intermediate == 0);
    let mut bad = config.clone();
    bad["shared_expert_combination_strategy"] = serde_json::json!("max");
    toy_refused(&bad, "shared_expert_combination_strategy");
}

#[test]
fn nanochat_norms_without_weights_on_the_embeddings_and_on_q_and_k_after_rotary() {
    // NanoChatModel (transformers 5.17): the Llama layer with `NanoChatRMSNorm` (Llama 4's
    // `Llama4TextL2Norm`: `x.float() * rsqrt(mean(x^2) + eps)`, `type_as(x)`, no weight) before
    // each sub-layer, on the embeddings and at the end; the same norm on q and k per head after
    // rotary; `fc2(relu2(fc1(x)))`; logits soft-capped at 15. A toy (hidden 256, MLP 1,024, 4
    // heads of 64, 2 KV heads, 2 layers, vocabulary 512, untied), which transformers builds
    // with 1,703,936 parameters, no norm among them: per layer q and o 256^2 each, k and v
    // 256 x 128 each, fc1 and fc2 256 x 1,024 each; the embedding and head 512 x 256 each.
    // LoRA r16 on q and v trains 2 x (16 x 512 + 16 x 384) = 28,672 (peft 0.21).
    let config = serde_json::json!({
        "model_type": "nanochat", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512
    });
    let m = toy(&config);
    let per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 256 * 1024;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&m, &p).memory.total_params,
        2 * per_layer + 2 * 512 * 256
    );
    assert_eq!(2 * per_layer + 2 * 512 * 256, 1_703_936);
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 28_672);
    use ftplan::spec::model::{Activation, Norm, QkNorm};
    assert_eq!(
        (m.norm, m.qk_norm, m.activation),
        (
            Norm::UnscaledRmsNorm,
            QkNorm::L2AfterRotary,
            Activation::Relu2
        )
    );
    assert!(m.embedding_norm && !m.gated_ffn);
    assert_eq!(m.softcap.logits, 15.0);
    // Full fine-tuning in mixed bf16, 64 tokens: the embedding norm reads the fp32 lookup
    // itself (`x.float()` returns it) and keeps it for pow's and the rsqrt multiply's backward,
    // 64 x 256 x 4 B = 65,536, with the rsqrt per row, 64 x 4 B = 256.
    let g = graph::build(&m, &p);
    assert_eq!(
        crate::kept_bytes(&g, crate::op_ending(&g, "embedding_norm")),
        65_792
    );
    // Nothing to train for LN tuning (and no bias for BitFit).
    for method in [Method::LnTuning, Method::BitFit] {
        assert!(
            refusal(&m, &plan(method, 1, 64, AttentionKernel::Sdpa))
                .contains("finds nothing to train")
        );
    }
}

#[test]
fn minicpm3_is_deepseek_v2s_latent_attention_with_mup_scalars() {
    // MiniCPM3 (transformers 5.17): `DeepseekV2Attention`'s modules (with Llama's rotary) in
    // Llama's layer and MLP. A toy (hidden 256, MLP 512, 4 heads, q rank 64, latent 32, heads of
    // 32 + 16, values of 256 / 4 = 64, 2 layers, vocabulary 512, tied by default), which
    // transformers builds with 1,156,544 parameters: per layer q_a 64 x 256 and its norm 64, q_b
    // 192 x 64, kv_a 48 x 256 and its norm 32, kv_b 384 x 32, o 256 x 256, the MLP
    // 3 x 256 x 512, two norms of 256 (512,608); the one embedding 512 x 256 and the final norm.
    // LoRA r16 on the four latent projections: 16 x (320 + 256 + 304 + 416) = 20,736 per layer;
    // IA3 with Llama's entry (peft has none for `minicpm3`) finds only `down_proj`: 2 x 512.
    let config = serde_json::json!({
        "model_type": "minicpm3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 512, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": null, "dim_model_base": 64
    });
    let m = toy(&config);
    let per_layer =
        64 * 256 + 64 + 192 * 64 + 48 * 256 + 32 + 384 * 32 + 256 * 256 + 3 * 256 * 512 + 2 * 256;
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(
        run(&m, &p).memory.total_params,
        2 * per_layer + 512 * 256 + 256
    );
    assert_eq!(2 * per_layer + 512 * 256 + 256, 1_156_544);
    let latent = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"];
    assert_eq!(lora_trainable(&m, &latent), 41_472);
    let ia3 = run(&m, &plan(Method::Ia3, 1, 64, AttentionKernel::Sdpa));
    assert_eq!(ia3.memory.trainable_params, 2 * 512);
    // scale_emb 12, scale_depth 1.4 over sqrt(2) layers, 256 / dim_model_base 64.
    let k = m.multipliers;
    assert_eq!((k.token_embedding, k.head_input_divisor), (12.0, 4.0));
    assert!((k.residual - 1.4 / 2f64.sqrt()).abs() < 1e-12);
    // MiniCPM3Config reads null as sqrt(layers) and `hidden_size`: no scaling.
    let mut plain = config.clone();
    plain["scale_depth"] = serde_json::Value::Null;
    plain["dim_model_base"] = serde_json::Value::Null;
    let k = toy(&plain).multipliers;
    assert!((k.residual - 1.0).abs() < 1e-12 && k.head_input_divisor == 1.0);
    // The embedding module scales the lookups before peft's prompt joins them: the 64 tokens'
    // 256 channels in bf16, 32,768 B, not the 72 with the 8 virtual ones.
    let prompt = plan(
        Method::Prompt { virtual_tokens: 8 },
        1,
        64,
        AttentionKernel::Sdpa,
    );
    let g = graph::build(&m, &prompt);
    assert_eq!(crate::op_ending(&g, "embed_tokens.scale").out.0, 32_768);
    // `hidden_states / logits_scaling` is a new tensor beside the model output's undivided
    // state, which lives on until the loss: the LM head's forward holds both, one 64 x 256
    // bf16 state (32,768 B) more than without the division.
    let lora = plan(lora_named(&["q_b_proj"]), 1, 64, AttentionKernel::Sdpa);
    let undivided = ModelSpec {
        multipliers: ftplan::spec::model::Multipliers {
            head_input_divisor: 1.0,
            ..m.multipliers
        },
        ..m.clone()
    };
    let head = |m: &ModelSpec| {
        let g = graph::build(m, &lora);
        crate::op_ending(&g, "lm_head").forward_transient.0
    };
    assert_eq!(head(&m), head(&undivided) + 32_768);
    // peft's usual q,v names find no `q_proj` and no `v_proj` in MiniCPM3-4B's latent
    // attention: the plan takes the roles and says which modules to name.
    let notes = estimate_notes("minicpm3-4b", "lora", &[]);
    assert!(notes.contains("no `v_proj` and no `q_proj`") && notes.contains("`kv_b_proj`"));
}

#[test]
fn latent_attention_lora_names_reach_one_module_each_as_peft_matches_them() {
    // peft matches a target name against each module's own name, so on MiniCPM3's toy above
    // (q rank 64, latent 32, heads of 32 + 16, values of 64) each latent projection is reached
    // by its name alone. LoRA r16 per layer: q_a 16 x (256 + 64) = 5,120, q_b 16 x (64 + 192)
    // = 4,096, kv_a 16 x (256 + 48) = 4,864, kv_b 16 x (32 + 384) = 6,656. peft 0.21 on the
    // meta device trains 10,240 for `q_a_proj`, 21,504 for `q_b_proj` and `kv_b_proj`, 9,728
    // for `kv_a_proj_with_mqa`, and raises "Target modules {'q_proj', 'v_proj'} not found".
    // Without the query bottleneck the query is `q_proj`, 16 x (256 + 192) = 7,168 per layer,
    // and `q_a_proj` is what is missing.
    let mut config = serde_json::json!({
        "model_type": "minicpm3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 512, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": null, "dim_model_base": 64
    });
    let m = toy(&config);
    assert_eq!(lora_trainable(&m, &["q_a_proj"]), 2 * 5_120);
    assert_eq!(lora_trainable(&m, &["q_b_proj", "kv_b_proj"]), 21_504);
    assert_eq!(lora_trainable(&m, &["kv_a_proj_with_mqa"]), 9_728);
    let lora = |names: &[&str]| plan(lora_named(names), 1, 64, AttentionKernel::Sdpa);
    for names in [&["q_proj", "v_proj"][..], &["q", "k", "v"]] {
        let why = refusal(&m, &lora(names));
        assert!(why.contains("finds nothing to train"), "{why}");
    }
    config["q_lora_rank"] = serde_json::Value::Null;
    let m = toy(&config);
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 2 * 7_168);
    assert_eq!(lora_trainable(&m, &["q_b_proj", "kv_b_proj"]), 2 * 6_656);
    let why = refusal(&m, &lora(&["q_a_proj"]));
    assert!(why.contains("finds nothing to train"), "{why}");
}

#[test]
fn ministral3_scales_each_query_by_its_position_after_rotary() {
    // A toy Ministral 3 (hidden 256, intermediate 768, 4 heads of 64, 2 KV heads, 2 layers,
    // vocabulary 512), full fine-tuning in mixed bf16, batch 2 x 64. Ministral3Attention
    // multiplies the rotated q by `get_llama_4_attn_scale(position_ids, ...)`: a (1, 1, 64, 1)
    // scale cast to q's dtype, fp32 here (Mistral's rotary output is fp32 under autocast with
    // fp32 weights), which `MulBackward` keeps: 64 x 4 B = 256. q itself is not kept (the
    // scale needs no gradient); the product is a new fp32 q, 2 x 64 x 256 x 4 B = 131,072 B,
    // live until SDPA's autocast copy. Mistral has no such multiply.
    let config = serde_json::json!({
        "model_type": "ministral3", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                            "original_max_position_embeddings": 16384,
                            "llama_4_scaling_beta": 0.1}
    });
    let m = toy(&config);
    assert!(
        m.query_scale == ftplan::spec::model::QueryScale::Every && !m.qkv_bias && !m.linear_bias
    );
    let p = full(Precision::MixedBf16, 2, 64);
    let g = graph::build(&m, &p);
    let scale: Vec<_> = g
        .ops()
        .filter(|o| g.name(o.name) == "decoder.layers.1.self_attn.q_scale")
        .collect();
    assert_eq!(scale.len(), 1);
    assert_eq!(crate::kept_bytes(&g, scale[0]), 256);
    assert_eq!(scale[0].forward_transient.0, 131_072);
    let mistral = ModelSpec {
        family: ftplan::spec::model::Family::Mistral,
        query_scale: ftplan::spec::model::QueryScale::None,
        ..m.clone()
    };
    let g = graph::build(&mistral, &p);
    assert!(g.ops().all(|o| !g.name(o.name).ends_with("q_scale")));
}

#[test]
fn ernie_moe_routes_with_an_fp32_router_in_a_bf16_model() {
    // A toy ERNIE-4.5-MoE (hidden 256, 4 heads of 64, 2 KV heads, 2 layers, vocabulary 512;
    // 4 experts of 128, top 2, one shared expert; `moe_layer_start_index` 1: layer 0 dense,
    // layer 1 sparse), full fine-tuning in pure bf16, batch 1 x 64. Ernie4_5_MoeTopKRouter's
    // weight stays fp32 (`_keep_in_fp32_modules_strict`: 4 x 256 x 4 B = 4,096) and runs
    // `F.linear(hidden_states.float(), weight.float())` with autocast off: the fp32 copy of the
    // bf16 input, 64 x 256 x 4 B = 65,536, is what its matmul keeps for the weight's gradient,
    // where a bf16 router would keep the norm's own output.
    let config = serde_json::json!({
        "model_type": "ernie4_5_moe", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 128,
        "moe_num_shared_experts": 1
    });
    let m = toy(&config);
    let moe = m.moe.expect("sparse");
    assert_eq!(moe.router, ftplan::spec::model::RouterPrecision::Fp32Module);
    assert_eq!(
        (moe.first_dense, moe.every, moe.shared_intermediate),
        (1, 1, 128)
    );
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(
        kept_at(&m, &p, "decoder.layers.1.mlp.gate"),
        (65_536, 4_096)
    );
    // Sparse layers must run to the last one.
    let mut mid = config.clone();
    mid["moe_layer_end_index"] = serde_json::json!(0);
    toy_refused(&mid, "moe_layer_end_index");
}

#[test]
fn deepseek_and_glm_routers_run_in_fp32_without_autocast() {
    // A toy GLM-4.5 (hidden 256, 4 heads of 64, 2 KV heads, 2 layers, the second sparse: 4
    // experts of 128, top 2, one shared expert), full fine-tuning, batch 1 x 64.
    // Glm4MoeTopkRouter (as DeepSeek's) runs `F.linear(hidden_states.type(torch.float32),
    // self.weight.type(torch.float32))` with autocast left on. In pure bf16 that is an fp32
    // matmul keeping the fp32 copy of its input (64 x 256 x 4 B = 65,536) for the weight's
    // gradient and of its weight (4 x 256 x 4 B = 4,096) for the input's: 69,632. Under
    // autocast the matmul runs in bf16 on autocast's copies: the input's (32,768) and the fp32
    // weight's (4 x 256 x 2 B = 2,048), 34,816, as a Mixtral router keeps.
    let config = serde_json::json!({
        "model_type": "glm4_moe", "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 128, "n_shared_experts": 1, "first_k_dense_replace": 1
    });
    let m = toy(&config);
    assert_eq!(
        m.moe.expect("sparse").router,
        ftplan::spec::model::RouterPrecision::Fp32Operands
    );
    let kept = |precision| kept_at(&m, &full(precision, 1, 64), "decoder.layers.1.mlp.gate").0;
    assert_eq!(kept(Precision::Bf16), 69_632);
    assert_eq!(kept(Precision::MixedBf16), 34_816);
}

#[test]
fn hunyuan_moe_shares_one_mlp_and_keeps_an_fp32_router_weight() {
    // A toy HunYuan-MoE (hidden 256, intermediate 128, 4 heads of 64, 2 KV heads, 2 layers, 4
    // experts, top 2 given per layer), pure bf16 full fine-tuning, batch 1 x 64. Every layer
    // has one shared MLP and the experts, all `intermediate_size` wide; the router `wg` is built
    // with `dtype=torch.float32`, so it stays fp32 in a bf16 model (4 x 256 x 4 B = 4,096), and
    // without autocast multiplies `hidden_states.float()`, whose fp32 copy it keeps
    // (64 x 256 x 4 B = 65,536).
    let mut config = serde_json::json!({
        "model_type": "hunyuan_v1_moe", "hidden_size": 256, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "num_experts": 4, "moe_topk": [2, 2]
    });
    let m = toy(&config);
    let moe = m.moe.expect("sparse");
    assert_eq!(
        (
            moe.experts,
            moe.top_k,
            moe.expert_intermediate,
            moe.shared_intermediate
        ),
        (4, 2, 128, 128)
    );
    assert_eq!(moe.router, ftplan::spec::model::RouterPrecision::Fp32Weight);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(
        kept_at(&m, &p, "decoder.layers.1.mlp.gate"),
        (65_536, 4_096)
    );
    // Over FSDP2 (2 ranks, mixed bf16) `MixedPrecisionPolicy(param_dtype=bf16)` gathers `wg` in
    // bf16 like every parameter, so the `weight.dtype == torch.float32` test fails and the
    // router multiplies its bf16 input as it is, which the matmul keeps (64 x 256 x 2 B =
    // 32,768); no fp32 copy (a replay of an 8-layer HunYuan-MoE over 4 ranks holds none, and the
    // estimate read 33.5 MB a layer over it). The weight stays fp32 in storage.
    let fsdp = Plan {
        parallel: ftplan::spec::parallel::Parallel {
            gpus: 2,
            gpus_per_node: 2,
            engine: ftplan::spec::parallel::Engine::Fsdp,
            ..ftplan::spec::parallel::Parallel::single()
        },
        ..full(Precision::MixedBf16, 1, 64)
    };
    assert_eq!(
        kept_at(&m, &fsdp, "decoder.layers.1.mlp.gate"),
        (32_768, 4_096)
    );
    let g = graph::build(&m, &fsdp);
    assert!(g.ops().all(|o| !g.name(o.name).ends_with("gate.float")));
    // A different top-k per layer is refused.
    config["moe_topk"] = serde_json::json!([2, 1]);
    toy_refused(&config, "moe_topk");
}

#[test]
fn glm_4_7_flash_reads_as_deepseek_attention_with_its_mlp_layer_types() {
    // `glm4_moe_lite` (GLM-4.7-Flash): DeepSeek-V3's latent attention (20 heads of 192 + 64
    // over a 2,048-wide model, which no head count has to divide) with GLM-4.5's MoE.
    // Glm4MoeLiteConfig's `q_lora_rank` default is 768, and `mlp_layer_types` says which layers
    // are dense: here the first two, so `first_dense` is 2. A dense layer after a sparse one is
    // refused.
    let mut config = serde_json::json!({
        "model_type": "glm4_moe_lite", "hidden_size": 2048, "intermediate_size": 10240,
        "num_hidden_layers": 4, "num_attention_heads": 20, "num_key_value_heads": 20,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 192,
        "v_head_dim": 256, "n_routed_experts": 64, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "moe_intermediate_size": 1536, "vocab_size": 154880,
        "mlp_layer_types": ["dense", "dense", "sparse", "sparse"]
    });
    let m = toy(&config);
    assert_eq!(m.family, ftplan::spec::model::Family::Deepseek);
    assert_eq!(m.mla.expect("latent attention").q_rank, Some(768));
    assert_eq!(m.moe.expect("sparse").first_dense, 2);
    config["mlp_layer_types"] = serde_json::json!(["dense", "sparse", "dense", "sparse"]);
    toy_refused(&config, "mlp_layer_types");
}

#[test]
fn qwen3_5_keeps_what_the_chunked_gated_delta_rule_saves() {
    // A toy Qwen3.5 text model: hidden 256, a Gated DeltaNet layer then a full-attention one
    // (2 heads of 64, 1 KV head); the linear layer has 2 key heads and 4 value heads of 32,
    // conv 4; vocabulary 512. Full fine-tuning, batch 1 x 100: the chunked rule pads the
    // sequence to 128 positions, two chunks of 64. Per position: key width hk = 4 x 32 = 128
    // (q and k repeated to the value heads), value width hv = 128, a chunk matrix row of
    // 4 heads x 64 = 256; a state is 4 x 32 x 32 = 4,096 values.
    //
    // Kept in any regime (fp32, 4 B): the fp32 q and k the L2 norms read (2 x 128 x 100),
    // the padded q, k and v, k * beta and the two solves' results (4 hk + 2 hv = 768 per
    // padded position), the pairwise decay and the triangular system (2 x 256), two rsqrt,
    // beta padded and three decay exponentials (6 x 4 heads):
    // 4 x (25,600 + 98,304 + 65,536 + 3,072) = 770,048.
    // Pure bf16 (no autocast): the fp32 matmuls keep the decayed q and k and the corrected
    // values (2 hk + hv = 384), both products and the intra-chunk matrix (3 x 256), and both
    // chunks' incoming states: 4 x (49,152 + 98,304 + 8,192) = 622,592; 1,392,640 in all.
    // Under autocast every matmul keeps bf16 copies instead: q, k^T twice, k * beta and the
    // two products before the loop (2 B x (512 + 512) x 128 = 262,144); per chunk two copies
    // of its state (2 x 2 x 2 x 4,096 = 32,768), the decayed-key, query and key slices but in
    // one chunk (64 x 384), the corrected values thrice of four (3 x 64 x 128) and both intra
    // slices (2 x 64 x 256): 2 x 81,920 = 163,840; and the first state in fp32 (16,384):
    // 1,245,184 in all.
    let config = serde_json::json!({
        "model_type": "qwen3_5_text", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 64, "vocab_size": 512, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
        "layer_types": ["linear_attention", "full_attention"]
    });
    let m = toy(&config);
    let d = ftplan::spec::model::DeltaNet {
        key_heads: 2,
        value_heads: 4,
        key_dim: 32,
        value_dim: 32,
        conv: 4,
        fused: false,
    };
    assert_eq!(m.mixers, vec![Mixer::GatedDeltaNet(d), Mixer::Attention]);
    assert_eq!(
        m.attention_output_gate,
        ftplan::spec::model::AttentionGate::QueryHalf
    );
    let kept = |precision, name: &str| kept_at(&m, &full(precision, 1, 100), name);
    let rule = "decoder.layers.0.linear_attn.chunk_gated_delta_rule";
    assert_eq!(kept(Precision::Bf16, rule).0, 1_392_640);
    assert_eq!(kept(Precision::MixedBf16, rule).0, 1_245_184);
    // Gated attention: q_proj writes queries and the gate (2 x 2 x 64 = 256 outputs of 256
    // inputs, bf16: 131,072 B); the sigmoid keeps its bf16 output, 100 x 128 x 2 = 25,600.
    assert_eq!(
        kept(Precision::Bf16, "decoder.layers.1.self_attn.gate_sigmoid"),
        (25_600, 0)
    );
    assert_eq!(
        kept(Precision::Bf16, "decoder.layers.1.self_attn.q_proj").1,
        131_072
    );
    // With flash-linear-attention's kernels (`--linear-kernel fla`), from its source: the rule
    // keeps the normalised q and k and v in bf16 ((128 + 128 + 128) x 100 x 2 = 76,800), two
    // rsqrt and the cumulative decay in fp32 (3 x 4 x 100 x 4 = 4,800), beta (800) and the
    // inverted 64-wide triangular system (4 x 64 x 100 x 2 = 51,200): 133,600 in all; the
    // causal-conv1d kernel keeps its input, q and k of 2 heads and v of 4 before any repeat
    // ((64 + 64 + 128) x 100 x 2 = 51,200), and fuses the SiLU, which keeps nothing.
    let fla = Plan {
        linear_kernel: ftplan::spec::plan::LinearKernel::Fla,
        ..full(Precision::Bf16, 1, 100)
    };
    assert_eq!(kept_at(&m, &fla, rule).0, 133_600);
    assert_eq!(
        kept_at(&m, &fla, "decoder.layers.0.linear_attn.conv1d").0,
        51_200
    );
    // Without `layer_types`: full attention every `full_attention_interval` layers.
    let mut every = config.clone();
    every.as_object_mut().expect("object").remove("layer_types");
    every["full_attention_interval"] = serde_json::json!(2);
    assert_eq!(
        toy(&every).mixers,
        vec![Mixer::GatedDeltaNet(d), Mixer::Attention]
    );
    // Each value head needs a key head to repeat.
    let mut odd = config.clone();
    odd["linear_num_value_heads"] = serde_json::json!(3);
    toy_refused(&odd, "linear_num_value_heads");
    // peft's prefix tuning fails in transformers 5.17: the linear-attention layers ask the
    // prefix's attention cache for their state (checked on toy Qwen3.5 and Qwen3-Next).
    let prefix = plan(
        Method::Prefix { virtual_tokens: 4 },
        1,
        64,
        AttentionKernel::Sdpa,
    );
    let err = refusal(&m, &prefix);
    assert!(err.contains("linear-attention layers reject"), "{err}");
}

#[test]
fn qwen3_5_moe_adapts_linear_layers_but_not_its_experts() {
    // A one-layer toy Qwen3.5-MoE (hidden 64; a Gated DeltaNet layer with 2 key and 2 value
    // heads of 16; 4 experts of 32, top 2, a shared expert of 32), LoRA r16 on `all-linear`.
    // peft's conversion table maps `qwen3_5_moe_text` to `qwen3_5_text`'s prefix change only,
    // so the 3-D experts are not adapted and the router (`Qwen3_5MoeTopKRouter`) is no
    // `nn.Linear`: LoRA wraps the mixer's in_proj_qkv (64 -> 96), in_proj_z (64 -> 32),
    // in_proj_b and in_proj_a (64 -> 2) and out_proj (32 -> 64), 16 x (160 + 96 + 66 + 66 + 96)
    // = 7,744, the shared expert's gate, up and down projections, 16 x 3 x 96 = 4,608, and its
    // gate (64 -> 1), 16 x 65 = 1,040: 13,392.
    let m = toy(&serde_json::json!({
        "model_type": "qwen3_5_moe_text", "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 256,
        "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "layer_types": ["linear_attention"]
    }));
    assert_eq!(m.block_kind(0).ffn, FfnKind::Moe);
    assert!(matches!(m.block_kind(0).mixer, Mixer::GatedDeltaNet(_)));
    let e = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert_eq!(e.memory.trainable_params, 13_392);
}

#[test]
fn qwen3_next_projects_its_linear_layers_through_two_fused_linears() {
    // A one-layer toy Qwen3-Next (hidden 64; a Gated DeltaNet layer with 2 key and 2 value
    // heads of 16; `decoder_sparse_step` 2 leaves layer 0 dense, an MLP of 32), LoRA r16 on
    // `all-linear`. Its mixer has two input projections where Qwen3.5 has four:
    // in_proj_qkvz (64 -> 2 x 32 + 2 x 32 = 128) 16 x 192 = 3,072 and in_proj_ba (64 -> 4)
    // 16 x 68 = 1,088, then out_proj (32 -> 64) 16 x 96 = 1,536: 5,696. The dense MLP is not
    // adapted: peft's conversion table maps `qwen3_next` to Qwen2-MoE's pattern, which moves
    // gate/up/down onto the experts and out of `target_modules` (the replay's
    // `peft_target_modules` lists no MLP name).
    let m = toy(&serde_json::json!({
        "model_type": "qwen3_next", "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "vocab_size": 256, "linear_num_key_heads": 2,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
        "num_experts_per_tok": 2, "decoder_sparse_step": 2, "layer_types": ["linear_attention"]
    }));
    assert_eq!(m.block_kind(0).ffn, FfnKind::Dense);
    assert!(matches!(
        m.block_kind(0).mixer,
        Mixer::GatedDeltaNet(d) if d.fused
    ));
    let e = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert_eq!(e.memory.trainable_params, 5_696);
}

#[test]
fn out_proj_names_the_linear_mixers_output_where_a_model_has_one() {
    // peft matches `target_modules` by module name. A toy Qwen3.5 (hidden 64; layer 0 a Gated
    // DeltaNet with 2 key and 2 value heads of 16, layer 1 gated attention with 2 heads of 32)
    // has `out_proj` only in its mixer (32 -> 64, r16: 16 x 96 = 1,536); its attention's output
    // is `o_proj` (64 -> 64: 16 x 128 = 2,048). The mixer's inputs answer to their own names:
    // in_proj_qkv (64 -> 2 x 16 x 2 + 2 x 16 = 96: 16 x 160 = 2,560) and in_proj_z (64 -> 32:
    // 1,536). A toy BART (d_model 64, one layer each side) names its attention outputs
    // `out_proj`: the encoder's self-attention and the decoder's self- and cross-attention,
    // 3 x 2,048 = 6,144.
    let qwen = toy(&serde_json::json!({
        "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "vocab_size": 256, "linear_num_key_heads": 2,
        "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "layer_types": ["linear_attention", "full_attention"]
    }));
    let bart = toy(&serde_json::json!({
        "model_type": "bart", "d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
        "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128, "vocab_size": 1000, "max_position_embeddings": 128
    }));
    assert_eq!(lora_trainable(&qwen, &["out_proj"]), 1_536);
    assert_eq!(lora_trainable(&qwen, &["o_proj"]), 2_048);
    assert_eq!(lora_trainable(&qwen, &["in_proj_qkv", "in_proj_z"]), 4_096);
    assert_eq!(lora_trainable(&bart, &["out_proj"]), 6_144);
}

#[test]
fn apertus_xielu_keeps_what_its_python_chain_saves() {
    // A one-layer toy Apertus (hidden 64, MLP 128, batch 1 x 64: 8,192 elements per MLP
    // activation). transformers runs xIELU as Python element-wise ops (the CUDA kernel is an
    // optional wheel): where(x > 0, a_p x x + beta x, (expm1(min(x, eps)) - x) a_n + beta x).
    // Under autocast `softplus` (making a_p and a_n) and `expm1` are on CUDA's fp32 list, and
    // a_p, a_n have shape (1,), so they promote: the chain runs in fp32. Kept: x (up_proj's
    // bf16 output, for (a_p x) x and the minimum) 16,384, a_p x in fp32 32,768, expm1's fp32
    // output 32,768 and the x > 0 mask 8,192: 90,112 bytes under LoRA, whose alphas are frozen.
    // Full fine-tuning trains the alphas, so alpha_n's gradient keeps expm1(...) - x (fp32,
    // 32,768) too: 122,880. Pure bf16 (no autocast) runs the chain in bf16: x, a_p x, expm1's
    // output and expm1(...) - x at 16,384 each and the mask: 73,728.
    let m = toy(&serde_json::json!({
        "model_type": "apertus", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 256
    }));
    assert_eq!(m.activation, ftplan::spec::model::Activation::Xielu);
    assert!(!m.gated_ffn);
    let kept = |p: &Plan| kept_under(&m, p, "decoder.layers.0.mlp.act");
    assert_eq!(kept(&plan(lora(), 1, 64, AttentionKernel::Sdpa)), 90_112);
    assert_eq!(kept(&full(Precision::MixedBf16, 1, 64)), 122_880);
    assert_eq!(kept(&full(Precision::Bf16, 1, 64)), 73_728);
    // alpha_p and alpha_n: two parameters of one element per layer, trained by full
    // fine-tuning only (as Mamba's A_log and D are).
    let lora_trainable = run(&m, &plan(lora(), 1, 64, AttentionKernel::Sdpa))
        .memory
        .trainable_params;
    // LoRA r16 on q and v (64 -> 64 each): 2 x 16 x 128 = 4,096, no alphas.
    assert_eq!(lora_trainable, 4_096);
}

#[test]
fn minimax_m2_and_dots1_read_as_the_blocks_they_reuse() {
    // Toy configs counted on transformers 5.17's builds and peft 0.21.2's `all-linear` (r16).
    // MiniMax-M2 (hidden 64; 2 heads of 32, 1 KV head; 4 experts of 32, top 2; one layer):
    // Mixtral's sparse block with q/k norms over the whole projections (64 + 32 weights) and
    // rotary on half of each head; 70,176 parameters. peft moves w1/w3/w2 onto the fused
    // experts: 30,784 trainable.
    let mm = toy(&serde_json::json!({
        "model_type": "minimax_m2", "hidden_size": 64, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "vocab_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    }));
    assert_eq!(mm.qk_norm, ftplan::spec::model::QkNorm::Full);
    assert_eq!(mm.block_kind(0).ffn, FfnKind::Moe);
    // dots.llm1 (hidden 64; 2 heads of 32; a dense first layer of 96, then 4 experts of 32,
    // top 2, one shared expert): Qwen3's attention, whose window starts at
    // `max_window_layers` (1), over DeepSeek-V3's MoE; 115,392 parameters, 40,000 trainable.
    let d1 = toy(&serde_json::json!({
        "model_type": "dots1", "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "vocab_size": 256, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "sliding_window": 16, "max_window_layers": 1
    }));
    assert_eq!(
        d1.mixers,
        vec![Mixer::Attention, Mixer::SlidingWindow { window: 16 }]
    );
    assert_eq!(d1.block_kind(0).ffn, FfnKind::Dense);
    assert_eq!(d1.block_kind(1).ffn, FfnKind::Moe);
    for (m, total, trainable) in [(&mm, 70_176, 30_784), (&d1, 115_392, 40_000)] {
        let e = run(m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
        assert_eq!(e.memory.base_params, total, "{}", m.family.model_type());
        assert_eq!(
            e.memory.trainable_params,
            trainable,
            "{}",
            m.family.model_type()
        );
    }
}

#[test]
fn gemma4_global_layers_have_their_own_heads_and_keys_double_as_values() {
    // A two-layer toy Gemma 4 text model (hidden 64; a sliding layer with 2 heads and 2 KV
    // heads of 32, then a global layer with 2 heads of 64 and 1 KV head whose keys are the
    // values: `attention_k_eq_v`, no v_proj), counted on transformers 5.17's build: 103,168
    // parameters. peft's `all-linear` at r16 wraps, on the sliding layer, q (64 -> 64), k and v
    // (64 -> 64) and o: 4 x 16 x 128 = 8,192, and on the global layer q (64 -> 128) 3,072,
    // k (64 -> 64) 2,048 and o (128 -> 64) 3,072; with both MLPs (3 x 16 x 192 each, 18,432):
    // 34,816. q,v reaches the sliding layer's two (4,096) and the global layer's q (3,072):
    // 7,168. A config transformers saved writes the global geometry as `per_layer_config`
    // with `global_head_dim` and `num_global_key_value_heads` null: it reads the same.
    let published = serde_json::json!({
        "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
        "attention_k_eq_v": true, "vocab_size": 256, "hidden_size_per_layer_input": 0,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]
    });
    let mut saved = published.clone();
    saved["global_head_dim"] = serde_json::Value::Null;
    saved["num_global_key_value_heads"] = serde_json::Value::Null;
    saved["per_layer_config"] =
        serde_json::json!({"1": {"head_dim": 64, "num_key_value_heads": 1}});
    for config in [&published, &saved] {
        let m = toy(config);
        assert_eq!(
            m.global_attention,
            Some(ftplan::spec::model::GlobalAttention {
                head_dim: 64,
                kv_heads: 1,
                keys_as_values: true
            })
        );
        assert!(m.value_norm);
        assert_eq!(lora_counts(&m), (103_168, 34_816, 7_168));
        let p = plan(lora(), 1, 64, AttentionKernel::Sdpa);
        // The scale-less v_norm on the global layer's one KV head (64 wide, 64 tokens) keeps
        // its fp32 copy, 16,384 bytes, and the row statistics, 64 x 2 x 4 = 512: 16,896.
        assert_eq!(
            kept_at(&m, &p, "decoder.layers.1.self_attn.v_norm").0,
            16_896
        );
    }
}

#[test]
fn gemma4_experts_run_beside_the_mlp_and_all_linear_reaches_their_router() {
    // The Gemma 4 toy above with `enable_moe_block` (26B-A4B's layout): an MLP of 96, and beside
    // it 4 experts of 32 (top 2) on the block's residual input, with a router norm, `scale`
    // (64) and `per_expert_scale` (4), and three norms more per layer; transformers 5.17
    // builds 141,064 parameters. peft does not convert Gemma 4's 3-D experts, but the
    // router's projection is an `nn.Linear`, which `all-linear` wraps: attention 16,384 as
    // above, MLPs 2 x 3 x 16 x (64 + 96) = 15,360, routers 2 x 16 x (64 + 4) = 2,176: 33,920.
    let m = toy(&serde_json::json!({
        "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
        "attention_k_eq_v": true, "vocab_size": 256, "hidden_size_per_layer_input": 0,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
        "enable_moe_block": true, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 32
    }));
    assert!(m.moe.is_some_and(|moe| moe.beside_mlp && moe.top_k == 2));
    assert_eq!(m.block_kind(0).ffn, FfnKind::Moe);
    assert_eq!(lora_counts(&m), (141_064, 33_920, 7_168));
}

#[test]
fn gemma4_small_models_gate_per_layer_inputs_and_share_keys_and_values() {
    // A four-layer toy Gemma 4 in the E2B/E4B layout (hidden 64, MLP 128; 2 heads and 1 KV
    // head of 32 locally, of 64 globally; per-layer inputs of 16 per layer from a table of 256
    // rows; the last two layers reuse earlier layers' keys and values, with MLPs twice as
    // wide), counted on transformers 5.17's build: 255,600 parameters. The shared layers have
    // no k_proj, v_proj or k norm. peft's `all-linear` (r16) reaches, besides the blocks' own
    // linears, the root's `per_layer_model_projection` (64 -> 64: 2,048) and every block's
    // `per_layer_input_gate` and `per_layer_projection` (64 <-> 16: 1,280 each): 89,088 in
    // all; q,v 13,824 (four q and the two unshared layers' v).
    let m = toy(&serde_json::json!({
        "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "global_head_dim": 64, "vocab_size": 256,
        "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16,
        "num_kv_shared_layers": 2, "use_double_wide_mlp": true, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    }));
    assert_eq!(
        m.per_layer_input,
        Some(ftplan::spec::model::PerLayerInput {
            width: 16,
            vocab: 256
        })
    );
    assert!(!m.block_kind(1).kv_shared && m.block_kind(2).kv_shared);
    assert_eq!(lora_counts(&m), (255_600, 89_088, 13_824));
}

#[test]
fn lfm2_short_convolutions_keep_their_projection_and_padded_filter_output() {
    // A toy LFM2 (hidden 64, 4 heads of 16 with 2 KV heads, vocabulary 256): layer 0 attends,
    // layer 1 is a gated short convolution. `block_ff_dim` 192 is auto-adjusted to two thirds,
    // 128, then rounded up to `block_multiple_of` (32): 128 (to 256 with the default 256).
    // transformers 5.17 builds 94,752 parameters: embeddings 16,384 (tied); the attention
    // layer's q, k, v, out_proj 12,288, q/k norms 32, MLP 3 x 64 x 128 = 24,576, two norms 128;
    // the convolution layer's filter 64 x 3 = 192, in_proj 64 -> 192 12,288, out_proj 4,096,
    // MLP 24,576, norms 128; the final norm 64.
    let config = |multiple: u64| {
        serde_json::json!({
            "model_type": "lfm2", "hidden_size": 64, "block_ff_dim": 192,
            "block_multiple_of": multiple, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256,
            "layer_types": ["full_attention", "conv"]
        })
    };
    let m = toy(&config(32));
    assert_eq!(m.decoder.intermediate_size, 128);
    assert_eq!(toy(&config(256)).decoder.intermediate_size, 256);
    assert!(m.tie_word_embeddings);
    assert_eq!(
        m.block_kind(1).mixer,
        Mixer::ShortConv(ftplan::spec::model::ShortConv {
            taps: 3,
            bias: false
        })
    );
    // peft 0.21.2, r16: `all-linear` 31,744 (q 2,048, k and v 1,536 each, both out_projs
    // 2,048 each, in_proj 16 x (64 + 192) = 4,096, two MLPs of 3 x 3,072); `in_proj,out_proj`
    // reaches the attention's output and the convolution's two projections: 8,192.
    let (base, all, qv) = lora_counts(&m);
    assert_eq!((base, all, qv), (94_752, 31_744, 3_584));
    assert_eq!(lora_trainable(&m, &["in_proj", "out_proj"]), 8_192);
    assert_eq!(lora_trainable(&m, &["w1", "w2", "w3"]), 18_432);
    // The convolution layer at batch 1 x 64 under autocast (fp32 weights, bf16 compute), bf16
    // tensors of 64 x 64 = 8,192 bytes: in_proj keeps its input's bf16 cast (8,192); `B * x`
    // keeps B and x, views of in_proj's whole output (3 x 8,192 = 24,576); the filter keeps
    // autocast's bf16 copy of that product (8,192; the fp32 copy `.to(weight.dtype)` makes is
    // freed); `C * conv` keeps C (the same output) and the filter's output, padded by two
    // positions (64 x 66 x 2 = 8,448); out_proj keeps that product (8,192, contiguous as it
    // is): 57,600 bytes. Pure bf16 casts nothing: in_proj keeps its bf16 input and the
    // filter the product itself, the same bytes. causal-conv1d's kernel keeps its input and
    // returns an unpadded output: 57,344.
    let conv = "decoder.layers.1.conv";
    assert_eq!(
        kept_under(&m, &full(Precision::MixedBf16, 1, 64), conv),
        57_600
    );
    assert_eq!(kept_under(&m, &full(Precision::Bf16, 1, 64), conv), 57_600);
    let fla = Plan {
        linear_kernel: ftplan::spec::plan::LinearKernel::Fla,
        ..full(Precision::MixedBf16, 1, 64)
    };
    assert_eq!(kept_under(&m, &fla, conv), 57_344);
    // IA3: peft's table has no `lfm2` entry and the harness gives Llama's (`k_proj`, `v_proj`,
    // `down_proj`); LFM2's FFN output is `w2`, so only k's and v's outputs are scaled: 32 + 32
    // (LFM2-350M's replay: 6 x (512 + 512) = 6,144).
    let ia3 = run(&m, &plan(Method::Ia3, 1, 64, AttentionKernel::Sdpa));
    assert_eq!(ia3.memory.trainable_params, 64);
    // peft's prefix tuning fails on LFM2 (its convolution layers reject the cache the prefix
    // arrives in, as a replay shows): refused, with what does apply.
    let prefix = plan(
        Method::Prefix { virtual_tokens: 20 },
        1,
        64,
        AttentionKernel::Sdpa,
    );
    let err = refusal(&m, &prefix);
    assert!(err.contains("prefix tuning fails"), "{err}");
}

#[test]
fn lfm2_moe_routes_its_convolution_layers_experts_beyond_peft_s_reach() {
    // A toy LFM2-MoE (hidden 64, 4 heads of 16 with 2 KV heads; layer 0 attends with a dense
    // MLP of 96, `num_dense_layers` 1; layer 1 convolves with 4 experts of 32, top 2).
    // transformers 5.17 builds 88,864 parameters: embeddings 16,384 (tied); layer 0's attention
    // 12,288, q/k norms 32, MLP 3 x 64 x 96 = 18,432, norms 128; layer 1's filter 192, in_proj
    // 12,288, out_proj 4,096, experts' gate_up 4 x 64 x 64 = 16,384 and down 4 x 64 x 32 =
    // 8,192, the router's 4 x 64 weight (an `nn.Parameter`, not a linear), norms 128; the final
    // norm 64. peft 0.21.2's conversion table has no `lfm2_moe` pattern: `w1,w2,w3` reach the
    // dense MLP only (3 x 16 x (64 + 96) = 7,680) and `all-linear` adds the attention (7,168)
    // and the convolution's projections (6,144): 20,992.
    let m = toy(&serde_json::json!({
        "model_type": "lfm2_moe", "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "num_experts": 4,
        "num_experts_per_tok": 2, "num_dense_layers": 1,
        "layer_types": ["full_attention", "conv"]
    }));
    assert_eq!(m.decoder.intermediate_size, 96);
    assert_eq!(m.block_kind(0).ffn, FfnKind::Dense);
    assert_eq!(m.block_kind(1).ffn, FfnKind::Moe);
    assert!(matches!(m.block_kind(1).mixer, Mixer::ShortConv(_)));
    assert_eq!(lora_counts(&m), (88_864, 20_992, 3_584));
    assert_eq!(lora_trainable(&m, &["w1", "w2", "w3"]), 7_680);
}

#[test]
fn llama4_runs_every_token_through_every_expert() {
    // A toy Llama 4 (hidden 64; 4 heads of 16, 2 KV heads; 4 layers, the fourth NoPE; 4
    // experts of 32, top 1, on every other layer, beside a shared expert of 32; dense MLPs of
    // 96). transformers 5.17 builds 181,312 parameters; peft 0.21.2 trains 14,336 with LoRA r16
    // on q,v (4 x 16 x (64 + 64) + 4 x 16 x (64 + 32)) and 24,576 on gate,up,down (the dense
    // MLPs 2 x 7,680, the shared experts 2 x 4,608; the 3-D experts are out of its reach), and
    // fails on `all-linear`, which wraps the router (an nn.Linear returning a tuple).
    let m = toy(&serde_json::json!({
        "model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32,
        "intermediate_size_mlp": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "num_local_experts": 4,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 2
    }));
    assert_eq!(
        (0..4).map(|l| m.block_kind(l).ffn).collect::<Vec<_>>(),
        [FfnKind::Dense, FfnKind::Moe, FfnKind::Dense, FfnKind::Moe]
    );
    assert_eq!(
        (0..4).map(|l| m.block_kind(l).rope).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    // Chunked layers (8,192 by default) where rotary applies, full attention on the NoPE one.
    assert_eq!(m.block_kind(0).mixer, Mixer::SlidingWindow { window: 8192 });
    assert_eq!(m.block_kind(3).mixer, Mixer::Attention);
    let qv = run(&m, &plan(lora(), 1, 64, AttentionKernel::Sdpa)).memory;
    assert_eq!((qv.base_params, qv.trainable_params), (181_312, 14_336));
    assert_eq!(
        lora_trainable(&m, &["gate_proj", "up_proj", "down_proj"]),
        24_576
    );
    let err = refusal(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert!(err.contains("router"), "{err}");
    // The sparse layer at batch 1 x 64, pure bf16, every expert on every token (E x T = 256
    // rows): the router's sigmoid keeps its (64, 4) output (512 bytes); the product of the
    // repeated input with the transposed scores keeps both, 256 x 64 x 2 = 32,768 and 512;
    // gate_up's matmul keeps that product (32,768) when the experts train; SiLU and `up *`
    // keep gate_up's output (256 x 64 x 2 = 32,768) and the SiLU's (256 x 32 x 2 = 16,384);
    // down's matmul keeps the product (16,384): 132,096. With the experts frozen (LoRA) the
    // two matmuls keep no input: 82,944.
    // (The repeat and the scores' transposed copy keep nothing.)
    let experts = |p: &Plan| {
        ["router.sigmoid", "routed_in", "experts"]
            .iter()
            .map(|part| kept_under(&m, p, &format!("decoder.layers.1.mlp.{part}")))
            .sum::<u64>()
    };
    assert_eq!(experts(&full(Precision::Bf16, 1, 64)), 132_096);
    // After rotary, the rotary layers' L2 norm keeps fp32 copies of q (64 x 64 x 4 = 16,384)
    // and k (64 x 32 x 4 = 8,192) and one fp32 statistic per head and token (64 x 4 x 4 =
    // 1,024; 64 x 2 x 4 = 512). The NoPE layer has no norm and scales its queries.
    let bf16 = full(Precision::Bf16, 1, 64);
    let l2 = ["q_norm", "k_norm"]
        .map(|n| kept_under(&m, &bf16, &format!("decoder.layers.0.self_attn.{n}")));
    assert_eq!(l2, [17_408, 8_704]);
    let g = graph::build(&m, &bf16);
    let names: Vec<String> = g.ops().map(|o| g.name(o.name)).collect();
    let in_nope = |part: &str| {
        names
            .iter()
            .any(|n| n.starts_with("decoder.layers.3.self_attn") && n.contains(part))
    };
    assert!(!in_nope("q_norm") && in_nope("q_scale") && !in_nope("rotary"));
    let lora_bf16 = plan(lora(), 1, 64, AttentionKernel::Sdpa);
    assert_eq!(experts(&lora_bf16), 82_944);
}

#[test]
fn mistral4_reads_as_deepseek_with_llama4_query_scaling_and_unconverted_experts() {
    // A toy Mistral4 (hidden 64; 4 latent-attention heads, q rank 32, kv rank 16, nope and
    // rope dims 8, values 16; a dense first layer of 96, then 4 experts of 32, top 2, and one
    // shared expert): transformers 5.17 builds 105,120 parameters. peft 0.21.2's conversion
    // table has no `mistral4` pattern: gate,up,down reach the dense and shared MLPs only
    // (12,288) and `all-linear` adds the attention's linears (28,928).
    let m = toy(&serde_json::json!({
        "model_type": "mistral4", "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "vocab_size": 256
    }));
    assert!(m.mla.is_some());
    assert_eq!(m.query_scale, ftplan::spec::model::QueryScale::Every);
    let all = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa)).memory;
    assert_eq!((all.base_params, all.trainable_params), (105_120, 28_928));
    assert_eq!(
        lora_trainable(&m, &["gate_proj", "up_proj", "down_proj"]),
        12_288
    );
    // The scaling multiplies the concatenated queries in every layer.
    let g = graph::build(&m, &full(Precision::Bf16, 1, 64));
    assert!(
        g.ops()
            .any(|o| g.name(o.name).ends_with("self_attn.q_scale"))
    );
}

#[test]
fn falcon_mamba_norms_dt_b_and_c_and_keeps_their_fp32_copies() {
    // A one-layer Mamba and Falcon Mamba at toy widths: hidden 64, inner 128, state 8, dt rank
    // 4; full fine-tuning under bf16 autocast, 1 x 100 tokens.
    let mamba = serde_json::json!({
        "model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 256,
        "state_size": 8, "expand": 2, "time_step_rank": 4, "conv_kernel": 4
    });
    let mut falcon = mamba.clone();
    falcon["model_type"] = serde_json::json!("falcon_mamba");
    let (mamba, falcon) = (toy(&mamba), toy(&falcon));
    // FalconMambaWeightlessRMSNorm has no parameters (its `weight` is a non-persistent buffer).
    let p = full(Precision::MixedBf16, 1, 100);
    let (m, f) = (run(&mamba, &p).memory, run(&falcon, &p).memory);
    assert_eq!(m.trainable_params, f.trainable_params);
    // Each norm keeps `x.float()` and the rsqrt per token: dt 100 x 4 x 4 + 400 = 2,000, B and
    // C 100 x 8 x 4 + 400 = 3,600 each; the scan keeps the normed C (bf16, 100 x 8 x 2 =
    // 1,600), and dt_proj's matmul the normed dt (800) in place of x_proj's whole output, which
    // nothing keeps now (100 x 20 x 2 = 4,000): 2,000 + 7,200 + 1,600 + 800 - 4,000 = 7,600.
    assert_eq!(f.saved_after_forward.0 - m.saved_after_forward.0, 7_600);
    // peft refuses LoRA on its `out_proj` as on Mamba's (`falcon_mamba` is in its list).
    let refused = refusal(&falcon, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa));
    assert!(
        refused.contains("out_proj") && refused.contains("in_proj,x_proj"),
        "{refused}"
    );
    // A stated `intermediate_size` wins over `expand` (transformers sets the config's keys after
    // `__post_init__` computes expand x hidden), as in Falcon Mamba 7B's published config:
    // hidden 64, expand 16 but width 128, state 16, dt rank 4 (hidden / 16), one layer, 100
    // tokens of vocabulary, untied. Embeddings and head 2 x 6,400, two norms 128, A_log
    // 128 x 16 = 2,048, D 128, conv 512 + 128, in_proj 64 x 256 = 16,384, x_proj
    // 128 x (4 + 2 x 16) = 4,608, dt_proj 512 + 128, out_proj 8,192: 45,568, what transformers
    // builds (274,048 at expand 16's width of 1,024).
    let stated = toy(&serde_json::json!({
        "model_type": "falcon_mamba", "hidden_size": 64, "expand": 16,
        "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 100,
        "tie_word_embeddings": false
    }));
    let p = full(Precision::MixedBf16, 1, 64);
    assert_eq!(run(&stated, &p).memory.trainable_params, 45_568);
    // The shipped model holds the card's 7.27 B.
    let card = run(&model("falcon-mamba-7b"), &p).memory.trainable_params;
    assert_eq!(card, 7_272_665_088);
}

#[test]
fn jamba_interleaves_mamba_and_attention_layers_and_dense_and_sparse_ffns() {
    // A toy Jamba: hidden 256, 4 layers, attention on odd layers (period 2, offset 1) and
    // experts on odd layers too (4 of 512, top 2), Mamba (inner 512, state 16, dt rank 32) and
    // a dense SwiGLU MLP of 512 on even ones; 8 heads (2 KV) of 32; untied, vocabulary 1,000.
    let mut config = serde_json::json!({
        "model_type": "jamba", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 1000, "num_experts": 4, "num_experts_per_tok": 2,
        "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
        "expert_layer_offset": 1, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
        "mamba_dt_rank": 32, "tie_word_embeddings": false
    });
    let m = toy(&config);
    let kinds: Vec<_> = (0..4).map(|l| m.block_kind(l)).collect();
    assert!(matches!(kinds[0].mixer, Mixer::Ssm(_)) && kinds[0].ffn == FfnKind::Dense);
    assert!(kinds[1].mixer == Mixer::Attention && kinds[1].ffn == FfnKind::Moe);
    assert_eq!(kinds[2], kinds[0]);
    assert_eq!(kinds[3], kinds[1]);
    // transformers 5.17 builds 5,684,608 parameters (checked on CPU). A Mamba layer: in_proj
    // 256 x 1,024 = 262,144, the convolution 2,048 + 512, x_proj 512 x 64 = 32,768, dt_proj
    // 32 x 512 + 512 = 16,896, A_log 8,192, D 512, out_proj 131,072, the dt/B/C norms 64:
    // 454,208; its MLP 3 x 256 x 512 = 393,216 and two norms 512: 847,936. An attention layer:
    // q and o 65,536 each, k and v 16,384 each; the router 1,024, the experts 4 x (1,024 +
    // 512) x 256 = 1,572,864; two norms: 1,738,240. Twice each, and the embeddings, the head
    // and the final norm, 512,256.
    // peft 0.21.2 with r16 (checked with r8 and doubled): `all-linear` wraps per Mamba layer
    // in_proj 16 x 1,280, x_proj 16 x 576, dt_proj 16 x 544 and out_proj 16 x 768 (peft leaves
    // Jamba's `out_proj` alone only for the model types it lists), gate, up and down 16 x 768
    // each: 87,552; per attention layer q 8,192, k and v 5,120 each, o 8,192 and the router
    // (an `nn.Linear`) 16 x 260 = 4,160: 30,784; twice each. q,v: 2 x (8,192 + 5,120).
    assert_eq!(lora_counts(&m), (5_684_608, 236_672, 26_624));
    // Mamba's forward reads `dt_proj.weight`: under `all-linear` its factors (2 x 16 x 544 =
    // 17,408 elements) count as trainable but get no gradient; the gradients are the other
    // adapters' (219,264 fp32 elements).
    let all = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa)).memory;
    assert_eq!(
        (all.model_states - all.persistent).0,
        4 * (236_672 - 17_408)
    );
    // Prefix tuning fails on its Mamba layers' cache, as on the other hybrids.
    let prefix = Method::Prefix { virtual_tokens: 8 };
    let err = refusal(&m, &plan(prefix, 1, 64, AttentionKernel::Sdpa));
    assert!(err.contains("Mamba layers reject"), "{err}");
    // No framework ftplan knows splits Mamba-1 mixers across tensor-parallel ranks.
    let mut tp = full(Precision::MixedBf16, 1, 64);
    tp.parallel.tp = 2;
    tp.parallel.gpus = 2;
    let err = refusal(&m, &tp);
    assert!(
        err.contains("`tp`") && err.contains("Mamba layers"),
        "{err}"
    );
    // One expert makes every FFN the dense MLP, whatever `num_experts_per_tok` (2 by default)
    // says: transformers 5.17 builds 3,323,264 (checked), the two sparse layers' router and
    // experts (1,573,888 each) replaced by MLPs of 393,216.
    config["num_experts"] = serde_json::json!(1);
    let dense = toy(&config);
    assert!(dense.moe.is_none() && (0..4).all(|l| dense.block_kind(l).ffn == FfnKind::Dense));
    assert_eq!(
        run(&dense, &full(Precision::MixedBf16, 1, 64))
            .memory
            .trainable_params,
        3_323_264
    );
}

#[test]
fn nemotron_h_latent_experts_run_on_the_latent_width() {
    // Nemotron 3 Super's LatentMoE on the toy's expert layer ("M-*E", 4 experts of 32, top
    // 2): `moe_latent_size` 24 adds fc1_latent_proj (64 -> 24) and fc2_latent_proj (24 -> 64),
    // 3,072, and the experts read 24 features, not 64: their up and down stacks are 2 x 4 x
    // 32 x 24 = 6,144, down from 16,384. transformers 5.17 builds 88,428 (checked on CPU).
    let mut config = nemotron_h_config("M-*E");
    let p = full(Precision::MixedBf16, 1, 100);
    let hidden = run(&toy(&config), &p).memory.trainable_params;
    config["moe_latent_size"] = serde_json::json!(24);
    let latent = toy(&config);
    assert_eq!(run(&latent, &p).memory.trainable_params, 88_428);
    assert_eq!(hidden - 88_428, 16_384 - 6_144 - 3_072);
    // The grouped up projection keeps its gathered rows, 100 tokens x top 2 at the latent
    // width, cast to the fp32 stack's dtype: 200 x 24 x 4 = 19,200 B; its stack is 4 x 32 x
    // 24 x 4 = 12,288 B.
    assert_eq!(
        kept_at(&latent, &p, "decoder.layers.3.mixer.experts.gate_up_proj"),
        (19_200, 12_288)
    );
}

#[test]
fn bamba_places_attention_at_its_listed_layers_beside_granite_mamba2_layers() {
    // A toy Bamba: hidden 128, 4 layers with attention at 1 and 3 (4 heads, 2 KV, of 32), an
    // MLP of 256 in every layer; Mamba-2 of 256 channels in 8 heads, state 16, 2 groups.
    let m = toy(&serde_json::json!({
        "model_type": "bamba", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "attn_layer_indices": [1, 3], "mamba_n_heads": 8,
        "mamba_d_head": "auto", "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4,
        "mamba_expand": 2, "mamba_chunk_size": 32, "tie_word_embeddings": false
    }));
    let mixers: Vec<_> = (0..4).map(|l| m.block_kind(l).mixer).collect();
    assert!(matches!(mixers[0], Mixer::Ssd(_)) && mixers[1] == Mixer::Attention);
    assert_eq!((mixers[2], mixers[3]), (mixers[0], mixers[1]));
    assert!((0..4).all(|l| m.block_kind(l).ffn == FfnKind::Dense));
    // BambaConfig hard-codes rotary on half of each head.
    assert_eq!(
        m.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 0.5 }
    );
    // transformers 5.17 builds 842,544 (checked on CPU). A Mamba layer: in_proj 128 -> 2 x
    // 256 + 2 x 2 x 16 + 8 = 584, 74,752; the convolution over 320 channels 1,600; dt_bias,
    // A_log and D 24; the gated norm 256; out_proj 32,768; the MLP 3 x 128 x 256 = 98,304; two
    // norms 256: 207,960. An attention layer: q and o 16,384 each, k and v 8,192 each, the MLP
    // and norms: 147,712. Twice each; the embeddings, head and final norm 131,200.
    // peft 0.21.2, r16 (checked): `all-linear` wraps in_proj 16 x 712, out_proj 16 x 384 and
    // the MLP's three 16 x 384 each per Mamba layer (`bamba` is not in peft's Mamba list),
    // q 4,096, k and v 3,072 each, o 4,096 and the MLP per attention layer; q,v 2 x 7,168.
    assert_eq!(lora_counts(&m), (842_544, 137_472, 14_336));
    // peft's prefix cache fails on its Mamba-2 layers (checked on the toy).
    let prefix = Method::Prefix { virtual_tokens: 4 };
    let err = refusal(&m, &plan(prefix, 1, 64, AttentionKernel::Sdpa));
    assert!(err.contains("Mamba-2 layers reject"), "{err}");
}

#[test]
fn granite_moe_runs_experts_in_every_layer_with_an_optional_shared_mlp() {
    // A toy Granite 3.x MoE: hidden 128, 2 layers, 4 heads (2 KV) of 32, 4 experts of 64 (top
    // 2), Granite's multipliers, tied embeddings.
    let mut config = serde_json::json!({
        "model_type": "granitemoe", "hidden_size": 128, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 6.0,
        "attention_multiplier": 0.0078125, "tie_word_embeddings": true
    });
    let m = toy(&config);
    assert!((0..2).all(|l| m.block_kind(l).ffn == FfnKind::Moe));
    // transformers 5.17 builds 362,112 (checked on CPU): per layer q and o 16,384 each, k and v
    // 8,192 each, the router 512, the experts 4 x (128 + 64) x 128 = 98,304, two norms 256;
    // the tied embedding 65,536 and the final norm. peft 0.21.2, r16 (checked): the attention
    // alone, 2 x (4,096 + 3,072 + 3,072 + 4,096) under `all-linear` (the router is a bare
    // parameter, the experts 3-D ones peft does not convert for this model type).
    assert_eq!(lora_counts(&m), (362_112, 28_672, 14_336));
    // `granitemoeshared` adds a shared MLP of `shared_intermediate_size` (96) after the
    // experts: input_linear 128 -> 192 and output_linear 96 -> 128, 36,864 a layer (435,840,
    // checked), which `all-linear` reaches, 16 x 320 + 16 x 224 = 8,704 a layer.
    config["model_type"] = serde_json::json!("granitemoeshared");
    config["shared_intermediate_size"] = serde_json::json!(96);
    assert_eq!(lora_counts(&toy(&config)), (435_840, 46_080, 14_336));
}

#[test]
fn a_gemma3_checkpoint_is_its_language_model_plus_a_tower_it_never_runs() {
    // google/gemma-3-4b-it's config.json: `text_config` keeps only what differs from
    // Gemma3TextConfig's defaults, `vision_config` is SigLIP (27 layers of 1,152, MLP 4,304,
    // 896 px in 14 px patches, no pooling head). The tower, by its modules:
    //   patch embedding 3 x 1,152 x 14 x 14 + 1,152 = 678,528
    //   positions (896 / 14)^2 = 4,096 rows x 1,152 = 4,718,592
    //   per layer 2 LayerNorms 4,608, q/k/v/out 4 x (1,152^2 + 1,152) = 5,313,024,
    //     fc1 1,152 x 4,304 + 4,304 = 4,962,512, fc2 4,304 x 1,152 + 1,152 = 4,959,360:
    //     15,239,504 x 27 = 411,466,608
    //   final LayerNorm 2,304: the tower 416,866,032, as transformers builds it;
    // the projector 1,152 x 2,560 + 1,152 = 2,950,272. The language model is 3,880,263,168.
    let wrapper = model(
        crate::repo("examples/configs/gemma-3-4b-it-config.json")
            .to_str()
            .expect("utf-8"),
    );
    let tower = wrapper.vision.expect("a vision tower");
    assert_eq!(tower.params, 416_866_032 + 2_950_272);
    let mut text = wrapper.clone();
    text.vision = None;
    text.buffers = ftplan::units::Bytes::ZERO;
    let qv = lora_named(&["q_proj", "v_proj"]);
    let (with, without) = (
        run(&wrapper, &plan(qv.clone(), 1, 1024, AttentionKernel::Sdpa)),
        run(&text, &plan(qv, 1, 1024, AttentionKernel::Sdpa)),
    );
    assert_eq!(without.memory.base_params, 3_880_263_168);
    assert_eq!(with.memory.base_params, 4_300_079_472);
    // peft's q_proj and v_proj reach the tower's too: 27 layers x 2 x 16 x (1,152 + 1,152) =
    // 1,990,656 more trainable, which never get a gradient (the tower does not run).
    assert_eq!(
        with.memory.trainable_params - without.memory.trainable_params,
        1_990_656
    );
    // The peak differs by what the tower holds and nothing it would compute: its bf16 weights,
    // the idle fp32 factors, and `position_ids` (4,096 int64).
    let held = (tower.params * 2 + 1_990_656 * 4 + 4_096 * 8) as i64;
    assert_eq!(
        with.memory.peak.0 as i64 - without.memory.peak.0 as i64,
        held
    );
    assert_eq!(
        with.memory.at_peak.optimizer,
        without.memory.at_peak.optimizer
    );
    // Full fine-tuning leaves the tower `requires_grad` but without a gradient: no state.
    let (with, without) = (
        run(&wrapper, &full(Precision::MixedBf16, 1, 1024)),
        run(&text, &full(Precision::MixedBf16, 1, 1024)),
    );
    assert_eq!(with.memory.trainable_params, 4_300_079_472);
    assert_eq!(
        with.memory.at_peak.optimizer,
        without.memory.at_peak.optimizer
    );
    assert_eq!(
        with.memory.at_peak.gradients,
        without.memory.at_peak.gradients
    );
    // The step runs only the language model.
    assert_eq!(with.time.step_seconds, without.time.step_seconds);
    // What is not modelled is refused: peft has no default targets for `gemma3`, and the
    // methods that would reach the tower otherwise are not modelled.
    assert!(
        refusal(&wrapper, &plan(lora(), 1, 1024, AttentionKernel::Sdpa))
            .contains("no default LoRA targets")
    );
    assert!(
        refusal(&wrapper, &plan(Method::Ia3, 1, 1024, AttentionKernel::Sdpa))
            .contains("multimodal checkpoint")
    );
    // `out_proj` names the tower's attention outputs only (the language model's is `o_proj`):
    // 27 x 16 x (1,152 + 1,152) = 995,328, none of which train; on a Llama, whose attention has
    // no `out_proj`, it names nothing, and peft raises.
    let out = run(
        &wrapper,
        &plan(lora_named(&["out_proj"]), 1, 1024, AttentionKernel::Sdpa),
    );
    assert_eq!(out.memory.trainable_params, 995_328);
    assert!(
        refusal(
            &model("llama2-7b"),
            &plan(lora_named(&["out_proj"]), 1, 1024, AttentionKernel::Sdpa)
        )
        .contains("finds nothing to train")
    );
    // `fit` offers LoRA with q and v named, which peft takes for this checkpoint.
    let out = crate::ftplan()
        .args(["fit", "--gpu", "l4", "--format", "json", "--model"])
        .arg(crate::repo("examples/configs/gemma-3-4b-it-config.json"))
        .assert()
        .code(1);
    let fit: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert!(
        fit["fixes"]
            .as_array()
            .expect("fixes")
            .iter()
            .any(|f| f["change"] == "switch to LoRA (r16, qv)" && f["fits"] == true),
        "{fit}"
    );
    // Against the replays (validation/multimodal.jsonl: the tower beside 4 and 34 text layers,
    // full fine-tuning and LoRA): every peak within 0.3 %, every trainable count exact.
    crate::each_within(
        &crate::shipped_rows("validation/multimodal.jsonl"),
        0.003,
        None,
    );
}

#[test]
fn a_checkpoint_auto_model_for_causal_lm_reads_as_its_language_model_is_its_text_config() {
    // transformers 5.17 builds `llama4` and `qwen3_5` checkpoints through AutoModelForCausalLM as
    // Llama4ForCausalLM and Qwen3_5ForCausalLM: the language model alone, as many parameters as
    // the text config builds by itself (checked on the meta device). So the checkpoint's
    // config.json plans exactly as its `text_config`; the vision tower's config is not read.
    for (shipped, wrapper) in [("llama4-scout", "llama4"), ("qwen3.5-27b", "qwen3_5")] {
        let text = ftplan::spec::registry::model_config(shipped).expect("ships");
        let checkpoint = serde_json::json!({
            "model_type": wrapper,
            "text_config": text,
            "vision_config": {"model_type": "not read", "depth": 27},
        });
        let from_checkpoint =
            ftplan::spec::hf::parse_config("config.json", &checkpoint, shipped, false)
                .expect("reads");
        let alone = model(shipped);
        let p = plan(
            lora_named(&["q_proj", "k_proj", "v_proj", "o_proj"]),
            1,
            1024,
            AttentionKernel::Sdpa,
        );
        let (a, b) = (run(&from_checkpoint, &p), run(&alone, &p));
        assert_eq!(a.memory.peak, b.memory.peak, "{wrapper}");
        assert_eq!(
            a.memory.trainable_params, b.memory.trainable_params,
            "{wrapper}"
        );
        assert_eq!(a.time.step_seconds, b.time.step_seconds, "{wrapper}");
    }
    // A fault inside is named by its path.
    let bad = serde_json::json!({"model_type": "llama4", "text_config": {"hidden_size": 0}});
    let err = ftplan::spec::hf::parse_config("config.json", &bad, "x", false)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("`text_config.hidden_size`"), "{err}");
}

#[test]
fn cwm_slides_three_layers_after_each_global_one() {
    // `CwmForCausalLM` (transformers 5.17, Meta's Code World Model): Llama's block whose
    // attention (Qwen2Attention's, with q, k and v rebuilt without biases) slides over
    // `sliding_window` on the layers `layer_types` calls "sliding_attention"; CwmConfig writes
    // that list as layer i global when i is a multiple of 4. A toy (hidden 256, MLP 512, 4
    // heads of 64, 2 KV heads, 6 layers, vocabulary 1,000, window 64), which transformers
    // builds with 4,054,272 parameters: per layer q and o 256^2, k and v 256 x 128, the MLP
    // 3 x 256 x 512 and two norms of 256 (590,336); the embedding and the untied head
    // 1,000 x 256 each, the final norm 256.
    let config = serde_json::json!({
        "model_type": "cwm", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 1000, "sliding_window": 64
    });
    let m = toy(&config);
    let layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256;
    let total = 6 * layer + 2 * 1000 * 256 + 256;
    assert_eq!(total, 4_054_272);
    let e = run(&m, &full(Precision::Bf16, 1, 64));
    assert_eq!(e.memory.total_params, total);
    // Without `layer_types`, CwmConfig's rule: global, then three windowed layers.
    let local = Mixer::SlidingWindow { window: 64 };
    assert_eq!(m.mixers, vec![Mixer::Attention, local, local, local]);
    // A listed `layer_types` wins; without `sliding_window` the window is CwmConfig's 8,192.
    let mut listed = config.clone();
    listed
        .as_object_mut()
        .expect("object")
        .remove("sliding_window");
    listed["layer_types"] = serde_json::json!([
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention"
    ]);
    let wide = Mixer::SlidingWindow { window: 8192 };
    assert_eq!(
        toy(&listed).mixers,
        vec![
            wide,
            Mixer::Attention,
            wide,
            Mixer::Attention,
            wide,
            Mixer::Attention
        ]
    );
    // No biases, whatever `attention_bias` says: LoRA q,v at rank 16 trains
    // 16 x (256 + 256) + 16 x (256 + 128) = 14,336 per layer (peft 0.21: 86,016).
    let mut biased = config.clone();
    biased["attention_bias"] = serde_json::json!(true);
    let b = toy(&biased);
    assert_eq!(
        run(&b, &full(Precision::Bf16, 1, 64)).memory.total_params,
        total
    );
    assert_eq!(lora_trainable(&m, &["q_proj", "v_proj"]), 86_016);
}

#[test]
fn hyperclovax_norms_each_sublayer_output_and_multiplies_its_logits() {
    // `HyperCLOVAXForCausalLM` (transformers 5.17, NAVER's HyperCLOVA X SEED): Granite's block
    // with `post_norm1`/`post_norm2` (Peri-LN) on each sub-layer's output before Granite's
    // residual multiplier, and `lm_head(x) * logits_scaling` where Granite divides. A toy
    // (hidden 256, MLP 512, 4 heads of 64, 2 KV heads, 3 layers, vocabulary 1,000), which
    // transformers builds with 2,284,800 parameters: per layer q and o 256^2, k and v
    // 256 x 128, the MLP 3 x 256 x 512 and four norms of 256 (590,848); embedding and head
    // 1,000 x 256 each, the final norm 256. Without `use_post_norm` two norms per layer go.
    let config = serde_json::json!({
        "model_type": "hyperclovax", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "logits_scaling": 0.125, "residual_multiplier": 0.5
    });
    let m = toy(&config);
    let layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 4 * 256;
    let total = 3 * layer + 2 * 1000 * 256 + 256;
    assert_eq!(total, 2_284_800);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    use ftplan::spec::model::NormPlacement;
    assert_eq!(m.norm_placement, NormPlacement::Sandwich);
    // Times 0.125 is the same one op as Granite's divide by 8: a new (64, 1,000) bf16 tensor.
    assert_eq!(m.multipliers.logits_divisor, 8.0);
    let names: Vec<String> = {
        let g = graph::build(&m, &p);
        g.ops().map(|o| g.name(o.name)).collect()
    };
    assert!(names.iter().any(|n| n == "lm_head.scaling"), "{names:?}");
    let mut plain = config.clone();
    plain["use_post_norm"] = serde_json::json!(false);
    let q = toy(&plain);
    assert_eq!(q.norm_placement, NormPlacement::Pre);
    assert_eq!(run(&q, &p).memory.total_params, total - 3 * 2 * 256);
}

#[test]
fn youtu_puts_latent_attention_in_a_dense_llama_layer() {
    // `YoutuForCausalLM` (transformers 5.17, Tencent's Youtu-LLM): DeepSeek-V3's latent
    // attention in Llama's layer, Qwen3's MLP in every layer, tied embeddings. A toy (hidden
    // 256, MLP 512, 4 heads, query latent 96, KV latent 64, heads of 32 + 16 rotary, values of
    // 32, 3 layers, vocabulary 1,000), which transformers builds with 1,775,840 parameters:
    // per layer q_a 256 x 96 and its norm 96, q_b 96 x 4 x 48, kv_a 256 x (64 + 16) and its
    // norm 64, kv_b 64 x 4 x (32 + 32), o 4 x 32 x 256 (112,800), the MLP 3 x 256 x 512 and
    // two norms of 256; the tied embedding 1,000 x 256 and the final norm.
    let config = serde_json::json!({
        "model_type": "youtu", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 1000,
        "q_lora_rank": 96, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32, "v_head_dim": 32
    });
    let m = toy(&config);
    let attention = 256 * 96 + 96 + 96 * 4 * 48 + 256 * 80 + 64 + 64 * 4 * 64 + 4 * 32 * 256;
    assert_eq!(attention, 112_800);
    let total = 3 * (attention + 3 * 256 * 512 + 2 * 256) + 1000 * 256 + 256;
    assert_eq!(total, 1_775_840);
    assert_eq!(
        run(&m, &full(Precision::Bf16, 1, 64)).memory.total_params,
        total
    );
    assert!(m.moe.is_none() && m.tie_word_embeddings);
    // peft 0.21 on the meta device: `q_a_proj,kv_b_proj` at rank 16 trains
    // 16 x (256 + 96) + 16 x (64 + 256) = 10,752 per layer.
    assert_eq!(lora_trainable(&m, &["q_a_proj", "kv_b_proj"]), 32_256);
}

#[test]
fn axk1_norms_the_sparse_block_output_and_keeps_lora_off_its_experts() {
    // `AXK1ForCausalLM` (transformers 5.17, SK Telecom's A.X K1): DeepSeek-V3 whose sparse
    // block ends in `post_mlp_layernorm`, an RMSNorm on the routed plus shared experts' sum.
    // A toy (hidden 256, dense MLP 512, the Youtu toy's latent attention of 112,800 per layer,
    // 3 layers of which the first is dense, 8 experts of 64, top 2, one shared expert,
    // vocabulary 1,000), which transformers builds with 2,134,752 parameters: the dense layer
    // 112,800 + 3 x 256 x 512 + 2 x 256; a sparse layer 112,800, the router 8 x 256 (its
    // score-correction bias is a buffer), experts 8 x 128 x 256 + 8 x 256 x 64, the shared
    // expert 3 x 256 x 64, `post_mlp_layernorm` 256 and two norms of 256 (557,984); the
    // untied embedding and head 1,000 x 256 each and the final norm.
    let config = serde_json::json!({
        "model_type": "axk1", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "vocab_size": 1000, "q_lora_rank": 96, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1
    });
    let m = toy(&config);
    let sparse = 112_800 + 8 * 256 + 8 * 128 * 256 + 8 * 256 * 64 + 3 * 256 * 64 + 256 + 512;
    assert_eq!(sparse, 557_984);
    let total = 112_800 + 3 * 256 * 512 + 512 + 2 * sparse + 2 * 1000 * 256 + 256;
    assert_eq!(total, 2_134_752);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    let moe = m.moe.expect("sparse");
    assert!(moe.output_norm && moe.first_dense == 1);
    // The norm runs on the shared experts' sum, before the residual add.
    let g = graph::build(&m, &p);
    let names: Vec<String> = g.ops().map(|o| g.name(o.name)).collect();
    let norm = names
        .iter()
        .position(|n| n == "decoder.layers.1+1.mlp.post_mlp_layernorm")
        .expect("the sparse block's output norm");
    // (The repeated sparse layers are walked once, as `layers.1+1`; the norm's fp32 upcast
    // comes between.)
    assert_eq!(names[norm - 2], "decoder.layers.1+1.mlp.shared_add");
    // `axk1` is not in peft 0.21's conversion table, so `gate_proj,up_proj` reaches the
    // dense layer's MLP (16 x (256 + 512) x 2 = 24,576) and each shared expert
    // (16 x (256 + 64) x 2 = 10,240), never the fused experts.
    assert_eq!(lora_trainable(&m, &["gate_proj", "up_proj"]), 45_056);
}

#[test]
fn mellum_windows_qwen3_moe_layers_by_type_with_a_rotary_pair_per_type() {
    // `MellumForCausalLM` (transformers 5.17, JetBrains Mellum 2): Qwen3-MoE's attention
    // (per-head q/k norms) with `sliding_window` on the layers `layer_types` calls sliding, and
    // Qwen3-MoE's experts (softmax, top-k renormalised: `norm_topk_prob` true by default) on the
    // layers `mlp_layer_types` calls sparse. A toy (hidden 256, dense MLP 512, 4 heads of 64,
    // 2 KV heads, 4 layers, the first dense, 8 experts of 64, top 2, window 32 on the first
    // three layers), which transformers builds with 2,880,256 parameters: attention q and o
    // 256^2, k and v 256 x 128, q/k norms 64 each (196,736 per layer), two norms of 256; the
    // dense MLP 3 x 256 x 512; a sparse layer's router 8 x 256 and experts 8 x 128 x 256 +
    // 8 x 256 x 64; embedding and head 1,000 x 256 each, the final norm.
    let config = serde_json::json!({
        "model_type": "mellum", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000, "num_experts": 8,
        "num_experts_per_tok": 2, "sliding_window": 32,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]
    });
    let m = toy(&config);
    let attention = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 64 + 2 * 256;
    let sparse = attention + 8 * 256 + 8 * 128 * 256 + 8 * 256 * 64;
    let total = attention + 3 * 256 * 512 + 3 * sparse + 2 * 1000 * 256 + 256;
    assert_eq!(total, 2_880_256);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    let local = Mixer::SlidingWindow { window: 32 };
    assert_eq!(m.mixers, vec![local, local, local, Mixer::Attention]);
    use ftplan::spec::model::Routing;
    let moe = m.moe.expect("sparse");
    assert_eq!((moe.first_dense, moe.routing), (1, Routing::TopK));
    // peft 0.21 moves LoRA's FFN names onto the experts (`mellum` maps to Qwen2-MoE's
    // conversion pattern): `all-linear` trains 545,152 and `gate_proj,up_proj` the fused
    // gate_up stacks only, 8 x (32 x 256 + 128 x 32) per sparse layer with the rank doubled.
    assert_eq!(lora_trainable(&m, &["all-linear"]), 545_152);
    assert_eq!(
        lora_trainable(&m, &["gate_proj", "up_proj"]),
        3 * 8 * (32 * 256 + 128 * 32)
    );
    // One cos/sin pair per layer type, each (1, 64, 64) in bf16: 4 x 8,192 bytes live from
    // before the first layer. Without the full layer, one pair.
    let mut windowed = config.clone();
    windowed["layer_types"] = serde_json::json!(vec!["sliding_attention"; 4]);
    let one = toy(&windowed);
    let tables = |m: &ModelSpec| kept_at(m, &p, "decoder.position_embeddings").0;
    assert_eq!(tables(&m) - tables(&one), 2 * 64 * 64 * 2);
    // A partial rotary factor per layer type (Laguna's) is refused by name.
    let mut partial = config.clone();
    partial["rope_parameters"] = serde_json::json!({
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                           "partial_rotary_factor": 0.5}
    });
    toy_refused(&partial, "rope_parameters");
}

#[test]
fn hy_v3_adds_its_shared_experts_in_fp32() {
    // `HYV3ForCausalLM` (transformers 5.17, Tencent Hy3): Apertus's attention (per-head q/k
    // norms) in Llama's layer, a dense MLP in the first layer, then routed experts under an
    // fp32 sigmoid router (a score-correction buffer, not a parameter) and one shared expert,
    // combined as `(routed.float() + shared.float()).to(dtype)`. A toy (hidden 256, dense MLP
    // 512, 4 heads of 64, 2 KV heads, 3 layers, 8 experts of 64, top 2, vocabulary 1,000),
    // which transformers builds with 2,386,048 parameters: attention 196,736 per layer (q, o
    // 256^2; k, v 256 x 128; q/k norms 64 each) and two norms of 256; the dense MLP
    // 3 x 256 x 512; a sparse layer's router 8 x 256, experts 8 x 128 x 256 + 8 x 256 x 64 and
    // shared expert 3 x 256 x 64; embedding and head 1,000 x 256 each, the final norm.
    let config = serde_json::json!({
        "model_type": "hy_v3", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000, "num_experts": 8,
        "num_experts_per_tok": 2, "num_shared_experts": 1
    });
    let m = toy(&config);
    let attention = 2 * 256 * 256 + 2 * 256 * 128 + 2 * 64 + 2 * 256;
    let sparse = attention + 8 * 256 + 8 * 128 * 256 + 8 * 256 * 64 + 3 * 256 * 64;
    let total = attention + 3 * 256 * 512 + 2 * sparse + 2 * 1000 * 256 + 256;
    assert_eq!(total, 2_386_048);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    let moe = m.moe.expect("sparse");
    use ftplan::spec::model::RoutingWeights;
    assert!(moe.fp32_combine && moe.weights == RoutingWeights::Fp32 && moe.first_dense == 1);
    // In a bf16 model the routed and shared outputs are each copied to fp32 and the fp32 sum
    // cast back: (64, 256) x 4 B twice and once more for the sum, then 2 B; none is kept.
    let g = graph::build(&m, &p);
    let names: Vec<String> = g.ops().map(|o| g.name(o.name)).collect();
    for op in ["routed_float", "shared_float", "shared_add", "combine_cast"] {
        let at = format!("decoder.layers.1+1.mlp.{op}");
        assert!(names.contains(&at), "{at} in {names:?}");
    }
    // `enable_moe_fp32_combine = false` adds them as they are.
    let mut plain = config.clone();
    plain["enable_moe_fp32_combine"] = serde_json::json!(false);
    assert!(!toy(&plain).moe.expect("sparse").fp32_combine);
    // `hy_v3` is not in peft 0.21's conversion table: `gate_proj,up_proj` reaches the dense
    // MLP (16 x (256 + 512) x 2) and each shared expert (16 x (256 + 64) x 2) only.
    assert_eq!(lora_trainable(&m, &["gate_proj", "up_proj"]), 45_056);
}

#[test]
fn deepseek_sparse_attention_indexes_without_gradients_and_masks_every_layer() {
    // `DeepseekV32ForCausalLM` (transformers 5.17): DeepSeek-V3 with a lightning indexer in
    // each attention. A toy (hidden 256, 2 layers, the first dense of 512, 4 heads with queries
    // through a rank-96 bottleneck, a latent of 64, keys of 32 + 16 rotary, values of 32; 4
    // experts of 128, top 2, one shared; an indexer of 4 heads of 32 keeping the top 8;
    // vocabulary 1,000), which transformers builds with 1,667,776 parameters: attention
    // 112,800 per layer (q_a 256 x 96, its norm 96, q_b 96 x 192, kv_a 256 x 80, its norm 64,
    // kv_b 64 x 256, o 128 x 256); the indexer 21,568 (wq_b 96 x 128, wk 256 x 32, k_norm's
    // weight and bias 2 x 32, weights_proj 256 x 4); two norms of 256 per layer; the dense MLP
    // 3 x 256 x 512; the sparse one's router 4 x 256, experts 4 x 256 x 256 + 4 x 256 x 128
    // and shared expert 3 x 256 x 128; embedding and head 1,000 x 256 each, the final norm.
    let config = serde_json::json!({
        "model_type": "deepseek_v32", "vocab_size": 1000, "hidden_size": 256,
        "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "qk_nope_head_dim": 32, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8,
        "first_k_dense_replace": 1
    });
    let m = toy(&config);
    let attention = 256 * 96 + 96 + 96 * 192 + 256 * 80 + 64 + 64 * 256 + 128 * 256;
    let indexer = 96 * 128 + 256 * 32 + 2 * 32 + 256 * 4;
    let sparse = 4 * 256 + 4 * 256 * 256 + 4 * 256 * 128 + 3 * 256 * 128;
    let total = 2 * (attention + indexer + 2 * 256) + 3 * 256 * 512 + sparse + 2 * 1000 * 256 + 256;
    assert_eq!(total, 1_667_776);
    let p = full(Precision::Bf16, 1, 64);
    assert_eq!(run(&m, &p).memory.total_params, total);
    // Its parameters train (`requires_grad`) but the `@torch.no_grad()` forward gives them no
    // gradient: idle, so no optimizer state.
    let g = graph::build(&m, &p);
    let idle: Vec<_> = g
        .params
        .iter()
        .filter(|q| g.name(q.name).contains(".indexer."))
        .collect();
    assert_eq!(idle.len(), 2 * 5);
    assert!(idle.iter().all(|q| q.trainable && q.idle));
    // peft's `all-linear` adds LoRA to `wq_b`, `wk` and `weights_proj` too: counted as
    // trainable (r16: 16 x (96 + 128) + 16 x (256 + 32) + 16 x (256 + 4) = 12,352 per layer),
    // as peft counts them, and idle.
    let with = run(&m, &plan(lora_all(), 1, 64, AttentionKernel::Sdpa))
        .memory
        .trainable_params;
    assert_eq!(with, 172_736);
    // The indexer's worst moment at batch 1 x 64 in pure bf16 (no autocast: fp32 scores):
    // `* softmax_scale` beside the matmul's (1, 64, 4, 64) fp32 scores, 2 x 65,536 B, over what
    // its locals keep to its return: the projected and the concatenated queries (1 x 64 x 4 x
    // 32 x 2 B each), the rotated rotary part (64 x 4 x 16 x 2 B) and the key, its rotated part
    // and their concatenation (64 x (32 + 16 + 32) x 2 B): 131,072 + 51,200 = 182,272 B. (The
    // matmul's moment is 98,304 B of those, the weighted sum's 103,424 B.)
    let scores = crate::op_ending(&g, "indexer.scores");
    assert_eq!(scores.forward_transient.0, 182_272);
    assert!(!scores.in_backward && scores.saves.is_empty());
    // At batch 2 `torch.matmul` copies the key for every query: (2, 64, 32, 64) fp32 more at
    // the matmul, whose moment becomes the worst: (2 x 64 x 4 x 32 + 2 x 64 x 32 x 64 + 2 x 64 x
    // 4 x 64) x 4 B = 1,245,184 B over 102,400 B of locals.
    let g2 = graph::build(&m, &full(Precision::Bf16, 2, 64));
    assert_eq!(
        crate::op_ending(&g2, "indexer.scores").forward_transient.0,
        1_347_584
    );
    // While SDPA runs, the attention forward names the boolean index mask and the combined
    // mask, (1, 1, 64, 64) each, and the int32 top-k, 64 x 8 x 4 B.
    let core = crate::op_ending(&g, "self_attn.core");
    let mut pinned: Vec<u64> = core.pinned.iter().map(|&t| g.tensor(t).bytes.0).collect();
    pinned.sort_unstable();
    assert_eq!(pinned[..2], [2_048, 8_192]);
    assert!(!m.flash_attention);
    // GLM-5 (`glm_moe_dsa`): a "shared" layer reuses the previous layer's top-k, so it has no
    // indexer: 21,568 parameters fewer.
    let mut glm = config.clone();
    glm["model_type"] = serde_json::json!("glm_moe_dsa");
    glm["indexer_types"] = serde_json::json!(["full", "shared"]);
    let glm = toy(&glm);
    assert_eq!(run(&glm, &p).memory.total_params, total - indexer);
    let g = graph::build(&glm, &p);
    assert!(
        g.ops()
            .any(|o| g.name(o.name) == "decoder.layers.1.self_attn.indexer.mask")
    );
    // A shared first layer has no top-k to reuse, and the indexer reads the query bottleneck.
    let mut first_shared = config.clone();
    first_shared["model_type"] = serde_json::json!("glm_moe_dsa");
    first_shared["indexer_types"] = serde_json::json!(["shared", "full"]);
    toy_refused(&first_shared, "indexer_types");
    let mut no_bottleneck = config;
    no_bottleneck["q_lora_rank"] = serde_json::Value::Null;
    toy_refused(&no_bottleneck, "q_lora_rank");
}

#[test]
fn a_model_shallower_than_its_window_period_has_no_global_layer() {
    // Gemma3TextConfig derives `layer_types` as five sliding layers, then a global one: a
    // 1-layer Gemma 3 has one sliding layer and nothing else. Read from a config without the
    // list (older config.json files), the rule's period is cut at the depth, so no rotary pair
    // or eager mask is planned for a global layer that does not exist, and the estimate is
    // the one its derived `layer_types` gives.
    let config = serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 64, "sliding_window": 32
    });
    let derived = toy(&config);
    assert_eq!(derived.attention_kinds(), (false, true));
    let mut listed = config.clone();
    listed["layer_types"] = serde_json::json!(["sliding_attention"]);
    let listed = toy(&listed);
    let p = plan(lora(), 2, 256, AttentionKernel::Eager);
    assert_eq!(run(&derived, &p).memory.peak, run(&listed, &p).memory.peak);
    // Seven layers reach the period's global layer.
    let mut deeper = config;
    deeper["num_hidden_layers"] = serde_json::json!(7);
    assert_eq!(toy(&deeper).attention_kinds(), (true, true));
}
