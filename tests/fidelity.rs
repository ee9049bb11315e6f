//! Issue #10: the mechanisms behind the runs that were off by 15-18 %, each on a small case whose
//! figures are derived by hand in the comments.

use ftplan::graph::{self, op::Op, op::OpGraph, op::TensorKind};
use ftplan::spec::model::ModelSpec;
use ftplan::spec::plan::{AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision};
use ftplan::spec::registry::resolve_model;
use ftplan::units::DType;

fn model(name: &str) -> ModelSpec {
    resolve_model(name).expect("ships").value
}

fn h200() -> ftplan::spec::hardware::Hardware {
    ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value
}

/// The H200's datasheet rates; tests set the fields they derive figures from.
fn h200_rates() -> ftplan::time::Rates {
    ftplan::time::Rates::from_datasheet(&h200())
}

/// Rates with round numbers: bf16 GEMMs at 1e12 FLOP/s (at the attention products' size),
/// copies at 1e12 B/s.
fn round_rates() -> ftplan::time::Rates {
    ftplan::time::Rates {
        bf16_matmul: vec![(4096, 1e12)],
        copy_bandwidth: 1e12,
        ..h200_rates()
    }
}

fn plan(method: Method, precision: Precision, batch: u64, seq: u64, target: u64, gc: bool) -> Plan {
    Plan {
        method,
        precision,
        optimizer: Optimizer::Adamw,
        batch,
        seq,
        target_seq: target,
        grad_ckpt: gc,
        attention: AttentionKernel::Sdpa,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    }
}

fn lora(rank: u64) -> Method {
    Method::Lora(Lora {
        rank,
        alpha: 2.0 * rank as f64,
        targets: LoraTargets::QueryValue,
        dora: false,
    })
}

/// A toy model read from a `config.json` object.
fn toy(config: serde_json::Value) -> ModelSpec {
    ftplan::spec::hf::parse_config("config.json", &config, "toy", false).expect("reads")
}

/// A toy decoder of `model_type`: hidden 256, intermediate 512, 2 layers, 4 heads of 64 over
/// `kv_heads` KV heads, vocabulary 512.
fn toy_decoder(model_type: &str, kv_heads: u64) -> ModelSpec {
    toy(serde_json::json!({
        "model_type": model_type, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
        "head_dim": 64, "vocab_size": 512
    }))
}

/// The toy decoder as a Llama.
fn toy_llama(kv_heads: u64) -> ModelSpec {
    toy_decoder("llama", kv_heads)
}

/// A toy Gemma 4: hidden 64, 4 heads of 16 over 2 KV heads on the sliding layer, and on the
/// full one 4 heads of 512 over `global_kv` KV heads whose keys are the values; vocabulary 512.
fn toy_gemma4(global_kv: u64) -> ModelSpec {
    toy(serde_json::json!({
        "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "global_head_dim": 512, "num_global_key_value_heads": global_kv,
        "attention_k_eq_v": true, "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0, "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"], "vocab_size": 512,
        "tie_word_embeddings": true
    }))
}

/// An op of a graph, by its full name.
fn op_named<'g>(g: &'g OpGraph, name: &str) -> &'g Op {
    g.ops()
        .find(|o| g.name(o.name) == name)
        .unwrap_or_else(|| panic!("no op {name}"))
}

/// The bytes of each tensor named while `op`'s forward runs (`OpGraph::named`), in order.
fn named_bytes(g: &OpGraph, op: &Op) -> Vec<u64> {
    g.named(op).map(|t| g.tensor(t).bytes.0).collect()
}

/// The shipped H200 profile as a CPU replay sees it (no CUDA context), and the memory
/// estimate of `g` under `plan` on it.
fn replay_estimate(
    g: &OpGraph,
    plan: &ftplan::spec::plan::Plan,
) -> (
    ftplan::memory::MemoryEstimate,
    ftplan::spec::hardware::Hardware,
) {
    let hw = ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value
        .as_cpu_replay();
    (ftplan::memory::estimate(g, plan, &hw), hw)
}

/// Bytes an op keeps for its backward, by the op's full name.
fn saved(g: &OpGraph, name: &str) -> u64 {
    crate::kept_bytes(g, op_named(g, name))
}

/// The bytes of each tensor every checkpointed block keeps as an input, block by block.
fn checkpoint_inputs(g: &OpGraph) -> Vec<Vec<u64>> {
    g.ops()
        .filter(|o| g.name(o.name) == "checkpoint_input")
        .map(|o| o.saves.iter().map(|&t| g.tensor(t).bytes.0).collect())
        .collect()
}

/// A run of a shipped validation file compared with its H200 estimate, by name.
fn shipped_run(file: &str, name: &str) -> ftplan::validate::Row {
    crate::shipped_rows(file)
        .into_iter()
        .find(|r| r.name == name)
        .expect("the run is in the file")
}

/// Asserts a compared run's relative error is under `bound`, naming the run.
fn within(row: &ftplan::validate::Row, bound: f64) {
    assert!(
        row.error.abs() < bound,
        "{}: {:+.3}%",
        row.name,
        row.error * 100.0
    );
}

/// A run of validation/sweep.jsonl compared with its H200 estimate, by name.
fn sweep_run(name: &str) -> ftplan::validate::Row {
    shipped_run("validation/sweep.jsonl", name)
}

#[test]
fn autocast_caches_only_the_copies_of_weights_that_train() {
    // GPT-2 (12 layers, width 768) with LoRA r8 on `c_attn` over an fp32 base under bf16
    // autocast. ATen's `cached_cast` caches a cast only for a leaf that requires grad, so the
    // cached copies are the LoRA matrices' alone: per layer A 768x8 + B 8x2304 = 24,576
    // weights, x 12 layers x 2 bytes = 589,824 bytes. The frozen fp32 weights are cast at every
    // use and kept only as ordinary saved tensors, which checkpointing drops.
    let m = model("gpt2");
    let g = graph::build(&m, &plan(lora(8), Precision::MixedBf16, 1, 128, 0, true));
    let cached: u64 = g
        .tensors
        .iter()
        .filter(|t| t.kind == TensorKind::WeightCopy)
        .map(|t| t.bytes.0)
        .sum();
    // Layers 1..11 are one template op set repeated 11 times: count the template once per copy.
    let per_layer = (768 * 8 + 8 * 2304) * 2;
    let templates = g
        .tensors
        .iter()
        .filter(|t| t.kind == TensorKind::WeightCopy)
        .count();
    assert_eq!(
        templates,
        2 * 2,
        "LoRA A and B, in layer 0 and in the repeated template"
    );
    assert_eq!(cached, 2 * per_layer);
    // `c_attn`'s frozen 768x2304 weight (+ bias 2304) in a layer whose input needs a gradient:
    // the matmul keeps its bf16 copy, 2 x (768 x 2304 + 2304) = 3,543,552 bytes (the input, which
    // only a weight gradient would need, stays with LoRA's A).
    assert_eq!(
        saved(&g, "decoder.layers.1+10.self_attn.qkv"),
        2 * (768 * 2304 + 2304)
    );
}

#[test]
fn checkpointing_drops_the_per_use_copies_of_a_frozen_fp32_base() {
    // Llama-3.2-1B, LoRA r16 on q,v over an fp32 base, batch 1 x 2048, checkpointed. The frozen
    // block weights are 16 x (2048x2048 + 2x 2048x512 + 2048x2048 + 3x 2048x8192) = 973,078,528
    // (q, k, v, o, gate, up, down); their bf16 copies, 1.95 GB, were held to the end of forward
    // before (the issue's +15.8 %). Now the activations at the peak (the loss) are the checkpoint
    // inputs and what lies outside the blocks (the LM head's per-use copy of the tied 128,256 x
    // 2048 embedding, 525 MB), well below half of the block weights' copies.
    let m = model("llama3.2-1b");
    let p = plan(lora(16), Precision::MixedBf16, 1, 2048, 0, true);
    let e = run(&m, &p, "h200");
    let block_copies = 973_078_528u64 * 2;
    assert!(
        e.memory.at_peak.activations.0 < block_copies / 2,
        "activations {} should not hold the block weights' copies ({block_copies})",
        e.memory.at_peak.activations.0
    );
}

/// T5-small (dropout 0.1) in full mixed-precision fine-tuning, batch 2 x 64 source and 16
/// target tokens: the graph the T5 tests read.
fn t5_small_full() -> OpGraph {
    graph::build(
        &model("t5-small"),
        &plan(Method::Full, Precision::MixedBf16, 2, 64, 16, false),
    )
}

#[test]
fn t5_self_attention_runs_the_fp32_math_path() {
    // T5-small (8 heads of 64, dropout 0.1), full fine-tuning, batch 2 x 64 source tokens.
    // The relative bias is a permuted view (last-dim stride 8), so SDPA runs its math path,
    // which upcasts q, k, v to fp32: each 2 x 8 x 64 x 64 x 4 = 262,144 bytes; one fp32
    // probability matrix 2 x 8 x 64 x 64 x 4 = 262,144; dropout's mask 65,536 (1 byte) and its
    // fp32 output 262,144. Saved: 4 x 262,144 + 65,536 + 262,144 = 1,376,256 bytes.
    let g = t5_small_full();
    assert_eq!(saved(&g, "encoder.layers.1+4.self_attn.core"), 1_376_256);
}

#[test]
fn t5_cross_attention_takes_the_fused_kernel() {
    // The cross-attention bias is a contiguous zeros tensor: the memory-efficient kernel takes
    // it and keeps bf16 q (2 x 16 x 512 x 2 = 32,768), k and v (2 x 64 x 512 x 2 = 131,072
    // each), the output (32,768) and the fp32 logsumexp (2 x 8 x 16 x 4 = 1,024): 328,704.
    let g = t5_small_full();
    assert_eq!(saved(&g, "decoder.layers.1+4.cross_attn.core"), 328_704);
}

#[test]
fn t5_casts_the_ffn_activation_to_the_output_weight_dtype() {
    // `T5DenseActDense` casts the ReLU output to `wo.weight.dtype` (fp32 under mixed precision)
    // and autocast casts it back to bf16 for `wo`: `wo` keeps that new bf16 tensor, 2 x 64 x
    // 2048 x 2 = 524,288 bytes, and its weight copy 512 x 2048 x 2 = 2,097,152; ReLU keeps its own
    // output besides (another 524,288).
    let g = t5_small_full();
    assert_eq!(saved(&g, "encoder.layers.1+4.mlp.fc2"), 524_288 + 2_097_152);
    assert_eq!(saved(&g, "encoder.layers.1+4.mlp.act"), 524_288);
}

#[test]
fn seq2seq_prompt_tuning_prompts_the_encoder_only() {
    // peft's PeftModelForSeq2SeqLM prepends the 20 virtual tokens to the encoder's input; the
    // decoder keeps its 16 target tokens, so the loss keeps 2 x 16 x 32,128 bf16
    // log-probabilities and nll_loss's fp32 copy of them (under autocast, below):
    // 1,028,096 x (2 + 4) = 6,168,576 bytes. The table still has a row set per submodule:
    // 2 x 20 x 512 = 20,480 trainable parameters.
    let m = model("t5-small");
    let p = plan(
        Method::Prompt { virtual_tokens: 20 },
        Precision::Bf16,
        2,
        64,
        16,
        false,
    );
    let g = graph::build(&m, &p);
    assert_eq!(saved(&g, "loss"), 2 * 16 * 32_128 * (2 + 4));
    let (_, _, trainable) = ftplan::graph::op::counts(&g);
    assert_eq!(trainable, 2 * 20 * 512);
}

#[test]
fn the_outliers_replayed_on_cpu_are_within_the_bounds() {
    // validation/outliers.jsonl: issue #10's checkpointed T5-base full fine-tuning and its
    // fp32-base Llama-3.2-1B LoRA, replayed at full size by measure.py --fake (torch 2.11). On
    // the H200 they measured 5.24 and 8.40 GiB; the CPU replay of the T5 run takes SDPA's math
    // path for its cross-attention as well (the CPU's fused kernel refuses a bias that needs a
    // gradient), the H200 the memory-efficient kernel. Compared on their peaks re-measured by a
    // tracker without module hooks (validation/peak_live.py): MemTracker's hooks held
    // 251,658,240 B more at the T5 run's peak (ten hidden-sized fp32 block-input gradients,
    // referenced by its multi-grad hooks until T5's shared position bias has its whole
    // gradient), 4.96 % (-4.4 % before). The T5 run is -1.2 %: at its peak (the first encoder block's
    // softmax backward) the recomputed block also holds the sum of its position bias and mask
    // (1 x 12 x 1,024 x 1,024 fp32, 50 MB), and the decoder's zeros cross-attention bias, a
    // leaf autograd keeps to the end of backward, with its gradient (6.3 MB each), which the
    // walk lets go with the decoder's checkpoints.
    let rows = crate::shipped_rows("validation/outliers.jsonl");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let bound = if r.name.starts_with("t5") {
            0.015
        } else {
            0.01
        };
        assert!(
            r.error.abs() <= bound,
            "{}: {:+.1}%",
            r.name,
            r.error * 100.0
        );
    }
}

fn run(m: &ModelSpec, p: &Plan, gpu: &str) -> ftplan::estimate::Estimate {
    let hw = ftplan::spec::registry::resolve_hardware(gpu)
        .expect("ships")
        .value;
    ftplan::estimate::estimate(m, p, &hw, &ftplan::time::Rates::from_datasheet(&hw))
        .expect("estimates")
}

#[test]
fn paged_optimizer_states_stay_outside_the_allocator_peak() {
    // GPT-2 full fine-tuning (124,439,808 parameters) with bitsandbytes' PagedAdamW32bit: two
    // fp32 states per parameter, allocated by cudaMallocManaged for tensors of at least 1e5
    // elements, so neither in PyTorch's peak nor in what the plan requires. The smaller
    // tensors' states are ordinary allocations: per block the c_attn bias (2,304), c_proj bias
    // (768), c_fc bias (3,072), mlp c_proj bias (768) and two LayerNorms (4 x 768), 9,984
    // elements, x 12, plus ln_f (1,536): 121,344 elements, 8 x 121,344 = 970,752 bytes. The
    // rest, 124,318,464 elements, is paged: 994,547,712 bytes. The same plan with fused AdamW
    // keeps all states in the peak (2 x 4 bytes x params plus a 4-byte `step` per tensor).
    let m = model("gpt2");
    let mut p = plan(Method::Full, Precision::MixedBf16, 2, 512, 0, false);
    p.optimizer = Optimizer::PagedAdamw32bit;
    let paged = run(&m, &p, "h200");
    assert_eq!(paged.memory.paged.0, 8 * 124_318_464);
    assert_eq!(paged.memory.at_peak.optimizer.0, 8 * 121_344);
    assert_eq!(paged.memory.paged_evicted.0, 0, "resident on an H200");
    assert_eq!(paged.time.paging_seconds, 0.0);
    p.optimizer = Optimizer::Adamw;
    let fused = run(&m, &p, "h200");
    assert!(fused.memory.required > paged.memory.required);
}

#[test]
fn paged_states_without_room_are_evicted_and_paged_every_step() {
    // Llama-2-7B full fine-tuning with PagedAdamW32bit on an A100-80GB: the paged states are
    // those of every tensor but the 65 RMSNorm weights of 4,096 elements (266,240), so
    // 8 x 6,738,149,376 = 53,905,195,008 bytes; what does not fit beside `required` on the
    // device is evicted, and each optimizer step moves it in and out over the 32 GB/s host
    // link: 2 x evicted / 32e9 seconds.
    let m = model("llama2-7b");
    let mut p = plan(Method::Full, Precision::MixedBf16, 1, 2048, 0, false);
    p.optimizer = Optimizer::PagedAdamw32bit;
    let e = run(&m, &p, "a100-80gb");
    assert_eq!(e.memory.paged.0, 8 * 6_738_149_376);
    let evicted = e.memory.required.0 + e.memory.paged.0 - e.hardware.memory.0;
    assert_eq!(e.memory.paged_evicted.0, evicted);
    let paging = 2.0 * evicted as f64 / 32e9;
    assert!((e.time.paging_seconds - paging).abs() < 1e-9);
    assert!(e.fits, "eviction keeps the plan running");
}

#[test]
fn fit_offers_paged_8bit_adamw_pure_bf16_and_adafactor_for_full_7b_on_an_a100() {
    // Full fine-tuning of Llama-2-7B on an A100-80GB needs ~108 GiB: fp32 weights 25.1 GiB,
    // gradients 25.1, AdamW states 50.2, activations. Pure bf16 halves weights, gradients and
    // states; Adafactor factors the states; paged 8-bit AdamW takes its 12.6 GiB of states
    // out of the allocator (resident here). Each fits on its own.
    let out = crate::ftplan()
        .args([
            "fit",
            "--model",
            "llama2-7b",
            "--gpu",
            "a100-80gb",
            "--method",
            "full",
            "--seq",
            "2048",
            "--format",
            "json",
        ])
        .assert()
        .code(1);
    let v: serde_json::Value =
        serde_json::from_slice(&out.get_output().stdout).expect("fit prints JSON");
    let changes: Vec<&str> = v["fixes"]
        .as_array()
        .expect("fixes")
        .iter()
        .map(|f| f["change"].as_str().expect("change"))
        .collect();
    for wanted in ["paged 8-bit AdamW", "pure bf16", "Adafactor", "8-bit AdamW"] {
        assert!(
            changes.iter().any(|c| c.contains(wanted)),
            "{wanted} missing from {changes:?}"
        );
    }
}

#[test]
fn a_linear_costs_the_kernels_pytorch_dispatches_for_it() {
    // Counted with a dispatch mode on BART's structure (torch 2.11, CUDA's autocast policy): a
    // trainable fp32 linear with a bias under autocast is the weight's cast and `addmm` forward;
    // backward the input's gradient, the weight's, its cast back to fp32 and the bias sum. A
    // frozen bf16 linear is one matmul each way. BART-large's encoder layer then counts 75
    // kernels in full fine-tuning (PyTorch: 73) and 65 with adapters (PyTorch: 61).
    let m = model("bart-large");
    let full = graph::build(
        &m,
        &plan(Method::Full, Precision::MixedBf16, 8, 512, 128, false),
    );
    let frozen = graph::build(
        &m,
        &plan(
            Method::Adapter { size: 64 },
            Precision::Bf16,
            8,
            512,
            128,
            false,
        ),
    );
    let kernels = |g: &OpGraph, name: &str| {
        let op = op_named(g, name);
        (op.cost.forward_kernels, op.cost.backward_kernels)
    };
    let fc1 = "encoder.layers.1+10.mlp.fc1";
    assert_eq!(kernels(&full, fc1), (2, 4));
    assert_eq!(kernels(&frozen, fc1), (1, 1));
}

#[test]
fn checkpointing_costs_host_time_per_block_and_per_saved_tensor() {
    // GPT-2 (12 blocks) without dropout, as the ground-truth runs train it, full fine-tuning,
    // batch 1 x 128, with and without non-reentrant checkpointing, on rates whose every other
    // host cost is zero, so the host time differs by checkpointing's Python alone.
    let mut m = model("gpt2");
    m.dropout = Default::default();
    let hw = h200();
    let host = |gc: bool, block_us: f64, tensor_us: f64| {
        let rates = ftplan::time::Rates {
            launch_overhead: 0.0,
            module_overhead: 0.0,
            checkpoint_block: block_us * 1e-6,
            checkpoint_tensor: tensor_us * 1e-6,
            ..h200_rates()
        };
        let p = plan(Method::Full, Precision::MixedBf16, 1, 128, 0, gc);
        ftplan::estimate::estimate(&m, &p, &hw, &rates)
            .expect("estimates")
            .time
            .host_seconds
    };
    // 200 us per block, one recomputation per block: 12 x 200 us = 2.4 ms.
    let per_block = host(true, 200.0, 0.0) - host(false, 200.0, 0.0);
    assert!((per_block - 2.4e-3).abs() < 1e-9, "{per_block}");
    // 1 us per saved tensor (half in forward, half in backward): 12 x the tensors one block
    // saves. A counting pack hook sees 27 per GPT-2 block on CPU and 31 on CUDA (the flash
    // kernel also saves the cumulative lengths and the Philox seed and offset); the graph's
    // estimate, each op's kept tensors plus the weights it reads, is 22 + 12 = 34.
    let per_tensor = (host(true, 0.0, 1.0) - host(false, 0.0, 1.0)) / 12.0 / 1e-6;
    assert!((per_tensor - 34.0).abs() < 1e-6, "{per_tensor}");
    assert!((27.0..=31.0 * 1.25).contains(&per_tensor));
}

/// GPT-2 full fine-tuning in fp32, batch 1 x 128, with `optimizer`, on an H200 whose copy rate
/// and dispatch cost are set (module calls free).
fn gpt2_fp32_step(
    optimizer: Optimizer,
    copy_bandwidth: f64,
    launch_overhead: f64,
) -> ftplan::time::TimeEstimate {
    let rates = ftplan::time::Rates {
        copy_bandwidth,
        launch_overhead,
        module_overhead: 0.0,
        ..h200_rates()
    };
    let p = Plan {
        optimizer,
        ..plan(Method::Full, Precision::Fp32, 1, 128, 0, false)
    };
    ftplan::estimate::estimate(&model("gpt2"), &p, &h200(), &rates)
        .expect("estimates")
        .time
}

#[test]
fn optimizer_steps_move_the_bytes_their_kernels_touch() {
    // GPT-2 full fine-tuning in fp32: 124,439,808 parameters in 148 tensors, P = 4 x that =
    // 497,759,232 bytes of parameters (and as many of gradients), on a GPU streaming 1e12 B/s.
    let seconds = |optimizer| gpt2_fp32_step(optimizer, 1e12, 0.0).optimizer_seconds;
    let p = 497_759_232.0;
    // Foreach kernels stream at 0.94 of the copy rate (a contiguous add on the H200,
    // validation/kbench-h200.json): 0.94e12 B/s here.
    // SGD with momentum, `_multi_tensor_sgd`: mul_(buf) reads and writes the buffer,
    // add_(buf, grad) reads both and writes the buffer, add_(param, buf) reads both and writes
    // the parameter: 3 P + 5 S with S = P, 8 x 497,759,232 = 3,982,073,856 bytes.
    assert!((seconds(Optimizer::Sgd) - 8.0 * p / 0.94e12).abs() < 1e-9);
    // Fused AdamW: parameter read and written, gradient read, both moments read and written:
    // 3 P + 2 S with S = 2 P + 148 fp32 steps (592 bytes): 7 P + 1,184 bytes, at the 0.82 of
    // the copy rate the fused kernel sustained in the profiled H200 steps (4.25 ms); its
    // element ceiling, 124,439,808 / 197e9 = 0.63 ms, does not bind for fp32.
    assert!((seconds(Optimizer::Adamw) - (7.0 * p + 1184.0) / 0.82e12).abs() < 1e-9);
    // Foreach AdamW, eight foreach kernels (weight decay, lerp_, mul_, addcmul_, sqrt, div_,
    // add_, addcdiv_): 7 P + 7 S = 21 P + 4,144 bytes, three times the fused kernel's traffic.
    assert!((seconds(Optimizer::AdamwForeach) - (21.0 * p + 4144.0) / 0.94e12).abs() < 1e-9);
    // bitsandbytes' blockwise 8-bit AdamW: 3 P + 2 S is about 2 GB (2.1 ms at 0.94e12 B/s),
    // but the kernel updates 35e9 elements per second: 124,439,808 / 35e9 = 3.555 ms.
    assert!((seconds(Optimizer::Adamw8bit) - 124_439_808.0 / 35e9).abs() < 1e-9);
    // torch.optim.Adafactor runs its single-tensor loop by default. GPT-2's 50 matrices (wte,
    // wpe and four per block) hold 124,318,464 elements, Pm = 497,273,856 bytes; each reads or
    // writes 17 of its sizes: 13 Pm through contiguous kernels (/ 0.94e12), the gradient's row
    // norms Pm (/ 0.7e12) and column norms Pm (fp32 sums over a dimension, / 0.47e12), and the
    // estimate's `div_` by a one-element mean through the legacy loop, 12.5 copied bytes per
    // element (more than its 2 Pm at 0.94). Eight row- or column-sized kernels per matrix take
    // the 1.3 us floor each. The 98 vectors (121,344 elements) are nine kernels apiece, all at
    // the floor: 98 x 9 x 1.3 us.
    let pm = 497_273_856.0;
    let adafactor = 13.0 * pm / 0.94e12
        + 124_318_464.0 * 12.5 / 1e12
        + pm / 0.7e12
        + pm / 0.47e12
        + 50.0 * 8.0 * 1.3e-6
        + 98.0 * 9.0 * 1.3e-6;
    let got = seconds(Optimizer::Adafactor);
    assert!((got - adafactor).abs() < 1e-9, "{got} vs {adafactor}");
}

#[test]
fn bitsandbytes_steps_synchronize_after_every_parameter() {
    // bitsandbytes' step calls torch.cuda.synchronize() after each parameter: the host's per
    // tensor work (AccumulateGrad, the update's dispatch, the synchronize: 3 dispatches) and
    // the kernels add up instead of overlapping. GPT-2 in fp32 with 8-bit AdamW has 148
    // trainable tensors: at 10 us per dispatch that is 148 x 3 x 10 us = 4.44 ms on top of the
    // kernel's 3.555 ms, after the backward pass has drained.
    let time = |optimizer| gpt2_fp32_step(optimizer, 1e9, 10e-6);
    let bnb = time(Optimizer::Adamw8bit);
    let fused = time(Optimizer::Adamw);
    // Up to the optimizer both steps are the same work, and at 1e9 B/s the GPU is far behind
    // the host when backward ends: fused AdamW's dispatches hide behind it, the 8-bit step's
    // host work waits for it and then alternates with its kernels.
    assert!((bnb.forward_seconds - fused.forward_seconds).abs() < 1e-12);
    assert!((bnb.backward_seconds - fused.backward_seconds).abs() < 1e-12);
    let expected = 148.0 * 3.0 * 10e-6 + bnb.optimizer_seconds - fused.optimizer_seconds;
    let got = bnb.step_seconds - fused.step_seconds;
    assert!((got - expected).abs() < 1e-9, "{got} vs {expected}");
    // The paged variant runs the same kernel and also prefetches both states of every tensor
    // of at least 1e5 elements before its update: wte, wpe and per block c_attn, c_proj, c_fc
    // and the MLP's c_proj weights, 2 + 4 x 12 = 50 tensors, 100 prefetches at 103 us.
    let paged = time(Optimizer::PagedAdamw8bit);
    let got = paged.step_seconds - bnb.step_seconds;
    assert!((got - 100.0 * 103e-6).abs() < 1e-9, "{got}");
}

#[test]
fn a_dropout_module_is_called_whether_or_not_it_drops() {
    // GPT-2 calls `nn.Dropout` modules: one module call and one `aten::dropout` dispatch each,
    // which with p = 0 returns its input and with p > 0 runs one `native_dropout` kernel (and
    // one backward kernel). So the published p = 0.1 and p = 0 cost the same module calls and
    // forward dispatches; only backward has a kernel more per dropout: per block after
    // attention and after the MLP (attention's own dropout runs inside the fused kernel), plus
    // the embeddings' once: 12 x 2 + 1 = 25.
    let with = model("gpt2");
    let mut without = with.clone();
    without.dropout = Default::default();
    let p = plan(Method::Full, Precision::MixedBf16, 1, 128, 0, false);
    let totals = |m: &ModelSpec| {
        let g = graph::build(m, &p);
        g.ops().fold((0u32, 0u32, 0u32), |(md, fw, bw), o| {
            let r = o.repeat.max(1);
            (
                md + o.cost.modules * r,
                fw + o.cost.forward_kernels * r,
                bw + o.cost.backward_kernels * r,
            )
        })
    };
    let (m1, f1, b1) = totals(&with);
    let (m0, f0, b0) = totals(&without);
    assert_eq!((m1, f1), (m0, f0));
    assert_eq!(b1 - b0, 25);
}

#[test]
fn a_llama_block_moves_the_backward_bytes_of_its_autograd_formulas() {
    // TinyLlama (hidden 2048, FFN 5632, 4 KV heads of 64) with a frozen bf16 base (adapters
    // train beside it), batch 1 x 1024: the non-matmul backward traffic of one repeated block,
    // per token, in bytes. A bf16 hidden element is 2 bytes, fp32 4, so per token:
    // - each RMSNorm (2): upcast's backward cast 2048 x 6; the norm's autograd 2048 x 78
    //   (weight-multiply gradient 4, cast 6, seventeen fp32 passes 68): 2 x 172,032;
    // - rotary: 14 passes of q (4,096 B) and of k (512 B): 64,512;
    // - attention core: its I/O twice (q, k, v, out: 4,096 + 512 + 512 + 4,096): 18,432;
    // - residual adds (2), each one accumulation, 3 x 4,096: 24,576;
    // - SiLU: gradient read, input read, gradient written, 3 x 11,264: 33,792;
    // - the gate multiply, both gradients: 6 x 11,264: 67,584;
    // - forks: q/k/v's input (2 adds) and gate/up's (1), 3 x 12,288: 36,864.
    // Sum: 589,824. A CPU dispatch trace of transformers' LlamaDecoderLayer (every aten op's
    // inputs and outputs, views free) reads 599,776, of which 9,216 are the CPU attention
    // kernel's GQA clones and 736 the row-sized rsqrt and mean gradients.
    let m = model("tinyllama-1.1b");
    let p = plan(
        Method::Adapter { size: 64 },
        Precision::Bf16,
        1,
        1024,
        0,
        false,
    );
    let g = ftplan::graph::build(&m, &p);
    let per_token: u64 = g
        .ops()
        .filter(|o| o.repeat > 1 && o.kind != ftplan::graph::op::OpKind::Matmul)
        .filter(|o| !g.name(o.name).contains("adapter"))
        .map(|o| o.cost.backward_bytes.0)
        .sum::<u64>()
        / 1024;
    assert_eq!(per_token, 589_824);
}

#[test]
fn granite_pays_for_its_three_multipliers_and_nothing_else() {
    // Granite is the Llama block plus three scalar multiplies (GraniteModel and
    // GraniteDecoderLayer in transformers): the embeddings once, each of the two residual
    // branches per layer, and the logits once. Read the same config as `llama` and the graphs
    // differ by exactly those ops. With a frozen bf16 base (LoRA) at batch 1 x 512, hidden 256,
    // 3 layers and a 1,000-token vocabulary, each multiply reads and writes its tensor once
    // forward (a bf16 hidden row is 512 B, a logits row 2,000 B):
    // - 1 + 2 x 3 = 7 hidden-sized multiplies: 7 x 512 x (512 + 512) = 3,670,016 B;
    // - the logits divide: 512 x (2,000 + 2,000) = 2,048,000 B.
    // Sum: 5,718,016 bytes more forward traffic, and 8 more ops.
    let config = |model_type: &str| {
        serde_json::json!({
            "model_type": model_type, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 1000, "tie_word_embeddings": true,
            "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
            "attention_multiplier": 0.015625, "logits_scaling": 8.0
        })
    };
    let read = |t: &str| {
        ftplan::spec::hf::parse_config("granite.json", &config(t), "granite", false)
            .expect("a Granite config reads")
    };
    let (granite, llama) = (read("granite"), read("llama"));
    assert_eq!(granite.multipliers.residual, 0.22);
    let p = plan(lora(8), Precision::Bf16, 1, 512, 0, false);
    let totals = |m: &ftplan::spec::model::ModelSpec| {
        let g = ftplan::graph::build(m, &p);
        let ops: u64 = g.ops().map(|o| u64::from(o.repeat.max(1))).sum();
        let bytes: u64 = g
            .ops()
            .map(|o| u64::from(o.repeat.max(1)) * o.cost.forward_bytes.0)
            .sum();
        (ops, bytes)
    };
    let ((ops_g, bytes_g), (ops_l, bytes_l)) = (totals(&granite), totals(&llama));
    assert_eq!(ops_g - ops_l, 8);
    assert_eq!(bytes_g - bytes_l, 5_718_016);
    // Same parameters, same trainable count.
    assert_eq!(
        run(&granite, &p, "h200").memory.trainable_params,
        run(&llama, &p, "h200").memory.trainable_params
    );
}

#[test]
fn smollm3_skips_rotary_on_its_nope_layers() {
    // SmolLM3Attention applies rotary only where `no_rope_layers[layer]` is 1; absent, every
    // fourth layer (`no_rope_layer_interval` 4) goes without. 8 layers: layers 3 and 7 skip it,
    // so 6 layers x (q, k) = 12 rotary ops, against 16 for the same config read as Llama.
    let config = |model_type: &str, extra: serde_json::Value| {
        let mut c = serde_json::json!({
            "model_type": model_type, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 1000, "tie_word_embeddings": true
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        c
    };
    let rotary_ops = |c: serde_json::Value| {
        let m =
            ftplan::spec::hf::parse_config("smollm3.json", &c, "smollm3", false).expect("reads");
        let p = plan(Method::Full, Precision::MixedBf16, 1, 256, 0, false);
        let g = ftplan::graph::build(&m, &p);
        g.ops()
            .filter(|o| g.name(o.name).contains("rotary"))
            .map(|o| u64::from(o.repeat.max(1)))
            .sum::<u64>()
    };
    let none = serde_json::json!({});
    assert_eq!(rotary_ops(config("smollm3", none.clone())), 12);
    assert_eq!(rotary_ops(config("llama", none)), 16);
    // An explicit list wins: only layer 0 without rotary.
    let list = serde_json::json!({"no_rope_layers": [0, 1, 1, 1, 1, 1, 1, 1]});
    assert_eq!(rotary_ops(config("smollm3", list)), 14);
    // A list that is not one 0 or 1 per layer is refused by field.
    let bad = serde_json::json!({"no_rope_layers": [1, 1, 2, 1, 1, 1, 1, 1]});
    let err = ftplan::spec::hf::parse_config("smollm3.json", &config("smollm3", bad), "s", false)
        .expect_err("2 is not 0 or 1");
    assert!(err.to_string().contains("no_rope_layers"), "{err}");
}

#[test]
fn attention_and_mlp_biases_follow_each_class() {
    // Which linears get a bias is each attention and MLP class's choice, not the config's
    // alone. Two layers of hidden 64, 4 heads of 16 over 2 KV heads, FFN 128, vocabulary 100:
    // the unbiased model has 86,848 parameters (Gemma's tied head: 80,448; Qwen3's and OLMo-2's
    // q/k norms add 64). Per layer, `attention_bias` puts q 64 + k 32 + v 32 + o 64 = 192 on
    // q, k, v and o (Llama, Qwen3, Gemma, OLMo-2, Granite: +384), Mistral ignores it; only
    // Llama's MLP (and Granite's) reads `mlp_bias`, gate 128 + up 128 + down 64 = 320 (+640);
    // Qwen2 always biases q, k and v (+256), never o. Every figure below is what transformers
    // 5.17's `AutoModelForCausalLM.from_config` builds for the same config.
    let count = |model_type: &str, extra: (&str, bool)| {
        let mut c = serde_json::json!({
            "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "head_dim": 16,
            "tie_word_embeddings": model_type.starts_with("gemma")
        });
        c[extra.0] = serde_json::Value::Bool(extra.1);
        let m = ftplan::spec::hf::parse_config("c.json", &c, model_type, false).expect("reads");
        let p = plan(Method::Full, Precision::MixedBf16, 1, 16, 0, false);
        run(&m, &p, "h200").memory.trainable_params
    };
    let (att, mlp) = (("attention_bias", true), ("mlp_bias", true));
    for (model_type, with_att, with_mlp) in [
        ("llama", 87_232, 87_488),
        ("granite", 87_232, 87_488),
        ("qwen3", 87_296, 86_912),
        ("olmo2", 87_424, 87_040),
        ("gemma", 80_832, 80_448),
        ("qwen2", 87_104, 87_104),
        ("mistral", 86_848, 86_848),
    ] {
        assert_eq!(
            count(model_type, att),
            with_att,
            "{model_type} attention_bias"
        );
        assert_eq!(count(model_type, mlp), with_mlp, "{model_type} mlp_bias");
    }
}

#[test]
fn eager_masks_stay_to_the_end_of_a_checkpointed_backward() {
    // Eager attention gets one materialised additive mask per mask type (transformers'
    // `eager_mask`: batch x 1 x q x k in the embeddings' dtype), and every checkpointed block
    // keeps it as an input until its backward. EXAONE-4-like: a sliding and a full layer, so two
    // masks; frozen bf16 base, batch 2 x 256: 2 masks x 2 x 256 x 256 x 2 bytes = 524,288.
    // With SDPA (no mask below the window) or without checkpointing nothing keeps them.
    let c = serde_json::json!({
        "model_type": "exaone4", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 1000, "sliding_window": 4096,
        "layer_types": ["sliding_attention", "full_attention"]
    });
    let m = ftplan::spec::hf::parse_config("exaone.json", &c, "exaone", false).expect("reads");
    // EXAONE-4: rotary on its windowed layer only.
    assert_eq!(m.rope_layers, vec![true, false]);
    let kept = |attention: AttentionKernel, gc: bool| {
        let mut p = plan(lora(8), Precision::Bf16, 2, 256, 0, gc);
        p.attention = attention;
        let g = ftplan::graph::build(&m, &p);
        g.ops()
            .filter(|o| g.name(o.name).contains("attention_masks"))
            .flat_map(|o| o.saves.iter().map(|t| g.tensors[t.0 as usize].bytes.0))
            .sum::<u64>()
    };
    assert_eq!(kept(AttentionKernel::Eager, true), 524_288);
    assert_eq!(kept(AttentionKernel::Sdpa, true), 0);
    assert_eq!(kept(AttentionKernel::Eager, false), 0);
}

#[test]
fn the_host_time_is_the_dispatches_and_module_calls_it_reports() {
    // TinyLlama (22 blocks), LoRA r16 on a frozen bf16 base, batch 1 x 128, no checkpointing:
    // the host time is exactly dispatches x the dispatch cost + module calls x the module cost.
    // LoRA on all seven projections instead of q and v adds 5 targets per block, each calling
    // its `lora_A` and `lora_B` modules: 22 x 5 x 2 = 220 more module calls.
    let m = model("tinyllama-1.1b");
    let hw = h200();
    let rates = ftplan::time::Rates {
        launch_overhead: 15e-6,
        module_overhead: 90e-6,
        ..h200_rates()
    };
    let time = |targets: LoraTargets| {
        let method = Method::Lora(Lora {
            rank: 16,
            alpha: 32.0,
            targets,
            dora: false,
        });
        let p = plan(method, Precision::Bf16, 1, 128, 0, false);
        ftplan::estimate::estimate(&m, &p, &hw, &rates)
            .expect("estimates")
            .time
    };
    let (qv, all) = (time(LoraTargets::QueryValue), time(LoraTargets::AllLinear));
    for t in [qv, all] {
        let host = t.host_dispatches * 15e-6 + t.host_module_calls * 90e-6;
        assert!((t.host_seconds - host).abs() < 1e-9, "{t:?}");
        assert!(
            t.host_dispatches > 1000.0 && t.host_module_calls > 200.0,
            "{t:?}"
        );
    }
    assert_eq!(all.host_module_calls - qv.host_module_calls, 220.0);
}

#[test]
fn t5_and_bart_eager_softmax_keeps_the_scores_dtype_without_autocast() {
    // transformers 5.17's `eager_attention_forward` for T5 and the BART family calls
    // `softmax(attn_weights, dim=-1)` with no dtype (Llama's asks for fp32). Under autocast
    // softmax is on the fp32 list; a bf16 module without autocast (pure bf16, FSDP's
    // MixedPrecisionPolicy) keeps bf16 probabilities and no cast copy. T5-base, full bf16,
    // batch 2 x 64 source tokens, one encoder self-attention (12 heads of 64): q, k and v are
    // 2 x 64 x 768 x 2 B = 196,608 B each; the probabilities 2 x 12 x 64 x 64 = 98,304
    // elements, 196,608 B in bf16. Saved: 4 x 196,608 = 786,432 B. (Read as fp32 with a bf16
    // copy kept by the matmul with v, as before: 3 x 196,608 + 393,216 + 196,608.)
    // Measured: T5-base full eager over 4 FSDP2 ranks replayed at 3.49 GiB, estimated 5.03
    // with fp32 probabilities, 3.55 now (validation/fsdp.jsonl, split probe6).
    let mut m = model("t5-base");
    m.dropout = Default::default(); // the published 0.1 would keep a mask and the dropped copy
    let mut p = plan(Method::Full, Precision::Bf16, 2, 64, 16, false);
    p.attention = AttentionKernel::Eager;
    let g = graph::build(&m, &p);
    assert_eq!(saved(&g, "encoder.layers.1+10.self_attn.core"), 786_432);
    // The same shapes read as Llama (which softmaxes in fp32) keep the fp32 matrix and its copy.
    let mut llama = m.clone();
    llama.family = ftplan::spec::model::Family::Llama;
    let g = graph::build(&llama, &p);
    assert_eq!(
        saved(&g, "encoder.layers.1+10.self_attn.core"),
        3 * 196_608 + 393_216 + 196_608
    );
}

#[test]
fn element_wise_kernels_run_at_their_loops_measured_rates() {
    // TinyLlama in pure bf16, one sequence of 128 tokens, on a GPU copying 1e12 B/s. One
    // (128, 2048) bf16 activation is 524,288 bytes. Each op's time is its bytes over the copy
    // rate times its loop's efficiency (validation/kbench-h200.json), but never less than
    // 1.3 us per kernel.
    let m = model("tinyllama-1.1b");
    let p = plan(Method::Full, Precision::Bf16, 1, 128, 0, false);
    let g = ftplan::graph::arch::build(&m, &p);
    let rates = ftplan::time::Rates {
        copy_bandwidth: 1e12,
        ..h200_rates()
    };
    let time = |suffix: &str| {
        let op = op_named(&g, &format!("decoder.layers.0.{suffix}"));
        ftplan::time::op_seconds(op, &rates)
    };
    let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    // The residual add reads two activations and writes one (1,572,864 bytes) with the
    // vectorized loop: / 0.94e12 = 1.673 us.
    close(time("self_attn.residual").0, 1_572_864.0 / 0.94e12);
    // The RMSNorm's upcast writes fp32 from bf16 (same bytes) through the dynamic-cast loop,
    // / 0.44e12 = 3.575 us; its backward narrows the gradient back with the vectorized one.
    let (up, down) = time("input_layernorm.upcast");
    close(up, 1_572_864.0 / 0.44e12);
    close(down, 1_572_864.0 / 0.94e12);
    // Rotary on q: ten passes over (128, 2048) bf16 on a transposed view, 5,242,880 bytes
    // through the strided loop, / 0.33e12 = 15.89 us (its seven kernels' floor is 9.1 us).
    close(time("self_attn.rotary_q").0, 5_242_880.0 / 0.33e12);
    // Rotary on k (4 KV heads: 655,360 bytes) would take 1.99 us at that rate, but seven
    // kernels hold the GPU at least 7 x 1.3 = 9.1 us.
    close(time("self_attn.rotary_k").0, 7.0 * 1.3e-6);
    // The norm's own kernels after the upcast, each at its loop's rate (n = 262,144): pow and
    // the cast down contiguous (14n bytes, / 0.94e12), mean a row sum (4n, / 0.7e12), the rsqrt
    // and weight multiplies broadcast (2n elements at 12.5 copied bytes each): 11.96 us, over
    // its seven kernels' 9.1 (the upcast is the eighth, its own op).
    let n = 262_144.0;
    close(
        time("input_layernorm").0,
        14.0 * n / 0.94e12 + 2.0 * n * 12.5 / 1e12 + 4.0 * n / 0.7e12,
    );
}

#[test]
fn qlora_pays_python_for_each_4bit_matmul_both_ways() {
    // bitsandbytes' `matmul_4bit` is a Python `autograd.Function` (`MatMul4Bit`) that calls
    // `F.dequantize_4bit` in each pass: two layers of Python forward and two backward, each
    // about an `nn.Module` call's host time. Llama-2-7B has 7 x 32 = 224 linears, all 4-bit
    // under QLoRA: 224 forward uses, and 221 backward ones (layer 0's q, k and v projections
    // read the frozen embeddings' output, which needs no gradient, so autograd builds no node
    // for them): 2 x 445 = 890 module calls more than LoRA's.
    let m = model("llama2-7b");
    let calls = |method: Method| {
        let p = plan(method, Precision::Bf16, 1, 512, 0, false);
        run(&m, &p, "h200").time.host_module_calls
    };
    let Method::Lora(adapter) = lora(16) else {
        unreachable!("lora() builds LoRA")
    };
    assert_eq!(calls(Method::Qlora(adapter)) - calls(lora(16)), 890.0);
}

#[test]
fn unfused_attention_runs_its_products_then_its_score_passes() {
    // TinyLlama with eager attention in pure bf16, one sequence of 512 tokens: 32 heads x
    // 512 x 512 = 8,388,608 scores, each a 64-long dot product for q k^T and another for the
    // weighted sum of v: 2 x 8,388,608 x 128 = 2,147,483,648 FLOPs forward (eager masks the
    // future but computes it), and backward four products (dV, dP, dQ, dK) where flash's
    // recomputation would make five: 4,294,967,296.
    let m = model("tinyllama-1.1b");
    let p = Plan {
        attention: ftplan::spec::plan::AttentionKernel::Eager,
        ..plan(Method::Full, Precision::Bf16, 1, 512, 0, false)
    };
    let g = ftplan::graph::arch::build(&m, &p);
    let op = g
        .ops()
        .find(|o| o.kind == ftplan::graph::op::OpKind::Attention)
        .expect("attention");
    assert_eq!(op.cost.forward_flops.0, 2_147_483_648.0);
    assert_eq!(op.cost.input_grad_flops.0, 4_294_967_296.0);
    // On a GPU whose bf16 GEMMs run 1e12 FLOP/s and whose copies move 1e12 B/s, the products
    // take 2.15 ms, and then the score matrix's passes (fp32, four of them: 134 MB and more)
    // go through row-wise kernels at 0.53e12 B/s: the two add up, they do not overlap as a
    // fused kernel's would.
    let (forward, _) = ftplan::time::op_seconds(op, &round_rates());
    assert!(op.cost.forward_bytes.0 >= 4 * 4 * 8_388_608);
    let want = 2_147_483_648.0 / 1e12 + op.cost.forward_bytes.0 as f64 / 0.53e12;
    assert!((forward - want).abs() < 1e-12, "{forward} vs {want}");
}

#[test]
fn fused_attention_with_dropout_runs_at_its_profiled_rate() {
    // GPT-2 in pure bf16, one causal sequence of 128 tokens: 12 heads x 128 x 128 scores, half
    // of them computed, two 64-long products each: 2 x 196,608 x 128 / 2 = 25,165,824 FLOPs
    // forward. On a GPU whose bf16 GEMMs run 1e12 FLOP/s the fused kernel takes them at 0.35
    // of that (71.9 us); drawing dropout's random numbers per score, at 0.24 (104.9 us).
    let rates = round_rates();
    let forward = |p_drop: f64| {
        let mut m = model("gpt2");
        m.dropout.attention = p_drop;
        let g =
            ftplan::graph::arch::build(&m, &plan(Method::Full, Precision::Bf16, 1, 128, 0, false));
        let op = g
            .ops()
            .find(|o| o.kind == ftplan::graph::op::OpKind::Attention)
            .expect("attention");
        assert_eq!(op.cost.forward_flops.0, 25_165_824.0);
        ftplan::time::op_seconds(op, &rates).0
    };
    assert!((forward(0.0) - 25_165_824.0 / 0.35e12).abs() < 1e-12);
    assert!((forward(0.1) - 25_165_824.0 / 0.24e12).abs() < 1e-12);
}

#[test]
fn qlora_under_mixed_fp16_computes_in_fp16_as_the_t4_recipe_does() {
    // The QLoRA recipe for GPUs without bf16 (T4, V100) sets bitsandbytes' compute dtype to fp16
    // and trains under fp16 autocast with a GradScaler. Every 4-bit projection's matmul then
    // runs in fp16 (the T4's tensor cores: 65 TFLOP/s) instead of bf16, which a T4 runs at its
    // fp32 rate (8.1 TFLOP/s); the dequantized weight is the same two bytes per element, so
    // memory is unchanged. Llama-2-7B, LoRA r16 on q and v, batch 4 x 1024, checkpointing.
    let m = model("llama2-7b");
    let run_on = |precision| {
        let p = plan(lora(16), precision, 4, 1024, 0, true);
        let p = Plan {
            method: match p.method {
                Method::Lora(l) => Method::Qlora(l),
                other => other,
            },
            ..p
        };
        let g = graph::arch::build(&m, &p);
        let dtypes: Vec<DType> = g
            .ops()
            .filter(|o| g.name(o.name).ends_with("self_attn.q_proj"))
            .map(|o| o.compute)
            .collect();
        (dtypes, run(&m, &p, "t4"))
    };
    let (bf16_ops, bf16) = run_on(Precision::Bf16);
    let (fp16_ops, fp16) = run_on(Precision::MixedFp16);
    assert!(
        !fp16_ops.is_empty() && fp16_ops.iter().all(|&d| d == DType::F16),
        "{fp16_ops:?}"
    );
    assert!(
        !bf16_ops.is_empty() && bf16_ops.iter().all(|&d| d == DType::Bf16),
        "{bf16_ops:?}"
    );
    assert_eq!(fp16.memory.peak, bf16.memory.peak);
    // GEMM-bound: about the 8x of the rates, less the memory-bound kernels that do not change
    // (32.1 s against 7.6 s).
    let ratio = bf16.time.step_seconds / fp16.time.step_seconds;
    assert!(ratio > 3.0 && ratio < 8.1, "{ratio}");
}

#[test]
fn a_checkpointed_frozen_seq2seq_keeps_its_embedding_leaf_and_the_encoder_output() {
    // BART-large (the harness's dropout-free config) with bottleneck adapters of 64, batch 8,
    // 512 source and 128 target tokens, bf16 base under autocast, checkpointing
    // (validation/sweep.jsonl). Two things live through backward that the walk had dropped:
    // - `enable_input_require_grads` makes each input-embedding lookup's bf16 output a leaf
    //   that requires grad (encoder 8 x 512 x 1,024 x 2 = 8,388,608 B, decoder 8 x 128 x 1,024
    //   x 2 = 2,097,152), held by its AccumulateGrad node; from it on `layernorm_embedding`
    //   records autograd and saves its fp32 input (16,777,216 and 4,194,304) and its fp32 mean
    //   and rstd (8 x 512 x 4 x 2 = 32,768 and 8,192);
    // - every decoder block's checkpoint holds the encoder's fp32 output (16,777,216) as an
    //   input, where the cross-attention's projections inside save only their bf16 casts.
    // Together 48,275,456 B at the loss's backward, the peak: the estimate moved from
    // 1,719,959,936 to 1,768,235,392 B (H200 less its two cuBLAS workspaces, as the CPU
    // replay has none); a dispatch-level tracker of the replay without module hooks peaked at
    // 1,768,524,346 there (-0.02 %). Both then kept the loss's log-probabilities in fp32, as
    // CPU autocast does; with CUDA's cross entropy (16-bit log-probabilities and nll_loss's
    // fp32 copy, one bf16 logits tensor less: 8 x 128 x 50,265 x 2 = 102,942,720 B) the
    // replay peaks at 1,665,581,630 and the estimate at 1,665,292,672.
    let row = sweep_run("bart-large|adapter|b8|s(512, 128)|gc1|sdpa");
    assert_eq!(row.measured_peak, 1_665_581_630);
    assert_eq!(row.estimated_peak, 1_719_959_936 + 48_275_456 - 102_942_720);
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    assert_eq!(
        saved(&g, "encoder.embed_tokens.input_require_grads"),
        8_388_608
    );
    assert_eq!(
        saved(&g, "decoder.embed_tokens.input_require_grads"),
        2_097_152
    );
    // Each decoder block's checkpoint keeps its hidden input, fp32 (8 x 128 x 1,024 x 4 =
    // 4,194,304: under autocast BART's post-norm blocks hand on LayerNorm's fp32 output), and
    // the encoder output.
    let markers = checkpoint_inputs(&g);
    assert_eq!(
        markers.last().expect("checkpointed"),
        &vec![4_194_304, 16_777_216]
    );
    // Without checkpointing, or with the embeddings training, no leaf is made.
    for p in [
        Plan {
            grad_ckpt: false,
            ..row.plan.clone()
        },
        Plan {
            method: Method::Full,
            precision: Precision::MixedBf16,
            ..row.plan.clone()
        },
    ] {
        let g = ftplan::graph::arch::build(&row.model, &p);
        assert!(
            !g.ops()
                .any(|o| g.name(o.name).ends_with("input_require_grads")),
            "{p:?}"
        );
    }
}

#[test]
fn checkpointed_t5_keeps_its_position_biases_and_its_math_backward_holds_three_score_matrices() {
    // T5-base with LoRA r16 on q/v over a frozen bf16 base, batch 16, 512 + 128 tokens, bf16
    // autocast, checkpointing (validation/sweep.jsonl), replayed without module hooks
    // (validation/peak_live.py): at its peak the encoder's position bias, a (512, 512, 12) bf16
    // lookup (6,291,456 B), the decoder's (128, 128, 12) (393,216) and the cross-attention's
    // zeros bias (1, 12, 128, 512) bf16 (1,572,864) are alive: T5Stack hands them to every
    // block, whose checkpoint holds them.
    let row = sweep_run("t5-base|lora|b16|s(512, 128)|gc1|sdpa|r16|qv");
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let markers = checkpoint_inputs(&g);
    // An encoder block keeps its bf16 input (16 x 512 x 768 x 2 = 12,582,912) and the bias.
    assert_eq!(markers[0], vec![12_582_912, 6_291_456]);
    // A decoder block: its input (16 x 128 x 768 x 2 = 3,145,728), the encoder output
    // (12,582,912), its own bias and the cross-attention's zeros.
    assert_eq!(
        markers.last().expect("decoder blocks"),
        &vec![3_145_728, 12_582_912, 393_216, 1_572_864]
    );
    // The strided bias sends SDPA down its math path. Its backward holds the saved fp32
    // probabilities with dP and dS, two more fp32 score matrices (16 x 12 x 512 x 512 x 4 =
    // 201,326,592 each). The product with v has run its backward: v's fp32 gradient (16 x 512 x
    // 768 x 4 = 25,165,824) exists, the output's gradient is gone, q's and k's are still to
    // come, and v's fp32 copy (25,165,824) is freed; the forward's boolean `-inf` test is not
    // alive: 25,165,824 + 402,653,184 - 25,165,824 = 402,653,184.
    let core = op_named(&g, "encoder.layers.0.self_attn.core");
    assert_eq!(core.backward_transient.0, 402_653_184);
    // Beside it, the residual keeps the attention's output gradient for the block's input
    // (`Builder::residual`), bf16 like the stream: 12,582,912, from `o_proj`'s backward (the
    // branch's last op, which took it in) to the block's first op (its checkpoint marker); and
    // the MLP's residual the same from `fc2`'s backward to its norm.
    let held = |name: &str| -> Vec<u64> {
        op_named(&g, name)
            .grads
            .iter()
            .map(|&t| g.tensor(t).bytes.0)
            .collect()
    };
    assert_eq!(held("encoder.layers.0.self_attn.o_proj"), [12_582_912]);
    assert_eq!(held("encoder.layers.0.mlp.fc2"), [12_582_912]);
    // Its forward: while `_safe_softmax` runs, the scores (201,326,592) and `isneginf`'s boolean
    // (16 x 12 x 512 x 512 = 50,331,648) live beside the probabilities it keeps; `where_out`
    // zeroes masked rows in the softmax's own output (a CPU profile of the call shows `where`
    // allocating nothing). With the op's bf16 output (12,582,912): 264,241,152.
    assert_eq!(core.forward_transient.0, 264_241_152);
    // The run peaks at the loss; the estimate equals the hook-free replay's peak within 0.1 %.
    within(&row, 0.001);
    // With adapters over 8 ranks (sharded weights, so activations dominate) the estimate had
    // peaked in the last encoder block's forward, one score matrix too high (+2.5 %); it now
    // peaks in backward, as the replay does, within 1 %.
    let fsdp = shipped_run(
        "validation/fsdp.jsonl",
        "t5-base|adapter|b16|s(512, 128)|gc1|sdpa|fsdp|w8",
    );
    within(&fsdp, 0.01);
}

#[test]
fn t5_accumulates_its_position_bias_gradient_across_the_blocks_that_read_it() {
    // T5Stack hands the first block's position bias to every block. Each block's attention adds
    // its bias gradient (the scores' gradient summed over the batch) to the one autograd sums in
    // the InputBuffer of the first block's lookup: alive from the last block's attention
    // backward to the first's. The decoder's cross-attention zeros, a leaf with requires_grad
    // under checkpointing, is kept by its AccumulateGrad node to the end of backward, and so is
    // its .grad. T5-base full fine-tuning (fp32 table, bf16 autocast), batch 8, 1,024 + 256
    // tokens, checkpointing, replayed without hooks (validation/peak_live.py), peaks at the
    // first encoder block's softmax backward with all three alive:
    // - the encoder's bias gradient, (1, 12, 1,024, 1,024) fp32: 50,331,648 B;
    // - the zeros and their gradient, (1, 12, 256, 1,024) bf16: 6,291,456 B each.
    let row = shipped_run(
        "validation/outliers.jsonl",
        "t5-base|full|b8|s(1024, 256)|gc1|sdpa",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let grads = |name: &str| -> Vec<(u64, bool)> {
        op_named(&g, name)
            .grads
            .iter()
            .map(|&t| (g.tensor(t).bytes.0, g.tensor(t).graph_held))
            .collect()
    };
    // Every self-attention adds to the encoder's sum (the first block and the other eleven).
    // Beside it, q's and k's gradients (8 x 1,024 x 768 x 2 B = 12,582,912 each) wait for their
    // projections' backward from the core's (`Builder::await_grads`); v's projection is the
    // op right before the core.
    let qk = (12_582_912, false);
    assert_eq!(
        grads("encoder.layers.0.self_attn.core"),
        [(50_331_648, false), qk, qk]
    );
    assert_eq!(
        grads("encoder.layers.1+10.self_attn.core"),
        [(50_331_648, false), qk, qk]
    );
    assert_eq!(
        grads("decoder.layers.1+10.cross_attn.core"),
        [(6_291_456, true)]
    );
    // The estimate was 59,813,384 B under the replay (-1.2 %); the three add 62,914,560, counted
    // once however many blocks add to them, and leave it 3,101,176 B (+0.06 %) over.
    let h200 = ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value;
    let memory = ftplan::memory::estimate(&g, &row.plan, &h200);
    assert_eq!(memory.peak_op, "encoder.layers.0.self_attn.core");
    assert_eq!(row.estimated_peak - row.measured_peak, 3_101_176);
    // Frozen, the table gets no gradient and nothing accumulates: LoRA on q and v, where only
    // q's and k's waiting gradients are held at each self-attention.
    let lora = sweep_run("t5-base|lora|b16|s(512, 128)|gc1|sdpa|r16|qv");
    let g = ftplan::graph::arch::build(&lora.model, &lora.plan);
    assert!(
        g.ops()
            .filter(|o| g.name(o.name).contains("self_attn.core"))
            .all(|o| o.grads.len() == 2)
    );
}

#[test]
fn repeat_kv_from_one_kv_head_is_a_view_that_only_autocast_copies() {
    // transformers' SDPA path passes `enable_gqa` only with no mask and heads at most 256 wide
    // (`use_gqa_in_sdpa`); otherwise `repeat_kv` (`expand(...).reshape(...)`) repeats keys and
    // values for every head. From one KV head the size-1 dimension merges with the expanded one
    // into a stride-0 view: no copy, and the kernel keeps the view. Autocast's cast of an fp32
    // view writes every head. Gemma 4 E2B's widths (8 heads, 1 KV head of 256, 512 in the global
    // layers, 2,048 tokens; layers 0-4 own their keys, 5-9 share them), per layer's attention:
    let rows = crate::shipped_rows("validation/families.jsonl");
    let row = |run: &str| {
        rows.iter()
            .find(|r| r.name == run)
            .expect("the run is in the file")
    };
    let saves = |run: &str, op: &str| -> Vec<u64> {
        let row = row(run);
        let g = ftplan::graph::arch::build(&row.model, &row.plan);
        op_named(&g, op)
            .saves
            .iter()
            .map(|&t| g.tensor(t).bytes.0)
            .collect()
    };
    // LoRA over a bf16 base, batch 4: a sliding layer keeps q (4 x 2,048 x 8 x 256 x 2 =
    // 33,554,432), k and v as the one head's views (4 x 2,048 x 256 x 2 = 4,194,304 each), the
    // logsumexp (4 x 8 x 2,048 x 4 = 262,144), the output and the additive window mask (4 x
    // 2,048 x 2,048 x 2): each 33,554,432.
    let lora = "gemma-4-e2b-10l|lora|b4|s2048|gc0|sdpa|r16|all";
    assert_eq!(
        saves(lora, "decoder.layers.0.self_attn.core"),
        [
            33_554_432, 4_194_304, 4_194_304, 262_144, 33_554_432, 33_554_432
        ]
    );
    // Full fine-tuning under autocast, batch 1: the rotary tables are fp32, so the keys are, and
    // the cast writes all 8 heads (1 x 2,048 x 8 x 256 x 2 = 8,388,608); the values (bf16 out of
    // their norm) stay a view (1,048,576). A global layer has no mask but 512-wide heads, so it
    // repeats too (16,777,216); a shared layer casts the earlier layer's keys again, and its
    // values are that layer's (counted there).
    let full = "gemma-4-e2b-10l|full|b1|s2048|gc0|sdpa";
    assert_eq!(
        saves(full, "decoder.layers.0.self_attn.core"),
        [
            8_388_608, 8_388_608, 1_048_576, 65_536, 8_388_608, 8_388_608
        ]
    );
    assert_eq!(
        saves(full, "decoder.layers.4.self_attn.core"),
        [16_777_216, 16_777_216, 2_097_152, 65_536, 16_777_216]
    );
    assert_eq!(
        saves(full, "decoder.layers.5+3.self_attn.core"),
        [8_388_608, 8_388_608, 0, 65_536, 8_388_608, 8_388_608]
    );
    // The replays without hooks agree within 0.1 % (LoRA had been +1.1 %, Gemma 4 31B's LoRA
    // runs -0.7 %, Gemma-2B's prefix tuning +1.7 %).
    for run in [
        lora,
        full,
        "gemma-4-31b-6l|lora|b2|s2048|gc0|sdpa|r16|qv",
        "gemma-4-31b-6l|lora|b2|s2048|gc0|sdpa|r16|all",
    ] {
        let row = row(run);
        within(row, 0.001);
    }
    let prefix = sweep_run("gemma-2b|prefix|b2|s1024|gc0|sdpa");
    within(&prefix, 0.001);
    // Eager attention's `matmul` folds batch and heads into one `bmm` batch: at batch 1 a single
    // KV head folds as a view too. Falcon-7B (71 heads over one KV head of 64), adapters, 1 x
    // 1,024 tokens: each layer had been charged keys and values for all 71 heads (1 x 1,024 x
    // 4,544 x 2 = 9,306,112 B each, 2 x 31 x that = 576,978,944 B over the 31 layers whose
    // attention backward reaches) and read +1.82 %; the replay keeps the one head.
    let falcon = sweep_run("falcon-7b|adapter|b1|s1024|gc0|eager");
    within(&falcon, 0.001);
}

#[test]
fn a_head_major_query_makes_the_attention_output_a_copy_the_output_projection_keeps() {
    // transformers' attention functions end in `attn_output.transpose(1, 2).contiguous()`.
    // FlashAttention and cuDNN write the output in q's memory layout (`empty_like`,
    // `alloc_with_matching_layout`), and so does the CPU kernel. A q that a projection's view
    // made is token-major, and the transpose is then free. Partial rotary rebuilds q with
    // `cat((q_rot, q_pass), -1)`, a head-major tensor, and the copy is a new tensor.
    // Pythia-1B (GPT-NeoX, rotary on a quarter of each head), full fine-tuning, batch 4 x 1,024,
    // hidden 2,048: per layer a bf16 copy of 4 x 1,024 x 2,048 x 2 = 16,777,216 B, kept by
    // `dense` beside the output SDPA saved. That is 16 x 16,777,216 = 268,435,456 B in all,
    // which the estimate had missed (-268,402,952 B against the hook-free replay, -1.24 %).
    let row = shipped_run(
        "validation/families.jsonl",
        "pythia-1b|full|b4|s1024|gc0|sdpa",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let copy = op_named(&g, "decoder.layers.1+14.attn.core.out_copy");
    assert_eq!(copy.forward_transient.0, 16_777_216);
    // Since the stack's rotary tables are counted (cos and sin, 1,024 x 64 fp32 each: 524,288
    // B), the estimate is 556,792 B (0.003 %) over the replay.
    assert_eq!(row.estimated_peak - row.measured_peak, 556_792);
    // Llama's full rotary keeps q token-major: no copy.
    let tiny = model("tinyllama-1.1b");
    let g = ftplan::graph::arch::build(
        &tiny,
        &plan(Method::Full, Precision::MixedBf16, 4, 512, 0, false),
    );
    assert!(g.ops().all(|o| !g.name(o.name).ends_with("out_copy")));
}

#[test]
fn a_rotary_that_concatenates_makes_q_head_major_even_over_the_whole_head() {
    // Phi-3's `apply_rotary_pos_emb` returns `torch.cat([q_rot * cos + rotate_half(q_rot) *
    // sin, q_pass], dim=-1)` whatever `partial_rotary_factor` is; at 1.0 `q_pass` is empty,
    // but `cat` still writes a new tensor in the default format: head-major. Phi-3-mini
    // (32 layers, hidden 3,072) full fine-tuning, batch 2 x 1,024: per layer the attention
    // output's bf16 copy, 2 x 1,024 x 3,072 x 2 = 12,582,912 B, kept by `o_proj` beside the
    // output SDPA saved; 32 x 12,582,912 = 402,653,184 B, the whole of what the estimate had
    // missed against the hook-free replay (-402,923,912 B, -0.62 %; over 8 FSDP ranks -2.30 %).
    let row = shipped_run(
        "validation/families.jsonl",
        "phi-3-mini|full|b2|s1024|gc0|sdpa",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let copy = op_named(&g, "decoder.layers.1+30.self_attn.core.out_copy");
    assert_eq!(copy.forward_transient.0, 12_582_912);
    // The stack's rotary tables (cos and sin, 1,024 x 96 fp32 each: 786,432 B) leave the
    // estimate 515,704 B (0.001 %) over the replay.
    assert_eq!(row.estimated_peak - row.measured_peak, 515_704);
    // The `cat` is one more copy kernel on each of q and k: the sum and the copy (fp32 under
    // autocast, the tables being fp32) alive together, 2 x 2 x 1,024 x 3,072 x 4 B.
    let rotary = op_named(&g, "decoder.layers.1+30.self_attn.rotary_q");
    assert_eq!(rotary.cost.forward_kernels, 8);
    assert_eq!(rotary.forward_transient.0, 50_331_648);
    let fsdp = shipped_run(
        "validation/fsdp.jsonl",
        "phi-3-mini|full|b2|s1024|gc0|sdpa|fsdp|w8",
    );
    within(&fsdp, 0.001);
    // Phi-4-mini is a `phi3` config rotating three quarters of each head
    // (`partial_rotary_factor` 0.75, which Phi3RotaryEmbedding reads): the same `cat`.
    let config = serde_json::json!({
        "model_type": "phi3", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "partial_rotary_factor": 0.75
    });
    let mini = ftplan::spec::hf::parse_config("config.json", &config, "toy", false).expect("reads");
    assert_eq!(
        mini.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 0.75 }
    );
    let g = graph::build(
        &mini,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 0, false),
    );
    assert!(g.ops().any(|o| g.name(o.name).ends_with("out_copy")));
    // GPT-NeoX's `cat` is unconditional too: a Pythia-1B config rotating whole heads (as
    // transformers 5 saves it, `rope_parameters.partial_rotary_factor`) replays with one
    // (4, 1,024, 8, 256) bf16 clone per layer, 16 x 16,777,216 B, as at a quarter.
    let neox = serde_json::json!({
        "model_type": "gpt_neox", "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    });
    let neox = ftplan::spec::hf::parse_config("config.json", &neox, "toy", false).expect("reads");
    assert_eq!(
        neox.positions,
        ftplan::spec::model::Positions::Rotary { fraction: 1.0 }
    );
    let g = graph::build(
        &neox,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 0, false),
    );
    assert!(g.ops().any(|o| g.name(o.name).ends_with("out_copy")));
    within(
        &shipped_run(
            "validation/families.jsonl",
            "pythia-1b-fullrot|full|b4|s1024|gc0|sdpa",
        ),
        0.001,
    );
    // Phi-3.5-MoE's (PhiMoE's) rotary is Llama's: q stays token-major.
    let moe = model("phi-3.5-moe");
    let g = ftplan::graph::arch::build(
        &moe,
        &plan(Method::Full, Precision::MixedBf16, 1, 512, 0, false),
    );
    assert!(g.ops().all(|o| !g.name(o.name).ends_with("out_copy")));
}

#[test]
fn a_tied_embedding_read_uncast_by_its_head_sums_its_two_gradients_out_of_place() {
    // GPT-2 (tied wte, 50,257 x 768), batch 1, 128 tokens: backward ends at the input
    // embedding's backward, with every gradient held, where the head's gradient of the tied
    // weight meets the lookup's. The H200's temporaries there are its two cuBLAS workspaces
    // (2 x 32 MiB = 67,108,864 B), the gradient coming into the lookup (128 x 768 in the
    // compute dtype) and the weight's second gradient, 50,257 x 768 elements:
    // - pure bf16: the head reads the weight uncast, so its gradient is the transpose view of
    //   an mm product and autograd's InputBuffer adds the lookup's into it out of place: the
    //   second gradient and their sum, 2 x 77,194,752 B, with 196,608 B coming in:
    //   154,389,504 + 67,108,864 + 196,608 = 221,694,976;
    // - mixed bf16: the head reads autocast's bf16 copy, so the fp32 gradient comes fresh out of
    //   the cast's backward and the sum goes into it: one fp32 gradient, 154,389,504 B, with
    //   393,216 coming in: 154,389,504 + 67,108,864 + 393,216 = 221,891,584.
    let gpt2 = model("gpt2");
    for (precision, temporary) in [
        (Precision::Bf16, 221_694_976),
        (Precision::MixedBf16, 221_891_584),
    ] {
        let est = run(
            &gpt2,
            &plan(Method::Full, precision, 1, 128, 0, false),
            "h200",
        );
        assert_eq!(est.memory.peak_op, "decoder.embed_tokens", "{precision:?}");
        assert_eq!(est.memory.at_peak.temporary.0, temporary, "{precision:?}");
    }
    // Replayed on the CPU, BART-large in pure bf16 (a weight shared by the head and both
    // stacks' lookups) peaked at the first sum, its decoder's lookup, with the head's gradient,
    // the lookup's and their sum alive (50,265 x 1,024 x 2 = 102,942,720 B each); the third,
    // the encoder's lookup, adds into that sum in place. With the sum the estimate moved from
    // -2.07 % to -0.36 %.
    let row = sweep_run("bart-large|full_bf16|b4|s(512, 128)|gc0|eager");
    within(&row, 0.005);
}

#[test]
fn the_replays_sum_gradients_as_the_engine_does_on_real_tensors() {
    // Autograd sums the gradients of a value read twice in its InputBuffer, in place only into a
    // plain tensor it holds the last reference to (`can_accumulate_inplace`); a FakeTensor, or
    // any tensor while a TorchDispatchMode such as MemTracker is on, always gets `old + new`.
    // Gemma 4 31B at 6 layers, full fine-tuning under bf16 autocast, ends its backward by
    // summing the tied embedding's two fp32 gradients (262,144 x 5,376 x 4 = 5,637,144,576 B
    // each): MemTracker's replay held a third for the sum and peaked there, at 80,683,859,296 B.
    // peak_live.py, counting that sum as written into the head's gradient (the cast's fresh
    // output), peaks at the start of backward instead, at 75,720,937,824; ftplan's estimate
    // (which adds in place) is within 0.2 % of it, where it was 6.3 % under the tracker's figure.
    let rows = crate::shipped_rows("validation/families.jsonl");
    let gemma = rows
        .iter()
        .find(|r| r.name == "gemma-4-31b-6l|full|b1|s2048|gc0|sdpa")
        .expect("the run is in the file");
    assert_eq!(gemma.measured_peak, 75_720_937_824);
    within(gemma, 0.002);
}

/// The gradients named by an op's `grads`, in bytes.
fn held_grads(g: &OpGraph, name: &str) -> Vec<u64> {
    op_named(g, name)
        .grads
        .iter()
        .map(|&t| g.tensor(t).bytes.0)
        .collect()
}

#[test]
fn a_residual_keeps_the_sums_gradient_while_its_branch_runs_backward() {
    // `x + mlp(norm(x))`: AddBackward0 hands the sum's gradient to both sides, the engine runs
    // the MLP's nodes first (higher sequence numbers), and x's side keeps the gradient in the
    // InputBuffer of x's producer until the MLP's backward reaches x. TinyLlama full bf16,
    // batch 2 x 2,048 tokens, checkpointed (validation/sweep.jsonl): the stream is bf16, so the
    // held gradient is 2 x 2,048 x 2,048 x 2 = 16,777,216 B, from `down_proj`'s backward (the
    // branch's last op, whose own incoming gradient it was) to the MLP's first op. The estimate
    // peaks in layer 0's MLP backward, and before this was 17,318,152 B (-0.19 %) below the
    // hook-free replay's peak; now within 0.01 %.
    let row = sweep_run("tinyllama-1.1b|full_bf16|b2|s2048|gc1|sdpa");
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    assert_eq!(
        held_grads(&g, "decoder.layers.0.mlp.down_proj"),
        [16_777_216]
    );
    assert_eq!(
        held_grads(&g, "decoder.layers.0.pre_feedforward_layernorm.upcast"),
        [16_777_216]
    );
    // The attention's residual the same, from `o_proj` to the block's checkpoint marker.
    assert_eq!(
        held_grads(&g, "decoder.layers.0.self_attn.o_proj"),
        [16_777_216]
    );
    within(&row, 0.0001);
}

#[test]
fn a_mixed_dtype_products_backward_makes_both_gradients_in_the_wider_dtype() {
    // Flan-T5's gated MLP multiplies gelu_new's fp32 output by wi_1's bf16 one (autocast runs
    // the gelu chain's `pow` in fp32). `mul_tensor_backward` makes each gradient as
    // `grad * other` in the product's dtype; the engine casts the bf16 one down only after the
    // node has returned (`validate_outputs`). So the incoming fp32 gradient and both fp32
    // products live at once: 3 x (8 x 512 x 2,048 x 4 = 33,554,432) = 100,663,296 B. Flan-T5-base
    // with adapters, batch 8, 512 + 128 tokens, checkpointed (validation/sweep.jsonl), replayed
    // without hooks (validation/peak_live.py), peaks at 1,012,264,072 B in step 2 at exactly
    // that `mul`, in the last encoder block's MLP backward, with the residual's bf16 gradient
    // (8 x 512 x 768 x 2 = 6,291,456) held beside it. The estimate was -1.04 %.
    let row = sweep_run("flan-t5-base|adapter|b8|s(512, 128)|gc1|sdpa");
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let mul = op_named(&g, "encoder.layers.0.mlp.gate_mul");
    assert_eq!(mul.backward_transient.0, 100_663_296);
    // The MLP's residual holds it from the adapter's skip (the branch's last op) back to the
    // MLP's norm; the adapter's own skip holds the MLP output's gradient over the adapter.
    assert_eq!(
        held_grads(&g, "encoder.layers.0.adapter.residual"),
        [6_291_456]
    );
    assert_eq!(held_grads(&g, "encoder.layers.0.adapter.up"), [6_291_456]);
    within(&row, 0.005);
    // GPT-J's gelu_new ends `(0.5 * x) * (1 + tanh(...))`, bf16 times fp32 under autocast. GPT-J-6B
    // with LoRA on every linear, batch 4 x 2,048, checkpointed (validation/families.jsonl), peaks
    // in the last block's backward of that product: its incoming fp32 gradient (the sum of the
    // two the output's casts for `fc_out` and its `lora_A` pass back) and both fp32 products,
    // 3 x (4 x 2,048 x 16,384 x 4 = 536,870,912) = 1,610,612,736 B. It had read -1.3 %, put down
    // to the replay; it is this mechanism.
    let row = shipped_run(
        "validation/families.jsonl",
        "gptj-6b|lora|b4|s2048|gc1|eager|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let mul = op_named(&g, "decoder.layers.0.mlp.act.mul");
    assert_eq!(mul.backward_transient.0, 1_610_612_736);
    within(&row, 0.001);
}

#[test]
fn eager_attentions_softmax_backward_holds_v_gradient_not_q_and_k() {
    // MPT-7B with LoRA on every linear, batch 4 x 2,048, checkpointed, eager attention
    // (validation/families.jsonl): its replay peaks in a block's softmax backward holding v's
    // gradient (4 x 2,048 x 4,096 x 2 = 67,108,864 B), softmax's fp32 result and its fp32
    // incoming gradient and result (4 x 32 x 2,048 x 2,048 = 536,870,912 scores, 2,147,483,648
    // B each in fp32), less what the product with v kept and has released, the bf16
    // probabilities (1,073,741,824) and v (67,108,864): 67,108,864 + 2 x 2,147,483,648 -
    // 1,073,741,824 - 67,108,864 = 3,221,225,472. q's and k's gradients come after (charging
    // them with the output's had put the run at +0.81 %; v had kept it at +0.22 %).
    let row = shipped_run(
        "validation/families.jsonl",
        "mpt-7b|lora|b4|s2048|gc1|eager|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let core = op_named(&g, "decoder.layers.0.self_attn.core");
    assert_eq!(core.backward_transient.0, 3_221_225_472);
    within(&row, 0.003);
}

#[test]
fn falcons_checkpointed_forward_holds_the_unmasked_scores_and_the_returned_probabilities() {
    // Falcon-40B LoRA on `query_key_value` (frozen bf16 base, autocast), eager, checkpointed,
    // batch 1 x 1,024, 128 heads: one bf16 score matrix S is 128 x 1,024^2 x 2 = 268,435,456 B,
    // the fp32 probabilities P twice that. Inside a block's first forward, at softmax, Falcon's
    // `F.softmax(attention_scores + attention_mask, dtype=hidden_states.dtype)` holds the
    // scores, their masked sum, the sum's fp32 copy (aten `softmax`: `input.toType(dtype)`) and
    // the output: 2 x 268,435,456 + 2 x 536,870,912 = 1,610,612,736 B. Of that the op saves P
    // and the bf16 copy the product with v keeps (805,306,368), leaving 805,306,368; and the
    // previous block's returned P (`return output, attn_weights`, held by the model's loop),
    // which a checkpointed block saves nowhere, is 536,870,912 more: 1,342,177,280 B. The
    // output (1,024 x 8,192 x 2 = 16,777,216) exists only from the product with v on, when the
    // scores and their fp32 copy are gone. The estimate had 2 S and no returned P: the replay
    // was 572 MB (-0.66 %) above it, and 1.02 % over 4 FSDP ranks.
    let row = shipped_run(
        "validation/families.jsonl",
        "falcon-40b|lora|b1|s1024|gc1|eager|r16|query_key_value",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let core = op_named(&g, "decoder.layers.1+58.attn.core");
    assert_eq!(core.forward_transient.0, 1_342_177_280);
    // A block recomputed in backward runs alone: no returned P there. Its backward holds the
    // repeated values' gradient (1,024 x 8,192 x 2 = 16,777,216) and softmax backward's dP and
    // dS in fp32 less what the product with v released, the bf16 copy and the repeated values
    // (2 x 536,870,912 - 268,435,456 - 16,777,216): 805,306,368 B, as much as the recomputed
    // softmax moment.
    assert_eq!(core.backward_transient.0, 805_306_368);
    for (file, name) in [
        ("validation/families.jsonl", row.name.as_str()),
        (
            "validation/fsdp.jsonl",
            "falcon-40b|lora|b1|s1024|gc1|eager|r16|query_key_value|fsdp|w4",
        ),
    ] {
        let r = shipped_run(file, name);
        within(&r, 0.001);
    }
    // Llama's `eager_attention_forward` rebinds one name, so only the masked scores are read
    // while softmax runs: S + 2 P at that moment less what the op saves (P and the bf16 copy),
    // 2 S, as before. TinyLlama (32 heads), batch 2 x 1,024: S = 134,217,728 B (the output, 2 x
    // 1,024 x 2,048 x 2 = 8,388,608 B, comes later, beside P and the copy: 3 S and it).
    let tiny = model("tinyllama-1.1b");
    let g = graph::build(
        &tiny,
        &Plan {
            attention: AttentionKernel::Eager,
            ..plan(Method::Full, Precision::MixedBf16, 2, 1024, 0, false)
        },
    );
    let core = op_named(&g, "decoder.layers.1+20.self_attn.core");
    assert_eq!(core.forward_transient.0, 2 * 134_217_728);
}

#[test]
fn falcon_and_llama4_softmax_in_their_inputs_dtype_without_autocast() {
    // Falcon's eager attention calls `softmax(scores + mask, dim=-1, dtype=hidden_states.dtype)`
    // with `hidden_states` the block's LayerNorm output, and Llama 4's text attention
    // `softmax(attn_weights, dim=-1)`: fp32 under autocast (its LayerNorm returns fp32, softmax
    // is on its fp32 list), but in a bf16 module (pure bf16, FSDP's and DeepSpeed's bf16 params)
    // bf16 probabilities and no cast copy. Falcon-7B full bf16, batch 1 x 1,024: one block's
    // attention keeps q (1,024 x 4,544 x 2 = 9,306,112 B), the one key and value head (1,024 x
    // 64 x 2 = 131,072 B each) and the probabilities (71 heads x 1,024^2 x 2 = 148,897,792 B),
    // 158,466,048 B; it had kept fp32 probabilities and their bf16 copy (446,693,376 B) instead.
    let g = graph::build(
        &model("falcon-7b"),
        &Plan {
            attention: AttentionKernel::Eager,
            ..plan(Method::Full, Precision::Bf16, 1, 1024, 0, false)
        },
    );
    let core = crate::op_ending(&g, "attn.core");
    assert_eq!(
        crate::kept_bytes(&g, core),
        158_466_048,
        "{}",
        g.name(core.name)
    );
    // Replays: Falcon-7B full bf16 on one GPU +7.4 % before; LoRA over 4 FSDP2 ranks +91.2 %
    // (every layer's fp32 probabilities, 17.8 GiB); Llama 4 Scout (4 layers) full bf16 +0.6 %,
    // LoRA over 2 ranks +7.5 %. Now all within 0.2 %.
    for (file, name) in [
        (
            "validation/families.jsonl",
            "falcon-7b|full_bf16|b1|s1024|gc0|eager",
        ),
        (
            "validation/families.jsonl",
            "llama4-scout-4l|full_bf16|b1|s2048|gc0|eager",
        ),
        (
            "validation/fsdp.jsonl",
            "falcon-7b|lora|b2|s1024|gc0|eager|r16|query_key_value|fsdp|w4",
        ),
        (
            "validation/fsdp.jsonl",
            "llama4-scout-4l|lora|b1|s2048|gc0|eager|r16|qv|fsdp|w2",
        ),
    ] {
        let row = shipped_run(file, name);
        within(&row, 0.002);
    }
}

#[test]
fn a_hybrids_blocks_are_released_in_the_models_order_not_the_walks() {
    // LFM2-700M has 16 blocks: attention at 2, 5, 8, 10, 12 and 14, convolutions elsewhere.
    // The graph builds one block of each kind and repeats it, so the walk's backward ran all
    // ten convolution blocks (the last block, 15, is one) before any attention block, releasing
    // their checkpoint inputs first. Autograd runs block 14 second, with blocks 0-13 still
    // holding theirs: eight convolution blocks' inputs more than the walk had, 8 x (4 x 4,096 x
    // 1,536 x 2 = 50,331,648) = 402,653,184 B, at a block whose eager softmax backward is the
    // step's peak. LoRA on every linear, batch 4 x 4,096, checkpointed (validation/families.jsonl;
    // the replay's live set at its peak holds the embedding output and fourteen block outputs):
    // -1.51 % before, now within 0.3 % (the estimate keeps one head-split copy more than the
    // replay, 50 MB).
    let row = shipped_run(
        "validation/families.jsonl",
        "lfm2-700m|lora|b4|s4096|gc1|eager|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let attention: Vec<u64> = (0..16)
        .filter(|&l| g.built_as.get(l) == Some(&2))
        .map(|l| l as u64)
        .collect();
    assert_eq!(attention, [2, 5, 8, 10, 12, 14]);
    let (m, _) = replay_estimate(&g, &row.plan);
    assert!(m.peak_op.ends_with("self_attn.core"), "{}", m.peak_op);
    within(&row, 0.003);
    // Each block of a group gets its own moment. An 8-layer LFM2-8B-A1B in full mixed
    // precision (no checkpointing) peaks in block 2's experts backward, the second of the
    // group built for blocks 2 and 6: by then blocks 3-5 (another group) have made their fp32
    // expert gradients (1.46 GB a block) and released their saves (1.04 GB), which the group's
    // first block, 6, does not see. Within 0.2 % of the replay.
    let moe = shipped_run(
        "validation/families.jsonl",
        "lfm2-8b-a1b-8l|full|b2|s2048|gc0|sdpa",
    );
    within(&moe, 0.002);
}

#[test]
fn the_last_hidden_state_is_alive_until_the_loss_is_computed() {
    // `XForCausalLM.forward` keeps `outputs` and `hidden_states = outputs.last_hidden_state`
    // referenced while the head and the loss run, so the final norm's output is alive at the
    // loss's forward even where autograd keeps none of it: under autocast the head keeps its
    // bf16 copy, and a LayerNorm keeps its input. StableLM-2-1.6B full mixed bf16, batch 4 x
    // 2,048, checkpointed (validation/families.jsonl), peaks at the loss's forward: the bf16
    // logits (8,192 x 100,352 x 2 = 1,644,167,168), their fp32 upcast (3,288,334,336) and the
    // fp32 hidden state (8,192 x 2,048 x 4 = 67,108,864) = 4,999,610,368 B beside what is held.
    // It was 67.6 MB (-0.21 %) short; four other runs that peak there were short by the same
    // tensor, and so was an H200 run.
    let row = shipped_run(
        "validation/families.jsonl",
        "stablelm-2-1_6b|full|b4|s2048|gc1|sdpa",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    assert_eq!(op_named(&g, "loss").forward_transient.0, 4_999_610_368);
    within(&row, 0.0005);
    // TinyLlama full mixed bf16, batch 4 x 2,048, checkpointed, measured on an H200
    // (validation/measured.jsonl): -0.35 % before, now within 0.05 %.
    let h200 = shipped_run(
        "validation/measured.jsonl",
        "tinyllama-1.1b|full|b4|s2048|gc1|sdpa",
    );
    within(&h200, 0.0005);
}

#[test]
fn seq2seq_cross_entropy_under_cuda_autocast_keeps_16_bit_log_probabilities() {
    // A seq2seq model calls `CrossEntropyLoss` on its logits as they are. CUDA autocast lists
    // `nll_loss` as an fp32 op but not `cross_entropy_loss` (CPU autocast lists both), so on a
    // GPU `cross_entropy_loss` decomposes into `log_softmax(x, dim, x.scalar_type())`, whose
    // explicit dtype autocast keeps (16-bit log-probabilities, kept for its backward), and
    // `nll_loss`, which autocast casts to fp32 and which keeps that copy for its backward.
    // T5-base in mixed bf16, batch 2 x 64 target tokens: 128 x 32,128 = 4,112,384 logits.
    // Kept: bf16 log-probabilities 8,224,768 B and their fp32 copy 16,449,536 B. Backward:
    // nll_loss's fp32 gradient (16,449,536 B) beside both, the loss's largest moment; after the
    // copy is freed, log_softmax's two bf16 gradients (2 x 8,224,768) fit in what it left.
    // Were the logits cast before log_softmax (CPU autocast), it would keep one fp32 tensor and
    // hold two fp32 gradients: 16,449,536 more bytes at the loss.
    let mixed = graph::build(
        &model("t5-base"),
        &plan(Method::Full, Precision::MixedBf16, 2, 256, 64, false),
    );
    let loss = op_named(&mixed, "loss");
    let kept: Vec<u64> = loss
        .saves
        .iter()
        .map(|&t| mixed.tensor(t).bytes.0)
        .collect();
    assert_eq!(kept, [8_224_768, 16_449_536]);
    assert_eq!(loss.backward_transient.0, 16_449_536);
    // Pure bf16 (no autocast): bf16 all the way, and log_softmax's two bf16 gradients.
    let pure = graph::build(
        &model("t5-base"),
        &plan(Method::Full, Precision::Bf16, 2, 256, 64, false),
    );
    let loss = op_named(&pure, "loss");
    assert_eq!(crate::kept_bytes(&pure, loss), 8_224_768);
    assert_eq!(loss.backward_transient.0, 16_449_536);
    // A causal LM upcasts with `.float()` first: one fp32 tensor kept, two fp32 gradients.
    let causal = graph::build(
        &model("gpt2"),
        &plan(lora(8), Precision::Bf16, 2, 64, 0, false),
    );
    let loss = op_named(&causal, "loss");
    assert_eq!(crate::kept_bytes(&causal, loss), 128 * 50_257 * 4);
    assert_eq!(loss.backward_transient.0, 2 * 128 * 50_257 * 4);
    // Measured on the H200 (validation/measured.jsonl), the three encoder-decoder PEFT runs
    // that peak at the loss were 1.5 to 3.1 % over while the loss kept fp32 log-probabilities;
    // now within 0.25 %.
    for name in [
        "t5-base|lora|b16|s(512, 128)|gc0|sdpa|r16|qv",
        "t5-base|prompt|b16|s(512, 128)|gc0|sdpa",
        "bart-large|adapter|b8|s(512, 128)|gc0|sdpa",
    ] {
        let row = shipped_run("validation/measured.jsonl", name);
        within(&row, 0.0025);
    }
}

#[test]
fn ia3_holds_its_scaling_gradients_full_size_product() {
    // IA3 on T5's feed-forward input: `(x.to(fp32) * l)` with l of d_ff = 2,048 (T5-small).
    // MulBackward0 computes x's gradient `grad * l` and l's `grad * x` at the full shape; the
    // engine sums the latter to l's shape after the node returns. Encoder at batch 2 x 64 =
    // 128 tokens: each full-size fp32 tensor is 128 x 2,048 x 4 = 1,048,576 B, and the backward
    // holds the incoming gradient, x's gradient and l's full-size product: 3,145,728 B.
    let g = graph::build(
        &model("t5-small"),
        &plan(Method::Ia3, Precision::Bf16, 2, 64, 16, false),
    );
    // The largest IA3 op is the encoder's feed-forward one (keys and values are 512 wide, the
    // decoder has 16 tokens).
    let encoder_ffn = g
        .ops()
        .filter(|o| g.name(o.name).ends_with("ia3"))
        .map(|o| o.backward_transient.0)
        .max();
    assert_eq!(encoder_ffn, Some(3 * 1_048_576));
    // Checkpointed T5-base IA3 at batch 16 x 512 + 128 (validation/sweep.jsonl) peaks in an
    // encoder block's feed-forward backward once the loss keeps 16-bit log-probabilities: the
    // product is 16 x 512 x 3,072 x 4 = 100,663,296 B, which the estimate lacked (-5.7 %).
    let row = sweep_run("t5-base|ia3|b16|s(512, 128)|gc1|sdpa");
    within(&row, 0.005);
}

#[test]
fn codegens_attention_names_its_rotary_parts_while_autocasts_casts_die_in_a_checkpointed_forward() {
    // CodeGen-2B (8 layers) LoRA on every linear, autocast over bf16 weights, eager, batch 4 x
    // 2,048 (8,192 tokens), hidden 2,560, 32 heads of 80, rotary on 64 of them, checkpointed.
    // A block's first forward keeps nothing for backward, so at softmax what is alive is what
    // Python names. `CodeGenAttention.forward` names, until it returns: the fused output
    // (`qkv`, `qkv_split`: 8,192 x 7,680 x 2 = 125,829,120 B), the unrotated q and k shards
    // (through the `q_pass` and `k_pass` views: 41,943,040 B each) and the rotated parts (fp32:
    // the sin/cos table is an fp32 buffer; 8,192 x 32 x 64 x 4 = 67,108,864 B each); the
    // decoder layer names the LayerNorm's output (`hidden_states`, fp32 under autocast:
    // 83,886,080 B). 427,819,008 B in all. Around them, the model's forward names the stack's
    // input (`inputs_embeds`) and its loop the block's (`hidden_states`), 8,192 x 2,560 x 2 =
    // 41,943,040 B each, which checkpointing keeps anyway.
    let row = shipped_run(
        "validation/families.jsonl",
        "codegen-2b-8l|lora|b4|s2048|gc1|eager|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let core = op_named(&g, "decoder.layers.1+6.attn.core");
    let pinned = named_bytes(&g, core);
    assert_eq!(
        pinned,
        [
            41_943_040,
            41_943_040,
            83_886_080,
            125_829_120,
            41_943_040,
            41_943_040,
            67_108_864,
            67_108_864
        ]
    );
    // The core's own moment: bf16 scores S = 32 x 4 x 2,048^2 x 2 = 1,073,741,824 B, fp32
    // probabilities P = 2 S. At softmax: S, its fp32 copy and P (5 S), less the P and the bf16
    // copy it saves (3 S): 2,147,483,648. `_attn`'s fp32 q and k (8,192 x 2,560 x 4 each,
    // 167,772,160) and the previous block's returned bf16 probabilities (S): 3,388,997,632 B.
    // The output (8,192 x 2,560 x 2) comes later, beside P and the copy only.
    // Autocast's bf16 copies of q and k (41,943,040 B each), which the scores' matmul alone
    // keeps, bind no name (v's shard is `value`): non-reentrant checkpointing's pack hook keeps
    // nothing, so the walk charges them only while the op runs, and the op takes them back, as
    // they are gone by softmax: 3,305,111,552 B.
    let unnamed: Vec<bool> = core.saves[..3]
        .iter()
        .map(|&t| g.tensor(t).unnamed)
        .collect();
    assert_eq!(unnamed, [true, true, false]);
    assert_eq!(core.forward_transient.0, 3_388_997_632 - 2 * 41_943_040);
    // The replay (validation/peak_live.py) peaks at that softmax; the estimate had missed the
    // names and kept the copies: -1.90 %. Over 8 FSDP2 ranks the peak is in backward.
    within(&row, 0.001);
    within(
        &shipped_run(
            "validation/fsdp.jsonl",
            "codegen-2b-8l|lora|b4|s2048|gc1|eager|r16|all|fsdp|w8",
        ),
        0.001,
    );
    // Falcon's new decoder computes both LayerNorms before the attention: the MLP's output
    // (`mlp_layernorm_out`, 1,024 x 8,192 x 4 B fp32) is named through it, beside the
    // attention's own input (and, as everywhere, the stack's and the block's inputs, 1,024 x
    // 8,192 x 2 B each).
    let falcon = shipped_run(
        "validation/families.jsonl",
        "falcon-40b|lora|b1|s1024|gc1|eager|r16|query_key_value",
    );
    let g = ftplan::graph::arch::build(&falcon.model, &falcon.plan);
    let core = op_named(&g, "decoder.layers.1+58.attn.core");
    let pinned = named_bytes(&g, core);
    assert_eq!(pinned, [16_777_216, 16_777_216, 33_554_432, 33_554_432]);
}

#[test]
fn without_autocast_upcast_scores_are_fp32_and_need_no_copy_for_softmax() {
    // GPT-J's and CodeGen's `_attn` cast q and k to fp32; with no autocast (pure bf16, FSDP's
    // bf16 modules) the scores' matmul runs in fp32. CodeGen-350M full bf16, batch 4 x 2,048,
    // 16 heads: fp32 scores S = 16 x 4 x 2,048^2 x 4 = 1,073,741,824 B, softmax's fp32 output P
    // the same, its bf16 cast for v C = 536,870,912. The forward's worst moment is softmax with
    // its input (S + P = 2,147,483,648; no upcast copy of an fp32 input); less what it saves
    // (P and C): 536,870,912 B, the output (8,192 x 1,024 x 2 = 16,777,216) included. The
    // estimate had taken the scores for bf16 and copied them: 1,090,519,040. The FSDP2 replay
    // of CodeGen-2B's LoRA (validation/fsdp.jsonl) holds the fp32 `bmm` output and its masked
    // sum at its forward peak.
    let row = shipped_run(
        "validation/families.jsonl",
        "codegen-350m|full_bf16|b4|s2048|gc0|eager",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let core = crate::op_ending(&g, "attn.core");
    assert_eq!(core.forward_transient.0, 536_870_912);
    within(&row, 0.001);
}

#[test]
fn partial_rotary_rotates_only_its_part_and_pays_for_the_cut_and_the_cat() {
    // Pythia-1B (GPT-NeoX, rotary on a quarter of each 256-wide head) in bf16, batch 4 x 1,024:
    // q is 4,096 x 2,048 x 2 = 16,777,216 B (call it Q). The rotation's ten forward and
    // fourteen backward passes run over the rotated quarter; the `cat` reads both parts and
    // writes the whole (2 Q); backward, the two slices q was cut into come back as two
    // `slice_backward`s and their sum (6 Q). Forward 10 x 0.25 + 2 = 4.5 Q = 75,497,472 B,
    // backward 14 x 0.25 + 6 = 9.5 Q = 159,383,552 B, in 8 and 10 kernels. A CPU dispatch trace
    // of transformers' code (validation/trace_rotary.py) moves 4.56 and 9.56 Q; ftplan had
    // charged 12 and 14 Q.
    let g = graph::build(
        &model("pythia-1b"),
        &plan(Method::Full, Precision::Bf16, 4, 1024, 0, false),
    );
    let rotary = crate::op_ending(&g, "rotary_q");
    assert_eq!(rotary.cost.forward_bytes.0, 75_497_472);
    assert_eq!(rotary.cost.backward_bytes.0, 159_383_552);
    assert_eq!(
        (rotary.cost.forward_kernels, rotary.cost.backward_kernels),
        (8, 10)
    );
    // Llama's form rotates the whole head and cuts nothing: ten and fourteen passes, as traced
    // (validation/trace_bytes.py).
    let g = graph::build(
        &model("tinyllama-1.1b"),
        &plan(Method::Full, Precision::Bf16, 2, 1024, 0, false),
    );
    let rotary = crate::op_ending(&g, "rotary_q");
    let q = 2 * 1024 * 2048 * 2;
    assert_eq!(
        (rotary.cost.forward_bytes.0, rotary.cost.backward_bytes.0),
        (10 * q, 14 * q)
    );
}

#[test]
fn a_moes_shared_experts_gradient_waits_for_the_routed_ones_and_their_weighting_casts_back() {
    // DeepSeek-V2-Lite, LoRA on q and v (kv_b_proj), bf16 weights, batch 1 x 1,024, hidden
    // 2,048, top 6 of 64 experts: S = 6,144 routed rows.
    let (batch, seq, hidden, routed) = (1u64, 1024u64, 2048u64, 6144u64);
    let build = |gc| {
        graph::build(
            &model("deepseek-v2-lite"),
            &plan(lora(16), Precision::Bf16, batch, seq, 128, gc),
        )
    };
    let g = build(false);
    // The block's norm output is read by the router, the routed experts and, made last, the
    // shared experts, whose backward runs first: their contribution to its gradient
    // (1,024 x 2,048 x 2 = 4,194,304 B) waits from the shared `up_proj`'s backward to the
    // router's, through the routed experts' whole backward.
    let router = crate::op_ending(&g, "mlp.gate");
    let shared_up = crate::op_ending(&g, "mlp.shared_expert.up_proj");
    let held: Vec<_> = router
        .grads
        .iter()
        .filter(|t| shared_up.grads.contains(t))
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(g.tensor(*held[0]).bytes.0, batch * seq * hidden * 2);
    assert_eq!(batch * seq * hidden * 2, 4_194_304);
    // `proj_out * sample_weights`: bf16 expert outputs times fp32 routing weights, an fp32
    // (S, h) product (6,144 x 2,048 x 4 = 50,331,648 B). Its backward holds the incoming
    // gradient and both full-size products (3 x 50,331,648 = 150,994,944 B), and then the
    // engine casts the outputs' gradient back to bf16 (6,144 x 2,048 x 2 = 25,165,824 B)
    // while the node's saved tensors are still held: 176,160,768 B. In a checkpointed block
    // the saved tensors are the recomputation's and die when the node returns, so the cast
    // takes the place of the saved bf16 outputs (25,165,824 B) and adds nothing.
    let product = routed * hidden * 4;
    assert_eq!(product, 50_331_648);
    let weighting = |g: &OpGraph| crate::op_ending(g, "experts.weight").backward_transient.0;
    assert_eq!(weighting(&g), 3 * product + routed * hidden * 2);
    assert_eq!(weighting(&g), 176_160_768);
    assert_eq!(weighting(&build(true)), 150_994_944);
}

#[test]
fn one_expert_standing_for_many_carries_all_their_side_kernels() {
    // Llama 4 Scout's 16 experts are built as expert 0 and one expert standing for the other
    // 15 (`OpGraph::scale_since`). Under mixed precision each expert's fp32 gate_up stack is
    // cast to bf16 before its `bmm` and its gradient widened back: the stand-in's casts are 15
    // experts' worth, as its FLOPs and bytes are.
    let g = graph::build(
        &model("llama4-scout"),
        &plan(Method::Full, Precision::MixedBf16, 1, 512, 0, false),
    );
    let side = |needle: &str| {
        g.ops()
            .find(|o| g.name(o.name).ends_with(needle))
            .unwrap_or_else(|| panic!("no {needle}"))
            .cost
    };
    let (one, rest) = (
        side(".experts.0.gate_up_proj"),
        side(".experts.1-15.gate_up_proj"),
    );
    assert!(one.side.forward_cast.0 > 0);
    assert_eq!(rest.side.forward_cast.0, one.side.forward_cast.0 * 15);
    assert_eq!(rest.side.backward_cast.0, one.side.backward_cast.0 * 15);
    assert_eq!(rest.forward_bytes.0, one.forward_bytes.0 * 15);
}

#[test]
fn llama4s_routed_sum_is_made_by_its_last_expert_so_the_shared_branch_alone_holds_its_gradient() {
    // Llama 4 adds the routed experts' sum into the shared expert's output. The shared
    // branch's backward runs first, while the routed side's gradient waits (`residual`): from
    // the shared branch's last op to the first op after the sum's producer. The sum is made
    // before the experts run but completed by the last expert's add, so that first op is the
    // shared branch's own; before, the hold reached back into the routed experts' backward,
    // where the gradient is the block residual's tensor, already held (+0.17 % on Scout's LoRA
    // over 8 ranks, validation/fsdp.jsonl).
    let g = graph::build(
        &model("llama4-scout"),
        &plan(lora(16), Precision::Bf16, 1, 512, 128, false),
    );
    // The shared branch's last op: the ops of its down projection (LoRA's add last).
    let last = g
        .ops()
        .rfind(|o| {
            g.name(o.name)
                .contains("layers.0.mlp.shared_expert.down_proj")
        })
        .expect("a shared expert");
    assert_eq!(last.grads.len(), 1);
    for t in &last.grads {
        let holders: Vec<String> = g
            .ops()
            .filter(|o| o.grads.contains(t))
            .map(|o| g.name(o.name))
            .collect();
        assert_eq!(holders.len(), 2, "{holders:?}");
        assert!(
            holders.iter().all(|n| !n.contains(".experts.")),
            "{holders:?}"
        );
    }
}

#[test]
fn qwens_shared_expert_runs_before_the_router_and_its_gate_after_the_experts() {
    // `Qwen2MoeSparseMoeBlock.forward` calls `self.shared_expert(...)` first, then the router
    // and the routed experts, then `shared_expert_gate`; DeepSeek calls its shared experts
    // after the routed ones. The graph keeps each family's order, so Qwen's shared activations
    // are alive through the routed experts' forward and its backward comes after theirs.
    let position = |g: &OpGraph, suffix: &str| {
        g.ops()
            .position(|o| g.name(o.name).ends_with(suffix))
            .unwrap_or_else(|| panic!("no op ending {suffix}"))
    };
    let qwen = graph::build(
        &model("qwen1.5-moe-a2.7b"),
        &plan(lora(16), Precision::Bf16, 1, 256, 128, false),
    );
    let shared = position(&qwen, "mlp.shared_expert.up_proj");
    let router = position(&qwen, "mlp.gate");
    let gather = position(&qwen, "mlp.experts.gather");
    let gate = position(&qwen, "mlp.shared_expert_gate");
    assert!(shared < router && router < gather && gather < gate);
    let deepseek = graph::build(
        &model("deepseek-v2-lite"),
        &plan(lora(16), Precision::Bf16, 1, 256, 128, false),
    );
    assert!(
        position(&deepseek, "mlp.experts.gather")
            < position(&deepseek, "mlp.shared_expert.up_proj")
    );
    // `HunYuanMoEV1Moe.forward` calls `self.shared_mlp` first as well (and gates nothing): a
    // checkpointed 2-layer HunYuan-MoE LoRA run, estimated before its replay, was -3.2 % with
    // the shared MLP built after the experts (-2.5 % once the rerun started at the reorder).
    let row = shipped_run(
        "validation/families.jsonl",
        "hunyuan-moe-2l-v2048|lora|b8|s4096|gc1|sdpa|r16|qv",
    );
    let hunyuan = graph::build(&row.model, &row.plan);
    assert!(position(&hunyuan, "mlp.shared_expert.up_proj") < position(&hunyuan, "mlp.gate"));
    within(&row, 0.005);
}

#[test]
fn the_experts_function_names_its_rows_and_a_checkpointed_block_peaks_in_its_rerun() {
    // Two layers of Qwen1.5-MoE (hidden 2,048, 60 experts of 1,408, top 4, a 5,632-wide shared
    // expert run first), LoRA r16 on q and v over bf16 weights, batch 8 x 4,096 = 32,768
    // tokens, checkpointed. A token-wide bf16 tensor is 32,768 x 2,048 x 2 = 134,217,728 B; a
    // routed one (S = 4 x 32,768 = 131,072 rows) 536,870,912 B.
    let row = shipped_run(
        "validation/families.jsonl",
        "qwen1.5-moe-2l-v2048|lora|b8|s4096|gc1|sdpa|r16|qv",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    // While `weighted_out[inv_perm]` runs, the Python frames name: the stack's input
    // (`inputs_embeds`), the block's input (the model's loop), the sum after attention
    // (`residual`), the MoE block's input (`hidden_states`), Qwen's shared expert output
    // (`shared_expert_output`), and in `grouped_mm_experts_forward` the gathered rows
    // (`selected_hidden_states_g`) and the masked down projection (`proj_out`). With the
    // experts frozen no matmul keeps the gathered rows, yet they are alive.
    let reorder = op_named(&g, "decoder.layers.1.mlp.experts.reorder");
    let named = named_bytes(&g, reorder);
    let token = 134_217_728;
    let routed = 536_870_912;
    assert_eq!(named, [token, token, token, token, token, routed, routed]);
    // Backward reruns block 1's forward (non-reentrant checkpointing) and peaks at that op:
    // beside what the rerun has made again, the op's own transients (the weighted product and
    // its reordered copy, 2 routed tensors), what is named and kept by no op (the sum after
    // attention, which the norm reads through an fp32 cast, the MoE input, the shared output
    // and the gathered rows: 3 token + 1 routed tensors; the down projection is kept by the
    // weighting, the two inputs by the checkpoints) and the gradient of the block's output (1
    // token tensor): 3 x 536,870,912 + 4 x 134,217,728 = 2,147,483,648 B beyond the cuBLAS
    // workspaces. The replay (validation/peak_live.py) peaks
    // there; before the frames and the rerun were walked the estimate was -9.3 %.
    let (m, hw) = replay_estimate(&g, &row.plan);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Recompute);
    assert_eq!(m.peak_op, "decoder.layers.1.mlp.experts.reorder");
    let workspaces = hw.cublas_workspace * 2;
    assert_eq!((m.at_peak.temporary - workspaces).0, 3 * routed + 4 * token);
    within(&row, 0.005);
    // Without checkpointing the first forward peaks at the same op (LoRA on every linear,
    // batch 4 x 4,096): -5.9 % before, and full bf16 fine-tuning's -3.2 % before Qwen's order.
    for name in [
        "qwen1.5-moe-2l-v2048|lora|b4|s4096|gc0|sdpa|r16|all",
        "qwen1.5-moe-2l-v2048|full_bf16|b4|s2048|gc0|sdpa",
    ] {
        within(&shipped_run("validation/families.jsonl", name), 0.005);
    }
}

#[test]
fn a_checkpointed_blocks_rerun_starts_at_its_last_saving_op_with_that_ops_gradient_waiting() {
    // Two layers of Qwen3-MoE (hidden 2,048, 128 experts of 768, top 8, no shared expert),
    // LoRA r16 on q and v over bf16 weights, batch 8 x 4,096 = 32,768 tokens, checkpointed.
    // The block's last saved tensor is the inverse permutation that `weighted_out[inv_perm]`
    // keeps (`IndexBackward0`; the sum over the top-k and the residual add keep nothing), so
    // backward reruns the block's forward when it reaches that index, stopping as the index
    // packs its indices, before its output exists. Waiting meanwhile: the reorder's output
    // gradient (S = 8 x 32,768 = 262,144 rows x 2,048 x 2 = 1,073,741,824 B, expanded by the
    // sum's backward) and the block output's (32,768 x 2,048 x 2 = 134,217,728 B), which the
    // residual add hands on.
    let row = shipped_run(
        "validation/families.jsonl",
        "qwen3-moe-2l-v2048|lora|b8|s4096|gc1|sdpa|r16|qv",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let reorder = op_named(&g, "decoder.layers.1.mlp.experts.reorder");
    let int64s: Vec<u64> = reorder.saves.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert_eq!(int64s, [262_144 * 8]);
    assert_eq!(reorder.out.0, 1_073_741_824);
    let (m, hw) = replay_estimate(&g, &row.plan);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Recompute);
    // At the trigger (the replay peaks at the `arange` just before it, with the same tensors
    // alive): its input, the weighted product (1 routed tensor), the names no op keeps (the
    // MoE input and the sum after attention: 2 token tensors; the gathered rows: 1 routed;
    // the down projection is kept by the weighting) and the two waiting gradients.
    assert_eq!(m.peak_op, "decoder.layers.1.mlp.experts.reorder");
    let workspaces = hw.cublas_workspace * 2;
    let (routed, token) = (1_073_741_824, 134_217_728);
    assert_eq!(
        (m.at_peak.temporary - workspaces).0,
        routed + 2 * token + routed + (routed + token)
    );
    // Estimated before the replay with the rerun starting at the block's first op in
    // backward and only the block output's gradient waiting: -4.2 %.
    within(&row, 0.005);
}

#[test]
fn a_lora_merged_expert_stacks_gradient_waits_from_its_grouped_matmul_to_its_merge() {
    // Two layers of Mixtral (hidden 4,096, 8 experts of 14,336, top 2) with LoRA on every
    // linear, which peft reaches the experts with as factors merged into the whole stack each
    // forward (`ParamWrapper`). The merged down stack is an activation that needs a gradient:
    // the grouped matmul's backward makes it, 8 x 4,096 x 14,336 x 2 = 939,524,096 B, beside
    // its input's gradient, and it waits until the merge folds it into the factors. The replay
    // peaks in that backward; without the stack's gradient there the estimate was -2.5 %.
    let row = shipped_run(
        "validation/families.jsonl",
        "mixtral-2l-v2048|lora|b2|s4096|gc0|sdpa|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let down = op_named(&g, "decoder.layers.1.mlp.experts.down_proj");
    let merge = op_named(&g, "decoder.layers.1.mlp.experts.down_lora_merge");
    let held: Vec<u64> = down.grads.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert_eq!(held, [939_524_096]);
    assert_eq!(down.grads, merge.grads);
    // The gate/up stack's the same way, twice as tall: 1,879,048,192 B.
    let gate_up = op_named(&g, "decoder.layers.1.mlp.experts.gate_up_proj");
    let held: Vec<u64> = gate_up.grads.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert_eq!(held, [1_879_048_192]);
    within(&row, 0.005);
}

#[test]
fn a_frozen_linear_packs_its_weight_so_a_checkpointed_blocks_rerun_runs_up_to_it() {
    // Two layers of dots1 (hidden 4,608; layer 1 has 128 experts of 1,408, top 6, then two
    // shared experts as one 2,816-wide MLP), LoRA r16 on q and v over bf16 weights, batch 8 x
    // 4,096 = 32,768 tokens, checkpointed. The block's last op that saves an activation is the
    // shared MLP's `act_fn(gate) * up`; after it the frozen `down_proj` saves only its weight,
    // for its input's gradient. Checkpointing's early stop counts that packed weight too, so
    // the rerun runs up to the `down_proj`, whose output gradient is the block output's (the
    // two sums after it hand it on): 32,768 x 4,608 x 2 = 301,989,888 B waits, not also the
    // product's 32,768 x 2,816 x 2 = 184,549,376 B.
    let row = shipped_run(
        "validation/families.jsonl",
        "dots1-2l-v2048|lora|b8|s4096|gc1|sdpa|r16|qv",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let down = op_named(&g, "decoder.layers.1.mlp.shared_expert.down_proj");
    assert!(down.saves.is_empty());
    assert!(down.params.iter().all(|&p| !g.param(p).trainable));
    let token = 301_989_888;
    assert_eq!(down.out.0, token);
    // The rerun peaks at the experts' reorder, beside the weighted product it reads and the
    // reordered copy it makes (2 routed tensors of S = 6 x 32,768 = 196,608 rows x 4,608 x 2 =
    // 1,811,939,328 B), what the frames name and no op keeps (the MoE input and the sum after
    // attention, 2 token tensors; the gathered rows, 1 routed) and the waiting gradient.
    let (m, hw) = replay_estimate(&g, &row.plan);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Recompute);
    assert_eq!(m.peak_op, "decoder.layers.1.mlp.experts.reorder");
    let routed = 1_811_939_328;
    let workspaces = hw.cublas_workspace * 2;
    assert_eq!((m.at_peak.temporary - workspaces).0, 3 * routed + 3 * token);
    // Estimated with the rerun stopping at the product: +0.73 %; GLM-4.5, built the same way,
    // +0.31 %.
    within(&row, 0.005);
    within(
        &shipped_run(
            "validation/families.jsonl",
            "glm-4.5-2l-v2048|lora|b8|s4096|gc1|sdpa|r16|qv",
        ),
        0.005,
    );
}

#[test]
fn a_broadcast_factors_gradient_is_product_sized_and_a_merged_stack_keeps_the_rows_once() {
    // Two layers of Qwen3-MoE (hidden 2,048, 128 experts of 768, top 8) with LoRA on every
    // linear, the experts reached through merged stacks (peft's `ParamWrapper`), bf16 weights,
    // batch 4 x 4,096 = 16,384 tokens: S = 8 x 16,384 = 131,072 routed rows, an (S, h) bf16
    // tensor 131,072 x 2,048 x 2 = 536,870,912 B.
    let row = shipped_run(
        "validation/families.jsonl",
        "qwen3-moe-2l-v2048|lora|b4|s4096|gc0|sdpa|r16|all",
    );
    let g = ftplan::graph::arch::build(&row.model, &row.plan);
    let routed = 536_870_912;
    // The grouped matmul over a merged stack keeps its input, the gathered rows, for the
    // stack's gradient; the experts' function names the same tensor, so it counts once. (The
    // merge's kept tensor had carried the rows' bytes as its own, and the forward's reorder
    // counted them twice: +0.8 %.)
    let gate_up = op_named(&g, "decoder.layers.1.mlp.experts.gate_up_proj");
    assert_eq!(gate_up.saves.len(), 1);
    let rows = gate_up.saves[0];
    assert_eq!(g.tensor(rows).bytes.0, routed);
    assert!(g.named(gate_up).any(|t| t == rows));
    // `proj_out * routing_weights` (S x h times S x 1) in backward: the incoming gradient
    // (the reorder's scatter, in place on a GPU), `grad * weights` for proj_out, and `grad *
    // proj_out` for the weights, product-sized until the engine sums it down to S x 1: three
    // routed tensors, where the replay peaks (at that `sum`). Counting the broadcast factor's
    // gradient at its own size had put two.
    let weight = op_named(&g, "decoder.layers.1.mlp.experts.weight");
    assert_eq!(weight.backward_transient.0, 3 * routed);
    let (m, hw) = replay_estimate(&g, &row.plan);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Backward);
    assert_eq!(m.peak_op, "decoder.layers.1.mlp.experts.weight");
    let workspaces = hw.cublas_workspace * 2;
    assert_eq!((m.at_peak.temporary - workspaces).0, 3 * routed);
    within(&row, 0.005);
}

#[test]
fn a_4bit_linear_packs_no_parameter_for_checkpointings_hooks() {
    // The parameters an op's autograd node saves, which non-reentrant checkpointing's pack hook
    // sees (`OpGraph::packed_params`), TinyLlama with LoRA r16 on q and v, checkpointed:
    // - over bf16 weights the frozen `down_proj` saves its weight (`MmBackward0` keeps it for
    //   its input's gradient), so a block's rerun runs up to it; `lora_A` saves its factor;
    // - under QLoRA the same `down_proj` is bitsandbytes' `MatMul4Bit`, a Python
    //   `autograd.Function` that keeps its weight as a `ctx` attribute and runs its matmul
    //   with grad mode off: no packed tensor, so the rerun stops at the FFN's product, the
    //   block's last op that saves, and the time model charges no hook for the weight.
    let m = model("tinyllama-1.1b");
    let Method::Lora(adapter) = lora(16) else {
        unreachable!("lora() builds LoRA")
    };
    let packed = |method: Method, suffix: &str| {
        let g = graph::build(&m, &plan(method, Precision::Bf16, 1, 256, 0, true));
        g.packed_params(crate::op_ending(&g, suffix))
    };
    assert_eq!(packed(lora(16), "mlp.down_proj"), 1);
    assert_eq!(packed(lora(16), "q_proj.lora_A"), 1);
    assert_eq!(packed(Method::Qlora(adapter.clone()), "mlp.down_proj"), 0);
    assert_eq!(packed(Method::Qlora(adapter), "q_proj.lora_A"), 1);
}

#[test]
fn an_rms_norm_backward_holds_five_fp32_tensors_at_pow_backward() {
    // LlamaRMSNorm's backward, op by op (derivatives.yaml, FunctionsManual.cpp): the weight
    // and rsqrt products hand on the input's first gradient (fp32); mean's backward divides
    // the expanded gradient (`sum_backward(...) / n`, a new fp32 tensor); pow's backward is
    // `grad * (2 * x.pow(1))`: `x^1`, `2 * x^1` and the product, three more. At that product
    // five fp32 tensors of the input's size are live. A toy Llama (hidden 256) at batch 2 x
    // 64: 128 x 256 x 4 B = 131,072 each, 655,360 in all (before: the bf16 incoming and
    // outgoing gradients and one fp32 scratch, 262,144).
    // A trained weight's product saved the normed copy for the weight's gradient, in the
    // input's dtype (fp32 here: mixed precision keeps fp32 weights, so the residual stream is
    // fp32; 131,072); that node runs first and autograd frees its saved tensors once it has
    // run, so the copy the walk holds until the op's backward ends is gone by then: 655,360 -
    // 131,072 = 524,288. A frozen weight (LoRA) saves no copy: 655,360.
    // T5LayerNorm multiplies the narrow input itself by the fp32 rsqrt: that product's
    // gradient is cast back to bf16 (65,536) before pow's backward, beside four fp32 tensors
    // (524,288): 589,824, less its own freed normed copy when the weight trains.
    let llama = toy_llama(4);
    let p = plan(Method::Full, Precision::MixedBf16, 2, 64, 0, false);
    let g = graph::build(&llama, &p);
    let norm = crate::op_ending(&g, "layers.1.input_layernorm");
    assert_eq!(norm.backward_transient.0, 655_360 - 131_072);
    let g = graph::build(
        &llama,
        &Plan {
            method: lora(8),
            ..p
        },
    );
    let norm = crate::op_ending(&g, "layers.1.input_layernorm");
    assert_eq!(norm.backward_transient.0, 655_360);
    let t5 = model("t5-small");
    let p = plan(Method::Full, Precision::MixedBf16, 2, 64, 64, false);
    let g = graph::build(
        &t5,
        &Plan {
            precision: Precision::Bf16,
            ..p
        },
    );
    let norm = crate::op_ending(&g, "encoder.final_norm");
    // t5-small's d_model is 512: 128 x 512 x 2 B + 4 x 128 x 512 x 4 B, less the freed bf16
    // normed copy (128 x 512 x 2 B).
    assert_eq!(norm.backward_transient.0, 131_072 + 1_048_576 - 131_072);
}

/// Bytes of the gradients held (`Op::grads`) while op `name`'s backward runs: each waits from
/// the backward of the last op that lists it (in forward order) through that of the first.
fn held_at(g: &OpGraph, name: &str) -> u64 {
    let ops: Vec<&Op> = g.ops().collect();
    let at = ops
        .iter()
        .position(|o| g.name(o.name) == name)
        .unwrap_or_else(|| panic!("no op {name}"));
    let mut span: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
    for (i, o) in ops.iter().enumerate() {
        for t in &o.grads {
            let e = span.entry(t.0).or_insert((i, i));
            e.1 = i;
        }
    }
    span.iter()
        .filter(|(_, (first, last))| *first <= at && at < *last)
        .map(|(&t, _)| g.tensor(ftplan::graph::op::TensorId(t)).bytes.0)
        .sum()
}

/// The attention's ops of layer 1 in forward order, from `names`.
fn attention_order(g: &OpGraph, names: &[&str]) -> Vec<String> {
    g.ops()
        .map(|o| g.name(o.name))
        .filter_map(|n| {
            let part = n.strip_prefix("decoder.layers.1.self_attn.")?;
            names.contains(&part).then(|| part.to_string())
        })
        .collect()
}

#[test]
fn the_attentions_gradients_wait_for_their_producers_in_the_forwards_order() {
    // Autograd runs backward in reverse creation order (`ReadyQueue` pops the highest sequence
    // number), so a gradient made by one op's backward waits in its producer's `InputBuffer`
    // while every op built between the two runs its backward.
    // Gemma4TextAttention builds q's projection, norm and rotary, then k's, then the value
    // norm (keys are values on the global layers). A toy Gemma 4 (hidden 64, 4 heads of 16,
    // global heads of 512 with 4 KV heads and keys as values, layers sliding then full) in
    // mixed bf16 at 1 x 1,024: the global layer's rotary multiplies q and k (bf16) by fp32
    // tables, so their gradients coming back from SDPA's casts are fp32, 1,024 x 2,048 x 4 B
    // = 8,388,608 each, and both wait while the value norm's backward runs, beside the
    // residual stream's fp32 gradient that waits through the whole attention branch (1,024 x
    // 64 x 4 B = 262,144): 17,039,360. A CPU dispatch trace of transformers' run shows the two
    // live there, with the norm's five fp32 tensors of that size, at the run's peak.
    let gemma4 = toy_gemma4(4);
    let p = plan(Method::Full, Precision::MixedBf16, 1, 1024, 0, false);
    let g = graph::build(&gemma4, &p);
    let parts = [
        "q_proj", "q_norm", "rotary_q", "k_proj", "k_norm", "rotary_k", "v_proj", "v_norm", "core",
    ];
    assert_eq!(
        attention_order(&g, &parts),
        [
            "q_proj", "q_norm", "rotary_q", "k_proj", "k_norm", "rotary_k", "v_norm", "core"
        ]
    );
    assert_eq!(held_at(&g, "decoder.layers.1.self_attn.v_norm"), 17_039_360);
    // The value norm's own backward: five fp32 tensors of 1,024 x 2,048.
    let v_norm = op_named(&g, "decoder.layers.1.self_attn.v_norm");
    assert_eq!(v_norm.backward_transient.0, 5 * 8_388_608);

    // Llama builds q, k and v, then rotates q and k. A toy (hidden 256, 4 heads of 64, 2 KV
    // heads) in bf16 at 2 x 64 (128 tokens): while k's rotary runs its backward, q's rotated
    // gradient (128 x 256 x 2 B = 65,536) and v's (128 x 128 x 2 B = 32,768) wait; while v's
    // projection runs its, the gradients of q's and k's projections wait (65,536 + 32,768).
    // The residual stream's gradient (65,536) waits beside both.
    let llama = toy_llama(2);
    let p = plan(Method::Full, Precision::Bf16, 2, 64, 0, false);
    let g = graph::build(&llama, &p);
    assert_eq!(held_at(&g, "decoder.layers.1.self_attn.rotary_k"), 163_840);
    assert_eq!(held_at(&g, "decoder.layers.1.self_attn.v_proj"), 163_840);

    // Qwen3 norms q and k as it projects them, then projects v and rotates both; HunYuan
    // rotates q and k before its norms.
    let order = |model_type: &str| {
        let m = toy_decoder(model_type, 2);
        let g = graph::build(&m, &plan(Method::Full, Precision::Bf16, 1, 64, 0, false));
        attention_order(&g, &parts)
    };
    assert_eq!(
        order("qwen3"),
        [
            "q_proj", "q_norm", "k_proj", "k_norm", "v_proj", "rotary_q", "rotary_k", "core"
        ]
    );
    assert_eq!(
        order("hunyuan_v1_dense"),
        [
            "q_proj", "k_proj", "v_proj", "rotary_q", "rotary_k", "q_norm", "k_norm", "core"
        ]
    );
}

#[test]
fn the_stack_keeps_its_rotary_tables_until_the_first_layers_backward() {
    // LlamaModel computes `position_embeddings = self.rotary_emb(hidden_states, position_ids)`
    // once: cos and sin, (1, seq, head_dim) from the batch-1 position ids, in the hidden
    // states' dtype, which every layer's rotary multiplies save. A toy Llama (4 heads of 64)
    // at 2 x 64 tokens in mixed bf16 (fp32 hidden states): 2 x 64 x 64 x 4 B = 32,768,
    // whatever the batch; in pure bf16 half that.
    let llama = toy_llama(2);
    let tables = |m: &ModelSpec, precision: Precision, batch: u64, seq: u64| {
        let g = graph::build(m, &plan(Method::Full, precision, batch, seq, 0, false));
        crate::kept_bytes(&g, crate::op_ending(&g, "position_embeddings"))
    };
    assert_eq!(tables(&llama, Precision::MixedBf16, 2, 64), 32_768);
    assert_eq!(tables(&llama, Precision::MixedBf16, 8, 64), 32_768);
    assert_eq!(tables(&llama, Precision::Bf16, 2, 64), 16_384);
    // Gemma 4 computes a pair per layer type: the sliding layers' at their head width (16),
    // the global layers' at theirs (512): 2 x 1,024 x (16 + 512) x 4 B = 4,325,376 at 1,024
    // tokens. (Tiny Gemma 4 31B on CPU: the estimate had been 4.2 MB under the run's peak
    // with both layers' waiting gradients counted; with the tables it is within 0.1 %.)
    let gemma4 = toy_gemma4(4);
    assert_eq!(tables(&gemma4, Precision::MixedBf16, 1, 1024), 4_325_376);
}

#[test]
fn a_parallel_blocks_shared_norm_output_gradient_waits_and_eager_attention_frees_v() {
    // Falcon's parallel block feeds one norm output to the attention and the MLP. The MLP,
    // built last, runs its backward first; its gradient of that output (fp32: an autocast
    // LayerNorm's) waits in the norm's `InputBuffer` through the attention's backward, beside
    // the residual stream's (fp32 in mixed precision). A toy Falcon (hidden 256) in mixed bf16
    // at 2 x 64: 128 x 256 x 4 B = 131,072 each, 262,144 while the output projection's
    // backward runs. (A replay of four Falcon-7B layers under checkpointed LoRA holds that
    // fp32 gradient at its peak: -0.9 -> -0.0 %.)
    let falcon = toy(serde_json::json!({
        "model_type": "falcon", "hidden_size": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 512, "multi_query": true,
        "new_decoder_architecture": false, "parallel_attn": true, "bias": false,
        "alibi": false
    }));
    let g = graph::build(
        &falcon,
        &plan(Method::Full, Precision::MixedBf16, 2, 64, 0, false),
    );
    assert_eq!(held_at(&g, "decoder.layers.1.attn.o_proj"), 262_144);

    // Eager attention's worst backward moment is softmax's: its incoming gradient and result
    // (fp32 probabilities' size each) and v's gradient. The matmul with v has run its
    // backward, so what it kept, the probabilities' bf16 copy and v, is freed (replays of
    // checkpointed GPT-J and GPT-Neo hold neither there). A toy Llama (hidden 256, 4 heads of
    // 64) in bf16, eager, at 2 x 64: scores 2 x 4 x 64 x 64 = 32,768; probabilities 131,072
    // (fp32), their copy 65,536, v 128 x 256 x 2 B = 65,536 and its gradient 65,536: 2 x
    // 131,072 - 65,536 - 65,536 + 65,536 = 196,608 (262,144 while v was counted).
    let llama = toy_llama(4);
    let eager = Plan {
        attention: AttentionKernel::Eager,
        ..plan(Method::Full, Precision::Bf16, 2, 64, 0, false)
    };
    let g = graph::build(&llama, &eager);
    let core = op_named(&g, "decoder.layers.1.self_attn.core");
    assert_eq!(core.backward_transient.0, 196_608);
}

#[test]
fn falcon_hands_sdpa_its_materialised_causal_mask() {
    // FalconModel builds its causal mask with `allow_is_causal_skip=False` (so that ALiBi can be
    // added onto it) and FalconAttention passes it to SDPA with or without ALiBi: SDPA converts
    // the boolean mask to an additive one per call, which the memory-efficient kernel (and the
    // CPU's flash kernel) keeps for backward. A toy Falcon with the new decoder (hidden 256, 4
    // heads, 2 KV heads broadcast to all 4) in mixed bf16 at 2 x 64: 2 x 64 x 64 x 2 B =
    // 16,384 per layer. (Tiny Falcon-40B on CPU: -23.9 -> -0.0 %.)
    let falcon = toy(serde_json::json!({
        "model_type": "falcon", "hidden_size": 256, "num_attention_heads": 4,
        "num_kv_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
        "new_decoder_architecture": true, "parallel_attn": true, "bias": false,
        "alibi": false
    }));
    let g = graph::build(
        &falcon,
        &plan(Method::Full, Precision::MixedBf16, 2, 64, 0, false),
    );
    let core = op_named(&g, "decoder.layers.1.attn.core");
    let saved: Vec<u64> = core.saves.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert!(saved.contains(&16_384), "{saved:?}");
}

#[test]
fn eager_attentions_mask_lives_through_the_blocks_forward() {
    // transformers builds the eager mask once per forward (`create_causal_mask`: batch x 1 x q
    // x k, additive, in the embeddings' dtype) and the model's forward names it until its
    // blocks are done; without checkpointing nothing keeps it for backward. A toy Llama in
    // mixed bf16 (fp32 embeddings), eager, at 2 x 64: 2 x 64 x 64 x 4 B = 32,768, named while
    // every block runs its forward. (Tiny BLOOM on CPU, which peaks in its second block's
    // forward: -5.2 -> -0.7 %.)
    let llama = toy_llama(4);
    let eager = Plan {
        attention: AttentionKernel::Eager,
        ..plan(Method::Full, Precision::MixedBf16, 2, 64, 0, false)
    };
    let g = graph::build(&llama, &eager);
    let core = op_named(&g, "decoder.layers.1.self_attn.core");
    assert!(named_bytes(&g, core).contains(&32_768));
    let head = crate::op_ending(&g, "lm_head");
    assert!(!named_bytes(&g, head).contains(&32_768));
}

#[test]
fn sdpa_runs_beside_its_callers_operands_and_the_copies_it_reads() {
    // A toy Gemma 4 whose global layer has 4 heads of 512 over 2 KV heads, mixed bf16, 1 x
    // 1,024 tokens. With a mask or heads over 256 wide, transformers repeats grouped keys for
    // every head (`repeat_kv`: `expand(...).reshape(...)`, a copy from more than one KV head) in
    // their own dtype, and autocast casts that copy for the kernel: fp32 keys (rotated by fp32
    // tables under autocast) leave the wide fp32 copy named `key` while the kernel runs,
    // 1,024 x 2,048 x 4 B = 8,388,608, the core's one transient. Its bf16 output (1,024 x 2,048
    // x 2 B) is kept for the backward, so held from the core on (it had been counted twice).
    let m = toy_gemma4(2);
    let p = plan(Method::Full, Precision::MixedBf16, 1, 1024, 0, false);
    let g = graph::build(&m, &p);
    let core = op_named(&g, "decoder.layers.1.self_attn.core");
    assert_eq!(core.forward_transient.0, 8_388_608);
    // While it runs, the frames name the stack's input (1,024 x 64 x 4 B = 262,144), the
    // sliding layers' boolean mask, which the model's forward holds until the blocks are done
    // (1,024 x 1,024 x 1 B = 1,048,576), the block's input and its normed copy (262,144 each),
    // and the operands as `sdpa_attention_forward(module, query, key, value, ...)` gets them:
    // q out of the fp32 rotary (1,024 x 2,048 x 4 B = 8,388,608), k (1,024 x 1,024 x 4 B =
    // 4,194,304) and v out of its norm in bf16 (1,024 x 1,024 x 2 B = 2,097,152).
    assert_eq!(
        named_bytes(&g, core),
        [
            262_144, 1_048_576, 262_144, 262_144, 8_388_608, 4_194_304, 2_097_152
        ]
    );
    // No op keeps q, k or v (the kernel keeps autocast's casts), nor the mask, nor the normed
    // input (the projections keep their bf16 casts of it): the run peaks there, with
    // 8,388,608 + 8,388,608 + 4,194,304 + 2,097,152 + 1,048,576 + 262,144 = 24,379,392 B beyond
    // the cuBLAS workspaces. A CPU run of this toy (`ftplan measure --device cpu`) peaks at that
    // kernel: -5.4 -> -0.3 %; tiny Gemma 4 26B-A4B -5.1 -> -0.4 %.
    let (m, hw) = replay_estimate(&g, &p);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Forward);
    assert_eq!(m.peak_op, "decoder.layers.1.self_attn.core");
    let workspaces = hw.cublas_workspace * 2;
    assert_eq!((m.at_peak.temporary - workspaces).0, 24_379_392);
}

#[test]
fn each_copy_of_a_repeated_block_holds_the_gradients_it_awaits() {
    // Layers 1..L-1 are built once and walked once; each other copy is added by what one copy
    // changes. A gradient the copy began and passed on within itself (the residual stream's:
    // the MLP residual's share waits in the InputBuffer of the block input's producer until the
    // input norm's backward adds its own) is held at the same moment by every copy.
    // The walk had put in its place what was pending when the walked copy ended (nothing), so
    // the later copies ran without it.
    // GPT-Neo-1.3B in pure bf16 over 2 FSDP2 ranks, checkpointed, 2 x 2,048, eager: its
    // replay traced op by op (`validation/README.md`) has softmax's backward in layer 23 at
    // 6,892,000,504 B (the walked copy: ftplan 6,891,956,856), in layer 22 the reduce-scatter
    // input the layer before left (fp32, 201,408,512) more, and each layer below that
    // 33,574,912 more (this rank's bf16 gradient shard, 50,352,128, less the 16 MiB input the
    // checkpoint frees); layer 1 holds the run's peak, 7,832,057,080. The estimate: 6,891,956,856
    // + 201,408,512 + 21 x 33,574,912 = 7,798,438,520 at layer 2, and 7,832,013,432 at layer 1,
    // with the residual stream's gradient (2 x 2,048 x 2,048 x 2 B = 16,777,216) it had
    // dropped: -0.21 -> -0.00 %. Llama-2-7B over 32 ranks went -0.48 -> -0.00 %.
    let neo = shipped_run(
        "validation/fsdp.jsonl",
        "gpt-neo-1.3b|full_bf16|b2|s2048|gc1|eager|fsdp|w2",
    );
    assert_eq!(
        neo.measured_peak - neo.estimated_peak,
        7_832_057_080 - 7_832_013_432
    );
    let llama = shipped_run(
        "validation/fsdp.jsonl",
        "llama2-7b|full|b2|s2048|gc1|sdpa|fsdp|w32",
    );
    within(&llama, 0.0001);
}

#[test]
fn checkpoints_keep_the_stacks_sliding_mask_and_gemma4s_stored_keys_and_values() {
    // What the model's forward hands every checkpointed block stays with the block's inputs
    // until its backward, so to the end of backward.
    // - SDPA's sliding window, once the keys reach it: `sdpa_mask` materialises one boolean
    //   (1, 1, q, k) mask for the sliding layers. A toy Gemma 4 (window 32) at 1 x 64: 64 x 64
    //   x 1 B = 4,096 B.
    // - Gemma 4 stores the last layer of each attention type's keys and values in the
    //   `shared_kv_states` dict handed to every layer (`store_full_length_kv`), whether or not
    //   a layer shares them; a checkpointed block's first forward keeps nothing else of them.
    //   In pure bf16: the sliding layer's (2 KV heads of 16) k and v, 64 x 32 x 2 B each,
    //   8,192 B; the global layer's (1 KV head of 512, keys as values: k normed and rotated, v
    //   the value norm of the same projection), 64 x 512 x 2 B each, 131,072 B.
    // A CPU replay of a checkpointed 6-layer Gemma 4 31B at 2 x 4,096 holds all three at the
    // loss's backward (16,777,216 + 201,326,592 B; the run read -0.38 %, now -0.00 %);
    // Command R7B's 8,192-token mask was the whole of its -0.15 %.
    let m = toy_gemma4(1);
    let p = plan(Method::Full, Precision::Bf16, 1, 64, 0, true);
    let g = graph::build(&m, &p);
    assert_eq!(saved(&g, "attention_masks"), 4_096);
    assert_eq!(saved(&g, "decoder.shared_kv_states.sliding"), 8_192);
    assert_eq!(saved(&g, "decoder.shared_kv_states.full"), 131_072);
    // Without checkpointing autograd keeps them in the attention anyway, and the mask dies
    // with the forward.
    let g = graph::build(&m, &plan(Method::Full, Precision::Bf16, 1, 64, 0, false));
    assert!(g.ops().all(
        |o| !g.name(o.name).contains("shared_kv_states") && g.name(o.name) != "attention_masks"
    ));
    // Below the window there is no mask (`is_causal` suffices).
    let g = graph::build(&m, &plan(Method::Full, Precision::Bf16, 1, 16, 0, true));
    assert!(g.ops().all(|o| g.name(o.name) != "attention_masks"));
    let row = shipped_run(
        "validation/families.jsonl",
        "gemma-4-31b-6l|full_bf16|b2|s4096|gc1|sdpa",
    );
    within(&row, 0.0001);
}

#[test]
fn a_routers_softmax_keeps_its_fp32_output_for_backward() {
    // `F.softmax(router_logits, dim=-1, dtype=torch.float)` keeps its output for
    // `_softmax_backward_data` whenever the logits need a gradient (the block's input does,
    // even with a frozen router). A toy Qwen3-MoE (hidden 256, 16 experts, top 4), LoRA on q and
    // v, at 2 x 64: 128 tokens x 16 experts x 4 B = 8,192 B a layer. A CPU replay of a 2-layer
    // Qwen3-MoE at 4 x 4,096 holds both layers' (16384 x 128 x 4 B each): -0.20 -> -0.08 %.
    let m = toy(serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512, "num_experts": 16,
        "num_experts_per_tok": 4
    }));
    let p = plan(lora(16), Precision::MixedBf16, 2, 64, 0, false);
    let g = graph::build(&m, &p);
    assert_eq!(saved(&g, "decoder.layers.1.mlp.router.softmax"), 8_192);
    let row = shipped_run(
        "validation/families.jsonl",
        "qwen3-moe-2l-v2048|lora|b4|s4096|gc0|sdpa|r16|all",
    );
    within(&row, 0.001);
}

#[test]
fn t5s_bias_lookup_keeps_its_bucket_indices_for_the_tables_gradient() {
    // T5's relative position bias is an `nn.Embedding` over a (q, k) tensor of int64 bucket
    // indices; with the table training, `embedding_dense_backward` reads the indices, so the
    // lookup keeps them from the first block's forward to its backward. t5-small, full
    // fine-tuning at 2 x (64, 32): the encoder's 64 x 64 x 8 B = 32,768, the decoder's 32 x 32
    // x 8 B = 8,192. A CPU replay of tiny T5 at 1,024 source tokens holds the encoder's
    // (8,388,608 B: -7.1 -> -0.4 %); the H200's T5-base full runs moved -0.99 -> -0.97 % and
    // -1.06 -> -1.05 %. LoRA leaves the table frozen: no gradient, nothing kept.
    let t5 = model("t5-small");
    let p = plan(Method::Full, Precision::MixedBf16, 2, 64, 32, false);
    let g = graph::build(&t5, &p);
    assert_eq!(saved(&g, "encoder.relative_attention_bias.buckets"), 32_768);
    assert_eq!(saved(&g, "decoder.relative_attention_bias.buckets"), 8_192);
    let g = graph::build(&t5, &plan(lora(8), Precision::MixedBf16, 2, 64, 32, false));
    assert!(g.ops().all(|o| !g.name(o.name).ends_with("buckets")));
}

#[test]
fn the_chunked_delta_rule_ends_beside_its_fp32_locals_and_the_outputs_copy() {
    // `torch_chunk_gated_delta_rule` (transformers' Qwen3.5 fallback) at the end of its loop,
    // as `--tiny` shrinks Qwen3.5-27B (hidden 64; the linear attention's 48 value heads over 16
    // key heads of 128 kept), mixed bf16, 1 x 1,024 tokens: 16 chunks of 64, nothing padded.
    // Per tensor of the value or key width, 48 x 128 x 1,024 x 4 B = 25,165,824 in fp32.
    // - v * beta, the decayed k * beta (read by the solves, kept by neither) and the fp32
    //   output being filled: 3 x 25,165,824;
    // - under autocast the loop's matmuls keep bf16 casts of their slices, so no op keeps the
    //   decayed q and k nor the intra-chunk matrix (48 x 64 x 1,024 x 4 B = 12,582,912), which
    //   the function's locals still name: 2 x 25,165,824 + 12,582,912;
    // - the output is `zeros_like(new_values)`, and `linalg_solve_triangular_out` makes its
    //   result Fortran-contiguous in the last two dimensions (aten BatchLinearAlgebra.cpp), so
    //   the final `reshape` across the chunks copies it: 25,165,824 more, beside the original
    //   (the bf16 result comes after the original is freed, and is smaller);
    // - the mixer's locals: the convolution's SiLU output ((2 x 16 x 128 + 6,144) x 1,024 x 2 B
    //   = 20,971,520), the repeated q and k (2 x 6,144 x 1,024 x 2 B = 25,165,824) and z
    //   (6,144 x 1,024 x 2 B = 12,582,912).
    // 163,577,856 + 58,720,256 = 222,298,112 B.
    let m = toy(serde_json::json!({
        "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "linear_num_key_heads": 16, "linear_num_value_heads": 48,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2, "vocab_size": 512, "tie_word_embeddings": false
    }));
    let p = plan(Method::Full, Precision::MixedBf16, 1, 1024, 0, false);
    let g = graph::build(&m, &p);
    let rule = op_named(&g, "decoder.layers.0.linear_attn.chunk_gated_delta_rule");
    assert_eq!(rule.forward_transient.0, 222_298_112);
    // The run peaks there. The CPU run (`ftplan measure --model qwen3.5-27b --tiny --device
    // cpu`) peaks at that copy, 745,114,116 B; the estimate was 710,475,760 (-4.6 %), and is
    // now 741,866,352 (-0.4 %).
    let (m, _) = replay_estimate(&g, &p);
    assert_eq!(m.peak_phase, ftplan::memory::Phase::Forward);
    assert_eq!(
        m.peak_op,
        "decoder.layers.0.linear_attn.chunk_gated_delta_rule"
    );
    assert_eq!(m.peak.0, 741_866_352);
}

#[test]
fn an_op_that_keeps_its_output_counts_it_once() {
    // ReLU keeps its output for `threshold_backward`: from the op on the walk holds it, so the
    // op's forward moment has nothing more of it as a transient (it had been counted twice
    // there). A toy T5 (width 64, feed-forward 128), mixed bf16, 1 x 64 source tokens: the
    // encoder's ReLU output is 64 x 128 x 2 B = 16,384.
    let m = toy(serde_json::json!({
        "model_type": "t5", "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4,
        "d_kv": 16, "vocab_size": 512, "feed_forward_proj": "relu", "dropout_rate": 0.0
    }));
    let g = graph::build(
        &m,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 16, false),
    );
    let relu = op_named(&g, "encoder.layers.0.mlp.act");
    assert_eq!(relu.out.0, 16_384);
    let kept: Vec<u64> = relu.saves.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert_eq!(kept, [16_384]);
    assert_eq!(relu.forward_transient.0, 0);
}

#[test]
fn a_weights_cast_back_to_fp32_is_a_node_of_its_own() {
    // Under autocast a trained fp32 weight's gradient is made by the matmul's node in bf16, then
    // cast back by `ToCopyBackward`, which runs after the matmul's node has released its saved
    // tensors and its incoming gradient. GPT-2's tied head (50,257 x 768), mixed bf16, eager
    // attention, 2 x 128 tokens: the head keeps its bf16 input (2 x 128 x 768 x 2 B = 393,216)
    // and the weight's cast copy (50,257 x 768 x 2 B = 77,194,752); its backward reads the
    // logits' gradient (2 x 128 x 50,257 x 2 B = 25,731,584) and writes the input's (393,216).
    let m = model("gpt2");
    let p = Plan {
        attention: AttentionKernel::Eager,
        ..plan(Method::Full, Precision::MixedBf16, 2, 128, 0, false)
    };
    let g = graph::build(&m, &p);
    let head = op_named(&g, "lm_head");
    assert_eq!(head.backward_transient.0, 25_731_584 + 393_216);
    let kept: Vec<u64> = head.saves.iter().map(|&t| g.tensor(t).bytes.0).collect();
    assert_eq!(kept, [393_216, 77_194_752]);
    // Beyond what the rest holds: the matmul's node holds the two saved tensors, the two
    // gradients and the bf16 weight gradient (77,194,752), 180,907,520 B; the cast's node the
    // input's gradient, the bf16 and the fp32 weight gradient (154,389,504), 231,977,472 B. The
    // walk had one moment with the fp32 gradient beside the node's saved tensors and incoming
    // gradient, 258,102,272 B: 26,124,800 (the logits' gradient and the saved input) over, which
    // made the head the peak at +0.57 % of the CPU run (`ftplan measure --device cpu`). The
    // run peaks at the embedding's backward, 2,146,215,512 B; so does the estimate now.
    let (est, _) = replay_estimate(&g, &p);
    assert_eq!(est.peak_op, "decoder.embed_tokens");
    assert_eq!(est.peak.0, 2_146_213_456);
}

/// An op's forward and backward seconds without the side kernels beside its GEMM (autocast's
/// weight casts, QLoRA's dequantization, a bias's gradient sum).
fn gemm_seconds(op: &Op, rates: &ftplan::time::Rates) -> (f64, f64) {
    let mut bare = op.clone();
    bare.cost.side = ftplan::graph::op::SideKernels::default();
    ftplan::time::op_seconds(&bare, rates)
}

#[test]
fn autocasts_weight_casts_are_kernels_of_their_own_beside_the_gemm() {
    // The toy Llama (hidden 256) under mixed bf16, one sequence of 64 tokens. q_proj's fp32
    // weight is 256 x 256 = 65,536 elements: autocast's copy reads 4 bytes and writes 2 per
    // element (393,216 bytes, `bfloat16_copy_kernel_cuda`'s vectorized loop, 0.94 of the copy
    // rate), and its bf16 gradient is widened back to fp32 (the same bytes through the
    // dynamic-cast loop, 0.44). At 1e12 B/s those take 393,216 / 0.94e12 = 0.418 us forward
    // and 393,216 / 0.44e12 = 0.894 us backward, added to the GEMM's roofline rather than
    // hidden under it. Pure bf16 weights need no cast, so the op moves nothing beside its GEMM.
    let m = toy_llama(4);
    let rates = round_rates();
    let g = ftplan::graph::arch::build(
        &m,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 0, false),
    );
    let op = op_named(&g, "decoder.layers.0.self_attn.q_proj");
    assert_eq!(op.cost.side.forward_cast.0, 393_216);
    assert_eq!(op.cost.side.backward_cast.0, 393_216);
    let (forward, backward) = ftplan::time::op_seconds(op, &rates);
    let (gemm_forward, gemm_backward) = gemm_seconds(op, &rates);
    assert!((forward - gemm_forward - 393_216.0 / 0.94e12).abs() < 1e-15);
    assert!((backward - gemm_backward - 393_216.0 / 0.44e12).abs() < 1e-15);
    // A frozen fp32 weight (LoRA over an fp32 base) is cast every forward; no gradient of it
    // is cast back.
    let lora_fp32 =
        ftplan::graph::arch::build(&m, &plan(lora(8), Precision::MixedBf16, 1, 64, 0, false));
    let op = op_named(&lora_fp32, "decoder.layers.0.self_attn.q_proj");
    assert_eq!(op.cost.side.forward_cast.0, 393_216);
    assert_eq!(op.cost.side.backward_cast.0, 0);
    let bf16 =
        ftplan::graph::arch::build(&m, &plan(Method::Full, Precision::Bf16, 1, 64, 0, false));
    let op = op_named(&bf16, "decoder.layers.0.self_attn.q_proj");
    assert_eq!(op.cost.side.forward_cast.0, 0);
    assert_eq!(op.cost.side.backward_cast.0, 0);
}

#[test]
fn an_fp32_rms_norm_makes_no_casts() {
    // LlamaRMSNorm on an fp32 input (the residual stream of mixed-precision training): its
    // `.to(float32)` and `.to(input_dtype)` return the input itself, so the chain is pow
    // (x read, the square written), mean (the square read), the rsqrt multiply (x read, the
    // normed written) and the weight multiply (the normed read, the output written): 7 fp32
    // passes, 28 bytes per element. Toy Llama, 64 tokens x 256: 16,384 elements, 458,752 bytes.
    let m = toy_llama(4);
    let g = ftplan::graph::arch::build(
        &m,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 0, false),
    );
    let op = op_named(&g, "decoder.layers.0.input_layernorm");
    assert_eq!(op.cost.forward_bytes.0, 16_384 * 28);
}

#[test]
fn llama_rms_norms_kernels_each_run_at_their_own_loops_rate() {
    // LlamaRMSNorm in pure bf16 with its weight trained, toy Llama at 1 x 1,024 tokens of 256:
    // n = 262,144 elements (bf16 2 bytes, fp32 4). Its kernels, by loop:
    // - forward: pow (8n) and the cast back to bf16 (6n) contiguous; mean a row reduction
    //   (4n); the rsqrt multiply (8n) and the weight multiply (4n) broadcast, 2n elements.
    //   30n = 7,864,320 bytes.
    // - backward: the weight multiply's gradient (4n), the rsqrt multiply's (8n) and mean's
    //   expanded one (4n) broadcast, 3n elements; the product for the row sum (12n), pow's
    //   copy, scale and product (28n), the two paths' sum (12n) and the weight's gradient
    //   product (6n) contiguous, 58n; `.to()`'s gradient widened (6n); the row sum (4n); the
    //   weight gradient's sum over the tokens (2n). 86n = 22,544,384 bytes.
    // At 1e12 B/s: contiguous at 0.94, widening 0.44, a broadcast element as 12.5 copied bytes
    // (more than its bytes at 0.94), row sums 0.7, 16-bit token sums 0.34:
    // forward 14n/0.94 + 2n x 12.5 + 4n/0.7 = 11.96 us (one row-wise rate, 0.53, said 14.8);
    // backward 58n/0.94 + 6n/0.44 + 3n x 12.5 + 4n/0.7 + 2n/0.34 = 32.6 us (0.53: 42.5).
    let m = toy_llama(4);
    let rates = round_rates();
    let g = ftplan::graph::arch::build(&m, &plan(Method::Full, Precision::Bf16, 1, 1024, 0, false));
    let op = op_named(&g, "decoder.layers.0.input_layernorm");
    let n = 262_144.0;
    assert_eq!(op.cost.forward_bytes.0, 262_144 * 30);
    assert_eq!(op.cost.backward_bytes.0, 262_144 * 86);
    let loops = op.cost.backward_loops;
    assert_eq!(loops.broadcast_elements, 262_144 * 3);
    assert_eq!(loops.widening.0, 262_144 * 6);
    let (forward, backward) = ftplan::time::op_seconds(op, &rates);
    let forward_by_hand = (14.0 * n / 0.94 + 2.0 * n * 12.5 + 4.0 * n / 0.7) / 1e12;
    let backward_by_hand =
        (58.0 * n / 0.94 + 6.0 * n / 0.44 + 3.0 * n * 12.5 + 4.0 * n / 0.7 + 2.0 * n / 0.34) / 1e12;
    assert!((forward - forward_by_hand).abs() < 1e-12, "{forward}");
    assert!((backward - backward_by_hand).abs() < 1e-12, "{backward}");
    // LoRA freezes the weight: no gradient product, no sum over the tokens (78n).
    let lora = ftplan::graph::arch::build(&m, &plan(lora(8), Precision::Bf16, 1, 1024, 0, false));
    let frozen = op_named(&lora, "decoder.layers.1.input_layernorm");
    assert_eq!(frozen.cost.backward_bytes.0, 262_144 * 78);
    assert_eq!(frozen.cost.backward_loops.token_reduce.0, 0);
    // LN tuning trains the weight of a first norm whose input (the frozen embeddings' output)
    // needs no gradient: autograd builds no node before the weight multiply, whose backward is
    // the weight's product (6n) and its sum over the tokens (2n), two kernels.
    let ln = ftplan::graph::arch::build(
        &m,
        &plan(Method::LnTuning, Precision::Bf16, 1, 1024, 0, false),
    );
    let first = op_named(&ln, "decoder.layers.0.input_layernorm");
    assert_eq!(first.cost.backward_bytes.0, 262_144 * 8);
    assert_eq!(first.cost.backward_loops.token_reduce.0, 262_144 * 2);
    assert_eq!(first.cost.backward_kernels, 2);
    // T5LayerNorm on mixed precision's fp32 residual stream runs the same kernels (its
    // `.to(float32)` returns the input, no cast runs before the fp32 weight multiply): T5-base's
    // encoder at 64 tokens, n = 64 x 768 = 49,152, forward 28n (pow 8, mean 4, the two broadcast
    // multiplies 16), backward with its trained fp32 weight 92n (the broadcast gradients 20, the
    // contiguous passes 52 and the weight's product 12, the row sum 4, the token sum 4).
    let t5 = ftplan::graph::arch::build(
        &model("t5-base"),
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 16, false),
    );
    let norm = op_named(&t5, "encoder.layers.0.input_layernorm");
    assert_eq!(norm.cost.forward_bytes.0, 49_152 * 28);
    assert_eq!(norm.cost.backward_bytes.0, 49_152 * 92);
    assert_eq!(norm.cost.forward_loops.broadcast_elements, 49_152 * 2);
}

#[test]
fn a_mixed_dtype_add_runs_the_dynamic_cast_loop() {
    // Under mixed precision the residual stream is fp32 (the fp32 embeddings') and o_proj's
    // output bf16 (autocast's): their sum casts each bf16 element as it loads it, so
    // TensorIterator runs the dynamic-cast `unrolled_elementwise_kernel`, not the vectorized
    // loop. Toy Llama, 1 x 1,024 tokens of 256: 262,144 elements of 4 + 2 bytes read and 4
    // written, 2,621,440 bytes, at the profiled 0.63 of a 1e12 B/s copy rate: 4.16 us. In pure
    // bf16 both inputs are bf16 and the vectorized loop's 0.94 moves 6 bytes per element:
    // 1.67 us.
    let m = toy_llama(4);
    let rates = round_rates();
    let time = |precision| {
        let g = ftplan::graph::arch::build(&m, &plan(Method::Full, precision, 1, 1024, 0, false));
        let op = op_named(&g, "decoder.layers.0.self_attn.residual");
        (
            op.cost.forward_bytes.0,
            ftplan::time::op_seconds(op, &rates).0,
        )
    };
    let (bytes, mixed) = time(Precision::MixedBf16);
    assert_eq!(bytes, 2_621_440);
    assert!((mixed - 2_621_440.0 / 0.63e12).abs() < 1e-15, "{mixed}");
    let (bytes, pure) = time(Precision::Bf16);
    assert_eq!(bytes, 1_572_864);
    assert!((pure - 1_572_864.0 / 0.94e12).abs() < 1e-15, "{pure}");
}

#[test]
fn rotary_on_bf16_q_with_fp32_tables_moves_each_kernels_own_bytes() {
    // Toy Llama under mixed bf16, 64 tokens: q is 4 heads x 64 = 256 wide, 16,384 bf16 elements
    // (s = 2 bytes), and cos, built in the fp32 hidden state's dtype, makes the result fp32
    // (r = 4). `q * cos` moves s + r per element, neg on half of q s, cat 2s, `rotate_half(q) *
    // sin` s + r, the add of the two fp32 products 3r: 5s + 5r = 30 bytes, 491,520 in all, where
    // ten passes of the fp32 result would be 40. In pure bf16 both are 2 bytes: 20 per element.
    let m = toy_llama(4);
    let bytes = |precision| {
        let g = ftplan::graph::arch::build(&m, &plan(Method::Full, precision, 1, 64, 0, false));
        op_named(&g, "decoder.layers.0.self_attn.rotary_q")
            .cost
            .forward_bytes
            .0
    };
    assert_eq!(bytes(Precision::MixedBf16), 16_384 * 30);
    assert_eq!(bytes(Precision::Bf16), 16_384 * 20);
}

#[test]
fn a_trained_biass_gradient_is_a_sum_kernel_after_the_gemms() {
    // GPT-2's fused qkv projection under mixed bf16, one sequence of 64 tokens: its bias's
    // gradient is the bf16 output gradient (64 x 2,304 x 2 = 294,912 bytes) summed over the
    // tokens, a reduction kernel of its own. At 1e12 B/s and the profiled 0.34 of the copy rate
    // that takes 294,912 / 0.34e12 = 0.867 us beside the backward GEMMs, as does the weight's
    // (and bias's) gradient cast back to fp32: (768 x 2,304 + 2,304) x 6 = 10,630,656 bytes at
    // 0.44e12. LoRA freezes the bias: nothing to sum.
    let m = model("gpt2");
    let rates = round_rates();
    let g = ftplan::graph::arch::build(
        &m,
        &plan(Method::Full, Precision::MixedBf16, 1, 64, 0, false),
    );
    let op = op_named(&g, "decoder.layers.0.self_attn.qkv");
    assert_eq!(op.cost.side.backward_bias_sum.0, 294_912);
    let (_, backward) = ftplan::time::op_seconds(op, &rates);
    let (_, without) = gemm_seconds(op, &rates);
    assert_eq!(op.cost.side.backward_cast.0, 10_630_656);
    let sides = 294_912.0 / 0.34e12 + 10_630_656.0 / 0.44e12;
    assert!((backward - without - sides).abs() < 1e-14);
    let lora = ftplan::graph::arch::build(&m, &plan(lora(8), Precision::Bf16, 1, 64, 0, false));
    let op = op_named(&lora, "decoder.layers.0.self_attn.qkv");
    assert_eq!(op.cost.side.backward_bias_sum.0, 0);
}

#[test]
fn qloras_dequantization_is_a_kernel_of_its_own_before_each_use() {
    // The toy Llama (hidden 256) under QLoRA, one sequence of 64 tokens. q_proj's NF4 weight
    // is 65,536 elements: bitsandbytes' `kDequantizeBlockwise` reads half a byte and writes a
    // bf16 per element (32,768 + 131,072 = 163,840 bytes) before the GEMM, which then reads the
    // bf16 weight itself. At 1e12 B/s and the profiled 0.47 of the copy rate that is 163,840 /
    // 0.47e12 = 0.349 us. Backward dequantizes again where the input needs a gradient: not in
    // the first layer (the frozen embeddings' output needs none), in the second.
    let m = toy_llama(4);
    let rates = round_rates();
    let Method::Lora(adapter) = lora(16) else {
        unreachable!("lora() builds LoRA")
    };
    let g = ftplan::graph::arch::build(
        &m,
        &plan(Method::Qlora(adapter), Precision::Bf16, 1, 64, 0, false),
    );
    let q_projs: Vec<&Op> = g
        .ops()
        .filter(|o| g.name(o.name).ends_with("self_attn.q_proj"))
        .collect();
    assert_eq!(q_projs.len(), 2);
    let (first, second) = (q_projs[0], q_projs[1]);
    assert_eq!(first.cost.side.forward_dequant.0, 163_840);
    assert_eq!(first.cost.side.backward_dequant.0, 0);
    assert_eq!(second.cost.side.backward_dequant.0, 163_840);
    let (forward, backward) = ftplan::time::op_seconds(second, &rates);
    let (gemm_forward, gemm_backward) = gemm_seconds(second, &rates);
    assert!((forward - gemm_forward - 163_840.0 / 0.47e12).abs() < 1e-15);
    assert!((backward - gemm_backward - 163_840.0 / 0.47e12).abs() < 1e-15);
}
