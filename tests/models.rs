//! Every shipped model and GPU loads, and every pair estimates.

use ftplan::estimate::estimate;
use ftplan::graph;
use ftplan::spec::plan::{AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision};
use ftplan::spec::registry::{hardware_files, model_files, parse_hardware_toml, parse_model_toml};
use ftplan::time::Rates;

fn plan(method: Method) -> Plan {
    let precision = if method.frozen_base() {
        Precision::Bf16
    } else {
        Precision::MixedBf16
    };
    Plan {
        method,
        precision,
        optimizer: Optimizer::Adamw,
        batch: 1,
        seq: 512,
        target_seq: 128,
        grad_ckpt: false,
        attention: AttentionKernel::Sdpa,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    }
}

#[test]
fn shipped_parameter_counts_match_their_published_totals() {
    assert!(model_files().len() >= 34);
    for (stem, text) in model_files() {
        let m = parse_model_toml(stem, stem, text).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let published = m
            .published_params
            .unwrap_or_else(|| panic!("{stem} states no `params`"));
        let g = graph::build(&m, &plan(Method::Full));
        let counted: u64 = g.params.iter().map(|p| p.count()).sum();
        assert_eq!(
            counted, published,
            "{stem}: counted {counted}, published {published}"
        );
    }
}

#[test]
fn every_model_and_gpu_pair_estimates() {
    let gpus: Vec<_> = hardware_files()
        .iter()
        .map(|(stem, text)| {
            parse_hardware_toml(stem, stem, text)
                .unwrap_or_else(|e| panic!("{stem}: {e}"))
                .0
        })
        .collect();
    assert!(gpus.len() >= 16);
    let lora = Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    });
    for (stem, text) in model_files() {
        let m = parse_model_toml(stem, stem, text).expect("loads");
        for hw in &gpus {
            let rates = Rates::from_datasheet(hw);
            for method in [Method::Full, lora.clone()] {
                if refused_by_design(&m, &method) {
                    assert!(estimate(&m, &plan(method), hw, &rates).is_err(), "{stem}");
                    continue;
                }
                let e = estimate(&m, &plan(method), hw, &rates)
                    .unwrap_or_else(|e| panic!("{stem} on {}: {e}", hw.name));
                assert!(
                    e.memory.peak.0 > 0 && e.time.step_seconds > 0.0,
                    "{stem} on {}",
                    hw.name
                );
                assert_eq!(
                    e.memory.at_peak.total(),
                    e.memory.peak,
                    "breakdown sums to the peak"
                );
            }
        }
    }
}

#[test]
fn every_peft_method_builds_a_valid_graph_for_every_family() {
    let methods = crate::peft_methods();
    for stem in [
        "gpt2",
        "opt-1.3b",
        "llama3.2-1b",
        "gemma-2b",
        "phi-2",
        "falcon-7b",
        "t5-small",
        "flan-t5-base",
        "bart-base",
        "qwen2.5-0.5b",
    ] {
        let (_, text) = model_files()
            .iter()
            .find(|(s, _)| *s == stem)
            .expect("shipped");
        let m = parse_model_toml(stem, stem, text).expect("loads");
        for method in &methods {
            for ckpt in [false, true] {
                let p = Plan {
                    grad_ckpt: ckpt,
                    ..plan(method.clone())
                };
                let g = graph::build(&m, &p);
                g.verify()
                    .unwrap_or_else(|e| panic!("{stem} {}: {e}", method.name()));
                let (_, _, trainable) = ftplan::graph::op::counts(&g);
                assert!(trainable > 0, "{stem} {} trains nothing", method.name());
            }
        }
    }
}

/// Methods a model cannot take, refused as peft refuses them: a recurrent (Mamba) block has no
/// query/value projections for `qv` LoRA, no keys and values for prefixes, no FFN for adapters
/// or IA3's feed-forward vectors.
fn refused_by_design(m: &ftplan::spec::model::ModelSpec, method: &Method) -> bool {
    // PhiMoE, Llama 4: peft's `all-linear` wraps the router, an nn.Linear returning a tuple,
    // and fails.
    let phimoe_all_linear = m.family.router_returns_tuple()
        && matches!(method, Method::Lora(l) | Method::Qlora(l) if l.targets == LoraTargets::AllLinear);
    // Hybrids (LFM2, Qwen3.5, Qwen3-Next, Granite 4.0, Nemotron-H): peft's prefix cache fails
    // on their recurrent layers.
    let recurrent_prefix = m.has_recurrent_layers() && matches!(method, Method::Prefix { .. });
    // Latent attention, multi-query caches and T5s whose `d_model` is not `num_heads x d_kv`:
    // peft's prefix does not fit the layers' caches.
    let mismatched_prefix =
        m.peft_prefix_width().is_err() && matches!(method, Method::Prefix { .. });
    // Nemotron-H, Falcon-H1: peft refuses `all-linear` (their Mamba layers' out_proj).
    use ftplan::spec::model::Family;
    let nemotron_all_linear = matches!(m.family, Family::NemotronH | Family::FalconH1)
        && matches!(method, Method::Lora(l) | Method::Qlora(l) if l.targets == LoraTargets::AllLinear);
    phimoe_all_linear
        || recurrent_prefix
        || mismatched_prefix
        || nemotron_all_linear
        || !m.has_attention()
            && match method {
                // Mamba: no q or v to adapt, and peft refuses `all-linear` (the mixer's out_proj).
                Method::Lora(l) | Method::Qlora(l) => {
                    matches!(l.targets, LoraTargets::QueryValue | LoraTargets::AllLinear)
                }
                Method::Prefix { .. } | Method::Ia3 | Method::Adapter { .. } => true,
                _ => false,
            }
}

#[test]
fn every_model_method_and_setting_builds_a_valid_graph() {
    let methods: Vec<Method> = crate::all_methods();
    let hw = parse_hardware_toml(
        "h100-sxm",
        "h100-sxm",
        hardware_files()
            .iter()
            .find(|(s, _)| *s == "h100-sxm")
            .expect("ships")
            .1,
    )
    .expect("loads")
    .0;
    let rates = Rates::from_datasheet(&hw);
    for (stem, text) in model_files() {
        let m = parse_model_toml(stem, stem, text).expect("loads");
        for method in &methods {
            for (ckpt, eager, precision) in [
                (false, false, Precision::MixedBf16),
                (true, true, Precision::Bf16),
                (true, false, Precision::Fp32),
            ] {
                let p = Plan {
                    grad_ckpt: ckpt,
                    attention: if eager {
                        AttentionKernel::Eager
                    } else {
                        AttentionKernel::Sdpa
                    },
                    precision,
                    seq: 64,
                    target_seq: 16,
                    ..plan(method.clone())
                };
                let g = graph::build(&m, &p);
                g.verify()
                    .unwrap_or_else(|e| panic!("{stem} {} {p:?}: {e}", method.name()));
                if refused_by_design(&m, method)
                    || (ckpt && matches!(method, Method::Prefix { .. }))
                {
                    assert!(estimate(&m, &p, &hw, &rates).is_err(), "{stem}");
                    continue;
                }
                let e = estimate(&m, &p, &hw, &rates).unwrap_or_else(|e| panic!("{stem}: {e}"));
                assert!(
                    e.memory.peak.0 > 0 && e.time.step_seconds.is_finite(),
                    "{stem} {}",
                    method.name()
                );
                assert!(
                    e.memory.trainable_params > 0
                        && e.memory.trainable_params <= e.memory.total_params
                );
            }
        }
    }
}

#[test]
fn mixture_of_experts_counts_all_experts_and_activates_top_k() {
    use ftplan::spec::registry::resolve_model;
    // Mixtral-8x7B: 46.7 B parameters, 12.9 B active per token (Jiang et al. 2024, sec. 2).
    let m = resolve_model("mixtral-8x7b").expect("ships").value;
    let total = m.published_params.expect("states its params");
    let active = m.active_params(total);
    assert!(active < total);
    assert!((12.8e9..13.0e9).contains(&(active as f64)), "{active}");
    // Dense models: active = total.
    let dense = resolve_model("llama2-7b").expect("ships").value;
    assert_eq!(dense.active_params(6_738_415_616), 6_738_415_616);
}

#[test]
fn partial_tuning_trains_exactly_its_roles() {
    use ftplan::estimate::estimate;
    use ftplan::spec::plan::{AttentionKernel, Method, Optimizer, Plan, Precision};
    use ftplan::spec::registry::{resolve_hardware, resolve_model};
    use ftplan::time::Rates;
    let hw = resolve_hardware("h100").expect("ships").value;
    let rates = Rates::from_datasheet(&hw);
    let plan = |method: Method| Plan {
        method,
        precision: Precision::MixedBf16,
        optimizer: Optimizer::Adamw,
        batch: 2,
        seq: 512,
        target_seq: 0,
        grad_ckpt: false,
        attention: AttentionKernel::Sdpa,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    };
    let run = |model: &str, method: Method| {
        let m = resolve_model(model).expect("ships").value;
        estimate(&m, &plan(method), &hw, &rates)
    };
    let trained = |model: &str, method: Method| {
        run(model, method)
            .expect("estimates")
            .memory
            .trainable_params
    };
    // GPT-2: per block c_attn 2304 + c_proj 768 + c_fc 3072 + c_proj 768 biases and two
    // LayerNorm shifts of 768 = 8,448; 12 blocks and ln_f's shift: 102,144 (BitFit).
    assert_eq!(trained("gpt2", Method::BitFit), 12 * 8_448 + 768);
    // 25 LayerNorms, scale and shift of 768 each (LN tuning).
    assert_eq!(trained("gpt2", Method::LnTuning), 25 * 2 * 768);
    // Llama-2-7B's top 4 blocks (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096 each) and the final norm.
    let block = 4 * 4096 * 4096 + 3 * 4096 * 11_008 + 2 * 4096;
    let top4 = Method::Freeze {
        top_layers: Some(4),
        embeddings: false,
        side: None,
    };
    assert_eq!(trained("llama2-7b", top4), 4 * block + 4096);
    // Llama has no biases: BitFit trains nothing, which is an error, not a silent 0.
    assert!(run("llama2-7b", Method::BitFit).is_err());
    // Never more optimizer state than full fine-tuning; backward reaches fewer layers, so the
    // saved activations grow with the layers that train.
    let full = run("tinyllama-1.1b", Method::Full).expect("full");
    let mut last = 0;
    for top in [1, 4, 11, 22] {
        let e = run(
            "tinyllama-1.1b",
            Method::Freeze {
                top_layers: Some(top),
                embeddings: false,
                side: None,
            },
        )
        .expect("freeze");
        assert!(e.memory.persistent <= full.memory.persistent);
        let acts = e.memory.saved_after_forward.0;
        assert!(acts >= last, "top {top}: {acts} < {last}");
        last = acts;
    }
    for m in [Method::BitFit, Method::LnTuning] {
        let e = run("gpt2", m).expect("partial");
        let f = run("gpt2", Method::Full).expect("full");
        assert!(e.memory.at_peak.optimizer <= f.memory.at_peak.optimizer);
    }
}

#[test]
fn dora_adds_one_magnitude_per_output_and_keeps_both_results() {
    use ftplan::estimate::estimate;
    use ftplan::spec::plan::{
        AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision,
    };
    use ftplan::spec::registry::{resolve_hardware, resolve_model};
    use ftplan::time::Rates;
    let model = resolve_model("llama2-7b").expect("ships").value;
    let hw = resolve_hardware("h100").expect("ships").value;
    let rates = Rates::from_datasheet(&hw);
    let run = |dora: bool| {
        let plan = Plan {
            method: Method::Lora(Lora {
                rank: 16,
                alpha: 32.0,
                targets: LoraTargets::AllLinear,
                dora,
            }),
            precision: Precision::Bf16,
            optimizer: Optimizer::Adamw,
            batch: 1,
            seq: 512,
            target_seq: 0,
            grad_ckpt: false,
            attention: AttentionKernel::Sdpa,
            expert_load: 1.0,
            linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
            parallel: ftplan::spec::parallel::Parallel::single(),
        };
        estimate(&model, &plan, &hw, &rates)
            .expect("estimates")
            .memory
    };
    let (lora, dora) = (run(false), run(true));
    // peft's DoRA: one magnitude per output of each adapted linear (q, k, v, o 4096; gate, up
    // 11008; down 4096) in each of 32 layers.
    let outputs: u64 = 4 * 4096 + 2 * 11_008 + 4096;
    assert_eq!(dora.trainable_params - lora.trainable_params, 32 * outputs);
    // Both results of every adapted linear kept for the magnitude's gradient.
    assert!(dora.saved_after_forward > lora.saved_after_forward);
}

#[test]
fn new_families_replayed_on_cpu_are_within_the_bounds() {
    // Qwen3, Phi-3, Mixtral and Pythia, then issue #8's Gemma-2/3, OLMo-2, StarCoder2, BLOOM,
    // Mamba, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2-Lite and Falcon-40B, then the shipped families
    // no run had covered: OPT, Phi-2, Gemma (v1), Mistral past its window, Llama-3.2 (tied
    // 128k vocabulary), Flan-T5 (gated GELU, untied head), Falcon-7B (multi-query) and
    // Qwen2.5-7B, the `olmo3` and `ministral` model types (read as OLMo-2 and Mistral with
    // their `layer_types` windows) past their windows, Granite, SmolLM3's NoPE layers and
    // EXAONE-4, then GPT-OSS 20B and 120B, then LoRA on every linear of Qwen1.5-MoE,
    // DeepSeek-V2-Lite and Qwen3-MoE, then GLM-4.5-Air and an 8-layer GLM-4.5 (q/k norms), then
    // GLM-4-9B, then Seed-OSS, HunYuan-dense, Helium and OLMoE, then Cohere's Command R7B and a
    // q/k-normed Cohere, then fp32 experts, then mT5, then StableLM, then mBART, then StarCoder, then OLMo 1, then GPT-Neo and GPT-J, then Marian and Pegasus, then CodeGen, MPT, PhiMoE, Minitron, Arcee, ERNIE 4.5, Ministral 3, ERNIE-4.5-MoE, a pure-bf16 GLM-4.5, HunYuan-MoE and GLM-4.7-Flash, then Qwen3.5's Gated DeltaNet hybrid, dense and MoE, and Qwen3-Next, then Apertus's xIELU, then MiniMax-M2 and dots.llm1, then Gemma 4, then LFM2's short convolutions, dense and MoE, then Llama 4, then Mistral4, then Gemma 4 E2B at its published depth, then pure-bf16 Falcon-7B and Llama 4 with eager attention, then checkpointed BLOOM,
    // Falcon-7B and MPT, whose blocks return their probabilities, then Pythia rotating whole
    // heads, then a 3-layer DeepSeek-V2-Lite with CUDA's SDPA kernel for its narrower values,
    // then Mamba-2's chunked scan and Granite 4.0's hybrid of it, then Nemotron-H's one-sub-layer
    // hybrids, dense and MoE, then Falcon-H1's parallel ones, then Falcon Mamba's and Jamba's
    // Mamba-1 layers and Nemotron-H's latent experts, then Bamba, then Granite 3.x MoE, then
    // GPT-NeoX-20B's `gelu_fast` and Falcon-7B under SDPA, then GLM-4-9B-Chat, VaultGemma,
    // Jais 2 and Solar Open, then FlexOlmo, K-EXAONE's `exaone_moe`, nanochat, MiniCPM3, AFMoE and
    // Cohere2-MoE, then CWM, HyperCLOVA X, Youtu-LLM, A.X K1, Mellum 2 and Hy3, then
    // DeepSeek-V3.2's and GLM-5's sparse attention, then Gemma 3 and EXAONE-4 shallower than
    // their window period (validation/families.jsonl, measure.py --fake; the twenty-three before Mamba-2 replayed by
    // validation/peak_live.py only).
    use ftplan::validate::{self, MEDIAN_BOUND, WORST_BOUND};
    let rows = crate::shipped_rows("validation/families.jsonl");
    assert_eq!(rows.len(), 519);
    let late = [
        "opt-1.3b|",
        "phi-2|",
        "gemma-2b|",
        "mistral-7b|",
        "llama3.2-1b|",
        "flan-t5-base|",
        "falcon-7b|",
        "qwen2.5-7b|",
        "olmo-3-7b|",
        "ministral-8b|",
        "granite-3.1-",
        "smollm3-3b|",
        "exaone-4.0-",
        "gpt-oss-",
        "glm-4.5-",
        "glm-4-9b|",
        "seed-oss-8l|",
        "hunyuan-7b-8l|",
        "helium-2b|",
        "olmoe-1b-7b|",
        "command-r7b|",
        "cohere-qk-4l|",
    ];
    for r in &rows {
        // Issue #8's runs and the later model types' are held to 2 % each (all within 1.5 % when added); the
        // fifty-two before mT5 to 1.5 % (within 0.9 % when added, GPT-OSS's nine within 0.2 %; Granite's
        // multipliers were added after its replays and moved none of them). Since these CPU replays
        // are compared without the estimate's cuBLAS workspaces (64 MiB), which a CPU has not, the
        // one beyond 1 % is a pure-bf16 GLM-4.5 at 2 x 2,048 tokens, -1.1 %.
        // DeepSeek Sparse Attention under eager attention: two toy runs at 1 x 2,048 without
        // checkpointing, -0.6 % (16.9 MB whatever the top-k, as for a plain DeepSeek-V3 toy
        // under eager attention: not the indexer's; not traced), the checkpointed one within
        // 0.01 %.
        let dsa = r.name.starts_with("dsv32-") || r.name.starts_with("glm5-");
        let bound = if dsa && r.name.contains("|eager") {
            0.01
        } else if dsa
            || [
                "glm-4-9b-chat|",
                "vaultgemma-1b|",
                "jais2-8b|",
                "solar-open-",
                "flex-olmo-",
                "exaone-moe",
                "nanochat",
                "minicpm3-4b|",
                "trinity-mini|",
                "afmoe-4l-",
                "north-mini-code|",
                "cohere2-moe-5l-",
                "cwm-",
                "hcx-4l-",
                "youtu-llm-2b|",
                "axk1-4l|",
                "mellum",
                "hy3-4l",
                "gemma3-3l-v32k|",
                "gemma3-1l-v32k|",
                "exaone4-2l-v32k|",
            ]
            .iter()
            .any(|m| r.name.starts_with(m))
        {
            // GLM-4-9B-Chat, VaultGemma 1B, Jais-2-8B and Solar Open (2026-12-07): twenty runs
            // estimated before they ran, within 0.1 %; FlexOlmo-7x7B and ExaoneMoeConfig's
            // defaults at 32 and 4 layers (2026-12-07): eleven, within 0.05 %; nanochat at
            // NanoChatConfig's defaults and 1,280 wide: nine, within 0.01 %; MiniCPM3-4B: seven,
            // within 0.02 % (the mixed full run -2.0 % until the replay cast SDPA's fp32 q as
            // CUDA autocast does), and two with LoRA on single latent projections (0.01 %);
            // Trinity Mini at 32 layers and a 4-layer AFMoE: nine, within 0.2 %; North Mini Code
            // at 49 layers and a 5-layer Command A+ layout: eight, within 0.08 %; CWM 32B and a
            // 6-layer CWM, three 4-layer HyperCLOVA X layouts, Youtu-LLM 2B and a 4-layer A.X K1
            // (2026-12-08): eighteen, within 0.04 %; Mellum 2 at 28 layers and an 8-layer
            // Mellum with windows (2026-12-08): seven, within 0.06 %; Hy3 at 4 of its 80
            // layers (2026-12-08): six, within 0.02 %; DeepSeek-V3.2 and GLM-5 at 4 full-width
            // layers and as toys with long top-k scores (2026-12-08): twelve under SDPA, within
            // 0.05 % (replayed while the indexer was written: see validation/README.md); a
            // 3- and a 1-layer Gemma 3 and a 2-layer EXAONE-4, shallower than their window
            // period, from configs without `layer_types` (2026-12-08): six, within 0.01 %
            // (+1.0, +0.1, +2.1, +0.1, +0.4 and 0.0 % while the period named a global layer the
            // model does not have).
            0.005
        } else if r.name.starts_with("gpt-neox-20b-4l|") || r.name.starts_with("falcon-7b-4l|") {
            // Four full-width layers each (2026-12-07): GPT-NeoX-20B's four within 0.0 % (LoRA
            // -22.6 % while `gelu_fast` was read as `F.gelu`, -4.8 % checkpointed before a
            // linear's input lived through its call); Falcon-7B's three under SDPA within 0.9 %
            // (LoRA -36.5 % while its one-KV-head SDPA call was read as a fused kernel's).
            0.01
        } else if r.name.contains("-2l-v2048|") && !r.name.starts_with("qwen1.5-moe") {
            // Eight 2-layer MoE runs at a 2,048 vocabulary, estimated before their replays
            // (2026-12-06, validation/README.md, "What the frames name"): within 0.8 % but
            // four at -2.5 to -4.2 %; within 0.8 % since.
            0.01
        } else if late.iter().any(|m| r.name.starts_with(m)) {
            0.015
        } else if [
            "mamba2-",
            "granite-4.0-h-",
            "nemotron-h-",
            "nemotron-3-nano-",
            "falcon-h1-",
            "falcon-mamba-",
            "jamba-",
            "nemotron-3-latent-",
            "bamba-",
            "granite-moe-shared-",
        ]
        .iter()
        .any(|m| r.name.starts_with(m))
        {
            // Mamba-2's eleven (2026-12-06): within 0.8 % estimated before they ran, 0.3 % since;
            // Granite 4.0's nine hybrid runs, estimated before they ran: within 0.5 %, 0.2 %
            // since. Nemotron-H's eight, estimated before they ran: the five dense hybrids
            // within 0.4 %, the three MoE ones +28 to +74 % (the non-gated experts were built
            // with a gate); within 0.1 % since (one up projection, and no autograd in the
            // blocks below the first adapted one). Falcon-H1's eight under its three gated-norm
            // forms, estimated before they ran: within 0.2 %. Falcon Mamba's four and Jamba's
            // five: the full runs within 0.3 % estimated before they ran, the LoRA ones -17 %
            // and +12 % (the first layer's scan kept nothing; the blocks below Jamba's first
            // adapted layer kept activations): within 0.3 % since. Three with Nemotron 3
            // Super's latent experts, estimated before they ran: within 0.1 %. Bamba's five,
            // estimated before they ran: within 0.05 %. Granite 3.x MoE's six (the four
            // `granite-3.1-3b-a800m-4l` ones fall under Granite's 1.5 % above), estimated
            // before they ran: within 0.1 %.
            0.01
        } else if r.name == "pegasus-large|full_bf16|b4|s(1024, 256)|gc1|sdpa"
            || r.name.starts_with("ernie-moe-4l|full|")
            || r.name == "gemma-4-26b-a4b-6l|full|b1|s2048|gc0|sdpa"
            || r.name == "lfm2-1.2b|full|b2|s1024|gc1|sdpa"
        {
            // The replay sums two gradients out of place (autograd accumulates in place only
            // for vanilla tensors, not FakeTensors): Pegasus's tied 96,103 x 1,024 bf16
            // embedding's (0.18 GiB, 4.0 % of the replay's 4.61: -3.8 %, +0.2 % without it),
            // the 4-layer ERNIE-MoE's tied fp32 embedding's (0.99 GiB, -2.3 %: its full runs
            // peak where that sum is taken), Gemma 4 26B-A4B's tied 262,144 x 2,816 table's
            // (2.75 GiB, -3.1 %), LFM2-1.2B's tied 65,536 x 2,048 table's under checkpointing
            // (0.5 GiB, -2.6 %). (Figures net of the estimate's cuBLAS workspaces, which a CPU
            // replay does not have.)
            0.04
        } else if r.name == "gemma-4-31b-6l|full|b1|s2048|gc0|sdpa" {
            // The same replay artifact at Gemma 4's 262,144 x 5,376 tied table: the fp32
            // embedding gradient is summed into the LM head's out of place, a third 5.25 GiB
            // tensor CUDA's in-place accumulation never allocates (-6.3 %; +0.7 % without it).
            0.07
        } else if r.name.contains("gemma-2")
            || r.name.contains("gemma-3")
            || r.name.contains("olmo-2")
            || r.name.contains("starcoder2")
            || r.name.contains("bloom")
            || r.name.contains("mamba")
            || r.name.contains("moe")
            || r.name.contains("deepseek")
            || r.name.contains("falcon-40b")
            || r.name.starts_with("mt5-")
            || r.name.starts_with("stablelm-")
            || r.name.starts_with("mbart-")
            || r.name.starts_with("starcoderbase-")
            || r.name.starts_with("olmo-1b|")
            || r.name.starts_with("olmo-7b|")
            || r.name.starts_with("gpt-neo-")
            || r.name.starts_with("gptj-")
            || r.name.starts_with("opus-mt-")
            || r.name.starts_with("pegasus-")
            || r.name.starts_with("codegen-")
            || r.name.starts_with("mpt-")
            || r.name.starts_with("phimoe-")
            || r.name.starts_with("phi-3.5-moe")
            || r.name.starts_with("minitron-")
            || r.name.starts_with("arcee-")
            || r.name.starts_with("ernie-")
            || r.name.starts_with("ministral-3-")
            || r.name.starts_with("hunyuan-moe-")
            || r.name.starts_with("glm-4.7-flash")
            || r.name.starts_with("qwen3.5-")
            || r.name.starts_with("qwen3-next-")
            || r.name.starts_with("apertus-")
            || r.name.starts_with("minimax-m2-")
            || r.name.starts_with("dots1-")
            || r.name.starts_with("gemma-4-")
            || r.name.starts_with("lfm2-")
            || r.name.starts_with("llama4-")
            || r.name.starts_with("mistral4-")
        {
            0.02
        } else {
            WORST_BOUND
        };
        crate::each_within(std::slice::from_ref(r), bound, None);
    }
    assert!(validate::summary(&rows).memory_median <= MEDIAN_BOUND);
}

#[test]
fn the_models_across_methods_replayed_on_cpu_are_within_the_bounds() {
    // The measured runs' own models (GPT-2, GPT-2-medium, Qwen2.5-0.5B, TinyLlama, Llama-2-7B,
    // T5-base, BART-large, and GPT-2 and BART with dropout) under the methods, checkpointing,
    // attention kernels, optimizers, fp32 bases, LoRA targets and shapes measured.jsonl does not
    // pair them with, then fourteen of families.jsonl's models under prefix, prompt, IA3 and
    // adapters (validation/sweep.jsonl, measure.py --fake, 119 runs), and 16 more pairings
    // (split sweep4: Llama-2-7B full, eager Llama-2, odd shapes, ...) estimated as they came,
    // within 0.9 %, and 6 pure-bf16 eager runs (sweep5: T5 +37.9 % and BART +23.6 % before
    // their softmax was read in the scores' dtype; 141 runs). Before the three
    // mechanisms it found, seq2seq prefix tuning was +66 % (BART) and +198 % (T5): peft gives
    // the prefix to the decoder's self-attention only, so a frozen encoder keeps nothing; with
    // eager attention it was still +12-14 %, as the cross-attention's matmuls kept what only
    // the encoder's (absent) key and value gradients need; and IA3 took keys and values
    // everywhere, where peft's table gives Qwen2 (and Gemma, BART, Phi) queries and values, OPT
    // queries and keys (Qwen2.5-0.5B's count was 122,880, peft's 141,312). Each run was within
    // 3.4 %, most of it the two cuBLAS workspaces (64 MiB) a CPU replay does not have; compared
    // without them, and without what MemTracker keeps alive from one checkpointed step to the
    // next (`memtracker_peak` in src/validate.rs), each is within 2.8 % (median 0.0 %), the worst
    // checkpointed BART and Flan-T5 runs, all below.
    use ftplan::validate::{self, MEDIAN_BOUND};
    let rows = crate::shipped_rows("validation/sweep.jsonl");
    assert_eq!(rows.len(), 141);
    crate::each_within(&rows, 0.03, None);
    assert!(validate::summary(&rows).memory_median <= MEDIAN_BOUND.min(0.01));
    let trainable = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.estimated_trainable)
    };
    // BART-large prefix, 32 virtual tokens: one table for the 12 decoder layers' keys and
    // values, 32 x 12 x 2 x 1,024 = 786,432 (not one per stack).
    assert_eq!(
        trainable("bart-large|prefix|b8|s(512, 128)|gc0|sdpa"),
        Some(786_432)
    );
    // Qwen2.5-0.5B IA3 on q (896), v (128) and down_proj's input (4,864), 24 layers: 141,312.
    assert_eq!(
        trainable("qwen2.5-0.5b|ia3|b8|s1024|gc0|sdpa"),
        Some(141_312)
    );
}

#[test]
fn bitsandbytes_runs_replayed_on_cpu_match_once_the_gpu_workspaces_are_set_aside() {
    // QLoRA (NF4 with double quantization, peft's prepare_model_for_kbit_training, LoRA on every
    // linear, with and without checkpointing) and 8-bit AdamW, replayed on CPU with real tensors
    // and bitsandbytes' CPU backend (validation/bnb.jsonl). A CPU has no cuBLAS: `validate`
    // compares a CPU replay with the estimate less the H200's two workspaces (2 x 32 MiB, the
    // forward thread's and autograd's), which are all that separated them.
    let rows = crate::shipped_rows("validation/bnb.jsonl");
    assert_eq!(rows.len(), 3);
    crate::each_within(&rows, 0.005, None);
}

#[test]
fn real_runs_on_cpu_at_published_widths_are_within_a_fifth_of_a_percent() {
    // Run with real tensors by `ftplan measure --device cpu --save` at 2 x 128 tokens
    // (validation/measure-cpu.jsonl): GPT-2, BART-base and T5-small at their published sizes
    // under every method (BitFit on T5 is refused: no biases), checkpointed full and LoRA on
    // every linear, eager attention, pure bf16 and foreach AdamW (41 runs); then eleven more
    // families (Qwen2.5, Qwen3, GPT-Neo, BLOOM, CodeGen, Marian, Mamba, LFM2, ERNIE 4.5, Flan-T5,
    // GPT-2-medium) under full fine-tuning, checkpointed LoRA on every linear, IA3 and prompt
    // tuning where they apply (41 runs). Each within 0.2 % with its exact trainable count; a
    // CPU's step time is not compared with the GPU's estimate.
    let rows = crate::shipped_rows("validation/measure-cpu.jsonl");
    assert_eq!(rows.len(), 82);
    crate::each_within(&rows, 0.002, None);
    assert!(rows.iter().all(|r| r.time_error().is_none()));
}

#[test]
fn mixed_fp16_keeps_the_bytes_and_takes_the_fp16_tensor_cores() {
    use ftplan::spec::registry::{resolve_hardware, resolve_model};
    // A V100 has fp16 tensor cores (125 TFLOP/s) and none for bf16 (its fp32 rate, 15.7):
    // fp16 autocast moves the same bytes as bf16 (2 per element; the GradScaler's state is two
    // scalars) and its GEMMs run at the fp16 rate, so the step is several times shorter.
    let m = resolve_model("llama3.2-1b").expect("ships").value;
    let hw = resolve_hardware("v100-32gb").expect("ships").value;
    let rates = Rates::from_datasheet(&hw);
    let p = |precision| Plan {
        precision,
        batch: 4,
        seq: 1024,
        ..plan(Method::Full)
    };
    let bf16 = estimate(&m, &p(Precision::MixedBf16), &hw, &rates).expect("estimates");
    let fp16 = estimate(&m, &p(Precision::MixedFp16), &hw, &rates).expect("estimates");
    assert_eq!(bf16.memory.peak, fp16.memory.peak);
    assert!(fp16.time.step_seconds < bf16.time.step_seconds / 3.0);
    assert!(
        fp16.time.mfu > 0.0 && fp16.time.mfu < 1.0,
        "{}",
        fp16.time.mfu
    );
    // DeepSpeed and Accelerate files say fp16 and are read back as it.
    let ds = ftplan::interop::deepspeed::write(&p(Precision::MixedFp16)).expect("writes");
    assert_eq!(ds["fp16"]["enabled"], true);
    assert_eq!(ds["bf16"]["enabled"], false);
    let back = ftplan::interop::deepspeed::read("ds.json", &ds.to_string()).expect("reads");
    assert_eq!(back.precision, Some(Precision::MixedFp16));
}

#[test]
fn llama_like_model_types_read_their_own_rules() {
    use ftplan::spec::model::{Norm, QkNorm};
    let read = |json: &str| {
        let value: serde_json::Value = serde_json::from_str(json).expect("json");
        ftplan::spec::hf::parse_config("config.json", &value, "m", false).expect("reads")
    };
    let shapes = r#""hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000"#;
    // SeedOssConfig's defaults: q/k/v biases, none on o, 0.1 dropout on the sub-layer
    // outputs and in attention.
    let seed = read(&format!(r#"{{"model_type": "seed_oss", {shapes}}}"#));
    assert!(seed.qkv_bias && seed.out_bias == Some(false));
    assert_eq!((seed.dropout.residual, seed.dropout.attention), (0.1, 0.1));
    // HunYuan: per-head q/k norms; Helium: the weight applied in fp32 before the cast back.
    let hunyuan = read(&format!(
        r#"{{"model_type": "hunyuan_v1_dense", {shapes}}}"#
    ));
    assert_eq!(hunyuan.qk_norm, QkNorm::PerHead);
    let helium = read(&format!(r#"{{"model_type": "helium", {shapes}}}"#));
    assert_eq!(helium.norm, Norm::Olmo2RmsNorm);
    // OLMoE: whole-width q/k norms and `intermediate_size`-wide experts.
    let olmoe = read(&format!(
        r#"{{"model_type": "olmoe", {shapes}, "num_experts": 64, "num_experts_per_tok": 8}}"#
    ));
    assert_eq!(olmoe.qk_norm, QkNorm::Full);
    let moe = olmoe.moe.expect("sparse");
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_intermediate),
        (64, 8, 2816)
    );
}

#[test]
fn cohere_layer_norm_keeps_two_centred_fp32_copies() {
    // CohereLayerNorm, op by op: `x.to(fp32)`, the mean, `(x - mean).pow(2).mean()` and
    // `(x - mean) * rsqrt(var + eps)`: the centred input is computed twice, each copy kept (by
    // pow, by the product), plus the per-token statistics. Command R7B's width 4,096, LoRA on
    // q and v (a frozen bf16 norm weight), 1 x 128 tokens: 2 x 128 x 4,096 x 4 B + 128 x 2 x
    // 4 B = 4,195,328 bytes per norm.
    let value: serde_json::Value = serde_json::from_str(
        r#"{"model_type": "cohere2", "vocab_size": 256000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 4, "num_attention_heads": 32,
            "num_key_value_heads": 8, "logit_scale": 0.25, "sliding_window": 4096}"#,
    )
    .expect("json");
    let m = ftplan::spec::hf::parse_config("config.json", &value, "r7b", false).expect("reads");
    let lora = Method::Lora(Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    });
    let p = Plan {
        precision: Precision::Bf16,
        seq: 128,
        ..plan(lora)
    };
    let g = graph::build(&m, &p);
    // A later block's (the first block's input, the embeddings, needs no gradient under LoRA).
    let norm = g
        .ops()
        .rfind(|o| g.name(o.name).ends_with("input_layernorm"))
        .expect("a block norm");
    let kept = crate::kept_bytes(&g, norm);
    assert_eq!(kept, 4_195_328);
}

#[test]
fn partial_tuning_replayed_on_cpu_is_within_the_bounds() {
    // BitFit, LN tuning and freezing (validation/partial.jsonl, `partial_replay.py`): GPT-2,
    // TinyLlama, Qwen2.5-0.5B, BART-large and T5-base at full size, fp32 weights under bf16
    // autocast as `ftplan measure`'s harness runs them, some checkpointed; and DoRA over a
    // frozen bf16 base on TinyLlama, Qwen2.5-0.5B, T5-base and Llama-2-7B. Estimated before
    // anything was changed for them: each within 0.1 %, every trainable count exact.
    let rows = crate::shipped_rows("validation/partial.jsonl");
    assert_eq!(rows.len(), 18);
    for method in ["bitfit", "ln_tuning", "freeze", "dora"] {
        assert!(rows.iter().any(|r| r.name.contains(method)), "{method}");
    }
    crate::each_within(&rows, 0.002, None);
}

#[test]
fn the_model_list_names_each_files_own_model_type() {
    // `list models` reports the `model_type` a file declares, as transformers knows it, not
    // the name of the reader family it shares (DeepSeek-V3 and V3.2 read as DeepSeek-V2's
    // layout; SmolLM3 as Llama's).
    let entries = ftplan::spec::registry::models().expect("ships");
    let of = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.model_type)
            .expect("listed")
    };
    assert_eq!(of("deepseek-v3"), "deepseek_v3");
    assert_eq!(of("deepseek-v3.2-exp"), "deepseek_v32");
    assert_eq!(of("glm-5"), "glm_moe_dsa");
    assert_eq!(of("smollm3-3b"), "smollm3");
    assert_eq!(of("deepseek-v2-lite"), "deepseek_v2");
}
