//! Linear layers and what PEFT methods wrap around them: LoRA's A/B (Hu et al. 2021), QLoRA's
//! NF4 base (Dettmers et al. 2023), IA3 scalings (Liu et al. 2022) and bottleneck adapters
//! (Houlsby et al. 2019), as peft and bitsandbytes run them.

use super::build::{Builder, OpSpec, Val, WeightCast, wider};
use crate::graph::op::{Cost, Name, OpKind, Param, ParamId, ParamRole, SideKernels, TensorId};
use crate::spec::model::Family;
use crate::spec::plan::{LoraTargets, Method, Proj};
use crate::units::{Bytes, DType, Flops};
use smallvec::{SmallVec, smallvec};

impl Builder<'_> {
    /// Whether LoRA wraps this projection, an `nn.Linear` module.
    pub(super) fn lora_on(&self, proj: Option<Proj>) -> Option<u64> {
        let proj = proj?;
        if self.model.moe.is_some()
            && self.model.family.peft_converts_experts()
            && matches!(proj, Proj::Gate | Proj::Up | Proj::Down)
        {
            // peft moved these names onto the fused experts and out of `target_modules`, so no
            // module of those names takes LoRA: not a dense layer's or a shared expert's FFN,
            // nor AFMoE's attention `gate_proj`.
            return None;
        }
        self.lora_on_experts(proj)
    }

    /// Whether LoRA reaches the experts' fused parameters through role `proj`'s names.
    pub(super) fn lora_on_experts(&self, proj: Proj) -> Option<u64> {
        let lora = self.plan.method.lora()?;
        // A fused q/k/v projection (GPT-2 `c_attn`, Falcon `query_key_value`) is one module:
        // naming any of q, k or v wraps all of it, as peft's target names do.
        let fused = self.model.fused_qkv && proj == Proj::Q;
        // A fused `gate_up_proj` likewise: naming gate or up wraps the one module.
        let fused_ffn = self.model.fused_gate_up && proj == Proj::Gate;
        let hit = lora.targets.reaches(proj)
            || match &lora.targets {
                LoraTargets::AllLinear | LoraTargets::QueryValue => false,
                LoraTargets::Named(list) => {
                    (fused
                        && list
                            .iter()
                            .any(|p| matches!(p, Proj::Q | Proj::K | Proj::V)))
                    || (fused_ffn && list.contains(&Proj::Up))
                    // `out_proj` is the attention output in the models that name it so; a
                    // model with a linear-attention or Mamba mixer gives the name to the
                    // mixer's output (its attention's is `o_proj`), as peft's name matching
                    // does.
                    || (proj == Proj::O
                        && list.contains(&Proj::OutProj)
                        && self.model.family.attention_out_proj()
                        && !self.model.has_linear_attention()
                        && !self.model.has_state_space_layers())
                }
            };
        hit.then_some(lora.rank)
    }

    fn ia3_on(&self, proj: Option<Proj>) -> Option<Ia3Site> {
        if self.plan.method != Method::Ia3 {
            return None;
        }
        // peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (peft 0.21, keyed by
        // model_type): two attention projections and the FFN's output projection, which is a
        // feed-forward module (the scaling multiplies its input). Which two depends on the
        // model type; a fused qkv projection is scaled whole. Model types missing from the
        // table make peft ask for `target_modules`; they get Llama's entry, as the harness does.
        // No model type with multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash,
        // Mistral 4, MiniCPM3) has an entry, and Llama's names none of its projections
        // (`Proj::QA`..`KvB`), so peft trains the FFN's `down_proj` inputs only (MiniCPM3-4B:
        // 396,800 scalings).
        let attention: [Proj; 2] = match self.model.family {
            Family::Qwen2
            | Family::Qwen3
            | Family::Gemma
            | Family::Gemma2
            | Family::Gemma3
            | Family::Bart
            | Family::Phi
            | Family::GptNeo
            | Family::Gptj => [Proj::Q, Proj::V],
            Family::Opt => [Proj::Q, Proj::K],
            _ => [Proj::K, Proj::V],
        };
        match proj? {
            Proj::Q if self.model.fused_qkv => Some(Ia3Site::Output),
            // mT5's entry scales `wi_1`'s output (the gated FFN's linear half) instead, and
            // lists no feed-forward module.
            Proj::Up if self.model.family == Family::Mt5 => Some(Ia3Site::Output),
            Proj::Down if self.model.family == Family::Mt5 => None,
            // LFM2 and nanochat are not in the table and name their FFN output `w2` and `fc2`:
            // Llama's entry finds only `k_proj` and `v_proj` (a toy LFM2 trains k's and v's
            // outputs only).
            Proj::Down if self.model.family.is_lfm2() || self.model.family == Family::NanoChat => {
                None
            }
            Proj::Down => Some(Ia3Site::Input),
            p if attention.contains(&p) => Some(Ia3Site::Output),
            _ => None,
        }
    }

    /// A linear layer of the base model with a target role (`nn.Linear`, `Conv1D` or
    /// bitsandbytes `Linear4bit`), or without one (`None`: a router's or the experts' weights,
    /// which are not `nn.Linear` modules), with whatever the method wraps around it.
    pub fn linear(
        &mut self,
        name: Name,
        x: Val,
        out_features: u64,
        bias: bool,
        proj: Option<Proj>,
    ) -> Val {
        self.linear_module(name, x, (out_features, bias), proj, proj.is_some())
    }

    /// A linear weight bitsandbytes quantized (QLoRA's `Linear4bit`): NF4 with double
    /// quantization, 4 bits per weight, one 8-bit absmax per 64 weights plus one fp32
    /// second-level constant per 256 blocks (Dettmers et al. 2023, sec. 3).
    pub(super) fn nf4_weight(&mut self, name: Name, shape: (u64, u64)) -> ParamId {
        let elements = shape.0.saturating_mul(shape.1);
        let blocks = elements.div_ceil(64);
        self.graph.add_param(Param {
            name,
            elements,
            dtype: DType::Nf4,
            storage: DType::Nf4,
            unit: self.unit,
            trainable: false,
            role: ParamRole::Linear,
            extra: Bytes(blocks + 4 * blocks.div_ceil(256)),
            shape,
            copies: u64::from(self.repeat),
            layer: self.layer,
            idle: false,
        })
    }

    /// peft's LoRA factors on a linear whose forward takes no part in the gradient (a vision
    /// tower text training never runs, an indexer under `torch.no_grad()`): trainable, counted
    /// as such, and idle ([`Param::idle`]); `copies` of each where given.
    pub(super) fn idle_lora(
        &mut self,
        name: Name,
        (inputs, outputs): (u64, u64),
        copies: Option<u64>,
    ) {
        let Some(lora) = self.plan.method.lora() else {
            return;
        };
        let (rank, dora) = (lora.rank, lora.dora);
        let mut parts = vec![("lora_A", (rank, inputs)), ("lora_B", (outputs, rank))];
        if dora {
            parts.push(("lora_magnitude_vector", (outputs, 1)));
        }
        for (part, shape) in parts {
            let p = self.adapter_param(name.then(part), shape);
            if let Some(p) = self.graph.params.get_mut(p.0 as usize) {
                p.idle = true;
                if let Some(c) = copies {
                    p.copies = c;
                }
            }
        }
    }

    /// An `nn.Linear` module that no target role names (a shared expert's gate, Jamba's
    /// router, Gemma 4's per-layer projections): bitsandbytes quantizes it under QLoRA as it
    /// does the named ones.
    pub fn nn_linear(&mut self, name: Name, x: Val, out_features: u64, bias: bool) -> Val {
        self.linear_module(name, x, (out_features, bias), None, true)
    }

    /// `module`: the layer is an `nn.Linear` (or `Conv1D`) module, which QLoRA's
    /// bitsandbytes may swap for `Linear4bit` (`Family::bnb_swaps`). The caller holds the
    /// module's input `x` while it runs (an argument), so every op of the call names it.
    fn linear_module(
        &mut self,
        name: Name,
        x: Val,
        shape: (u64, bool),
        proj: Option<Proj>,
        module: bool,
    ) -> Val {
        let frame = self.name(&[x.id]);
        let out = self.linear_module_ops(name, x, shape, proj, module);
        self.unname(frame);
        out
    }

    fn linear_module_ops(
        &mut self,
        name: Name,
        x: Val,
        (out_features, bias): (u64, bool),
        proj: Option<Proj>,
        module: bool,
    ) -> Val {
        let in_features = x.width;
        let qlora = matches!(self.plan.method, Method::Qlora(_))
            && module
            && self.model.family.bnb_swaps(proj);
        let weight = if qlora {
            self.nf4_weight(name.then("weight"), (out_features, in_features))
        } else {
            self.base_param(
                name.then("weight"),
                (out_features, in_features),
                ParamRole::Linear,
            )
        };
        let mut params: SmallVec<[ParamId; 3]> = smallvec![weight];
        if bias {
            params.push(self.base_param(name.then("bias"), (1, out_features), ParamRole::Bias));
        }
        let trainable = self.trains(ParamRole::Linear) && !qlora;
        // A trainable bias needs only the output's gradient (a sum), not the input (BitFit).
        let bias_trainable = bias && self.trains(ParamRole::Bias);
        // bitsandbytes computes in its `bnb_4bit_compute_dtype`: bf16, or fp16 in the recipe
        // for GPUs without bf16 (mixed-fp16 plans).
        let compute = if qlora { self.half } else { self.compute() };

        // IA3 on a feed-forward input: `(x.to(fp32) * l)` saves the fp32 input for l's gradient.
        let mut x = x;
        let ia3 = self.ia3_on(proj);
        if ia3 == Some(Ia3Site::Input) {
            let l = self.adapter_param(name.then("ia3_l"), (1, in_features));
            let x32 = self.cast(name.then("ia3_cast"), x, self.adapter);
            let scaled = self.val(in_features, x.tokens, self.adapter, true);
            let op = self.elementwise(name.then("ia3"), &[x32], scaled, smallvec![x32.id], 1.0);
            self.ia3_scaling(op, l, scaled);
            x = self.cast(name.then("ia3_back"), scaled, x.dtype);
        }

        let xin = if self.autocast || qlora {
            self.autocast(name.then("cast"), x, self.half)
        } else {
            x
        };
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if trainable {
            saves.push(xin.id);
        }
        let out_grad = x.grad || trainable || bias_trainable;
        let weight_cast = self.autocast && self.base == DType::F32 && !qlora;
        // autocast's half-precision copy of the weight (and bias): cached when they train, cast
        // per use when frozen; autograd keeps it when the input needs a gradient.
        let elems = in_features * out_features + if bias { out_features } else { 0 };
        let cast = if weight_cast {
            self.autocast_weight(elems, trainable, x.grad)
        } else {
            WeightCast::default()
        };
        let mut forward_transient = cast.transient;
        if qlora {
            // bitsandbytes dequantizes the whole weight to the compute dtype for the matmul.
            forward_transient += self.half.bytes(in_features * out_features);
        }
        // bitsandbytes' Linear4bit computes in its compute dtype and casts the result back to its
        // input's dtype.
        let out_dtype = if qlora { x.dtype } else { compute };
        let out = self.val(out_features, x.tokens, out_dtype, out_grad);
        let flops = 2.0 * x.tokens as f64 * in_features as f64 * out_features as f64;
        // The matmul reads its weight in the compute dtype. QLoRA dequantizes the NF4 weight to
        // it before each use, forward and backward: a kernel of its own that reads 4 bits and
        // writes 16 per weight.
        let weight_bytes = compute.bytes(in_features * out_features);
        let dequant = if qlora {
            DType::Nf4.bytes(in_features * out_features)
                + self.half.bytes(in_features * out_features)
        } else {
            Bytes::ZERO
        };
        self.emit(OpSpec {
            name,
            kind: OpKind::Matmul,
            params,
            saves: if out_grad { saves } else { SmallVec::new() }
                .into_iter()
                .chain(cast.copy)
                .collect(),
            out: out.bytes(),
            forward_transient: forward_transient + out.bytes(),
            backward_transient: out.bytes() + xin.bytes() + forward_transient,
            cost: Cost {
                forward_flops: Flops(flops),
                input_grad_flops: Flops(if x.grad { flops } else { 0.0 }),
                weight_grad_flops: Flops(if trainable { flops } else { 0.0 }),
                forward_bytes: xin.bytes() + out.bytes() + weight_bytes,
                backward_bytes: (xin.bytes() + out.bytes()) * 2 + weight_bytes * 2,
                // Forward: the matmul, and autocast's cast of an fp32 weight. Backward: the
                // input's gradient, the weight's (and, under autocast, its cast back to the
                // fp32 parameter's dtype), the bias sum (each parameter's AccumulateGrad is
                // charged per parameter by the time model). A frozen bf16 weight costs one
                // matmul each way: what PyTorch dispatches for it. QLoRA's `matmul_4bit` is a
                // Python `autograd.Function` (`MatMul4Bit`) that dequantizes the weight in
                // each pass: with double quantization the 8-bit absmax first
                // (`dequantize_blockwise`), its offset added, then the NF4 weight: three
                // dispatches more each way (4.5 more launches per 4-bit linear use profiled on
                // Llama-2-7B, `validation/profile-h200.jsonl`), and two layers of Python in both
                // passes, each about a module call: the Function's own, and
                // `F.dequantize_4bit`'s (the quant state's checks, the nested
                // `dequantize_blockwise` of the absmax, the custom op's Python wrapper).
                forward_kernels: 1 + u32::from(weight_cast) + 3 * u32::from(qlora),
                backward_kernels: u32::from(x.grad)
                    + u32::from(trainable) * (1 + u32::from(weight_cast))
                    + u32::from(bias_trainable)
                    + 3 * u32::from(qlora),
                min_dim: x.tokens.min(in_features).min(out_features),
                modules: 1 + 2 * u32::from(qlora),
                backward_modules: 2 * u32::from(qlora),
                misaligned: !in_features.is_multiple_of(8) || !out_features.is_multiple_of(8),
                side: SideKernels {
                    forward_dequant: dequant,
                    backward_dequant: if x.grad { dequant } else { Bytes::ZERO },
                    backward_bias_sum: if bias_trainable {
                        out.bytes()
                    } else {
                        Bytes::ZERO
                    },
                    ..cast.side
                },
                ..Cost::default()
            },
            compute,
            in_backward: out_grad,
        });
        let mut out = out;

        // LoRA (Hu et al. 2021) as peft runs it: the input is cast to the adapter's dtype, then
        // (under autocast) back to bf16 for `lora_A`, which saves that copy; `lora_B` saves A's
        // output; the scaled update is added to the base output.
        if let Some(rank) = self.lora_on(proj)
            && proj == Some(Proj::DtProj)
            && !qlora
        {
            // Mamba reads `self.dt_proj.weight` (`dt_proj.weight @ time_step`), never calling
            // the wrapped module: peft's factors exist and count as trainable, but take no
            // part. (Under bitsandbytes the mixer calls the module, `dt_proj(time_step) -
            // dt_proj.bias`, and the factors work as on any linear.)
            for (part, shape) in [
                ("lora_A", (rank, in_features)),
                ("lora_B", (out_features, rank)),
            ] {
                let p = self.adapter_param(name.then(part), shape);
                if let Some(p) = self.graph.params.get_mut(p.0 as usize) {
                    p.idle = true;
                }
            }
        } else if let Some(rank) = self.lora_on(proj) {
            let a = self.adapter_param(name.then("lora_A"), (rank, in_features));
            let b = self.adapter_param(name.then("lora_B"), (out_features, rank));
            // peft's `Linear.forward` rebinds its argument to the cast copy (`x =
            // self._cast_input_dtype(x, lora_A.weight.dtype)`), which stays bound until the
            // forward returns (the caller still holds the layer's input: `linear_module`).
            let xa = self.cast(name.then("lora_cast"), x, self.adapter);
            let frame = self.name(&[xa.id]);
            let xa = if self.autocast {
                self.autocast(name.then("lora_autocast"), xa, self.half)
            } else {
                xa
            };
            let mid = self.lora_matmul(name.then("lora_A"), xa, rank, a, x.grad);
            let up = self.lora_matmul(name.then("lora_B"), mid, out_features, b, true);
            let scaled = self.val(out_features, x.tokens, up.dtype, true);
            self.elementwise(name.then("lora_scale"), &[up], scaled, SmallVec::new(), 1.0);
            if self.plan.method.lora().is_some_and(|l| l.dora) {
                out = self.dora(name, out, scaled, (in_features, out_features), rank);
            } else {
                out = self.residual(name.then("lora_add"), out, scaled);
            }
            self.unname(frame);
        }
        // IA3 on an output (keys, values): `(result * l)` saves the result for l's gradient.
        if ia3 == Some(Ia3Site::Output) {
            let l = self.adapter_param(name.then("ia3_l"), (1, out_features));
            let scaled = self.val(out_features, x.tokens, wider(out.dtype, self.adapter), true);
            let op = self.elementwise(name.then("ia3"), &[out], scaled, smallvec![out.id], 1.0);
            self.ia3_scaling(op, l, scaled);
            out = self.cast(name.then("ia3_back"), scaled, out.dtype);
        }
        out
    }

    /// IA3's `x * l`: the op reads the scaling vector `l`, and its backward (`MulBackward0`)
    /// computes l's gradient as `grad * x` at the product's full shape; autograd's engine sums it
    /// down to l's shape only after the node returns (`validate_outputs` in
    /// torch/csrc/autograd/engine.cpp calls `at::sum_to`), so that full-size product exists
    /// beside the incoming gradient and x's.
    fn ia3_scaling(&mut self, op: usize, l: ParamId, scaled: Val) {
        if let Some(o) = self.graph.op_mut(op) {
            o.params.push(l);
            if o.in_backward {
                o.backward_transient += scaled.bytes();
            }
        }
    }

    /// DoRA (Liu et al. 2024) as peft's `DoraLinearLayer` runs it: each forward composes the
    /// full weight `W + s * B @ A` in the adapters' dtype and takes its row norms (detached, so
    /// neither is kept), then `(m / ||W'|| - 1) * base + (m / ||W'||) * lora` with the trainable
    /// magnitude `m` (one per output), which keeps both results for m's gradient.
    fn dora(&mut self, name: Name, base: Val, lora: Val, shape: (u64, u64), rank: u64) -> Val {
        let (in_features, out_features) = shape;
        let magnitude = self.adapter_param(name.then("lora_magnitude"), (1, out_features));
        let weight = self.adapter.bytes(in_features * out_features);
        let norm = self.val(out_features, 1, self.adapter, false);
        let op = self.elementwise(name.then("dora_norm"), &[], norm, SmallVec::new(), 0.0);
        if let Some(o) = self.graph.op_mut(op) {
            // B @ A and W + s * (B @ A), both weight-sized, while the norm runs.
            o.forward_transient += weight * 2;
            o.cost.forward_flops = Flops(
                2.0 * (rank * in_features * out_features) as f64
                    + 3.0 * (in_features * out_features) as f64,
            );
            o.cost.forward_bytes = weight * 3;
            o.cost.forward_kernels = 4;
        }
        let out = self.val(
            out_features,
            base.tokens,
            wider(base.dtype, lora.dtype),
            true,
        );
        let op = self.elementwise(
            name.then("dora_scale"),
            &[base, lora],
            out,
            smallvec![base.id, lora.id],
            3.0,
        );
        if let Some(o) = self.graph.op_mut(op) {
            o.params.push(magnitude);
        }
        out
    }

    /// A small trainable matmul (LoRA A or B, adapter down/up): saves its input for the weight
    /// gradient; under autocast also the bf16 copy of its fp32 weight when the input needs grad.
    pub(super) fn lora_matmul(
        &mut self,
        name: Name,
        x: Val,
        out_features: u64,
        weight: ParamId,
        input_grad: bool,
    ) -> Val {
        let compute = if self.autocast {
            self.half
        } else {
            self.adapter
        };
        let mut saves = smallvec![x.id];
        // A trainable leaf: autocast caches its copy (held to the region's end either way).
        let cast = if self.autocast {
            self.autocast_weight(x.width * out_features, true, input_grad)
        } else {
            WeightCast::default()
        };
        saves.extend(cast.copy);
        let out = self.val(out_features, x.tokens, compute, true);
        let flops = 2.0 * x.tokens as f64 * x.width as f64 * out_features as f64;
        self.emit(OpSpec {
            name,
            kind: OpKind::Matmul,
            params: smallvec![weight],
            saves,
            out: out.bytes(),
            forward_transient: out.bytes(),
            backward_transient: out.bytes() + x.bytes(),
            cost: Cost {
                forward_flops: Flops(flops),
                input_grad_flops: Flops(if input_grad { flops } else { 0.0 }),
                weight_grad_flops: Flops(flops),
                forward_bytes: x.bytes() + out.bytes(),
                backward_bytes: (x.bytes() + out.bytes()) * 2,
                forward_kernels: 2,
                backward_kernels: 2 + u32::from(input_grad),
                min_dim: x.tokens.min(x.width).min(out_features),
                modules: 1,
                misaligned: false,
                side: cast.side,
                ..Cost::default()
            },
            compute,
            in_backward: true,
        });
        out
    }

    /// A bottleneck adapter (down, ReLU, up, residual) on `x`, in the adapter's fp32 weights
    /// under autocast (measure.py's `Bottleneck`, Houlsby et al. 2019).
    pub fn bottleneck(&mut self, name: Name, x: Val, size: u64) -> Val {
        let h = x.width;
        let down = self.adapter_param(name.then("down_weight"), (size, h));
        let down_b = self.adapter_param(name.then("down_bias"), (1, size));
        let up = self.adapter_param(name.then("up_weight"), (h, size));
        let up_b = self.adapter_param(name.then("up_bias"), (1, h));
        let xin = if self.autocast {
            self.autocast(name.then("cast"), x, self.half)
        } else {
            x
        };
        let mid = self.lora_matmul(name.then("down"), xin, size, down, x.grad);
        if let Some(o) = self.graph.op_mut(self.graph.len() - 1) {
            o.params.push(down_b);
            o.cost.side.backward_bias_sum = mid.bytes();
        }
        let act = self.val(size, x.tokens, mid.dtype, true);
        self.elementwise(name.then("relu"), &[mid], act, smallvec![act.id], 1.0);
        let upv = self.lora_matmul(name.then("up"), act, h, up, true);
        if let Some(o) = self.graph.op_mut(self.graph.len() - 1) {
            o.params.push(up_b);
            o.cost.side.backward_bias_sum = upv.bytes();
        }
        self.residual(name.then("residual"), x, upv)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ia3Site {
    /// Scales the layer's input (peft's feed-forward modules).
    Input,
    /// Scales the layer's output.
    Output,
}
