//! Causal depthwise convolutions over the sequence: the one Gated DeltaNet runs over q, k and
//! v (`delta.rs`), and LFM2's gated short convolution mixer (Liquid AI 2025, "LFM2 Technical
//! Report"; a Hyena-style `C * conv(B * x)` with a 3-tap filter), as transformers 5.17's
//! `causal_conv1d_fn` runs them: its own PyTorch fallback (`F.conv1d`), or the causal-conv1d
//! package's kernel where that is installed (`LinearKernel::Fla`).

use super::build::{Builder, Val};
use crate::graph::op::{ParamRole, Scope};
use crate::spec::model::ShortConv;
use crate::spec::plan::{LinearKernel, Proj};
use smallvec::smallvec;

impl Builder<'_> {
    /// `causal_conv1d_fn(x, weight, bias, activation)` over `x`'s channels with a filter of
    /// `taps`, SiLU after it when `silu`. Returns the (activated) output.
    ///
    /// transformers' fallback casts x to the weight's dtype (`x.to(weight.dtype)`: an fp32
    /// copy under autocast with fp32 weights), autocast casts it back to bf16 for `F.conv1d`
    /// (on its lower-precision list), which pads `taps - 1` positions on each side and is then
    /// sliced to the sequence: the output is a view of `seq + taps - 1` positions. The
    /// convolution's derivative is one formula for input, weight and bias, so autograd keeps
    /// the input (and weight) whenever any of them needs a gradient; SiLU keeps its input,
    /// that padded output.
    ///
    /// causal-conv1d's `causal_conv1d_fn` (an autograd Function) keeps its input as given,
    /// the weight and the bias; a SiLU is fused and recomputed in backward, the output is
    /// unpadded.
    pub(super) fn causal_conv1d(
        &mut self,
        name: Scope,
        x: Val,
        taps: u64,
        (bias, silu): (bool, bool),
    ) -> Val {
        let b = self;
        let channels = x.width;
        let tokens = x.tokens;
        let batch = b.plan.batch.max(1);
        let seq = tokens / batch;
        let mut params = smallvec::SmallVec::<[_; 2]>::new();
        params.push(b.base_param(name.at("weight"), (channels, taps), ParamRole::Linear));
        if bias {
            params.push(b.base_param(name.at("bias"), (1, channels), ParamRole::Bias));
        }
        let weight_trains = b.trains(ParamRole::Linear) || (bias && b.trains(ParamRole::Bias));
        if b.plan.linear_kernel == LinearKernel::Fla {
            let out = b.val(channels, tokens, x.dtype, x.grad || weight_trains);
            let flops = 2.0 * taps as f64 + if silu { 8.0 } else { 0.0 };
            let op = b.elementwise(name.at(""), &[x], out, smallvec![x.id], flops);
            if let Some(o) = b.graph.op_mut(op) {
                o.params.extend(params);
            }
            return out;
        }
        let up = b.cast(name.at("upcast"), x, b.base);
        let conv_in = if b.autocast {
            b.cast(name.at("autocast"), up, b.half)
        } else {
            up
        };
        let padded = b.val(
            channels,
            batch * (seq + taps.saturating_sub(1)),
            conv_in.dtype,
            conv_in.grad || weight_trains,
        );
        let conv = Val { tokens, ..padded };
        let op = b.elementwise(
            name.at(""),
            &[conv_in],
            conv,
            smallvec![conv_in.id],
            2.0 * taps as f64,
        );
        if let Some(o) = b.graph.op_mut(op) {
            o.params.extend(params);
            o.forward_transient = padded.bytes();
        }
        if silu {
            b.activation(name.at("act"), conv)
        } else {
            conv
        }
    }

    /// LFM2's `Lfm2ShortConv` on the normed hidden states `x` (its caller adds the residual):
    /// `in_proj` to B, C and x (three chunks of one output, transposed views), `B * x`, the
    /// causal convolution (no activation), `C * conv`, `out_proj`.
    ///
    /// Both products keep their operands: the projection's whole output (B, C and x are views
    /// of it) and the convolution's output. The first product's result takes B's strides
    /// (TensorIterator follows its first operand's layout), so after the second the
    /// `transpose(-1, -2).contiguous()` before `out_proj` is already contiguous and copies
    /// nothing: `out_proj` keeps that product.
    pub(super) fn short_conv(&mut self, at: (Scope, &'static str), x: Val, c: ShortConv) -> Val {
        let b = self;
        let name = b.scope(at.0, at.1);
        let h = x.width;
        let bcx = b.linear(name.at("in_proj"), x, 3 * h, c.bias, Some(Proj::InProj));
        let part = Val { width: h, ..bcx };
        let gated = b.mul(name.at("b_mul"), part, part);
        let conv_name = b.scope(name, "conv");
        let conv = b.causal_conv1d(conv_name, gated, c.taps, (c.bias, false));
        let y = b.mul(name.at("c_mul"), part, conv);
        b.linear(name.at("out_proj"), y, h, c.bias, Some(Proj::OutProj))
    }
}
