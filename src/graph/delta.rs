//! Gated DeltaNet linear attention (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2
//! with Delta Rule"), as transformers 5.17's `Qwen3_5GatedDeltaNet` runs it without the
//! flash-linear-attention and causal-conv1d kernels: `causal_conv1d_fn`'s `F.conv1d` and
//! `torch_chunk_gated_delta_rule`, the chunked delta rule in fp32 PyTorch ops. Like Mamba's
//! slow path (`arch::mamba_mixer`), that fallback is what a plain `pip install transformers`
//! trains with and what a replay measures; its saved tensors are counted op by op below.

use super::build::{Builder, Val};
use crate::graph::op::{Name, OpKind, ParamRole, Scope, TensorKind};
use crate::spec::model::DeltaNet;
use crate::spec::plan::{LinearKernel, Proj};
use crate::units::{Bytes, DType};
use smallvec::smallvec;

/// `torch_chunk_gated_delta_rule`'s `chunk_size` (the default its caller keeps).
const CHUNK: u64 = 64;

/// Kernels of the chunked rule outside its loop, forward: five transposed fp32 copies, two
/// L2 norms of five ops, the query scale, five pads, two beta products, cumsum, the pairwise
/// decay's subtract, masked_fill and exp, two matmuls and two decay products, the decayed keys'
/// exp and product, two triangular solves, two zero fills, the query's and key's decay (exp,
/// product; subtract, exp, product), the chunk decay's exp, and the output's copy back.
const RULE_FORWARD_KERNELS: u32 = 44;
/// Per chunk, forward: the state read by the keys (matmul, subtract), by the queries (matmul),
/// the intra-chunk matmul and sum, the copy into the output slice, the state's decay product,
/// the key-value outer product (matmul) and sum.
const CHUNK_FORWARD_KERNELS: u32 = 9;
/// Backward has each forward op's derivative (a matmul two, a product up to two), plus per
/// chunk the full-size zero gradients of five sliced tensors (`select_backward`), the output
/// slice's `CopySlices` clone and zero fill, and the gradient accumulations.
const RULE_BACKWARD_KERNELS: u32 = 80;
const CHUNK_BACKWARD_KERNELS: u32 = 30;

impl Builder<'_> {
    /// Qwen3.5's linear-attention mixer on the normed hidden states `x` (its caller adds the
    /// residual).
    ///
    /// Outside the rule: four projections of x; the convolution over q, k and v (its input is
    /// cast to the conv weight's dtype, then by autocast to bf16, and kept when that weight
    /// trains; SiLU keeps the convolution's output, padded by `conv - 1` positions); beta =
    /// sigmoid(b) and g = -exp(A_log) * softplus(a.float() + dt_bias), tiny. With more value
    /// than key heads, q and k are `repeat_interleave`d (copies nobody keeps).
    ///
    /// The rule (`torch_chunk_gated_delta_rule`, fp32) keeps per padded position: the fp32
    /// q and k the L2 norms read, the padded q, k, v, k * beta, the triangular solves' results
    /// (new values, decayed keys), the decayed q and k the loop reads, and each chunk's
    /// corrected values: eight key-width and three value-width fp32 tensors; five 64-wide
    /// chunk matrices per head (the pairwise decay, both products before and after it, and the
    /// unit-triangular system the solves keep); and every chunk's incoming recurrent state,
    /// `key_dim x value_dim` per head, which the next chunk's matmuls keep.
    pub(super) fn gated_delta_net(
        &mut self,
        at: (Scope, &'static str),
        x: Val,
        d: DeltaNet,
    ) -> Val {
        let b = self;
        let name = b.scope(at.0, at.1);
        let (qk_width, v_width) = d.widths();
        let conv_width = qk_width + v_width;
        let heads = d.value_heads;
        let tokens = x.tokens;
        let batch = b.plan.batch.max(1);
        let seq = tokens / batch;
        let (qkv, z, beta_in, a) = if d.fused {
            // Qwen3-Next: `in_proj_qkvz` and `in_proj_ba`, viewed per key head and split;
            // reshaping the strided q, k, v, z, b and a parts copies each, and `torch.cat`
            // joins q, k and v again (their copies and the projection outputs are freed).
            b.fork(name.at("fork"), x, 2);
            let qkvz = b.linear(
                name.at("in_proj_qkvz"),
                x,
                conv_width + v_width,
                false,
                Some(Proj::InProjQkvz),
            );
            let ba = b.linear(
                name.at("in_proj_ba"),
                x,
                2 * heads,
                false,
                Some(Proj::InProjBa),
            );
            let part = |w: u64, of: Val| Val { width: w, ..of };
            let qkv = b.contiguous(name.at("qkv_cat"), part(conv_width, qkvz));
            if let Some(o) = b.graph.op_mut(b.graph.len() - 1) {
                // Three reshape copies, then the concatenation they feed.
                o.forward_transient += qkv.bytes();
                o.cost.forward_kernels = 4;
                o.cost.backward_kernels = 4;
            }
            let z = b.contiguous(name.at("z_split"), part(v_width, qkvz));
            let beta_in = b.contiguous(name.at("b_split"), part(heads, ba));
            let a = b.contiguous(name.at("a_split"), part(heads, ba));
            (qkv, z, beta_in, a)
        } else {
            b.fork(name.at("fork"), x, 4);
            let qkv = b.linear(
                name.at("in_proj_qkv"),
                x,
                conv_width,
                false,
                Some(Proj::InProjQkv),
            );
            let z = b.linear(name.at("in_proj_z"), x, v_width, false, Some(Proj::InProjZ));
            let beta_in = b.linear(name.at("in_proj_b"), x, heads, false, Some(Proj::InProjB));
            let a = b.linear(name.at("in_proj_a"), x, heads, false, Some(Proj::InProjA));
            (qkv, z, beta_in, a)
        };

        // causal_conv1d_fn over q, k and v with its SiLU.
        let conv = b.scope(name, "conv1d");
        let mixed = b.causal_conv1d(conv, qkv, d.conv, (false, true));

        // beta = sigmoid(b); g = -A_log.float().exp() * softplus(a.float() + dt_bias).
        let beta = b.sigmoid(name.at("beta"), beta_in);
        let dt_bias = b.base_param(name.at("dt_bias"), (1, heads), ParamRole::Bias);
        let a_log = b.base_param(name.at("A_log"), (1, heads), ParamRole::Linear);
        let a32 = b.cast(name.at("a_upcast"), a, DType::F32);
        let g_grad = a32.grad || b.trains(ParamRole::Bias) || b.trains(ParamRole::Linear);
        let shifted = b.val(heads, tokens, DType::F32, g_grad);
        let op = b.elementwise(name.at("dt_add"), &[a32], shifted, smallvec![], 1.0);
        if let Some(o) = b.graph.op_mut(op) {
            o.params.push(dt_bias);
        }
        let soft = b.val(heads, tokens, DType::F32, g_grad);
        b.elementwise(
            name.at("softplus"),
            &[shifted],
            soft,
            smallvec![shifted.id],
            4.0,
        );
        let g = b.val(heads, tokens, DType::F32, g_grad);
        let op = b.elementwise(name.at("decay"), &[soft], g, smallvec![soft.id], 3.0);
        if let Some(o) = b.graph.op_mut(op) {
            o.params.push(a_log);
        }

        // q and k repeated to every value head: copies alive until the mixer returns.
        let repeat = heads / d.key_heads.max(1);
        let hk = heads * d.key_dim;
        let hv = v_width;
        let repeated = if repeat > 1 {
            mixed.dtype.bytes(2 * hk * tokens)
        } else {
            Bytes::ZERO
        };
        let out = b.val(hv, tokens, mixed.dtype, mixed.grad || g.grad || beta.grad);
        let rule = name.at("chunk_gated_delta_rule");
        let op = b.delta_rule(rule, (mixed, g, beta), out, d, (batch, seq));
        if let Some(o) = b.graph.op_mut(op) {
            // What the mixer's own locals hold while the rule runs: the convolution's SiLU
            // output (q, k and v are views of it), the repeated q and k, and z.
            o.forward_transient += mixed.bytes() + repeated + z.bytes();
            if repeat > 1 {
                o.cost.forward_kernels += 2;
                o.cost.backward_kernels += 2;
            }
        }
        let normed = b.gated_rms_norm(name.at("norm"), out, z, d.value_dim);
        b.linear(
            name.at("out_proj"),
            normed,
            b.model.hidden_size,
            false,
            Some(Proj::OutProj),
        )
    }

    /// The gated delta rule over `(batch, seq)` with the plan's kernel: one op keeping what
    /// that kernel keeps, holding its locals, and costed as 64-row matmuls.
    fn delta_rule(
        &mut self,
        name: Name,
        (mixed, g, beta): (Val, Val, Val),
        out: Val,
        d: DeltaNet,
        (batch, seq): (u64, u64),
    ) -> usize {
        let rule = match self.plan.linear_kernel {
            LinearKernel::Fla => fla_rule(d, (batch, seq), (mixed.dtype, beta.dtype)),
            LinearKernel::Torch => torch_rule(d, (batch, seq), self.autocast, self.half),
        };
        let kept = self.tensor(TensorKind::Activation, rule.saved);
        let op = self.elementwise(name, &[mixed, g, beta], out, smallvec![kept], 0.0);
        if let Some(o) = self.graph.op_mut(op) {
            o.forward_transient = rule.forward;
            o.backward_transient = out.bytes() + rule.backward;
            // Matmuls within chunks: q k^T and (k beta) k^T, the two solves, and per chunk
            // the state's reads (2 x 64 x dk x dv), the intra-chunk product (64 x 64 x dv)
            // and the update (dk x dv x 64), two FLOPs per multiply-add; backward twice that.
            let per_position = 4.0 * (CHUNK * d.key_dim) as f64
                + (CHUNK * (d.key_dim + d.value_dim)) as f64
                + 6.0 * (d.key_dim * d.value_dim) as f64
                + 2.0 * (CHUNK * d.value_dim) as f64;
            o.cost.forward_flops = crate::units::Flops(per_position * rule.positions as f64);
            o.cost.input_grad_flops = crate::units::Flops(2.0 * o.cost.forward_flops.0);
            o.cost.forward_bytes = rule.saved * 2 + o.forward_transient;
            o.cost.backward_bytes = (rule.saved + o.backward_transient) * 2;
            (o.cost.forward_kernels, o.cost.backward_kernels) = rule.kernels;
            o.kind = OpKind::Matmul;
            o.compute = rule.compute;
            o.cost.min_dim = CHUNK;
        }
        op
    }
}

/// What one kernel's rule keeps for backward, holds at its worst moment forward (its output
/// included where that is alive then) and beyond its output backward, over how many (head,
/// position) pairs it computes, with how many launches each way, in which dtype.
struct Rule {
    saved: Bytes,
    forward: Bytes,
    backward: Bytes,
    positions: u64,
    kernels: (u32, u32),
    compute: DType,
}

/// flash-linear-attention's `chunk_gated_delta_rule` (`ChunkGatedDeltaRuleFunction`, fla
/// `ops/gated_delta_rule/chunk.py`): `input_guard` makes its inputs contiguous; it keeps the
/// L2-normalised q and k (in q's dtype) with their fp32 rsqrt, v, the chunk-local cumulative
/// decay (fp32), beta and the inverted 64-wide triangular system `A` (in k's dtype), and
/// recomputes the WY factors `w`, `u` and the per-chunk states `h` in backward. Forward holds
/// `h` (`key_dim x value_dim` per head and chunk, k's dtype), the corrected values, `w` and `u`
/// beside its output until it returns; backward holds them again with the states' gradient and
/// fp32 q, k and w gradients. Launches: two L2 norms, the cumsum, k k^T, the triangular solve,
/// w and u, the states, the output and its cast; backward twice as many.
fn fla_rule(d: DeltaNet, (batch, seq): (u64, u64), (half, beta): (DType, DType)) -> Rule {
    let heads = d.value_heads;
    let hk = heads * d.key_dim;
    let hv = heads * d.value_dim;
    let tokens = batch * seq;
    let states = half.bytes(batch * seq.div_ceil(CHUNK) * heads * d.key_dim * d.value_dim);
    Rule {
        saved: half.bytes((2 * hk + hv) * tokens)
            + DType::F32.bytes(3 * heads * tokens)
            + beta.bytes(heads * tokens)
            + half.bytes(heads * CHUNK * tokens),
        forward: states + half.bytes((hk + 3 * hv) * tokens),
        backward: states * 2
            + half.bytes((hk + 2 * hv) * tokens)
            + DType::F32.bytes((3 * hk + hv) * tokens),
        positions: heads * tokens,
        kernels: (9, 18),
        compute: half,
    }
}

/// `torch_chunk_gated_delta_rule` (see `gated_delta_net`), in fp32 over the sequence padded to
/// whole chunks; under autocast its matmuls keep bf16 (`half`) copies of their operands.
fn torch_rule(d: DeltaNet, (batch, seq): (u64, u64), autocast: bool, half: DType) -> Rule {
    let f32 = |n: u64| DType::F32.bytes(n);
    let half = |n: u64| half.bytes(n);
    let heads = d.value_heads;
    let hk = heads * d.key_dim;
    let hv = heads * d.value_dim;
    let chunks = seq.div_ceil(CHUNK);
    // Padded positions (the sequence rounded up to whole chunks) over the batch.
    let padded = batch * chunks * CHUNK;
    let tokens = batch * seq;
    // One chunk's slice of a per-position tensor of `width` over the batch, and one state.
    let slice = |width: u64| batch * CHUNK * width;
    let state = batch * heads * d.key_dim * d.value_dim;
    let square = heads * CHUNK;
    // Kept whatever the regime: the fp32 q and k (the L2 norms), the padded q, k and v,
    // k * beta, the solves' results and their unit-triangular system, the pairwise decay;
    // two rsqrt, beta padded, three decay exponentials.
    let common = f32(2 * hk * tokens)
        + f32((4 * hk + 2 * hv) * padded)
        + f32(2 * square * padded)
        + f32(6 * heads * padded);
    let saved = if autocast {
        // Autocast runs every matmul in bf16 and each keeps its own cast copies: q, k^T
        // (twice) and k * beta before the loop with both products (before the decay); per
        // chunk two copies of the incoming state, the decayed keys' and queries' slices (not
        // in the first chunk, whose zero state needs no gradient), the corrected values twice
        // and the transposed keys' slice (not in the last chunk, whose update nothing reads)
        // and the intra-chunk slice. The fp32 states the decay products keep run from the zero
        // state to the one before the last.
        let n = chunks;
        common
            + half(4 * hk * padded + 2 * square * padded)
            + half(2 * state * n)
            + half((n - 1) * slice(3 * hk) + (2 * n - 1) * slice(hv) + n * slice(square))
            + f32(state * (n - 1))
    } else {
        // fp32 matmuls keep their operands themselves: the decayed q and k, the corrected
        // values, both products and the intra-chunk matrix, and every chunk's incoming state.
        common + f32((2 * hk + hv) * padded + 3 * square * padded) + f32(state * chunks)
    };
    // The locals at the loop's end: v * beta and the decayed k * beta (which the solves read
    // but do not keep) and the fp32 output being filled. Under autocast no op keeps the decayed
    // q and k nor the intra-chunk matrix in fp32 either (the loop's matmuls keep bf16 casts of
    // their slices), and the locals name them. The output is `zeros_like(new_values)`, which
    // keeps the solve's layout: `linalg_solve_triangular_out` makes its result
    // Fortran-contiguous in the last two dimensions (aten BatchLinearAlgebra.cpp), so the
    // final `reshape` across the chunk dimension is a copy, made beside the original; the
    // bf16 result comes after the original is freed, and is smaller.
    let named = if autocast {
        f32(2 * hk * padded) + f32(square * padded)
    } else {
        Bytes::ZERO
    };
    let steps = u32::try_from(chunks).unwrap_or(u32::MAX);
    Rule {
        saved,
        forward: f32(hv * padded) * 3 + f32(hk * padded) + named,
        // Full-size fp32 gradients of the sliced tensors (new values, decayed keys, decayed q
        // and k, the intra-chunk matrix), one more zero-filled slice gradient and the
        // output's `CopySlices` clone at a time.
        backward: f32(3 * hk * padded) + f32(hv * padded) * 3 + f32(heads * CHUNK * padded),
        positions: heads * padded,
        kernels: (
            RULE_FORWARD_KERNELS + CHUNK_FORWARD_KERNELS * steps,
            RULE_BACKWARD_KERNELS + CHUNK_BACKWARD_KERNELS * steps,
        ),
        // fp32 matmuls of 64-row chunks (no tensor cores without TF32).
        compute: DType::F32,
    }
}
