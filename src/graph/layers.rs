//! Norms, activations, element-wise products and rotary embeddings, each saving what its
//! framework implementation's autograd graph keeps.

use super::build::{Builder, OpSpec, Val, wider};
use crate::graph::op::{
    Access, Cost, Loops, Name, OpKind, ParamId, ParamRole, TensorId, TensorKind,
};
use crate::spec::model::{Activation, Norm, RotaryApply};
use crate::units::{Bytes, DType, Flops};
use smallvec::{SmallVec, smallvec};

/// Which tensor a unary function's derivative reads besides the gradient.
#[derive(Clone, Copy)]
enum Keeps {
    Input,
    Output,
}

impl Builder<'_> {
    /// A norm's weight or bias; `reached` false leaves it frozen whatever its role.
    fn norm_param(&mut self, name: Name, weight: u64, role: ParamRole, reached: bool) -> ParamId {
        let trainable = reached && self.trains(role);
        let (base, storage) = (self.base, self.storage_base);
        self.param(name, (1, weight), base, storage, trainable, role)
    }

    /// Whether LN tuning trains the norm `name`. peft's `LNTuningConfig` (0.21) wraps the
    /// modules its TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING names per model type:
    /// Qwen2/Qwen3 only `post_attention_layernorm` (the FFN's input norm; no q/k norms, no final
    /// norm), Gemma-3 its four block norms and the final one (no q/k norms), Falcon
    /// `input_layernorm` and `ln_f` (the new decoder's `ln_attn`/`ln_mlp` are not named), BART
    /// and BLOOM every norm but the embeddings'. Model types the table lacks make peft ask for
    /// `target_modules`; ftplan trains all their norms. Every other method: true.
    fn ln_tuning_reaches(&self, name: Name) -> bool {
        use crate::spec::model::Family;
        if self.plan.method != crate::spec::plan::Method::LnTuning {
            return true;
        }
        match self.model.family {
            Family::Qwen2 | Family::Qwen3 => name.part == "pre_feedforward_layernorm",
            Family::Gemma3 => !matches!(name.part, "q_norm" | "k_norm"),
            Family::Falcon if self.model.parallel_two_norms => name.part == "final_norm",
            Family::Bart | Family::Bloom => name.part != "embedding_norm",
            _ => true,
        }
    }

    /// A normalisation layer, saving what its implementation's autograd graph keeps.
    pub fn norm(&mut self, name: Name, x: Val) -> Val {
        self.norm_sized(name, x, x.width)
    }

    /// A norm whose weight has `weight` elements applied across `x` (Qwen3's per-head q/k
    /// norms: a head_dim weight over every head).
    pub fn norm_sized(&mut self, name: Name, x: Val, weight: u64) -> Val {
        let h = x.width;
        let kind = self.model.norm;
        if kind == Norm::UnscaledRmsNorm {
            // No weight: Llama 4's q/k norm, one statistic per row of the whole width.
            return self.unscaled_rms_norm(name, x, (h, 1));
        }
        // nn.LayerNorm carries a bias whatever the linears do (Falcon: bias=False, LN biased).
        let has_bias = matches!(kind, Norm::LayerNorm | Norm::LayerNorm1P);
        let layer_norm = matches!(
            kind,
            Norm::LayerNorm | Norm::LayerNormWithoutBias | Norm::LayerNorm1P
        );
        // OLMo 1's LayerNorm has neither weight nor bias.
        let has_weight = kind != Norm::OlmoLayerNorm;
        let reached = self.ln_tuning_reaches(name) && has_weight;
        let mut params: SmallVec<[ParamId; 3]> = SmallVec::new();
        if has_weight {
            params.push(self.norm_param(name.then("weight"), weight, ParamRole::Norm, reached));
        }
        if has_bias {
            params.push(self.norm_param(name.then("bias"), weight, ParamRole::NormBias, reached));
        }
        let trainable = reached
            && (self.trains(ParamRole::Norm) || (has_bias && self.trains(ParamRole::NormBias)));
        let tokens = x.tokens;
        let stats = |b: &mut Self| b.tensor(TensorKind::Activation, DType::F32.bytes(tokens * 2));
        // The RMSNorm variants' `hidden_states.to(float32)` of a narrower input is an op of its
        // own (`cast` below); the norm op then holds the rest of the chain.
        let upcast = !layer_norm && kind != Norm::OlmoLayerNorm && x.dtype != DType::F32;
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        // What the op saves and its backward frees before its peak (the walk holds an op's saves
        // until its backward ends).
        let mut freed_before_peak = Bytes::ZERO;
        let out = match kind {
            Norm::LayerNorm | Norm::LayerNormWithoutBias | Norm::LayerNorm1P => {
                // native_layer_norm saves its input, mean and rstd; autocast runs it in fp32,
                // while NemotronLayerNorm1P casts its input to autocast's half dtype itself and
                // runs with autocast off.
                let to = if kind == Norm::LayerNorm1P {
                    self.half
                } else {
                    DType::F32
                };
                let input = if self.autocast {
                    self.autocast(name.then("cast"), x, to)
                } else {
                    x
                };
                saves.push(input.id);
                saves.push(stats(self));
                self.val(h, tokens, input.dtype, x.grad || trainable)
            }
            Norm::OlmoLayerNorm => {
                // `hidden_states.to(float32)` (the input itself when already fp32), whose copy
                // native_layer_norm keeps with its mean and rstd; the result is cast back.
                let x32 = self.cast(name.then("upcast"), x, DType::F32);
                if x.grad {
                    saves.push(x32.id);
                    saves.push(stats(self));
                }
                self.val(h, tokens, x.dtype, x.grad)
            }
            Norm::RmsNorm
            | Norm::GemmaRmsNorm
            | Norm::Olmo2RmsNorm
            | Norm::T5RmsNorm
            | Norm::CohereLayerNorm
            | Norm::UnscaledRmsNorm => {
                // hidden.to(fp32): pow(2) and the rsqrt multiply keep the fp32 copy.
                let x32 = self.cast(name.then("upcast"), x, DType::F32);
                if x.grad {
                    saves.push(x32.id);
                    saves.push(stats(self));
                }
                if kind == Norm::T5RmsNorm && x.dtype != DType::F32 && x.grad {
                    // T5LayerNorm multiplies the *original* input by the fp32 rsqrt.
                    saves.push(x.id);
                }
                if kind == Norm::CohereLayerNorm && x.grad {
                    // CohereLayerNorm computes `hidden_states - mean` twice, once squared for
                    // the variance (pow keeps it) and once multiplied by the rsqrt (the
                    // product keeps it): two fp32 centred copies, where the fp32 input above
                    // stands for the first.
                    saves.push(self.tensor(TensorKind::Activation, DType::F32.bytes(x.elements())));
                }
                let normed32 = self.val(h, tokens, DType::F32, x.grad);
                let out_dtype = match kind {
                    // LlamaRMSNorm casts back to the input dtype before the weight multiply.
                    Norm::RmsNorm => x.dtype,
                    // T5LayerNorm casts to the weight dtype when that is half precision.
                    Norm::T5RmsNorm => {
                        if self.base == DType::Bf16 {
                            DType::Bf16
                        } else {
                            DType::F32
                        }
                    }
                    // GemmaRMSNorm stays fp32 until the end.
                    _ => DType::F32,
                };
                let fp32_weight = matches!(
                    kind,
                    Norm::GemmaRmsNorm | Norm::Olmo2RmsNorm | Norm::CohereLayerNorm
                );
                let pre = if fp32_weight {
                    normed32
                } else {
                    self.val(h, tokens, out_dtype, x.grad)
                };
                if trainable {
                    // weight * normed keeps `normed` for the weight gradient. That product's
                    // backward runs first, and autograd frees a node's saved tensors once it has
                    // run (`Node::release_variables`), so `normed` is gone before pow's backward
                    // peaks (`rms_backward_peak`).
                    saves.push(pre.id);
                    freed_before_peak = pre.bytes();
                }
                let out_dtype = if fp32_weight {
                    x.dtype
                } else {
                    wider(out_dtype, self.base)
                };
                self.val(h, tokens, out_dtype, x.grad || trainable)
            }
        };
        // LlamaRMSNorm's chain after its upcast, kernel by kernel. T5LayerNorm on an fp32 input
        // (mixed precision's residual stream, an fp32 weight) runs the same kernels: its
        // `.to(float32)` returns the input, which its rsqrt multiply then reads, and no cast
        // runs before the weight multiply. The other norms are one fused kernel or are timed as
        // one row-wise chain.
        let llama_chain =
            kind == Norm::RmsNorm || (kind == Norm::T5RmsNorm && x.dtype == DType::F32);
        let (forward_loops, backward_loops) = if llama_chain {
            llama_rms_loops(x.elements(), (x.dtype, out.dtype), x.grad, trainable)
        } else {
            (Loops::default(), Loops::default())
        };
        self.emit(OpSpec {
            name,
            kind: OpKind::Norm,
            params,
            saves: if out.grad { saves } else { SmallVec::new() },
            out: out.bytes(),
            forward_transient: out.bytes() + x.dtype.bytes(x.elements()),
            backward_transient: match kind {
                // The fused kernel reads the incoming gradient and writes the input's.
                Norm::LayerNorm
                | Norm::LayerNormWithoutBias
                | Norm::LayerNorm1P
                | Norm::OlmoLayerNorm => out.bytes() + x.bytes() + DType::F32.bytes(x.elements()),
                // T5LayerNorm's product reads the narrow input itself: its gradient is cast
                // back to that dtype before pow's backward runs beside it.
                Norm::T5RmsNorm => {
                    x.bytes() + DType::F32.bytes(x.elements()) * 4 - freed_before_peak
                }
                _ => rms_backward_peak(x.elements()) - freed_before_peak,
            },
            cost: Cost {
                forward_flops: Flops(5.0 * x.elements() as f64),
                input_grad_flops: Flops(8.0 * x.elements() as f64),
                // The fused layer_norm kernel reads its input and writes its output; the
                // RMSNorm variants run each of their ops as a kernel over fp32 copies (upcast,
                // square, mean, multiply, downcast, weight multiply: ~9 fp32-sized passes).
                forward_bytes: if layer_norm || kind == Norm::OlmoLayerNorm {
                    x.bytes() + out.bytes()
                } else if llama_chain {
                    forward_loops.bytes()
                } else if upcast {
                    // The upcast (reading x, writing the first fp32 pass) is its own op; T5's
                    // norm reads x once more for its rsqrt multiply.
                    let again = if kind == Norm::T5RmsNorm {
                        x.bytes()
                    } else {
                        Bytes::ZERO
                    };
                    out.bytes() + again + DType::F32.bytes(x.elements()) * 6
                } else {
                    // An fp32 input (mixed precision's residual stream): both `.to()` calls
                    // return it as it is, so no cast runs: pow (x read, the square written),
                    // mean (the square read), the rsqrt multiply (x read, the normed written)
                    // and the weight multiply (the normed read, the output written).
                    x.bytes() + out.bytes() + DType::F32.bytes(x.elements()) * 5
                },
                backward_bytes: match kind {
                    // LlamaRMSNorm's autograd, op by op (`llama_rms_loops`).
                    _ if llama_chain => backward_loops.bytes(),
                    Norm::LayerNorm | Norm::LayerNormWithoutBias | Norm::LayerNorm1P => {
                        (x.bytes() + out.bytes()) * 2
                    }
                    // The fused layer_norm backward over the fp32 copy, and the cast's.
                    Norm::OlmoLayerNorm => {
                        DType::F32.bytes(x.elements()) * 3 + x.bytes() + out.bytes()
                    }
                    // The other RMSNorm variants (and T5's on a narrower input): about twelve
                    // fp32 passes. (LlamaRMSNorm always takes the first arm.)
                    Norm::RmsNorm
                    | Norm::GemmaRmsNorm
                    | Norm::Olmo2RmsNorm
                    | Norm::T5RmsNorm
                    | Norm::CohereLayerNorm
                    | Norm::UnscaledRmsNorm => {
                        (x.bytes() + out.bytes()) * 2 + DType::F32.bytes(x.elements()) * 12
                    }
                },
                // LlamaRMSNorm is eight Python-level ops (to, pow, mean, add, rsqrt, mul, to,
                // mul); layer_norm is one fused kernel.
                forward_kernels: match kind {
                    Norm::LayerNorm | Norm::LayerNormWithoutBias => 1,
                    // `weight + 1`, then (under autocast) the weight's and bias's casts.
                    Norm::LayerNorm1P => 2 + 2 * u32::from(self.autocast),
                    // layer_norm and the cast back (the upcast is its own op).
                    Norm::OlmoLayerNorm => 2,
                    _ => 8 - u32::from(upcast),
                },
                backward_kernels: match kind {
                    Norm::LayerNorm | Norm::LayerNormWithoutBias => 1,
                    // layer_norm's, and the weight's `+ 1` and casts pass its gradient on.
                    Norm::LayerNorm1P => {
                        1 + u32::from(trainable) * (1 + 2 * u32::from(self.autocast))
                    }
                    Norm::OlmoLayerNorm => 2,
                    // An input that needs no gradient builds no autograd node before the weight
                    // multiply, whose backward is then the weight's product and its sum.
                    _ if llama_chain && !x.grad => 2,
                    _ => 12,
                },
                modules: 1,
                forward_loops,
                backward_loops,
                ..Cost::default()
            },
            compute: out.dtype,
            in_backward: out.grad,
        });
        out
    }

    /// The FFN's activation. `gated` multiplies by the up projection afterwards (the caller).
    pub fn activation(&mut self, name: Name, x: Val) -> Val {
        let width = x.width;
        let tokens = x.tokens;
        // The activation module's call.
        self.host_only(1, 0);
        match self.model.activation {
            Activation::Silu | Activation::Gelu => {
                // One kernel; backward needs the input: `silu_backward` / `gelu_backward` read
                // the gradient and the saved input and write the input's gradient.
                let out = self.val(width, tokens, x.dtype, x.grad);
                let op = self.elementwise(name, &[x], out, smallvec![x.id], 8.0);
                self.set_backward_bytes(op, out.bytes() + x.bytes() * 2);
                out
            }
            Activation::Relu => self.relu(name, x),
            Activation::Relu2 => {
                // `relu` keeps its output, which `torch.square` (a `pow`, run in fp32 under
                // autocast) keeps too, or its fp32 copy; the square is new.
                let r = self.relu(name, x);
                let wide = if self.autocast { DType::F32 } else { x.dtype };
                let r32 = self.cast(name.then("pow_cast"), r, wide);
                let out = self.val(width, tokens, wide, x.grad);
                self.elementwise(name.then("square"), &[r32], out, smallvec![r32.id], 2.0);
                out
            }
            Activation::GeluNewPython => {
                // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3)))), op by op:
                // pow (autocast: fp32) keeps its fp32 input; tanh keeps its output; the final
                // multiply keeps both operands, 0.5*x and (1 + tanh).
                let wide = if self.autocast { DType::F32 } else { x.dtype };
                let x32 = self.cast(name.then("pow_cast"), x, wide);
                let inner = self.val(width, tokens, wide, x.grad);
                self.elementwise(name.then("pow"), &[x32], inner, smallvec![x32.id], 4.0);
                let t = self.val(width, tokens, wide, x.grad);
                self.elementwise(name.then("tanh"), &[inner], t, smallvec![t.id], 4.0);
                let half = self.val(width, tokens, x.dtype, x.grad);
                self.elementwise(name.then("half"), &[x], half, SmallVec::new(), 1.0);
                let one_plus = self.val(width, tokens, wide, x.grad);
                self.elementwise(name.then("one_plus"), &[t], one_plus, SmallVec::new(), 1.0);
                // Under autocast the halves differ in dtype (bf16 0.5*x, fp32 1 + tanh): the
                // product's backward makes both gradients in fp32 (`Builder::mul`).
                self.mul(name.then("mul"), half, one_plus)
            }
            Activation::GeluFastPython => {
                // 0.5 * x * (1.0 + tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))), in
                // Python's order: x is read by `0.5 * x`, `x * 0.797...`, `0.044715 * x` and the
                // square, whose gradients autograd sums; the products by floats keep nothing.
                self.fork(name.then("fork"), x, 4);
                let half = self.scale(name.then("half"), x);
                let scaled = self.scale(name.then("scale"), x);
                let coef = self.scale(name.then("cube_coef"), x);
                let cube = self.mul(name.then("cube"), coef, x);
                let inner = self.offset(name.then("one_plus_cube"), cube);
                let arg = self.mul(name.then("arg"), scaled, inner);
                let t = self.unary(name.then("tanh"), arg, Keeps::Output, (1, 3));
                let one_plus = self.offset(name.then("one_plus"), t);
                self.mul(name.then("mul"), half, one_plus)
            }
            Activation::GeluErfPython => {
                // x * 0.5 * (1.0 + erf(x / sqrt(2))): x read twice; erf's derivative
                // `2 / sqrt(pi) * exp(-x.pow(2)) * grad` (derivatives.yaml) is five kernels
                // (pow, neg, exp, the float multiply and the product), eleven passes.
                self.fork(name.then("fork"), x, 2);
                let half = self.scale(name.then("half"), x);
                let scaled = self.scale(name.then("scale"), x);
                let e = self.unary(name.then("erf"), scaled, Keeps::Input, (5, 11));
                let one_plus = self.offset(name.then("one_plus"), e);
                self.mul(name.then("mul"), half, one_plus)
            }
            Activation::QuickGelu => {
                // x * sigmoid(1.702 * x): x read twice; `sigmoid_backward` reads the gradient
                // and the kept output.
                self.fork(name.then("fork"), x, 2);
                let scaled = self.scale(name.then("scale"), x);
                let s = self.unary(name.then("sigmoid"), scaled, Keeps::Output, (1, 3));
                self.mul(name.then("mul"), x, s)
            }
            Activation::Xielu => self.xielu(name, x),
        }
    }

    /// `x + c` for a Python float `c`: a new tensor of x's size and dtype, one kernel forward;
    /// `AddBackward` hands the gradient on unchanged, no kernel (derivatives.yaml: `self:
    /// grad`).
    fn offset(&mut self, name: Name, x: Val) -> Val {
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        let op = self.elementwise(name, &[x], out, SmallVec::new(), 1.0);
        if let Some(o) = self.graph.op_mut(op) {
            o.backward_transient = Bytes::ZERO;
            o.cost.input_grad_flops = Flops(0.0);
            o.cost.backward_bytes = Bytes::ZERO;
            o.cost.backward_kernels = 0;
        }
        out
    }

    /// A unary function of x in x's dtype (one kernel forward) whose derivative needs its
    /// input (`erf`) or its output (`tanh`, `sigmoid`: `tanh_backward`, `sigmoid_backward`),
    /// with the backward's kernels and passes over x's size.
    fn unary(&mut self, name: Name, x: Val, keeps: Keeps, (kernels, passes): (u32, u64)) -> Val {
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        let kept = match keeps {
            Keeps::Input => x.id,
            Keeps::Output => out.id,
        };
        let op = self.elementwise(name, &[x], out, smallvec![kept], 4.0);
        self.set_backward_bytes(op, x.bytes() * passes);
        if let Some(o) = self.graph.op_mut(op) {
            o.cost.backward_kernels = kernels;
        }
        out
    }

    /// A scale-less RMSNorm over groups of `group` channels (a head, or the whole width):
    /// `x.float()` times `pow(mean(x^2) + eps, -0.5)` (Gemma 4's `v_norm` and router norm,
    /// `Gemma4RMSNorm(with_scale=False)`, whose `pow` keeps its input and the product its
    /// output: two fp32 statistics per group) or times `rsqrt(...)` (Llama 4's
    /// `Llama4TextL2Norm`, nanochat's every norm, whose `rsqrt` and product keep one), cast back
    /// with `type_as`. The square and the product keep the fp32 copy; there is no weight.
    pub fn unscaled_rms_norm(&mut self, name: Name, x: Val, (group, stats): (u64, u64)) -> Val {
        let x32 = self.cast(name.then("upcast"), x, DType::F32);
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if x.grad {
            let rows = x.elements() / group.max(1);
            saves.push(x32.id);
            saves.push(self.tensor(
                TensorKind::Activation,
                DType::F32.bytes(rows.saturating_mul(stats)),
            ));
        }
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        let f32 = DType::F32.bytes(x.elements());
        self.emit(OpSpec {
            name,
            kind: OpKind::Norm,
            params: SmallVec::new(),
            saves,
            out: out.bytes(),
            forward_transient: out.bytes() + f32,
            backward_transient: rms_backward_peak(x.elements()),
            cost: Cost {
                forward_flops: Flops(4.0 * x.elements() as f64),
                input_grad_flops: Flops(8.0 * x.elements() as f64),
                forward_bytes: x.bytes() + out.bytes() + f32 * 5,
                backward_bytes: (x.bytes() + out.bytes()) * 2 + f32 * 10,
                // pow, mean, add, pow, mul and the cast back.
                forward_kernels: 6,
                backward_kernels: 10,
                modules: 1,
                ..Cost::default()
            },
            compute: DType::F32,
            in_backward: x.grad,
        });
        out
    }

    /// transformers' `XIELUActivation._xielu_python` (the CUDA kernel is an optional wheel):
    /// `where(x > 0, a_p x x + beta x, (expm1(min(x, eps)) - x) a_n + beta x)`, with
    /// `a_p = softplus(alpha_p)` and `a_n = beta + softplus(alpha_n)`. The two alphas are
    /// parameters of shape (1,) in the config's dtype, and `softplus` is on CUDA autocast's fp32
    /// list: under autocast each is an fp32 tensor of shape (1,), a dimensioned operand, so
    /// every product with one is promoted to fp32 and the chain runs in fp32 whatever the
    /// weights' dtype (without autocast, in the wider of x's and the weights' dtype); beta and
    /// eps are 0-d buffers, which do not promote. `expm1` is on the fp32 list too. Autograd
    /// keeps, op by op: x (for `a_p x`'s alpha gradient and `(a_p x) x`), `a_p x` itself,
    /// `expm1`'s output, `expm1(...) - x` when the alphas train (alpha_n's gradient), and the
    /// `x > 0` mask (`where`'s only saved tensor). Python evaluates the mask, then the positive
    /// branch, then the negative one; so while the last sum of the negative branch runs, the
    /// positive branch, both of the sum's operands and its result are live.
    fn xielu(&mut self, name: Name, x: Val) -> Val {
        let (width, tokens) = (x.width, x.tokens);
        let alpha_p = self.base_param(name.then("alpha_p"), (1, 1), ParamRole::Linear);
        let alpha_n = self.base_param(name.then("alpha_n"), (1, 1), ParamRole::Linear);
        let alphas_train = self.trains(ParamRole::Linear);
        let wide = if self.autocast {
            DType::F32
        } else {
            wider(x.dtype, self.base)
        };
        let grad = x.grad || alphas_train;
        let mask = self.val(width, tokens, DType::U8, false);
        self.elementwise(name.then("positive_mask"), &[x], mask, SmallVec::new(), 1.0);
        // a_p * x (its x kept only for the alpha's gradient), then (a_p x) * x keeping both.
        let apx = self.param_mul(name.then("alpha_p_x"), x, (alpha_p, alphas_train), wide);
        // softplus(alpha_p): one kernel on one element.
        self.host_only(0, 1);
        let sq = self.val(width, tokens, wide, grad);
        self.elementwise(
            name.then("square"),
            &[apx, x],
            sq,
            smallvec![apx.id, x.id],
            1.0,
        );
        // Each branch ends `... + self.beta * x`: a fresh `beta * x` (beta is a buffer, so it
        // keeps nothing), then the sum, while both operands and whatever else is live
        // (`earlier`) stay allocated.
        let plus_beta_x = |b: &mut Self, names: [&'static str; 2], a: Val, earlier: Bytes| {
            let bx = b.val(width, tokens, x.dtype, x.grad);
            b.elementwise(name.then(names[0]), &[x], bx, SmallVec::new(), 1.0);
            let sum = b.val(width, tokens, wide, grad);
            let op = b.elementwise(name.then(names[1]), &[a, bx], sum, SmallVec::new(), 1.0);
            if let Some(o) = b.graph.op_mut(op) {
                o.forward_transient += a.bytes() + bx.bytes() + earlier;
            }
            sum
        };
        let positive = plus_beta_x(self, ["beta_x", "positive"], sq, Bytes::ZERO);
        // expm1(min(x, eps)) - x: `minimum` keeps x (already kept), expm1 its output.
        let low = self.val(width, tokens, x.dtype, x.grad);
        self.elementwise(name.then("min_eps"), &[x], low, smallvec![x.id], 1.0);
        let low = if self.autocast {
            self.cast(name.then("expm1_cast"), low, DType::F32)
        } else {
            low
        };
        let e = self.val(width, tokens, low.dtype, x.grad);
        self.elementwise(name.then("expm1"), &[low], e, smallvec![e.id], 4.0);
        let d = self.val(width, tokens, wider(e.dtype, x.dtype), x.grad);
        self.elementwise(name.then("minus_x"), &[e, x], d, SmallVec::new(), 1.0);
        let scaled = self.param_mul(name.then("alpha_n_mul"), d, (alpha_n, alphas_train), wide);
        // beta + softplus(alpha_n): two kernels on one element.
        self.host_only(0, 2);
        let negative = plus_beta_x(self, ["beta_x_2", "negative"], scaled, positive.bytes());
        let out = self.val(width, tokens, wide, grad);
        let op = self.elementwise(
            name.then("where"),
            &[mask, positive, negative],
            out,
            smallvec![mask.id],
            0.0,
        );
        if let Some(o) = self.graph.op_mut(op) {
            // Forward: both branches live with the output. Backward: `where` splits the
            // gradient into one masked copy per branch.
            o.forward_transient += positive.bytes() + negative.bytes();
            o.backward_transient = out.bytes() * 3;
        }
        out
    }

    /// `torch.sigmoid(x)`: one kernel keeping its output (`sigmoid_backward` reads it).
    pub fn sigmoid(&mut self, name: Name, x: Val) -> Val {
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        self.elementwise(name, &[x], out, smallvec![out.id], 4.0);
        out
    }

    /// `x * p` for a parameter `p` broadcast over x (a norm's weight, xIELU's alphas, Gemma 4's
    /// router scale): the product is in `dtype` (PyTorch's promotion of the two), keeps x only
    /// for p's gradient (`trains`), and records p as the op's parameter.
    pub(super) fn param_mul(
        &mut self,
        name: Name,
        x: Val,
        (param, trains): (ParamId, bool),
        dtype: DType,
    ) -> Val {
        let out = self.val(x.width, x.tokens, dtype, x.grad || trains);
        let saves = if trains {
            smallvec![x.id]
        } else {
            SmallVec::new()
        };
        let op = self.elementwise(name, &[x], out, saves, 1.0);
        if let Some(o) = self.graph.op_mut(op) {
            o.params.push(param);
        }
        out
    }

    /// A gated RMSNorm over groups of `group` channels (Qwen3.5's `Qwen3_5RMSNormGated`, the
    /// norm of Gated DeltaNet's output per value head): `x.to(fp32)` normalised by its rsqrt
    /// (pow and the multiply keep the fp32 copy, the multiply the rsqrt), cast back to x's
    /// dtype, times the weight (which keeps that cast copy when it trains; an fp32 weight
    /// promotes the product to fp32), times `silu(gate.to(fp32))` (SiLU keeps the fp32 gate,
    /// the product both factors), cast back to x's dtype.
    pub fn gated_rms_norm(&mut self, name: Name, x: Val, gate: Val, group: u64) -> Val {
        let reached = self.ln_tuning_reaches(name);
        let weight = self.norm_param(name.then("weight"), group, ParamRole::Norm, reached);
        let trains = reached && self.trains(ParamRole::Norm);
        let rows = x.elements() / group.max(1);
        self.rms_weight_gate(name, (x, gate), rows, (weight, trains), (x.dtype, 1))
    }

    /// What Qwen3.5's and Falcon-H1's gated norms share: x upcast to fp32, normalised over
    /// `rows` rows, times the weight in `dtype`, times `silu(gate.to(fp32))` (its SiLU call
    /// counting `modules` module calls), cast back to x's dtype.
    fn rms_weight_gate(
        &mut self,
        name: Name,
        (x, gate): (Val, Val),
        rows: u64,
        weight: (ParamId, bool),
        (dtype, modules): (DType, u32),
    ) -> Val {
        let x32 = self.cast(name.then("upcast"), x, DType::F32);
        let weighted = self.weighted_rms(name, x32, rows, weight, dtype);
        let act = self.silu_gate(name, gate);
        self.host_only(modules, 0);
        let gated = self.mul(name.then("gate_mul"), weighted, act);
        self.cast(name.then("cast_back"), gated, x.dtype)
    }

    /// Mamba-2's `MambaRMSNormGated(x, gate)` in its PyTorch form, which gates before it
    /// normalises over the whole width (over each of `groups` equal slices in Nemotron-H's
    /// `Zamba2RMSNormGated`, one rsqrt per slice): `x.to(fp32) * silu(gate.to(fp32))` (SiLU
    /// keeps the fp32 gate, the product both factors), normalised by its rsqrt (pow and the
    /// multiply keep the product, the multiply the rsqrt), cast back to x's dtype, times the
    /// weight (which keeps the normalised tensor when it trains; an fp32 x or weight makes the
    /// result fp32).
    pub fn gate_then_rms_norm(&mut self, name: Name, x: Val, gate: Val, groups: u64) -> Val {
        let reached = self.ln_tuning_reaches(name);
        let weight = self.norm_param(name.then("weight"), x.width, ParamRole::Norm, reached);
        let trains = reached && self.trains(ParamRole::Norm);
        let x32 = self.cast(name.then("upcast"), x, DType::F32);
        let act = self.silu_gate(name, gate);
        let gated = self.mul(name.then("gate_mul"), x32, act);
        let rows = gated.tokens.saturating_mul(groups.max(1));
        self.weighted_rms(name, gated, rows, (weight, trains), x.dtype)
    }

    /// `FalconH1RMSNormGated` with `norm_before_gate`: y upcast to fp32, normalised over each
    /// of `groups` slices (pow and the multiply keep the fp32 y, the multiply the rsqrt),
    /// times the weight in fp32 (which keeps the normalised tensor when it trains), then times
    /// `silu(gate.to(fp32))` (SiLU keeps the fp32 gate, the product both factors), cast back
    /// to y's dtype.
    pub fn rms_then_gate(&mut self, name: Name, y: Val, gate: Val, groups: u64) -> Val {
        let reached = self.ln_tuning_reaches(name);
        let weight = self.norm_param(name.then("weight"), y.width, ParamRole::Norm, reached);
        let trains = reached && self.trains(ParamRole::Norm);
        let rows = y.tokens.saturating_mul(groups.max(1));
        self.rms_weight_gate(name, (y, gate), rows, (weight, trains), (DType::F32, 0))
    }

    /// `y * silu(gate)` with no norm (Falcon-H1's `mamba_rms_norm` false): SiLU in the gate's
    /// dtype keeping its input, the product keeping both factors.
    pub fn silu_gated(&mut self, name: Name, y: Val, gate: Val) -> Val {
        let act = self.val(gate.width, gate.tokens, gate.dtype, gate.grad);
        self.elementwise(name.then("silu"), &[gate], act, smallvec![gate.id], 8.0);
        self.mul(name.then("gate_mul"), y, act)
    }

    /// `F.silu(gate.to(torch.float32))`: the fp32 copy (where the gate is 16-bit) kept by SiLU.
    fn silu_gate(&mut self, name: Name, gate: Val) -> Val {
        let gate32 = self.cast(name.then("gate_upcast"), gate, DType::F32);
        let act = self.val(gate.width, gate.tokens, DType::F32, gate.grad);
        self.elementwise(name.then("silu"), &[gate32], act, smallvec![gate32.id], 8.0);
        act
    }

    /// The gated norms' shared tail: an fp32 `x32` normalised over `rows` rows by its rsqrt
    /// (pow and the multiply keep `x32`, the multiply the rsqrt), cast to `dtype`, times the
    /// weight (which keeps that cast when it trains; an fp32 weight makes the product fp32).
    fn weighted_rms(
        &mut self,
        name: Name,
        x32: Val,
        rows: u64,
        (weight, trains): (ParamId, bool),
        dtype: DType,
    ) -> Val {
        let rstd = self.tensor(TensorKind::Activation, DType::F32.bytes(rows));
        let normed = self.val(x32.width, x32.tokens, DType::F32, x32.grad);
        let op = self.elementwise(
            name.then("rms"),
            &[x32],
            normed,
            smallvec![x32.id, rstd],
            4.0,
        );
        if let Some(o) = self.graph.op_mut(op) {
            // pow, mean, add, rsqrt, multiply; the module's own call.
            o.cost.forward_kernels = 5;
            o.cost.backward_kernels = 8;
            o.cost.modules = 1;
        }
        let narrow = self.cast(name.then("downcast"), normed, dtype);
        self.param_mul(
            name.then("weight_mul"),
            narrow,
            (weight, trains),
            wider(self.base, dtype),
        )
    }

    /// `F.relu`: one kernel keeping its output; `threshold_backward` reads the gradient and that
    /// output and writes the input's gradient.
    fn relu(&mut self, name: Name, x: Val) -> Val {
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        let op = self.elementwise(name, &[x], out, smallvec![out.id], 1.0);
        self.set_backward_bytes(op, out.bytes() * 2 + x.bytes());
        out
    }

    /// `a * b` of two activations (gated FFN): keeps both.
    pub fn mul(&mut self, name: Name, a: Val, b: Val) -> Val {
        let out = self.val(a.width, a.tokens, wider(a.dtype, b.dtype), a.grad || b.grad);
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if b.grad {
            saves.push(a.id);
        }
        if a.grad {
            saves.push(b.id);
        }
        let op = self.binary(name, (a, b), out, saves);
        let saved: Bytes = self
            .graph
            .op(op)
            .map(|o| o.saves.iter().map(|&t| self.graph.tensor(t).bytes).sum())
            .unwrap_or(Bytes::ZERO);
        let in_segment = self.segment.is_some();
        if let Some(o) = self.graph.op_mut(op) {
            // `MulBackward0` computes each needed input gradient as `grad * other` in the
            // product's (promoted) dtype and returns them (`mul_tensor_backward`). The engine
            // then fits them to their inputs in order (`validate_outputs` in `call_function`,
            // torch/csrc/autograd/engine.cpp: a broadcast one summed down to its shape, a
            // narrower one cast to its dtype) while `call_function` still holds the incoming
            // gradient and the other products, and before `evaluate_function` releases the
            // node's saved tensors (`release_variables`). So the worst moment holds the incoming
            // gradient, one product-sized, product-dtype tensor per input that needs a gradient
            // (a broadcast input's too, before its sum), and the narrower input's cast gradient
            // beside what the op saved (replayed: the routed experts' `proj_out *
            // sample_weights` in DeepSeek-V2, three fp32 and one bf16 (S, h) tensors at its
            // `_to_copy`; in Qwen3-MoE, all bf16, three (S, h) tensors at the weights' `sum`).
            // In a checkpointed block the saved tensors are the recomputation's, which
            // non-reentrant checkpointing's unpack hook hands over and forgets
            // (`torch/utils/checkpoint.py`): they die when the node returns, before the casts,
            // which then take their place.
            let casts: Bytes = [a, b]
                .iter()
                .filter(|x| x.grad && x.dtype != out.dtype)
                .map(|x| x.bytes())
                .sum();
            let casts = if in_segment {
                Bytes(casts.0.saturating_sub(saved.0))
            } else {
                casts
            };
            o.backward_transient =
                out.bytes() * (1 + u64::from(a.grad) + u64::from(b.grad)) + casts;
        }
        out
    }

    /// Rotary embeddings on q and k, as the family's `apply_rotary_pos_emb` runs them; the
    /// tables are `(seq, rotary_width)`: one sequence's positions (transformers builds
    /// `position_ids` as `cache_position.unsqueeze(0)`, batch 1, when none are passed) by the
    /// rotated part of one head. `concatenated`: the family rebuilds q and k as `cat([rotated,
    /// pass], dim=-1)` (`Family::rotary_concatenates`, and every family under partial rotary),
    /// one more copy of each.
    pub fn rotary_qk(
        &mut self,
        names: (Name, Name),
        (q, k): (Val, Val),
        cos_dtype: DType,
        apply: RotaryApply,
        (seq, head_dim, rotary_width, concatenated): (u64, u64, u64, bool),
    ) -> (Val, Val) {
        // GLM's and ERNIE's per-layer `cos[..., :half].repeat_interleave(2, dim=-1)` (and sin's):
        // two new (1, 1, seq, rotary width) tensors that both q's and k's multiplies keep.
        let table_dtype = match apply {
            RotaryApply::Shared | RotaryApply::ComplexFp32 => None,
            RotaryApply::Interleaved => Some(cos_dtype),
            RotaryApply::InterleavedFp32 => Some(DType::F32),
        };
        let table_bytes = table_dtype.map(|d| d.bytes(seq.saturating_mul(rotary_width)));
        let tables: SmallVec<[TensorId; 6]> = match table_bytes {
            Some(bytes) => smallvec![
                self.tensor(TensorKind::Activation, bytes),
                self.tensor(TensorKind::Activation, bytes)
            ],
            None => SmallVec::new(),
        };
        let (q_op, q) = self.rotary(names.0, q, cos_dtype, apply, tables.clone());
        let (k_op, k) = self.rotary(names.1, k, cos_dtype, apply, tables);
        let fraction = rotary_width as f64 / head_dim.max(1) as f64;
        if concatenated || rotary_width < head_dim {
            for (op, out) in [(q_op, q), (k_op, k)] {
                if let Some(o) = self.graph.op_mut(op) {
                    // The rotation's passes run over the rotated part only. The `cat`: one
                    // kernel reading the rotated and pass-through parts and writing the whole,
                    // beside the sum it copies; its backward hands on slices of the gradient
                    // (views), and the slices q was cut into (`q[..., :rotary_dim]`,
                    // `q[..., rotary_dim:]`) come back as `slice_backward`s (each writes the
                    // whole zeroed gradient and copies its part in) and their sum: six passes
                    // and three kernels, or four and two where nothing passes through
                    // (`validation/trace_rotary.py`: GPT-NeoX at a quarter 4.56 forward
                    // passes and 9.56 backward, GPT-J at 64 of 256 4.67 and 9.56, Phi-3 over
                    // the whole head 12.25 and 18.25).
                    let (fwd, bwd) = (o.cost.forward_bytes.0, o.cost.backward_bytes.0);
                    o.cost.forward_bytes = Bytes((fwd as f64 * fraction) as u64);
                    o.cost.backward_bytes = Bytes((bwd as f64 * fraction) as u64);
                    o.cost.forward_kernels += 1;
                    o.cost.forward_bytes += out.bytes() * 2;
                    let (kernels, passes) = if rotary_width < head_dim {
                        (3, 6)
                    } else {
                        (2, 4)
                    };
                    o.cost.backward_kernels += kernels;
                    o.cost.backward_bytes += out.bytes() * passes;
                    o.forward_transient = o.forward_transient.max(out.bytes() * 2);
                }
            }
        }
        if let (Some(bytes), Some(o)) = (table_bytes, self.graph.op_mut(q_op)) {
            // Per table: the slice, `unsqueeze` and `repeat_interleave` (an expand and one copy
            // kernel reading half a table and writing a whole one); on q's op, which runs first.
            o.cost.forward_kernels += 6;
            o.cost.forward_bytes += bytes * 3;
        }
        (q, k)
    }

    /// `q * scale.to(q.dtype)` with Llama 4's per-position scale (`get_llama_4_attn_scale`:
    /// `1 + beta * log(1 + floor(position_ids / original_max))`, shaped (1, 1, seq, 1) from
    /// batch-1 position ids): a new tensor of q's size and dtype; `MulBackward` keeps the
    /// (seq) scale in q's dtype and multiplies the gradient by it. Dispatches: div, floor,
    /// add, log, mul, add, the indexing, the cast and the multiply forward; one mul back.
    pub fn position_scale(&mut self, name: Name, q: Val, seq: u64) -> Val {
        let scale = self.tensor(TensorKind::Activation, q.dtype.bytes(seq));
        let out = self.val(q.width, q.tokens, q.dtype, q.grad);
        let op = self.elementwise(name, &[q], out, smallvec![scale], 1.0);
        self.set_backward_bytes(op, q.bytes() + out.bytes());
        if let Some(o) = self.graph.op_mut(op) {
            o.cost.forward_kernels = 9;
        }
        out
    }

    /// One of q and k. `Shared` (transformers' Llama `apply_rotary_pos_emb`): `q * cos +
    /// rotate_half(q) * sin` keeps only the model's cos and sin, and produces a new tensor in the
    /// wider of q's and cos's dtypes (cos follows the embeddings' dtype: fp32 when the weights
    /// are fp32). GLM's interleaved form keeps its per-layer tables; ERNIE's runs in fp32 and
    /// casts back to q's dtype.
    pub(super) fn rotary(
        &mut self,
        name: Name,
        x: Val,
        cos_dtype: DType,
        apply: RotaryApply,
        tables: SmallVec<[TensorId; 6]>,
    ) -> (usize, Val) {
        let fp32 = apply == RotaryApply::InterleavedFp32;
        let complex = apply == RotaryApply::ComplexFp32;
        let dtype = if fp32 || complex {
            x.dtype
        } else {
            wider(x.dtype, cos_dtype)
        };
        let out = self.val(x.width, x.tokens, dtype, x.grad);
        let op = self.elementwise(name, &[x], out, tables, 3.0);
        // q and k are transposed views (batch, heads, seq, head_dim) and cos/sin broadcast over
        // the heads: every multiply, the neg and the add take the strided loop.
        self.set_access(op, (Access::Strided, Access::Strided));
        if let Some(o) = self.graph.op_mut(op) {
            if complex {
                // Llama 4: `q.float()`, the complex multiply (the views around it are free)
                // and `type_as(q)`: three kernels each way (the multiply's derivative is the
                // gradient times the table's conjugate). The fp32 copy and the fp32 product
                // are alive together.
                let e = x.elements();
                o.cost.forward_kernels = 3;
                o.cost.backward_kernels = 3;
                o.cost.forward_bytes = x.bytes() + DType::F32.bytes(e) * 4 + out.bytes();
                o.cost.backward_bytes = o.cost.forward_bytes;
                o.forward_transient = DType::F32.bytes(e) * 2;
            } else if fp32 {
                // ERNIE: `q.float()`, `* cos`, two strided slices, `neg`, `stack`, `flatten`,
                // `.float()`, `* sin`, the add and `.to(q.dtype)`: eleven dispatches. Per element
                // (q of s bytes, fp32 of 4): the casts move s + 4 each, the multiplies 8 each,
                // neg and stack 2s each, the add 12 and the cast back 4 + s: 38 + 7s bytes.
                // Backward: the three casts (4 + s each), two muls (8 each), neg (2s), two
                // `slice_backward`s (a zeroed gradient and half copied in: 2s each) and the
                // add of the two paths (3s): 28 + 12s. At the add, the two fp32 products and
                // their fp32 sum are live.
                let (e, s) = (x.elements(), x.dtype.bytes(1).0);
                o.cost.forward_kernels = 11;
                o.cost.backward_kernels = 9;
                o.cost.forward_bytes = Bytes(e.saturating_mul(38 + 7 * s));
                o.cost.backward_bytes = Bytes(e.saturating_mul(28 + 12 * s));
                o.forward_transient = DType::F32.bytes(e) * 3;
            } else {
                // mul, two slices, neg, cat, mul, add: seven dispatches (transformers'
                // `apply_rotary_pos_emb`). Per element, with q of s bytes and the result of r
                // (r = s unless cos is wider): `q * cos` reads q and writes the result (s + r),
                // neg reads and writes half of q (s), cat reads and writes q's size (2s),
                // `rotate_half(q) * sin` moves s + r again and the add reads two results and
                // writes one (3r): 5s + 5r, ten passes when the dtypes agree. Backward: two
                // muls, neg, two `slice_backward`s (each writes the whole zeroed gradient and
                // copies half into it) and two adds, fourteen passes (a CPU dispatch trace of a
                // Llama block: 14.1 for q, 14.5 for k).
                o.cost.forward_kernels = 7;
                o.cost.backward_kernels = 7;
                o.cost.forward_bytes = (x.bytes() + out.bytes()) * 5;
                o.cost.backward_bytes = out.bytes() * 14;
            }
        }
        (op, out)
    }
}

/// transformers' `LlamaRMSNorm` after `hidden_states.to(float32)` (an op of its own), kernel by
/// kernel, forward and backward, for `n` elements of a `narrow` input whose output (the weight
/// times the normed input cast back) is `out`.
///
/// Forward: `pow(2)` (fp32 read and written), `mean(-1)` (a row reduction reading the square),
/// the rsqrt multiply (a broadcast row scale, fp32 read and written), `.to(input_dtype)` where
/// that is narrower (fp32 read, narrow written), and the weight multiply (a broadcast weight,
/// the narrow normed input read, the output written). `rsqrt(var + eps)` runs on one value per
/// row.
///
/// Backward, by derivatives.yaml: the weight multiply's input gradient (a broadcast weight: the
/// gradient read, written) and, where the output is wider than the input, the engine's cast of
/// it to the input dtype; `.to()`'s gradient widened back to fp32; the rsqrt multiply's two
/// gradients, one a broadcast row scale (2 fp32 passes), the other a product (3) summed along
/// the row (1); mean's gradient, the row value expanded and divided (a broadcast write, 1);
/// pow's, `2 * x.pow(1) * grad` (a copy, a scale and a product: 2 + 2 + 3); and the sum of the
/// two paths (3). Seventeen fp32 passes; a CPU dispatch trace of a Llama block gives the same
/// 84 bytes per bf16 element with the upcast's backward cast. A trained weight adds its
/// product with the normed input and that product's sum over the tokens.
fn llama_rms_loops(
    n: u64,
    (narrow, out): (DType, DType),
    input_grad: bool,
    trained: bool,
) -> (Loops, Loops) {
    let f32 = DType::F32.bytes(n);
    let cast_down = if narrow == DType::F32 {
        Bytes::ZERO
    } else {
        f32 + narrow.bytes(n)
    };
    let forward = Loops {
        contiguous: f32 * 2 + cast_down,
        broadcast: f32 * 2 + narrow.bytes(n) + out.bytes(n),
        broadcast_elements: n.saturating_mul(2),
        row_reduce: f32,
        ..Loops::default()
    };
    let mut backward = Loops::default();
    if input_grad {
        let engine_cast = if out == narrow {
            Bytes::ZERO
        } else {
            out.bytes(n) + narrow.bytes(n)
        };
        backward.broadcast = out.bytes(n) * 2 + f32 * 3;
        backward.broadcast_elements = n.saturating_mul(3);
        backward.contiguous = engine_cast + f32 * 13;
        backward.widening = cast_down;
        backward.row_reduce = f32;
    }
    if trained {
        backward.contiguous += out.bytes(n) * 2 + narrow.bytes(n);
        backward.token_reduce = out.bytes(n);
    }
    (forward, backward)
}

/// The most an RMSNorm's autograd chain holds at once in backward, over `elements` fp32
/// values (its own saves apart): pow's backward, `grad * (2 * x.pow(1))`
/// (`pow_backward`, torch/csrc/autograd/FunctionsManual.cpp), runs on mean's expanded
/// division of the incoming gradient (`mean_backward`: `sum_backward(...) / n`) while the
/// rsqrt product's input gradient waits to be summed with it. So five fp32 tensors are live:
/// that waiting gradient, the division, `x^1`, `2 * x^1` and the product (a CPU dispatch trace
/// of Gemma 4's `v_norm` shows the five, in that order). The incoming gradient and its fp32
/// copy are freed before (the weight and rsqrt products hold three), the cast back after.
fn rms_backward_peak(elements: u64) -> Bytes {
    DType::F32.bytes(elements) * 5
}
