//! Mamba-2's state-space-duality mixer (Dao & Gu 2024, "Transformers are SSMs: Generalized
//! Models and Efficient Algorithms Through Structured State Space Duality", sec. 6, the chunked
//! "SSD algorithm") as transformers 5.17's `Mamba2Mixer` runs it without the mamba-ssm and
//! causal-conv1d kernels: `causal_conv1d_fn`'s `F.conv1d` and `mamba2_chunk_scan`, the chunked
//! scan written as broadcast products summed down, in fp32. Like Mamba's slow path
//! (`arch::mamba_mixer`) and Gated DeltaNet's (`delta.rs`), that fallback is what a plain
//! `pip install transformers` trains with and what a replay measures.
//!
//! Its memory is dominated by the products the sums reduce: `C[..., None, :, :] * B[:, :,
//! None]` is chunk x chunk x heads x state fp32 elements per chunk, 10.7 GB for one 1,024-token
//! sequence at Mamba-2 2.7B's widths, and its backward makes two of them at once.

use super::build::{Builder, Val};
use crate::graph::op::{Access, Name, OpKind, ParamRole, Scope, TensorKind};
use crate::spec::model::{GatedNorm, Ssd};
use crate::spec::plan::Proj;
use crate::units::{Bytes, DType};
use smallvec::smallvec;

impl Builder<'_> {
    /// `MambaBlock` and `Mamba2Block`: RMSNorm of the block input cast to the norm weight's
    /// dtype (`self.norm(hidden_states.to(dtype=self.norm.weight.dtype))`, a 16-bit copy of
    /// the fp32 residual stream in pure 16-bit training, which the RMSNorm upcasts again), the
    /// `mixer` on it, and the residual added in fp32 (`residual_in_fp32`) where `fp32_residual`
    /// says so, else in the stream's dtype (Nemotron-H's `NemotronHBlock`, the same shape).
    pub(super) fn recurrent_block(
        &mut self,
        name: Scope,
        x: Val,
        fp32_residual: bool,
        mixer: impl FnOnce(&mut Self, Scope, Val) -> Val,
    ) -> Val {
        let xin = self.cast(name.at("norm_input"), x, self.base);
        let hn = self.norm(name.at("norm"), xin);
        let scope = self.scope(name, "mixer");
        let out = mixer(self, scope, hn);
        let residual = if x.dtype == DType::F32 || !fp32_residual {
            x
        } else {
            self.cast(name.at("residual_fp32"), x, DType::F32)
        };
        self.add(name.at("residual"), residual, out)
    }

    /// `Mamba2Mixer.forward` on the normed hidden states: `in_proj` to z (the gate), x, B, C
    /// and dt in one output; the causal convolution with its SiLU over x, B and C; the chunked
    /// scan; `MambaRMSNormGated(y, z)`; `out_proj` of the result cast back to the mixer input's
    /// dtype. The projection's output and the convolution's are locals until the mixer returns.
    pub(super) fn ssd_mixer(&mut self, name: Scope, hn: Val, s: Ssd) -> Val {
        let b = self;
        let inner = s.inner();
        // Falcon-H1: `hidden_states * self.ssm_in_multiplier` first.
        let x = if s.mup {
            b.scale(name.at("in_multiplier"), hn)
        } else {
            hn
        };
        let proj = b.linear(
            name.at("in_proj"),
            x,
            inner + s.conv_dim() + s.heads,
            s.bias,
            Some(Proj::InProj),
        );
        // `projected_states * self.mup_vector`: a buffer in the model's dtype, which is all the
        // product keeps.
        let proj = if s.mup {
            let dtype = super::build::wider(proj.dtype, b.base);
            b.scale_into(name.at("mup_vector"), proj, dtype)
        } else {
            proj
        };
        let frame = b.name(&[proj.id]);
        let part = |width: u64| Val { width, ..proj };
        let conv = b.scope(name, "conv1d");
        let act = b.causal_conv1d(conv, part(s.conv_dim()), s.conv, (s.conv_bias, true));
        b.name(&[act.id]);
        let y = b.ssd_scan(name.at("chunk_scan"), act, part(s.heads), s);
        let (z, groups) = (part(inner), s.norm_groups);
        let normed = match s.gated_norm {
            GatedNorm::GateThenNorm => b.gate_then_rms_norm(name.at("norm"), y, z, groups),
            GatedNorm::NormThenGate => b.rms_then_gate(name.at("norm"), y, z, groups),
            GatedNorm::GateOnly => b.silu_gated(name.at("gate"), y, z),
        };
        let back = b.cast(name.at("cast"), normed, hn.dtype);
        let out = b.linear(
            name.at("out_proj"),
            back,
            b.model.hidden_size,
            s.out_bias,
            Some(Proj::OutProj),
        );
        b.unname(frame);
        out
    }

    /// `mamba2_chunk_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus=True)` on the
    /// convolution's output `act` (x, B and C) and the projection's dt: one op keeping what
    /// the function's autograd nodes keep ([`chunk_scan`]), its output fp32 over the padded
    /// sequence (the caller reads a slice of it).
    fn ssd_scan(&mut self, name: Name, act: Val, dt: Val, s: Ssd) -> Val {
        let b = self;
        let dt_bias = b.base_param(name.then("dt_bias"), (1, s.heads), ParamRole::Bias);
        let a_log = b.base_param(name.then("A_log"), (1, s.heads), ParamRole::Linear);
        let d = b.base_param(name.then("D"), (1, s.heads), ParamRole::Linear);
        let grads = Grads {
            x: act.grad,
            dt: dt.grad || b.trains(ParamRole::Bias),
            a: b.trains(ParamRole::Linear),
            d: b.trains(ParamRole::Linear),
        };
        let batch = b.plan.batch.max(1);
        let seq = act.tokens / batch;
        let scan = chunk_scan(
            s,
            (batch, seq),
            (act.dtype, dt.dtype),
            (b.autocast && act.dtype != DType::F32, b.segment.is_some()),
            grads,
        );
        let out = b.val(
            s.inner(),
            act.tokens,
            DType::F32,
            grads.x || grads.dt || grads.a,
        );
        b.graph.tensors[out.id.0 as usize].bytes = scan.out;
        let kept = b.tensor(TensorKind::Activation, scan.saved);
        let op = b.elementwise(name, &[act, dt], out, smallvec![kept], 0.0);
        if let Some(o) = b.graph.op_mut(op) {
            o.params.extend([dt_bias, a_log, d]);
            o.out = scan.out;
            o.forward_transient = scan.forward;
            o.backward_transient = scan.backward;
            o.cost.forward_flops = crate::units::Flops(scan.flops);
            o.cost.input_grad_flops = crate::units::Flops(2.0 * scan.flops);
            o.cost.forward_bytes = scan.traffic;
            o.cost.backward_bytes = scan.traffic * 2;
            o.cost.forward_kernels = FORWARD_KERNELS;
            o.cost.backward_kernels = BACKWARD_KERNELS;
            o.kind = OpKind::Elementwise;
        }
        b.set_access(op, (Access::Strided, Access::Strided));
        out
    }
}

/// Forward launches of `mamba2_chunk_scan`: the dt bias add and its cast, softplus (and
/// autocast's cast), clamp, the fp32 copies and `repeat_interleave`s of x, B and C, the D
/// product and its pad, the two discretising products, four pads, the permute's cumsum, two
/// segment sums (masked fill, cumsum, masked fill, exp), the five broadcast products and their
/// sums, the decays' subtract and exps, the zero state and the concatenation, the two adds.
const FORWARD_KERNELS: u32 = 48;
/// Backward: each product's two gradient products and the sums fitting them to their inputs,
/// each sum's and pad's and exp's derivative, the accumulations.
const BACKWARD_KERNELS: u32 = 96;

/// Which of the scan's inputs need a gradient: x, B and C (the convolution's output), dt (the
/// projection's slice or its bias), A (`A_log`) and D.
#[derive(Debug, Clone, Copy)]
struct Grads {
    x: bool,
    dt: bool,
    a: bool,
    d: bool,
}

/// The scan's memory, traffic and work: what its autograd nodes keep, what else is live at
/// the worst moment of its forward and of its backward (beyond what it keeps), its output's
/// bytes (over the padded sequence), FLOPs and bytes moved forward.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Scan {
    saved: Bytes,
    forward: Bytes,
    backward: Bytes,
    out: Bytes,
    flops: f64,
    traffic: Bytes,
}

/// `mamba2_chunk_scan` (transformers 5.17, `modeling_mamba2.py`) over `batch` sequences of
/// `seq` tokens, read op by op. Sizes: T = batch x seq tokens, P = T padded to whole chunks
/// of l, c = P / (batch l) chunks, h heads of p channels (I = h p), N state, g groups.
///
/// Forward: `dt + dt_bias`, softplus (fp32 under autocast, which keeps its cast input), clamp
/// (keeps its input); `x.float()` (an fp32 copy of 16-bit x, kept by the discretising product
/// for dt's gradient); B and C `.float()` then `repeat_interleave`d to h heads (copies when
/// g < h); `D[..., None] * pad(x)` (`constant_pad_nd` clones even with no padding; the product
/// keeps that clone for D's gradient) is a local to the end; `x * dt`, `A * dt`; each of x, A,
/// B and C padded (cloned) into chunks while the originals are still bound; `A_cumsum`; the
/// segment sum (masked fill, cumsum, masked fill: three chunk x chunk tensors a head) and its
/// exp L (kept); G = (C B).sum over N (product c l l h N, kept operands B and C, G kept by the
/// next product), M = (G L).sum (kept by the next), Y_diag = (M x).sum over l (product c l l h
/// p), the decays, B_decay (kept), the chunk states (B_decay x).sum over l (product c l h p N),
/// their concatenation after a zero state (kept), the inter-chunk recurrence (product
/// (c+1)^2 h p N; its result kept), `C_times_states` (c l h p N, a local to the end, its
/// operands kept), its sum over N (kept by Y_off's product), Y_off, and the output's two adds.
///
/// Backward: a product's node computes both operands' gradients product-sized before the
/// engine sums each down to its operand (`mul` in `layers.rs`), so the products' backward
/// holds two of them at once. At G's (the largest when N >= p), the gradient arriving at the
/// scan is still held by D's product, the chunked x's gradient (from Y_diag and the states),
/// B's and C's first parts, L's and G's are held, and only the saves of G's product and the
/// ones before it are left.
fn chunk_scan(
    s: Ssd,
    (batch, seq): (u64, u64),
    (xd, dtd): (DType, DType),
    (autocast, in_segment): (bool, bool),
    g: Grads,
) -> Scan {
    let f32 = |n: u64| DType::F32.bytes(n).0;
    let (h, n, l) = (s.heads, s.state, s.chunk.max(1));
    let i = s.inner();
    let t = batch * seq;
    let chunks = seq.div_ceil(l);
    let pt = batch * chunks * l;
    let c1 = chunks + 1;
    // Per-token sizes in bytes.
    let x32 = if xd == DType::F32 { 0 } else { f32(t * i) };
    let xp = f32(pt * i);
    let e = f32(pt * h * l);
    let bn = f32(pt * h * n);
    let bt = f32(t * h * n);
    let bg = if xd == DType::F32 {
        0
    } else {
        f32(t * s.groups * n)
    };
    let repeated = if s.groups < h { bt } else { bg };
    let sh = f32(pt * h);
    let st = f32(t * h);
    let states = f32(batch * c1 * i * n);
    let states_sum = f32(batch * chunks * i * n);
    let prod_g = f32(pt * l * h * n);
    let prod_y = f32(pt * l * i);
    let prod_s = f32(pt * i * n);
    let prod_n = f32(batch * c1 * c1 * i * n);
    let dt16 = dtd.bytes(t * h).0;

    // dt: softplus's kept input (its fp32 cast under autocast) and output (kept by the
    // clamp), the clamp's output (kept by the discretising products); without autocast
    // `dt.float()` twice more (fp32 copies those products keep).
    let dt_one = if autocast { st } else { dt16 };
    let dt_float = if autocast || dtd == DType::F32 { 0 } else { st };
    let dt_saves = 3 * dt_one + 2 * dt_float;
    let keep_x32 = if g.dt { x32 } else { 0 };
    let keep_pad = if g.d { xp } else { 0 };
    // Kept by the chunk products: x, B and C chunked; L, G and M; the two decays; B_decay;
    // the concatenated and the recurred states; C_times_states' sum.
    let chunk_saves = xp + 2 * bn + 3 * e + 2 * sh + bn + 2 * states + xp;
    let saved = dt_saves + keep_x32 + keep_pad + chunk_saves;

    // Forward, in order; `live` counts what the function holds (kept or bound to a name),
    // `peak` the most it holds with what one op makes and drops at once.
    let mut live = dt_saves + x32 + repeated * 2;
    let mut peak = live;
    let mut bump = |live: &mut u64, add: u64, transient: u64| {
        *live += add;
        peak = peak.max(*live + transient);
    };
    // D's product: D_residual (a local) beside the padded clone, which it keeps for D.
    bump(&mut live, xp, xp);
    bump(&mut live, keep_pad, 0);
    // x * dt and A * dt; x32 goes unless kept.
    bump(&mut live, f32(t * i) + st, 0);
    live -= x32 - keep_x32;
    // The four pads: clones beside their originals, which then go.
    bump(&mut live, xp + sh + 2 * bn, 0);
    live -= f32(t * i) + st + repeated * 2;
    // A_cumsum; the segment sum's three tensors, then L.
    bump(&mut live, sh, 3 * e);
    bump(&mut live, e, 0);
    // G, M and Y_diag, each a product summed down.
    bump(&mut live, e, prod_g);
    bump(&mut live, e, e);
    bump(&mut live, xp, prod_y);
    // The decays, B_decay, the chunk states' product and sum, the concatenation.
    bump(&mut live, 2 * sh + bn, 0);
    bump(&mut live, states_sum, prod_s);
    bump(&mut live, states, 0);
    live -= states_sum;
    // The recurrence; C_times_states (a local), its sum and Y_off; the two adds.
    bump(&mut live, states, prod_n);
    bump(&mut live, prod_s + xp + xp, 0);
    bump(&mut live, xp, xp);
    let forward = Bytes(peak.saturating_sub(saved));

    // Backward, at each large product's node: what is still kept, the gradients held (the
    // scan's incoming one, which D's product still holds, first), and the operand gradients
    // product-sized; then the engine sums the first operand's down while both are alive. In
    // a checkpointed block the node's saves are the recomputation's and die as it returns,
    // before that sum (`mul` in `layers.rs`): `released`, what only that node still kept.
    let early = dt_saves + keep_x32 + keep_pad;
    let prods = if g.x { 2 } else { u64::from(g.dt || g.a) };
    let moment = |kept_and_held: u64, product: u64, (summed, released): (u64, u64)| {
        let released = if in_segment { released } else { 0 };
        kept_and_held + prods * product + summed.saturating_sub(released)
    };
    // C_times_states' product (C's gradient summed first): every save but Csum's and the
    // output decay's; the recurred states are its own.
    let at_c = moment(
        early + chunk_saves - xp - sh + (xp + xp),
        prod_s,
        (bn, states),
    );
    // The recurrence (the tiny decay's gradient first): the recurred states' gradient, a
    // slice's zero-filled copy, held.
    let at_n = moment(
        early + chunk_saves - xp - sh - states + (xp + bn + states),
        prod_n,
        (0, states),
    );
    // The chunk states' product (B_decay's first, its own save): x, B, C, L, G, M and a decay
    // still kept.
    let at_s = moment(
        early + xp + 3 * bn + 3 * e + sh + (xp + bn + states),
        prod_s,
        (bn, bn),
    );
    // Y_diag's product (M's first; M and x are its own by then).
    let at_y = moment(
        early + xp + 2 * bn + 3 * e + (xp + xp + 2 * bn),
        prod_y,
        (e, e + xp),
    );
    // G's product (C's first; B and C are its own): L kept; the chunked x's, B's, C's, L's
    // and G's gradients held.
    let at_g = moment(
        early + e + 2 * bn + (xp + xp + 2 * bn + 2 * e),
        prod_g,
        (bn, 2 * bn),
    );
    let worst = at_c.max(at_n).max(at_s).max(at_y).max(at_g);
    let backward = Bytes(worst.saturating_sub(saved));

    // Two FLOPs per product element (multiply, then the sum's add).
    let flops = 2.0 * (prod_g + pt * h * l + prod_y + 2 * prod_s + prod_n) as f64 / 4.0;
    let traffic = Bytes(2 * (prod_g + prod_y + 2 * prod_s + prod_n) + 6 * e + 8 * xp + 4 * bn);
    Scan {
        saved: Bytes(saved),
        forward,
        backward,
        out: Bytes(xp),
        flops,
        traffic,
    }
}
