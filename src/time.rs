//! Step time: a roofline over the op graph plus the host's kernel-launch cost.
//!
//! Each op's device time is the larger of its FLOPs over the achievable matmul rate (a
//! size-dependent efficiency curve, replaced by `ftplan calibrate` measurements) and its bytes
//! over the achievable bandwidth (Williams et al. 2009, "Roofline"). PyTorch's eager mode launches
//! kernels asynchronously from one host thread, paying a dispatch cost per kernel; when kernels
//! are short the host, not the GPU, sets the pace, so the step takes the larger of the two totals.

use crate::graph::op::{Access, AttentionPath, Loops, Op, OpGraph, OpKind, SideKernels};
use crate::spec::hardware::Hardware;
use crate::spec::plan::{Optimizer, Plan};
use crate::units::{Bytes, DType};
use serde::{Deserialize, Serialize};

/// Achievable rates of one GPU, from the datasheet or from `ftplan calibrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Where the numbers come from.
    pub source: String,
    /// (GEMM size n, achieved FLOP/s) for n x n x n bf16 products, ascending in n.
    pub bf16_matmul: Vec<(u64, f64)>,
    /// (n, FLOP/s) for fp32 (no TF32) products.
    pub fp32_matmul: Vec<(u64, f64)>,
    /// (n, FLOP/s) for fp16 products (V100 and T4 have fp16 tensor cores but no bf16 ones).
    pub fp16_matmul: Vec<(u64, f64)>,
    /// Achieved device-to-device copy bandwidth, bytes/s (read + write).
    pub copy_bandwidth: f64,
    /// Host-side cost of one eager-mode op dispatch (ATen dispatch, autograd bookkeeping,
    /// kernel launch), seconds.
    pub launch_overhead: f64,
    /// Host-side cost of one `nn.Module` call (Python hooks and argument handling), seconds.
    pub module_overhead: f64,
    /// Host-side cost of one checkpointed block beyond its ops (RNG stash and restore, hook
    /// contexts, the recomputation's entry), seconds.
    #[serde(default)]
    pub checkpoint_block: f64,
    /// Host-side cost of one tensor a checkpointed block saves (pack, repack, unpack), seconds.
    #[serde(default)]
    pub checkpoint_tensor: f64,
}

/// Fraction of datasheet peak a large, well-shaped cuBLAS GEMM sustains (power and clock
/// limits; e.g. 783 of 989 TFLOP/s bf16 on the H200, `validation/calib-h200.json`).
const DATASHEET_MATMUL_EFFICIENCY: f64 = 0.8;
/// Fraction of datasheet HBM bandwidth a streaming copy sustains (4.25 of 4.8 TB/s on the H200).
const DATASHEET_BANDWIDTH_EFFICIENCY: f64 = 0.88;
/// GEMM dimension at which tile and wave quantisation halve the achievable rate.
const HALF_EFFICIENCY_DIM: f64 = 96.0;
/// FlashAttention-2 reaches about half of the GEMM rate forward and less backward on an A100
/// (Dao 2023, fig. 5-6); the fused kernels SDPA picks on the H200 (cuDNN's flash forward and
/// backward, torch 2.11) sustained less on the fine-tuning shapes profiled there: a median of
/// 0.28 of the GEMM rate forward and 0.35 backward over 26 runs, 0.34 to 0.47 at 8k tokens and
/// more (`validation/profile-h200.jsonl`).
const ATTENTION_EFFICIENCY: f64 = 0.35;
/// The same kernels reading prefix tuning's materialised mask computed every score at 0.22 to
/// 0.28 of the GEMM rate (TinyLlama and GPT-2 prefix runs, `validation/profile-h200.jsonl`).
const MASKED_ATTENTION_EFFICIENCY: f64 = 0.25;
/// With attention dropout they drew their random numbers per score: 0.16 to 0.18 of the GEMM
/// rate forward and 0.28 to 0.30 backward (GPT-2 and BART with dropout, the same file), 0.24
/// over both passes' FLOPs (one forward, 2.5 backward).
const DROPOUT_ATTENTION_EFFICIENCY: f64 = 0.24;
/// A 16-bit GEMM with a dimension that is not a multiple of 8 falls off cuBLAS's tensor-core
/// fast path (NVIDIA's "Matrix Multiplication Background" guide, sec. 4.1): padding GPT-2's
/// vocabulary from 50257 to 50304 made nanoGPT's whole step ~25% faster, i.e. the misaligned LM
/// head ran roughly eight times slower than an aligned one.
const MISALIGNED_EFFICIENCY: f64 = 0.125;

impl Rates {
    /// Seconds to move `bytes` through a loop that sustains `efficiency` of the copy rate.
    fn moving(&self, bytes: f64, efficiency: f64) -> f64 {
        bytes / (self.copy_bandwidth * efficiency)
    }

    /// Datasheet-derived curves for a GPU that was not calibrated.
    pub fn from_datasheet(hw: &Hardware) -> Rates {
        let curve = |peak: f64| {
            [256u64, 512, 1024, 2048, 4096, 8192]
                .iter()
                .map(|&n| {
                    (
                        n,
                        peak * DATASHEET_MATMUL_EFFICIENCY * n as f64
                            / (n as f64 + HALF_EFFICIENCY_DIM),
                    )
                })
                .collect()
        };
        Rates {
            source: format!("{} datasheet", hw.display_name),
            bf16_matmul: curve(hw.bf16_tflops * 1e12),
            fp32_matmul: curve(hw.fp32_tflops * 1e12),
            fp16_matmul: curve(hw.fp16_tflops * 1e12),
            copy_bandwidth: hw.hbm_gbps * 1e9 * DATASHEET_BANDWIDTH_EFFICIENCY,
            launch_overhead: hw.launch_overhead_us * 1e-6,
            module_overhead: hw.module_overhead_us * 1e-6,
            checkpoint_block: hw.checkpoint_block_us * 1e-6,
            checkpoint_tensor: hw.checkpoint_tensor_us * 1e-6,
        }
    }

    /// Achievable FLOP/s of a GEMM whose smallest dimension is `dim`.
    pub fn matmul(&self, dtype: DType, dim: u64) -> f64 {
        let curve = match dtype {
            DType::F32 => &self.fp32_matmul,
            DType::F16 if !self.fp16_matmul.is_empty() => &self.fp16_matmul,
            DType::Bf16 | DType::F16 | DType::U8 | DType::Nf4 | DType::I64 => &self.bf16_matmul,
        };
        interpolate(curve, dim.max(1))
    }
}

/// Rate at `n` on a measured curve: scaled by n/(n + n_half) below the first point, flat above
/// the last, linear in between.
fn interpolate(curve: &[(u64, f64)], n: u64) -> f64 {
    let Some(&(n0, r0)) = curve.first() else {
        return 1.0;
    };
    if n <= n0 {
        let shape = |x: f64| x / (x + HALF_EFFICIENCY_DIM);
        return r0 * shape(n as f64) / shape(n0 as f64);
    }
    for w in curve.windows(2) {
        let ((a, ra), (b, rb)) = (w[0], w[1]);
        if n <= b {
            let t = (n - a) as f64 / (b - a) as f64;
            return ra + t * (rb - ra);
        }
    }
    curve.last().map_or(r0, |&(_, r)| r)
}

/// A two-socket server's memory bandwidth (8 channels of DDR4-3200 per socket: 2 x 204.8 GB/s,
/// about 200 GB/s sustained in STREAM-like loops), for the CPU optimizer step of offload.
const HOST_MEMORY_BANDWIDTH: f64 = 200e9;

/// Step time and throughput.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimeEstimate {
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    /// Model FLOPs utilisation: 6N (or 4N + 2N_trainable) per token over the datasheet peak.
    pub mfu: f64,
    /// Device time of forward, backward and optimizer.
    pub forward_seconds: f64,
    pub backward_seconds: f64,
    pub optimizer_seconds: f64,
    /// Host launch time of the whole step.
    pub host_seconds: f64,
    /// Op dispatches the host pays for in one step (forward, recomputation, backward, the
    /// optimizer's kernels and per-tensor bookkeeping), each at the dispatch cost.
    pub host_dispatches: f64,
    /// `nn.Module` calls of one step (forward and recomputation), each at the module cost.
    pub host_module_calls: f64,
    /// Whether the host (kernel launches) rather than the GPU sets the pace.
    pub launch_bound: bool,
    /// All FLOPs of the step, recomputation included.
    pub flops: f64,
    /// Data-parallel gradient all-reduce (ring: 2(n-1)/n of the gradients over the interconnect).
    pub allreduce_seconds: f64,
    /// Collective time per step on one rank (all-gathers, reduce-scatters, all-reduces,
    /// pipeline sends), overlapped or not.
    pub communication_seconds: f64,
    /// Bytes one rank sends in data-parallel collectives per step.
    pub data_parallel_bytes: f64,
    /// The part of it compute does not hide (on the step's critical path).
    pub exposed_communication_seconds: f64,
    /// Idle fraction of a pipeline stage under 1F1B: (p - 1) / (M + p - 1).
    pub bubble_fraction: f64,
    /// Host-link time of paged optimizer states evicted to host memory (zero when resident).
    pub paging_seconds: f64,
}

impl TimeEstimate {
    /// Adds time the GPU waits for evicted optimizer pages, on the step's critical path.
    pub fn add_paging(&mut self, seconds: f64) {
        let scale = self.step_seconds / (self.step_seconds + seconds);
        self.paging_seconds += seconds;
        self.step_seconds += seconds;
        self.tokens_per_second *= scale;
        self.mfu *= scale;
    }
}

/// Fractions of the copy bandwidth that PyTorch's memory-bound kernels sustain, measured on the
/// H200 with torch 2.11 (`validation/kbench-h200.json`, `validation/kbench.py`: 16.7 M-element
/// operands, several times the L2; the CUDA-event figures less the 9.7 us an event pair adds
/// to one kernel, which is the gap between the same add timed alone and replayed from a CUDA
/// graph). They describe the kernels' loops rather than the chip, so other GPUs take them too.
/// A contiguous bf16 add: 3.97 of 4.23 TB/s.
const CONTIGUOUS_EFFICIENCY: f64 = 0.94;
/// `x.float()` of a bf16 tensor: 1.86 TB/s.
const WIDENING_EFFICIENCY: f64 = 0.44;
/// A binary op over contiguous operands of different dtypes (bf16 and fp32 in, fp32 out: 10
/// bytes per element), the dynamic-cast `unrolled_elementwise_kernel`: mixed precision's
/// residual adds 0.63 of the copy rate in TinyLlama's profiled steps (44 calls at 4.2 M elements,
/// 66 at 16.7 M), GPT-2-medium's `0.5 * x * (1 + tanh(...))` multiply 0.62 (48 calls at
/// 33.5 M, `validation/profile-h200.jsonl`).
const MIXED_EFFICIENCY: f64 = 0.63;
/// Rotary's `q * cos` over a transposed view, a row-broadcast multiply and `.contiguous()` of
/// a transpose: 1.37, 1.48 and 1.35 TB/s.
const STRIDED_EFFICIENCY: f64 = 0.33;
/// Row-wise kernels (norms, softmax): `F.layer_norm` in fp32 and transformers' eight-op
/// `LlamaRMSNorm` on bf16 both sustain 2.23 TB/s of the bytes the graph counts for them.
const ROWWISE_EFFICIENCY: f64 = 0.53;
/// A legacy `elementwise_kernel` element (a broadcast or strided operand) takes as long as this
/// many bytes of copy, whatever its dtype: the loop computes every operand's offset per element,
/// so elements, not bytes, bound it. Per 16.7 M elements on the H200 (4.23 TB/s): a bf16 row
/// scale 45.3 us (11.4 B), rotary's bf16 `q * cos` 49.6 us (12.5 B), a bf16 transpose copy
/// 49.9 us (12.6 B) (`kbench-h200.json`, less the event pair's 9.7 us); LlamaRMSNorm's fp32
/// rsqrt multiply 52.7 us (13.3 B, 89 calls) and mean's expanded fp32 gradient 41.2 us
/// (10.4 B, 44 calls) in TinyLlama LoRA's profiled step (`profile-h200.jsonl`). The median.
/// For bf16 operands it is `STRIDED_EFFICIENCY`'s rate: 4 bytes per element at 0.33.
const LEGACY_ELEMENT_BYTES: f64 = 12.5;
/// A sum or mean along each row (`reduce_kernel` over the last dimension, fp32): LlamaRMSNorm's
/// variance mean sustains 0.76 of the copy rate and its backward's row sum 0.65 in the
/// profiled TinyLlama steps (45 and 44 calls on 16.7 M elements, `profile-h200.jsonl`).
const ROW_REDUCE_EFFICIENCY: f64 = 0.7;
/// A sum over the tokens in fp32 (`reduce_kernel` over dimension 0): `sum(0)` of a 16.7 M
/// element tensor 0.47 of the copy rate (`kbench-h200.json`, `sum_dim0_fp32_T_H`), a trained
/// fp32 RMSNorm weight's gradient 0.46 (45 calls in checkpointed TinyLlama's profiled step).
/// In 16 bits the same sums are a bias's gradient (`BIAS_SUM_EFFICIENCY`).
const TOKEN_SUM_F32_EFFICIENCY: f64 = 0.47;
/// A trained bias's gradient, the output gradient summed over the tokens (`reduce_kernel` over
/// dimension 0 of a 16-bit gradient): 0.31 and 0.37 of the copy rate by the bytes it reads in
/// GPT-2's and GPT-2-medium's profiled steps (48 sums in 1.04 ms, 96 in 2.32 ms,
/// `validation/profile-h200.jsonl`).
const BIAS_SUM_EFFICIENCY: f64 = 0.34;
/// bitsandbytes' `kDequantizeBlockwise` of an NF4 weight to bf16 (half a byte read, two written
/// per element): 0.42 and 0.52 of the copy rate in the profiled QLoRA steps of TinyLlama (305
/// dequantizations in 2.66 ms) and Llama-2-7B (445 in 14.7 ms, `validation/profile-h200.jsonl`).
const DEQUANT_EFFICIENCY: f64 = 0.47;
/// The least time a kernel holds the GPU, launch to retirement: 1.3 us per kernel for adds of
/// one element replayed back to back from a CUDA graph (`kbench.py`, `graph_add_bf16_n1`).
const KERNEL_FLOOR: f64 = 1.3e-6;

/// PyTorch's fused AdamW (`_fused_adamw_`, one `multi_tensor_apply` kernel per chunk of
/// tensors) as profiled inside the measured steps (`validation/profile-h200.jsonl`): 30.8 GB
/// for TinyLlama's 1.1 B fp32 parameters in 8.9 ms, 0.82 of the copy rate; Llama-2-7B's bf16
/// parameters 34.3 ms, which bytes alone would put at 22 ms: the kernel does its arithmetic in
/// fp32 per element (`FusedAdamMathFunctor`'s opmath type) and converts every bf16 load and
/// store, 197 G elements/s at most.
const FUSED_ADAMW_EFFICIENCY: f64 = 0.82;
const FUSED_ADAMW_ELEMENTS: f64 = 197e9;
/// bitsandbytes' blockwise 8-bit Adam kernel (`kOptimizerStatic8bit2StateBlockwise`)
/// dequantizes both states through their 256-value maps, updates them and quantizes them back
/// by searching those maps per element: 35 G elements/s whatever the parameter dtype (1.10 B fp32
/// in 31.2 ms, 0.49 B bf16 in 14.2 ms, `validation/profile-h200.jsonl`), far under its bytes.
const BNB_8BIT_ELEMENTS: f64 = 35e9;

/// Host time of one paged state's prefetch (bitsandbytes' `prefetch_state`, a
/// `cudaMemPrefetchAsync` of a resident range): the H200 runs of TinyLlama with paged and plain
/// 8-bit AdamW, identical but for the paging, differ by 32.2 ms over 312 prefetches
/// (`validation/bnb-h200.jsonl`); 103 us each puts the paged 32-bit runs within 7 %.
const PAGED_PREFETCH: f64 = 103e-6;

/// Which pass of an op is timed.
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward,
}

/// Device seconds of one op's forward and of its backward (one copy).
pub fn op_seconds(op: &Op, rates: &Rates) -> (f64, f64) {
    (
        op_time(op, rates, Pass::Forward),
        op_time(op, rates, Pass::Backward),
    )
}

/// Device seconds of one pass of one op: its FLOPs, bytes, access path and kernel count for
/// that pass.
fn op_time(op: &Op, rates: &Rates, pass: Pass) -> f64 {
    let c = &op.cost;
    let side = side_seconds(&c.side, rates, pass);
    let (flops, bytes, access, kernels) = match pass {
        Pass::Forward => (
            c.forward_flops,
            c.forward_bytes,
            c.forward_access,
            c.forward_kernels,
        ),
        Pass::Backward => (
            c.input_grad_flops + c.weight_grad_flops,
            c.backward_bytes,
            c.backward_access,
            c.backward_kernels,
        ),
    };
    let unfused = op.kind == OpKind::Attention && op.cost.attention == AttentionPath::Unfused;
    let efficiency = match op.kind {
        // Unfused attention's score passes are softmax and its neighbours.
        OpKind::Attention if unfused => ROWWISE_EFFICIENCY,
        // GEMM and fused attention kernels stream their operands at the copy rate when
        // memory-bound.
        OpKind::Matmul | OpKind::Attention => 1.0,
        OpKind::Norm | OpKind::Loss => ROWWISE_EFFICIENCY,
        OpKind::Elementwise | OpKind::Embedding => match access {
            Access::Contiguous => CONTIGUOUS_EFFICIENCY,
            Access::Widening => WIDENING_EFFICIENCY,
            Access::Strided => STRIDED_EFFICIENCY,
            Access::Mixed => MIXED_EFFICIENCY,
        },
    };
    let floor = f64::from(kernels) * KERNEL_FLOOR;
    let loops = match pass {
        Pass::Forward => &c.forward_loops,
        Pass::Backward => &c.backward_loops,
    };
    let t_memory = if *loops == Loops::default() {
        rates.moving(bytes.0 as f64, efficiency)
    } else {
        loops_seconds(loops, op.compute, rates)
    }
    .max(floor);
    if flops.0 <= 0.0 {
        return t_memory + side;
    }
    let (kind, compute, dim) = (op.kind, op.compute, op.cost.min_dim);
    let compute_rate = match kind {
        OpKind::Matmul if op.cost.misaligned && compute != DType::F32 => {
            rates.matmul(compute, dim) * MISALIGNED_EFFICIENCY
        }
        OpKind::Matmul => rates.matmul(compute, dim),
        OpKind::Attention => {
            // Batched products over (seq x head_dim) operands: the rate of a GEMM as large as
            // the head dimension times 64.
            let gemm = rates.matmul(compute, dim.max(1) * 64);
            match op.cost.attention {
                AttentionPath::Fused => gemm * ATTENTION_EFFICIENCY,
                AttentionPath::FusedMasked => gemm * MASKED_ATTENTION_EFFICIENCY,
                AttentionPath::FusedDropout => gemm * DROPOUT_ATTENTION_EFFICIENCY,
                AttentionPath::Unfused => gemm,
            }
        }
        // Element-wise work runs on CUDA cores: bandwidth-bound in practice.
        OpKind::Norm | OpKind::Elementwise | OpKind::Embedding | OpKind::Loss => f64::INFINITY,
    };
    let t_compute = flops.0 / compute_rate;
    side + if unfused {
        // Separate kernels run one after another: the products, then the score passes.
        t_compute + t_memory
    } else {
        t_compute.max(t_memory)
    }
}

/// Device seconds of a chain of kernels, each part at its own loop's rate: the legacy loop at
/// its element rate unless its bytes take longer, and sums over the tokens at the rate of their
/// dtype (the op's compute dtype).
fn loops_seconds(loops: &Loops, compute: DType, rates: &Rates) -> f64 {
    let at = |bytes: Bytes, efficiency: f64| rates.moving(bytes.0 as f64, efficiency);
    let legacy = loops.broadcast_elements as f64 * LEGACY_ELEMENT_BYTES / rates.copy_bandwidth;
    let token_sum = if compute == DType::F32 {
        TOKEN_SUM_F32_EFFICIENCY
    } else {
        BIAS_SUM_EFFICIENCY
    };
    at(loops.contiguous, CONTIGUOUS_EFFICIENCY)
        + at(loops.widening, WIDENING_EFFICIENCY)
        + at(loops.broadcast, CONTIGUOUS_EFFICIENCY).max(legacy)
        + at(loops.row_reduce, ROW_REDUCE_EFFICIENCY)
        + at(loops.token_reduce, token_sum)
}

/// Device seconds of torch.optim.Adafactor's step as it runs by default: `foreach` defaults to
/// off for Adafactor (unlike the other optimizers, to spare the foreach path's extra memory), so
/// `_single_tensor_adafactor` steps one parameter at a time (torch/optim/_adafactor.py).
///
/// A matrix of P bytes (weight decay off): `param.norm(2)` reads P; the gradient's row norms
/// (`vector_norm(dim=-1)`) read P along the rows, its column norms (`dim=-2`) P across them;
/// `row_var @ col_var` writes the P-sized estimate; its `div_` by a one-element mean is a
/// broadcast (the legacy loop, 2 P); `clamp_` and `rsqrt_` 2 P each, `mul_(grad)` 3 P,
/// `update.norm(2)` P, `param.add_` 3 P: 17 P. Eight more kernels run over a row or a column
/// (the norms' `square_` and `div_`, the factors' `lerp_`, the row mean and its `clamp_`), each
/// at least the kernel floor. A vector: `grad * grad`, the variance's `lerp_`, `clone`,
/// `clamp_`, `rsqrt_`, `mul_`, two norms and the add, 20 of its bytes in nine kernels.
fn adafactor_step(trainable: &[&crate::graph::op::Param], rates: &Rates) -> f64 {
    trainable
        .iter()
        .map(|p| {
            let bytes = p.storage.bytes(p.elements) * p.copies;
            let copies = p.copies as f64;
            let (rows, cols) = p.shape;
            if rows > 1 && cols > 1 {
                let loops = Loops {
                    contiguous: bytes * 13,
                    broadcast: bytes * 2,
                    broadcast_elements: p.count(),
                    row_reduce: bytes,
                    token_reduce: bytes,
                    ..Loops::default()
                };
                loops_seconds(&loops, p.storage, rates) + 8.0 * copies * KERNEL_FLOOR
            } else {
                let loops = Loops {
                    contiguous: bytes * 20,
                    ..Loops::default()
                };
                loops_seconds(&loops, p.storage, rates).max(9.0 * copies * KERNEL_FLOOR)
            }
        })
        .sum()
}

/// Device seconds of the kernels an op launches beside its GEMM, which run before or after it
/// on the same stream: autocast's weight cast (forward: fp32 to half through
/// `bfloat16_copy_kernel_cuda`'s vectorized loop; backward: the gradient widened back by the
/// dynamic-cast loop), QLoRA's dequantization, and a trained bias's gradient sum.
fn side_seconds(side: &SideKernels, rates: &Rates, pass: Pass) -> f64 {
    if *side == SideKernels::default() {
        return 0.0;
    }
    let at = |bytes: Bytes, efficiency: f64| rates.moving(bytes.0 as f64, efficiency);
    match pass {
        Pass::Forward => {
            at(side.forward_cast, CONTIGUOUS_EFFICIENCY)
                + at(side.forward_dequant, DEQUANT_EFFICIENCY)
        }
        Pass::Backward => {
            at(side.backward_cast, WIDENING_EFFICIENCY)
                + at(side.backward_dequant, DEQUANT_EFFICIENCY)
                + at(side.backward_bias_sum, BIAS_SUM_EFFICIENCY)
        }
    }
}

/// The host thread enqueues work asynchronously; the GPU runs it in order. A unit of work
/// becomes available once the host has paid its dispatch cost, and starts when the GPU is free:
/// when kernels are short the GPU waits on the host, when they are long the host runs ahead.
#[derive(Debug, Default)]
struct Queue {
    /// Host cost of one op dispatch and of one `nn.Module` call.
    dispatch_cost: f64,
    module_cost: f64,
    host: f64,
    device: f64,
    busy: f64,
    host_total: f64,
    /// Dispatches and module calls paid so far, for the report.
    dispatches: f64,
    modules: f64,
}

impl Queue {
    /// Work the host waits for before and after (a `torch.cuda.synchronize()` around it): its
    /// host time and its device time add up instead of overlapping.
    fn serial(&mut self, dispatches: f64, extra: f64, device: f64) {
        let host = dispatches * self.dispatch_cost + extra;
        self.dispatches += dispatches;
        self.host_total += host;
        self.host = self.host.max(self.device) + host + device;
        self.device = self.host;
        self.busy += device;
    }

    /// One unit of work: its dispatches and module calls (plus any other host time, `extra`)
    /// on the host, then `device` seconds on the GPU.
    fn push(&mut self, dispatches: f64, modules: f64, extra: f64, device: f64) {
        let host = dispatches * self.dispatch_cost + modules * self.module_cost + extra;
        self.dispatches += dispatches;
        self.modules += modules;
        self.host += host;
        self.host_total += host;
        self.device = self.device.max(self.host) + device;
        self.busy += device;
    }
}

/// Estimates the time of one training step.
pub fn estimate(graph: &OpGraph, plan: &Plan, hw: &Hardware, rates: &Rates) -> TimeEstimate {
    // Non-reentrant checkpointing runs Python hooks for every tensor a block's autograd nodes
    // save: a pack hook in forward, and in backward the recomputation's pack hook and the
    // unpack hook (half the cost each way). An op's saved tensors are those it keeps plus the
    // weights it reads (a matmul saves its input and its weight, or the weight's cast copy;
    // `OpGraph::packed_params`): within a quarter of the pack-hook calls counted on Llama,
    // GPT-2, T5 and BART blocks.
    let checkpoint_hooks = |op: &Op| {
        // An op that backward never reaches builds no autograd node and saves nothing.
        if op.segment.is_some() && op.in_backward {
            (op.saves.len() + graph.packed_params(op)) as f64 * rates.checkpoint_tensor / 2.0
        } else {
            0.0
        }
    };
    let mut q = Queue {
        dispatch_cost: rates.launch_overhead,
        module_cost: rates.module_overhead,
        ..Queue::default()
    };
    let mut fwd = 0.0;
    let mut flops = 0.0;
    let ops: Vec<&Op> = graph.ops().collect();
    // Each op's forward and backward seconds, once: a repeated block's copies are the same ops.
    let seconds: Vec<(f64, f64)> = ops.iter().map(|op| op_seconds(op, rates)).collect();
    // Execution order with each repeated block expanded to its copies; `true` marks the first
    // op of a copy.
    let mut order: Vec<(usize, bool)> = Vec::with_capacity(ops.len());
    let mut i = 0;
    while i < ops.len() {
        let mut end = i + 1;
        // A run is one block's ops (one sharding unit): two neighbouring runs with the same
        // copy count stay two.
        while ops[i].repeat > 1
            && end < ops.len()
            && ops[end].repeat == ops[i].repeat
            && ops[end].unit == ops[i].unit
        {
            end += 1;
        }
        let repeated = ops[i].repeat > 1;
        for _ in 0..ops[i].repeat.max(1) {
            order.extend((i..end).map(|k| (k, repeated && k == i)));
        }
        i = end;
    }
    // Device time per unit instance (a block copy, or the root's ops between blocks), in
    // execution order: what the step schedule overlaps communication with.
    let mut fwd_units: Vec<(u32, f64)> = Vec::new();
    let mut last: Option<usize> = None;
    for &(k, first) in &order {
        let op = ops[k];
        let c = &op.cost;
        let t = seconds[k].0;
        if first || last.is_none_or(|l| ops[l].unit != op.unit) {
            fwd_units.push((op.unit, 0.0));
        }
        if let Some(u) = fwd_units.last_mut() {
            u.1 += t;
        }
        last = Some(k);
        fwd += t;
        flops += c.forward_flops.0;
        q.push(
            f64::from(c.forward_kernels),
            f64::from(c.modules),
            checkpoint_hooks(op),
            t,
        );
    }
    let mut bwd = 0.0;
    let mut current = None;
    let mut bwd_units: Vec<(u32, f64)> = Vec::new();
    for (pos, &(i, _)) in order.iter().enumerate().rev() {
        let op = ops[i];
        // A new copy of a repeated block is a new checkpointed block.
        let new_copy = order.get(pos + 1).is_some_and(|&(_, first)| first);
        if new_copy {
            current = None;
        }
        let next_unit = order.get(pos + 1).map(|&(n, _)| ops[n].unit);
        if new_copy || next_unit != Some(op.unit) {
            bwd_units.push((op.unit, 0.0));
        }
        let before = bwd;
        if !op.in_backward {
            continue;
        }
        if op.segment.is_some() && op.segment != current {
            // Checkpointing reruns the block's forward before its backward.
            let start = ops[..i]
                .iter()
                .rposition(|o| o.segment != op.segment)
                .map_or(0, |p| p + 1);
            let mut entry = rates.checkpoint_block;
            for (o, &(t, _)) in ops[start..=i].iter().zip(&seconds[start..=i]) {
                let c = &o.cost;
                bwd += t;
                flops += c.forward_flops.0;
                q.push(
                    f64::from(c.forward_kernels),
                    f64::from(c.modules),
                    checkpoint_hooks(o) + entry,
                    t,
                );
                entry = 0.0;
            }
        }
        current = op.segment;
        let c = &op.cost;
        let back_flops = c.input_grad_flops + c.weight_grad_flops;
        let t = seconds[i].1;
        bwd += t;
        flops += back_flops.0;
        // Backward runs in autograd's C++ engine: no module calls, except where a Python
        // `autograd.Function`'s backward runs.
        q.push(
            f64::from(c.backward_kernels),
            f64::from(c.backward_modules),
            0.0,
            t,
        );
        if let Some(u) = bwd_units.last_mut() {
            u.1 += bwd - before;
        }
    }
    // Optimizer: a memory-bound pass over parameters, gradients and states.
    let trainable: Vec<_> = graph.params.iter().filter(|p| p.updated()).collect();
    let param_bytes: Bytes = trainable.iter().map(|p| p.bytes()).sum();
    let state_bytes = crate::optimizer::state_bytes(plan.optimizer, &trainable);
    // Bytes each implementation's kernels read and write, from its source, in units of the
    // parameters' bytes P (gradients are the parameters' size and dtype) and the states' S
    // (none where the step is timed kernel by kernel); and its kernel launches per parameter
    // tensor.
    let (p, s) = (param_bytes.0 as f64, state_bytes.0 as f64);
    let (opt_bytes, kernels_per_tensor) = match plan.optimizer {
        // One fused kernel over chunks of many tensors (`_fused_adamw_`'s multi_tensor_apply,
        // bitsandbytes' blockwise kernels): parameter read and written, gradient read, states
        // read and written.
        Optimizer::Adamw
        | Optimizer::Adamw8bit
        | Optimizer::PagedAdamw8bit
        | Optimizer::PagedAdamw32bit => (Some(3.0 * p + 2.0 * s), 0.05),
        // `_multi_tensor_adamw`, one foreach kernel each: mul_(param, 1 - lr wd),
        // lerp_(m, grad), mul_(v), addcmul_(v, grad, grad), sqrt(v) into a temporary of v's
        // size, div_ and add_ on it, addcdiv_(param, m, temporary). Parameter 4 P, gradient
        // 3 P, m 3 S/2, v 5 S/2, the temporary 6 S/2.
        Optimizer::AdamwForeach => (Some(7.0 * p + 7.0 * s), 0.5),
        // `_multi_tensor_sgd` with momentum: mul_(buf), add_(buf, grad), add_(param, buf):
        // buffer 5 S, gradient P, parameter 2 P.
        Optimizer::Sgd => (Some(3.0 * p + 5.0 * s), 0.1),
        // torch.optim.Adafactor, one parameter at a time: about 17 P, timed kernel by kernel
        // (`adafactor_step`). Host: per parameter its norm, the gradient's row and column
        // norms, the outer-product variance estimate, the row mean and the update's norm, and
        // two `.item()` reads of those norms, which wait for the GPU.
        Optimizer::Adafactor => (None, 8.0),
    };
    // GradScaler.unscale_: `_amp_foreach_non_finite_check_and_unscale_` reads and writes every
    // gradient once more (the gradients are the parameters' size and dtype).
    let unscale = if plan.precision == crate::spec::plan::Precision::MixedFp16 {
        param_bytes.0 as f64 * 2.0
    } else {
        0.0
    };
    let par = plan.parallel;
    let (_, _, optimizer_div) = par.divisors();
    let elements: f64 = trainable.iter().map(|p| p.count() as f64).sum();
    let opt = if par.offload == crate::spec::parallel::Offload::None {
        // Each rank steps its shard of the optimizer states, at the rate its kernels sustain.
        let (efficiency, element_rate) = match plan.optimizer {
            Optimizer::Adamw => (FUSED_ADAMW_EFFICIENCY, FUSED_ADAMW_ELEMENTS),
            Optimizer::Adamw8bit | Optimizer::PagedAdamw8bit => {
                (CONTIGUOUS_EFFICIENCY, BNB_8BIT_ELEMENTS)
            }
            _ => (CONTIGUOUS_EFFICIENCY, f64::INFINITY),
        };
        let stepped = match opt_bytes {
            Some(bytes) => rates
                .moving(bytes + unscale, efficiency)
                .max(elements / element_rate),
            None => {
                adafactor_step(&trainable, rates) + rates.moving(unscale, CONTIGUOUS_EFFICIENCY)
            }
        };
        stepped / optimizer_div as f64
    } else {
        // ZeRO-Offload's CPU Adam: fp32 parameter, gradient and two states read and written
        // (32 bytes per parameter) at the host's memory bandwidth, shared by the node's ranks.
        let ranks = par.gpus_per_node.min(par.gpus).max(1) as f64;
        elements / optimizer_div as f64 * 32.0 / (HOST_MEMORY_BANDWIDTH / ranks)
    };
    let tensors: u64 = trainable.iter().map(|p| p.copies).sum();
    let opt_kernels = (tensors as f64 * kernels_per_tensor).ceil();
    // Per trainable tensor: its AccumulateGrad node in backward, and the optimizer's Python
    // bookkeeping (`_init_group` collects params, grads and states one tensor at a time).
    let per_tensor = 2.0 * tensors as f64;
    if plan.optimizer.bitsandbytes() {
        // bitsandbytes' `Optimizer8bit.step` calls `torch.cuda.synchronize()` after every
        // parameter's update (`sync_gpu` in bitsandbytes 0.50's optim/optimizer.py): the first
        // waits for backward to drain, and from then on each parameter's Python and its kernel
        // run one after the other. Per tensor: its AccumulateGrad node, the update's dispatch
        // and the synchronize's round trip, each at the dispatch cost.
        // A paged optimizer also prefetches each paged state to the GPU before its update
        // (`prefetch_state`: `cudaMemPrefetchAsync` through ctypes), even when resident.
        let prefetches = crate::optimizer::paged_state_tensors(plan.optimizer, &trainable) as f64;
        q.serial(3.0 * tensors as f64, prefetches * PAGED_PREFETCH, opt);
    } else {
        q.push(opt_kernels + per_tensor, 0.0, 0.0, opt);
    }

    let host = q.host_total;
    let device = q.busy;
    // One rank's compute (and host) time for one micro-batch; the step schedule adds the
    // layout's communication, pipeline and accumulation.
    let compute = q.device - opt;
    let sched = crate::comm::schedule(
        graph,
        plan,
        hw,
        &crate::comm::Compute {
            forward: fwd_units,
            backward: bwd_units,
            total: compute,
            optimizer: opt,
        },
    );
    let step = sched.step_seconds;
    // Tokens per optimizer step on one data-parallel replica.
    let tokens = plan.batch as f64
        * (plan.seq + plan.target_seq) as f64
        * (par.micro_batches * par.grad_accum) as f64;
    // MFU counts the model's useful FLOPs (no recomputation) against the datasheet peak.
    let useful: f64 = graph
        .ops()
        .map(|o| {
            f64::from(o.repeat.max(1))
                * (o.cost.forward_flops.0
                    + if o.in_backward {
                        o.cost.input_grad_flops.0 + o.cost.weight_grad_flops.0
                    } else {
                        0.0
                    })
        })
        .sum();
    let peak = hw.peak_flops(match plan.precision {
        crate::spec::plan::Precision::MixedFp16 => DType::F16,
        crate::spec::plan::Precision::Bf16 => DType::Bf16,
        _ if plan.autocast() => DType::Bf16,
        _ => DType::F32,
    });
    TimeEstimate {
        step_seconds: step,
        tokens_per_second: tokens * par.dp() as f64 / step,
        // Every rank does 1/(tp x pp) of a replica's work for its micro-batches.
        mfu: useful * (par.micro_batches * par.grad_accum) as f64 / step / peak,
        forward_seconds: fwd,
        backward_seconds: bwd,
        optimizer_seconds: opt,
        host_seconds: host,
        host_dispatches: q.dispatches,
        host_module_calls: q.modules,
        launch_bound: host > device,
        flops,
        allreduce_seconds: sched.exposed_seconds,
        communication_seconds: sched.communication_seconds,
        data_parallel_bytes: sched.data_parallel_bytes,
        exposed_communication_seconds: sched.exposed_seconds,
        bubble_fraction: sched.bubble_fraction,
        paging_seconds: 0.0,
    }
}
