//! Builds the op graph of one training step from a model, a method and a plan.
//!
//! Each helper mirrors what PyTorch's autograd saves for the framework code it stands for:
//! autograd's generated code saves an operand only when the gradient that needs it will be
//! computed (e.g. `mm` keeps its input only if the weight requires grad), autocast casts inputs of
//! `linear`/`matmul`/SDPA to bf16 and runs `layer_norm`, `pow`, `softmax` and `log_softmax` in
//! fp32, and its cast cache keeps one bf16 copy per fp32 weight. Those rules, applied op by op,
//! are the whole activation model: there is no per-model multiplier.

use crate::graph::op::{
    Cost, Name, Op, OpGraph, OpKind, Param, ParamId, ParamRole, Scope, Tensor, TensorId, TensorKind,
};
use crate::spec::model::{Activation, Family, ModelSpec, Norm, Stack};
use crate::spec::plan::{AttentionKernel, LoraTargets, Method, Plan, Precision, Proj};
use crate::units::{Bytes, DType, Flops};
use smallvec::{SmallVec, smallvec};

/// A value flowing through the forward pass.
#[derive(Debug, Clone, Copy)]
pub struct Val {
    pub id: TensorId,
    pub dtype: DType,
    /// Elements per token.
    pub width: u64,
    /// Tokens (batch x sequence) it spans.
    pub tokens: u64,
    /// Whether it requires grad.
    pub grad: bool,
}

impl Val {
    fn elements(&self) -> u64 {
        self.width.saturating_mul(self.tokens)
    }

    fn bytes(&self) -> Bytes {
        self.dtype.bytes(self.elements())
    }
}

/// Builder state: the graph so far plus the dtype regime of the plan.
pub struct Builder<'a> {
    pub graph: OpGraph,
    pub model: &'a ModelSpec,
    pub plan: &'a Plan,
    autocast: bool,
    /// Storage dtype of the base model's dense weights.
    base: DType,
    /// Storage dtype of trainable PEFT parameters (peft upcasts them to fp32).
    adapter: DType,
    base_trainable: bool,
    segment: Option<u32>,
    next_segment: u32,
    /// Copies the ops and parameters being built stand for.
    repeat: u32,
}

/// Pieces of a matmul-like op that the callers fill.
struct OpSpec {
    name: Name,
    kind: OpKind,
    params: SmallVec<[ParamId; 3]>,
    saves: SmallVec<[TensorId; 6]>,
    forward_transient: Bytes,
    backward_transient: Bytes,
    cost: Cost,
    compute: DType,
    in_backward: bool,
}

impl<'a> Builder<'a> {
    pub fn new(model: &'a ModelSpec, plan: &'a Plan) -> Builder<'a> {
        let base = match (&plan.method, plan.precision) {
            // peft's `prepare_model_for_kbit_training` upcasts every parameter that was not
            // quantized (embeddings, norms, LM head, biases) to fp32.
            (Method::Qlora(_), _) => DType::F32,
            (_, Precision::MixedBf16 | Precision::Fp32) => DType::F32,
            (_, Precision::Bf16) => DType::Bf16,
        };
        Builder {
            graph: OpGraph::default(),
            model,
            plan,
            autocast: plan.autocast(),
            base,
            adapter: DType::F32,
            base_trainable: !plan.method.frozen_base(),
            segment: None,
            next_segment: 0,
            repeat: 1,
        }
    }

    /// The dtype matmuls produce.
    fn compute(&self) -> DType {
        if self.autocast {
            DType::Bf16
        } else {
            self.base
        }
    }

    fn tensor(&mut self, kind: TensorKind, bytes: Bytes) -> TensorId {
        self.graph.add_tensor(Tensor {
            bytes,
            kind,
            checkpoint_input: false,
            cache_only: false,
        })
    }

    /// Host-side cost with no device work (a module call, a dispatch that returns its input),
    /// charged to the op before it.
    fn host_only(&mut self, modules: u32, dispatches: u32) {
        let last = self.graph.len().checked_sub(1);
        if let Some(op) = last.and_then(|i| self.graph.op_mut(i)) {
            op.cost.modules += modules;
            op.cost.forward_kernels += dispatches;
        }
    }

    /// Ops and parameters built from now on stand for `copies` identical blocks.
    pub fn set_repeat(&mut self, copies: u32) {
        self.repeat = copies.max(1);
    }

    /// Interns a child scope (`decoder` -> `decoder.layers.3`).
    pub fn scope(&mut self, parent: Scope, child: &str) -> Scope {
        self.graph.scope(parent, child)
    }

    /// A bf16 weight copy from autocast's cache; `cache_only` when autograd does not keep it.
    fn weight_copy(&mut self, bytes: Bytes, cache_only: bool) -> TensorId {
        self.graph.add_tensor(Tensor {
            bytes,
            kind: TensorKind::WeightCopy,
            checkpoint_input: false,
            cache_only,
        })
    }

    /// A fresh value of `width` elements per token.
    pub fn val(&mut self, width: u64, tokens: u64, dtype: DType, grad: bool) -> Val {
        let id = self.tensor(
            TensorKind::Activation,
            dtype.bytes(width.saturating_mul(tokens)),
        );
        Val {
            id,
            dtype,
            width,
            tokens,
            grad,
        }
    }

    fn param(
        &mut self,
        name: Name,
        shape: (u64, u64),
        dtype: DType,
        trainable: bool,
        role: ParamRole,
    ) -> ParamId {
        self.graph.add_param(Param {
            name,
            elements: shape.0.saturating_mul(shape.1),
            dtype,
            trainable,
            role,
            extra: Bytes::ZERO,
            shape,
            copies: u64::from(self.repeat),
        })
    }

    /// A frozen-or-trainable base parameter in the plan's base dtype.
    pub fn base_param(&mut self, name: Name, shape: (u64, u64), role: ParamRole) -> ParamId {
        let (base, trainable) = (self.base, self.base_trainable);
        self.param(name, shape, base, trainable, role)
    }

    /// A trainable PEFT parameter.
    pub fn adapter_param(&mut self, name: Name, shape: (u64, u64)) -> ParamId {
        let dtype = self.adapter;
        self.param(name, shape, dtype, true, ParamRole::Adapter)
    }

    fn emit(&mut self, spec: OpSpec) -> usize {
        self.graph.push(Op {
            name: spec.name,
            kind: spec.kind,
            segment: self.segment,
            repeat: self.repeat,
            params: spec.params,
            saves: spec.saves,
            forward_transient: spec.forward_transient,
            backward_transient: spec.backward_transient,
            in_backward: spec.in_backward,
            cost: spec.cost,
            compute: spec.compute,
        })
    }

    /// An element-wise op over `inputs` producing `out`, saving `saves`.
    fn elementwise(
        &mut self,
        name: Name,
        inputs: &[Val],
        out: Val,
        saves: SmallVec<[TensorId; 6]>,
        flops_per_elem: f64,
    ) -> usize {
        let read: Bytes = inputs.iter().map(Val::bytes).sum();
        let in_backward = out.grad;
        let saves = if in_backward { saves } else { SmallVec::new() };
        self.emit(OpSpec {
            name,
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves,
            forward_transient: out.bytes(),
            backward_transient: out.bytes() + read,
            cost: Cost {
                forward_flops: Flops(flops_per_elem * out.elements() as f64),
                input_grad_flops: Flops(2.0 * flops_per_elem * out.elements() as f64),
                forward_bytes: read + out.bytes(),
                backward_bytes: (read + out.bytes()) * 2,
                forward_kernels: 1,
                backward_kernels: 1,
                ..Cost::default()
            },
            compute: out.dtype,
            in_backward,
        })
    }

    /// `x.to(dtype)`: the same tensor when the dtype already matches, else a copy (saves nothing).
    pub fn cast(&mut self, name: Name, x: Val, dtype: DType) -> Val {
        if x.dtype == dtype {
            return x;
        }
        let out = self.val(x.width, x.tokens, dtype, x.grad);
        self.elementwise(name, &[x], out, SmallVec::new(), 0.0);
        out
    }

    /// `a + b` (residual adds): saves nothing; the result takes the wider dtype.
    pub fn add(&mut self, name: Name, a: Val, b: Val) -> Val {
        let dtype = wider(a.dtype, b.dtype);
        let out = self.val(a.width, a.tokens, dtype, a.grad || b.grad);
        self.elementwise(name, &[a, b], out, SmallVec::new(), 1.0);
        out
    }

    /// `torch.cat` along the sequence: saves nothing (its backward only slices).
    pub fn concat(&mut self, name: Name, a: Val, b: Val) -> Val {
        let out = Val {
            id: self.tensor(
                TensorKind::Activation,
                a.dtype.bytes(a.width.saturating_mul(a.tokens + b.tokens)),
            ),
            tokens: a.tokens + b.tokens,
            grad: a.grad || b.grad,
            ..a
        };
        self.elementwise(name, &[a, b], out, SmallVec::new(), 0.0);
        out
    }

    /// `nn.Dropout(p)` in training: with p > 0 CUDA's fused dropout keeps a bool mask of the
    /// input's size; with p = 0 `F.dropout` returns its input unchanged.
    pub fn dropout(&mut self, name: Name, x: Val, p: f64) -> Val {
        // GPT-2, T5 and Phi call `nn.Dropout` modules, BART, OPT and Falcon call
        // `F.dropout`; the Llama family has no dropout calls outside attention.
        let (modules, dispatch) = match self.model.family {
            Family::Gpt2 | Family::T5 | Family::Phi => (1, 1),
            Family::Bart | Family::Opt | Family::Falcon => (0, 1),
            Family::Llama | Family::Mistral | Family::Qwen2 | Family::Gemma => (0, 0),
        };
        if p <= 0.0 {
            // A call with p = 0 still costs its host time and returns its input.
            let _ = name;
            self.host_only(modules, dispatch);
            return x;
        }
        let mask = self.tensor(TensorKind::Activation, DType::U8.bytes(x.elements()));
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        self.elementwise(name, &[x], out, smallvec![mask], 2.0);
        out
    }

    /// Marks the start of a checkpointed block (HF's `gradient_checkpointing_enable`, one
    /// `torch.utils.checkpoint` per block): the block input is kept, its interior is recomputed.
    pub fn begin_block(&mut self, input: Val) {
        if !self.plan.grad_ckpt {
            return;
        }
        let segment = self.next_segment;
        self.segment = Some(segment);
        self.next_segment += 1;
        // The checkpoint keeps the block's input itself (whoever else saves it).
        self.graph.tensors[input.id.0 as usize].checkpoint_input = true;
        self.graph.begin_segment(segment);
        // A zero-cost marker op that keeps the block input.
        self.emit(OpSpec {
            name: Name::root("checkpoint_input"),
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves: smallvec![input.id],
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost::default(),
            compute: input.dtype,
            in_backward: input.grad,
        });
    }

    pub fn end_block(&mut self) {
        self.segment = None;
    }

    /// Whether LoRA wraps this projection.
    fn lora_on(&self, proj: Option<Proj>) -> Option<u64> {
        let lora = self.plan.method.lora()?;
        let proj = proj?;
        // A fused q/k/v projection (GPT-2 `c_attn`, Falcon `query_key_value`) is one module:
        // naming any of q, k or v wraps all of it, as peft's target names do.
        let fused = self.model.fused_qkv && proj == Proj::Q;
        let hit = match &lora.targets {
            LoraTargets::AllLinear => true,
            LoraTargets::QueryValue => matches!(proj, Proj::Q | Proj::V),
            LoraTargets::Named(list) => {
                list.contains(&proj)
                    || (fused
                        && list
                            .iter()
                            .any(|p| matches!(p, Proj::Q | Proj::K | Proj::V)))
            }
        };
        hit.then_some(lora.rank)
    }

    fn ia3_on(&self, proj: Option<Proj>) -> Option<Ia3Site> {
        if self.plan.method != Method::Ia3 {
            return None;
        }
        // peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: keys, values and the FFN's
        // output projection (feed-forward: the scaling multiplies the input).
        match proj? {
            Proj::Q if self.model.fused_qkv => Some(Ia3Site::Output),
            Proj::K | Proj::V => Some(Ia3Site::Output),
            Proj::Down => Some(Ia3Site::Input),
            _ => None,
        }
    }

    /// A linear layer of the base model (`nn.Linear`, `Conv1D` or bitsandbytes `Linear4bit`),
    /// with whatever the method wraps around it.
    pub fn linear(
        &mut self,
        name: Name,
        x: Val,
        out_features: u64,
        bias: bool,
        proj: Option<Proj>,
    ) -> Val {
        let in_features = x.width;
        let qlora = matches!(self.plan.method, Method::Qlora(_)) && proj.is_some();
        let weight = if qlora {
            // NF4 with double quantization: 4 bits per weight, one 8-bit absmax per 64 weights
            // plus one fp32 second-level constant per 256 blocks (Dettmers et al. 2023, sec. 3).
            let elements = in_features.saturating_mul(out_features);
            let blocks = elements.div_ceil(64);
            self.graph.add_param(Param {
                name: name.then("weight"),
                elements,
                dtype: DType::Nf4,
                trainable: false,
                role: ParamRole::Linear,
                extra: Bytes(blocks + 4 * blocks.div_ceil(256)),
                shape: (out_features, in_features),
                copies: u64::from(self.repeat),
            })
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
        let trainable = self.base_trainable && !qlora;
        let compute = if qlora { DType::Bf16 } else { self.compute() };

        // IA3 on a feed-forward input: `(x.to(fp32) * l)` saves the fp32 input for l's gradient.
        let mut x = x;
        let ia3 = self.ia3_on(proj);
        if ia3 == Some(Ia3Site::Input) {
            let l = self.adapter_param(name.then("ia3_l"), (1, in_features));
            let x32 = self.cast(name.then("ia3_cast"), x, self.adapter);
            let scaled = self.val(in_features, x.tokens, self.adapter, true);
            let op = self.elementwise(name.then("ia3"), &[x32], scaled, smallvec![x32.id], 1.0);
            if let Some(o) = self.graph.op_mut(op) {
                o.params.push(l);
            }
            x = self.cast(name.then("ia3_back"), scaled, x.dtype);
        }

        let xin = if self.autocast || qlora {
            self.cast(name.then("cast"), x, DType::Bf16)
        } else {
            x
        };
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if trainable {
            saves.push(xin.id);
        }
        let mut forward_transient = Bytes::ZERO;
        let out_grad = x.grad || trainable;
        let mut cached = None;
        if self.autocast && self.base == DType::F32 && !qlora {
            // autocast's cast cache: one bf16 copy of the weight (and bias), made whether or not
            // autograd keeps it; autograd keeps it when the input needs a gradient.
            let elems = in_features * out_features + if bias { out_features } else { 0 };
            let copy = self.weight_copy(DType::Bf16.bytes(elems), !x.grad);
            if x.grad {
                saves.push(copy);
            } else {
                cached = Some(copy);
            }
        }
        if qlora {
            // bitsandbytes dequantizes the whole weight to bf16 for the matmul.
            forward_transient += DType::Bf16.bytes(in_features * out_features);
        }
        // bitsandbytes' Linear4bit computes in bf16 and casts the result back to its input's dtype.
        let out_dtype = if qlora { x.dtype } else { compute };
        let out = self.val(out_features, x.tokens, out_dtype, out_grad);
        let flops = 2.0 * x.tokens as f64 * in_features as f64 * out_features as f64;
        // QLoRA dequantizes the NF4 weight to bf16 before each use, forward and backward: one
        // more kernel that reads 4 bits and writes 16 per weight, which the matmul then reads.
        let weight_bytes = if qlora {
            DType::Nf4.bytes(in_features * out_features)
                + DType::Bf16.bytes(in_features * out_features) * 2
        } else {
            compute.bytes(in_features * out_features)
        };
        self.emit(OpSpec {
            name,
            kind: OpKind::Matmul,
            params,
            saves: if out_grad { saves } else { SmallVec::new() }
                .into_iter()
                .chain(cached)
                .collect(),
            forward_transient: forward_transient + out.bytes(),
            backward_transient: out.bytes() + xin.bytes() + forward_transient,
            cost: Cost {
                forward_flops: Flops(flops),
                input_grad_flops: Flops(if x.grad { flops } else { 0.0 }),
                weight_grad_flops: Flops(if trainable { flops } else { 0.0 }),
                forward_bytes: xin.bytes() + out.bytes() + weight_bytes,
                backward_bytes: (xin.bytes() + out.bytes()) * 2 + weight_bytes * 2,
                // view + mm; backward: input grad, weight grad, bias sum (each parameter's
                // AccumulateGrad is charged per parameter by the time model).
                forward_kernels: 2 + u32::from(qlora),
                backward_kernels: 1
                    + u32::from(x.grad)
                    + u32::from(trainable)
                    + u32::from(trainable && bias)
                    + u32::from(qlora),
                min_dim: x.tokens.min(in_features).min(out_features),
                modules: 1,
                misaligned: !in_features.is_multiple_of(8) || !out_features.is_multiple_of(8),
            },
            compute,
            in_backward: out_grad,
        });
        let mut out = out;

        // LoRA (Hu et al. 2021) as peft runs it: the input is cast to the adapter's dtype, then
        // (under autocast) back to bf16 for `lora_A`, which saves that copy; `lora_B` saves A's
        // output; the scaled update is added to the base output.
        if let Some(rank) = self.lora_on(proj) {
            let a = self.adapter_param(name.then("lora_A"), (rank, in_features));
            let b = self.adapter_param(name.then("lora_B"), (out_features, rank));
            let xa = self.cast(name.then("lora_cast"), x, self.adapter);
            let xa = if self.autocast {
                self.cast(name.then("lora_autocast"), xa, DType::Bf16)
            } else {
                xa
            };
            let mid = self.lora_matmul(name.then("lora_A"), xa, rank, a, x.grad);
            let up = self.lora_matmul(name.then("lora_B"), mid, out_features, b, true);
            let scaled = self.val(out_features, x.tokens, up.dtype, true);
            self.elementwise(name.then("lora_scale"), &[up], scaled, SmallVec::new(), 1.0);
            out = self.add(name.then("lora_add"), out, scaled);
        }
        // IA3 on an output (keys, values): `(result * l)` saves the result for l's gradient.
        if ia3 == Some(Ia3Site::Output) {
            let l = self.adapter_param(name.then("ia3_l"), (1, out_features));
            let scaled = self.val(out_features, x.tokens, wider(out.dtype, self.adapter), true);
            let op = self.elementwise(name.then("ia3"), &[out], scaled, smallvec![out.id], 1.0);
            if let Some(o) = self.graph.op_mut(op) {
                o.params.push(l);
            }
            out = self.cast(name.then("ia3_back"), scaled, out.dtype);
        }
        out
    }

    /// A small trainable matmul (LoRA A or B, adapter down/up): saves its input for the weight
    /// gradient; under autocast also the bf16 copy of its fp32 weight when the input needs grad.
    fn lora_matmul(
        &mut self,
        name: Name,
        x: Val,
        out_features: u64,
        weight: ParamId,
        input_grad: bool,
    ) -> Val {
        let compute = if self.autocast {
            DType::Bf16
        } else {
            self.adapter
        };
        let mut saves = smallvec![x.id];
        if self.autocast && input_grad {
            let elems = x.width * out_features;
            saves.push(self.tensor(TensorKind::WeightCopy, DType::Bf16.bytes(elems)));
        }
        let out = self.val(out_features, x.tokens, compute, true);
        let flops = 2.0 * x.tokens as f64 * x.width as f64 * out_features as f64;
        self.emit(OpSpec {
            name,
            kind: OpKind::Matmul,
            params: smallvec![weight],
            saves,
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
            self.cast(name.then("cast"), x, DType::Bf16)
        } else {
            x
        };
        let mid = self.lora_matmul(name.then("down"), xin, size, down, x.grad);
        if let Some(o) = self.graph.op_mut(self.graph.len() - 1) {
            o.params.push(down_b);
        }
        let act = self.val(size, x.tokens, mid.dtype, true);
        self.elementwise(name.then("relu"), &[mid], act, smallvec![act.id], 1.0);
        let upv = self.lora_matmul(name.then("up"), act, h, up, true);
        if let Some(o) = self.graph.op_mut(self.graph.len() - 1) {
            o.params.push(up_b);
        }
        self.add(name.then("residual"), x, upv)
    }

    /// A normalisation layer, saving what its implementation's autograd graph keeps.
    pub fn norm(&mut self, name: Name, x: Val) -> Val {
        let h = x.width;
        let kind = self.model.norm;
        // nn.LayerNorm carries a bias whatever the linears do (Falcon: bias=False, LN biased).
        let has_bias = kind == Norm::LayerNorm;
        let w = self.base_param(name.then("weight"), (1, h), ParamRole::Norm);
        let mut params: SmallVec<[ParamId; 3]> = smallvec![w];
        if has_bias {
            params.push(self.base_param(name.then("bias"), (1, h), ParamRole::Norm));
        }
        let trainable = self.base_trainable;
        let tokens = x.tokens;
        let stats = |b: &mut Self| b.tensor(TensorKind::Activation, DType::F32.bytes(tokens * 2));
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        let out = match kind {
            Norm::LayerNorm => {
                // native_layer_norm saves its input, mean and rstd; autocast runs it in fp32.
                let input = if self.autocast {
                    self.cast(name.then("cast"), x, DType::F32)
                } else {
                    x
                };
                saves.push(input.id);
                saves.push(stats(self));
                self.val(h, tokens, input.dtype, x.grad || trainable)
            }
            Norm::RmsNorm | Norm::GemmaRmsNorm | Norm::T5RmsNorm => {
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
                let pre = if kind == Norm::GemmaRmsNorm {
                    normed32
                } else {
                    self.val(h, tokens, out_dtype, x.grad)
                };
                if trainable {
                    // weight * normed keeps `normed` for the weight gradient.
                    saves.push(pre.id);
                }
                let out_dtype = if kind == Norm::GemmaRmsNorm {
                    x.dtype
                } else {
                    wider(out_dtype, self.base)
                };
                self.val(h, tokens, out_dtype, x.grad || trainable)
            }
        };
        self.emit(OpSpec {
            name,
            kind: OpKind::Norm,
            params,
            saves: if out.grad { saves } else { SmallVec::new() },
            forward_transient: out.bytes() + x.dtype.bytes(x.elements()),
            backward_transient: out.bytes() + x.bytes() + DType::F32.bytes(x.elements()),
            cost: Cost {
                forward_flops: Flops(5.0 * x.elements() as f64),
                input_grad_flops: Flops(8.0 * x.elements() as f64),
                // The fused layer_norm kernel reads its input and writes its output; the
                // RMSNorm variants run each of their ops as a kernel over fp32 copies (upcast,
                // square, mean, multiply, downcast, weight multiply: ~9 fp32-sized passes).
                forward_bytes: if kind == Norm::LayerNorm {
                    x.bytes() + out.bytes()
                } else {
                    x.bytes() + out.bytes() + DType::F32.bytes(x.elements()) * 7
                },
                backward_bytes: if kind == Norm::LayerNorm {
                    (x.bytes() + out.bytes()) * 2
                } else {
                    (x.bytes() + out.bytes()) * 2 + DType::F32.bytes(x.elements()) * 12
                },
                // LlamaRMSNorm is eight Python-level ops (to, pow, mean, add, rsqrt, mul, to,
                // mul); layer_norm is one fused kernel.
                forward_kernels: if kind == Norm::LayerNorm { 1 } else { 8 },
                backward_kernels: if kind == Norm::LayerNorm { 1 } else { 12 },
                modules: 1,
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
                // One kernel; backward needs the input.
                let out = self.val(width, tokens, x.dtype, x.grad);
                self.elementwise(name, &[x], out, smallvec![x.id], 8.0);
                out
            }
            Activation::Relu => {
                // threshold_backward uses the output.
                let out = self.val(width, tokens, x.dtype, x.grad);
                self.elementwise(name, &[x], out, smallvec![out.id], 1.0);
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
                let out = self.val(width, tokens, wider(wide, x.dtype), x.grad);
                self.elementwise(
                    name.then("mul"),
                    &[half, one_plus],
                    out,
                    smallvec![half.id, one_plus.id],
                    1.0,
                );
                out
            }
        }
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
        self.elementwise(name, &[a, b], out, saves, 1.0);
        out
    }

    /// Rotary embeddings: `q * cos + rotate_half(q) * sin` keeps only cos and sin (shared), and
    /// produces a new tensor in the wider of q's and cos's dtypes (cos follows the embeddings'
    /// dtype: fp32 when the weights are fp32).
    pub fn rotary(&mut self, name: Name, x: Val, cos_dtype: DType) -> Val {
        let out = self.val(x.width, x.tokens, wider(x.dtype, cos_dtype), x.grad);
        let op = self.elementwise(name, &[x], out, SmallVec::new(), 3.0);
        if let Some(o) = self.graph.op_mut(op) {
            // mul, two slices, neg, cat, mul, add: each a kernel, ~10 passes over the tensor
            // each way (transformers' `apply_rotary_pos_emb`).
            o.cost.forward_kernels = 7;
            o.cost.backward_kernels = 7;
            o.cost.forward_bytes = out.bytes() * 10;
            o.cost.backward_bytes = out.bytes() * 10;
        }
        out
    }

    /// Self- or cross-attention core between projected q, k, v.
    #[expect(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        name: Name,
        q: Val,
        k: Val,
        v: Val,
        stack: &Stack,
        batch: u64,
        (seq_q, seq_k): (u64, u64),
        mask: AttnMask,
    ) -> Val {
        let heads = stack.heads;
        let head_dim = stack.head_dim;
        let grad = q.grad || k.grad || v.grad;
        let p_drop = self.model.dropout.attention;
        let scores = batch
            .saturating_mul(heads)
            .saturating_mul(seq_q)
            .saturating_mul(seq_k);
        let out_width = heads * head_dim;
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        let mut fwd_extra = Bytes::ZERO;
        let kernel = match (self.plan.attention, mask) {
            (AttentionKernel::Eager, _) => Kernel::Eager,
            // A float bias that needs no gradient (T5's relative bias over a frozen base) does
            // not reach the fused kernels on CUDA; SDPA falls back to its math path, which
            // upcasts bf16 inputs to fp32 (observed on the H200 ground truth, see README).
            (AttentionKernel::Sdpa, AttnMask::FrozenBias | AttnMask::TrainableBias) => Kernel::Math,
            (AttentionKernel::Sdpa, _) => Kernel::Fused,
        };
        let compute = if self.autocast { DType::Bf16 } else { q.dtype };
        let out;
        match kernel {
            Kernel::Fused => {
                // flash / memory-efficient: q, k, v (as cast by autocast), the output (laid out
                // so that the caller's transpose().contiguous() is free), and fp32 logsumexp.
                // Dropout inside the kernel is regenerated from the RNG state: no mask.
                // transformers passes `enable_gqa` to SDPA only when there is no mask;
                // with one, `repeat_kv` materialises keys and values for every head.
                let group = heads / stack.kv_heads.max(1);
                let (k, v) = if mask == AttnMask::Explicit && group > 1 {
                    (
                        self.val(out_width, k.tokens, compute, k.grad),
                        self.val(out_width, v.tokens, compute, v.grad),
                    )
                } else {
                    (k, v)
                };
                let q = self.cast(name.then("q_cast"), q, compute);
                let k = self.cast(name.then("k_cast"), k, compute);
                let v = self.cast(name.then("v_cast"), v, compute);
                saves.extend([q.id, k.id, v.id]);
                saves.push(self.tensor(
                    TensorKind::Activation,
                    DType::F32.bytes(batch * heads * seq_q),
                ));
                if mask == AttnMask::Explicit {
                    // SDPA converts a boolean mask to an additive one per call and the
                    // memory-efficient kernel keeps it (convert_boolean_attn_mask).
                    saves.push(
                        self.tensor(TensorKind::Activation, compute.bytes(batch * seq_q * seq_k)),
                    );
                }
                out = self.val(out_width, q.tokens, compute, grad);
                saves.push(out.id);
            }
            Kernel::Math => {
                // _scaled_dot_product_attention_math: the scaled q and k copies and v are kept
                // by the two matmuls; `_safe_softmax` keeps softmax's output and returns a new
                // `where` result that the second matmul keeps: two probability matrices.
                let qs = self.val(q.width, q.tokens, compute, q.grad);
                let ks = self.val(k.width, k.tokens, compute, k.grad);
                let v = self.cast(name.then("v_cast"), v, compute);
                saves.extend([qs.id, ks.id, v.id]);
                saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                if p_drop > 0.0 {
                    saves.push(self.tensor(TensorKind::Activation, DType::U8.bytes(scores)));
                    saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                }
                fwd_extra += compute.bytes(scores) * 2;
                out = self.val(out_width, q.tokens, compute, grad);
            }
            Kernel::Eager => {
                // eager_attention_forward: matmul keeps q and k (GQA keys and values repeated
                // to every head), softmax(dtype=fp32) keeps its fp32 output, the bf16 copy of
                // it is kept by the matmul with v, and so is v.
                let group = heads / stack.kv_heads.max(1);
                let q = self.cast(name.then("q_cast"), q, compute);
                let k_rep = if group > 1 {
                    self.val(out_width, k.tokens, compute, k.grad)
                } else {
                    self.cast(name.then("k_cast"), k, compute)
                };
                let v_rep = if group > 1 {
                    self.val(out_width, v.tokens, compute, v.grad)
                } else {
                    self.cast(name.then("v_cast"), v, compute)
                };
                saves.extend([q.id, k_rep.id, v_rep.id]);
                saves.push(self.tensor(TensorKind::Activation, DType::F32.bytes(scores)));
                saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                if p_drop > 0.0 {
                    saves.push(self.tensor(TensorKind::Activation, DType::U8.bytes(scores)));
                    saves.push(self.tensor(TensorKind::Activation, compute.bytes(scores)));
                }
                fwd_extra += compute.bytes(scores) * 2;
                out = self.val(out_width, q.tokens, compute, grad);
            }
        }
        let flops = 4.0 * scores as f64 * head_dim as f64;
        let causal_factor = if mask == AttnMask::Causal { 0.5 } else { 1.0 };
        let io = q.bytes() + k.bytes() + v.bytes() + out.bytes();
        let score_bytes = match kernel {
            Kernel::Fused => Bytes::ZERO,
            Kernel::Math | Kernel::Eager => DType::F32.bytes(scores) * 4,
        };
        self.emit(OpSpec {
            name,
            kind: OpKind::Attention,
            params: SmallVec::new(),
            saves: if grad { saves } else { SmallVec::new() },
            forward_transient: out.bytes() + fwd_extra,
            backward_transient: io + fwd_extra,
            cost: Cost {
                forward_flops: Flops(flops * causal_factor),
                // Flash backward recomputes the scores: 2.5x the forward matmuls.
                input_grad_flops: Flops(2.5 * flops * causal_factor),
                weight_grad_flops: Flops(0.0),
                forward_bytes: io + score_bytes,
                backward_bytes: io * 2 + score_bytes * 2,
                // Head split views and transposes around the kernel(s).
                forward_kernels: if kernel == Kernel::Fused { 9 } else { 14 },
                backward_kernels: if kernel == Kernel::Fused { 9 } else { 16 },
                min_dim: head_dim,
                // The attention module and the block around it.
                modules: 2,
                misaligned: false,
            },
            compute,
            in_backward: grad,
        });
        out
    }

    /// Token (and position) embedding lookup: backward needs only the indices.
    pub fn embedding(&mut self, name: Name, param: ParamId, width: u64, tokens: u64) -> Val {
        let p = self.graph.param(param).clone();
        let dtype = p.dtype;
        let out = self.val(width, tokens, dtype, p.trainable);
        let table_bytes = p.bytes();
        self.emit(OpSpec {
            name,
            kind: OpKind::Embedding,
            params: smallvec![param],
            saves: SmallVec::new(),
            forward_transient: out.bytes(),
            // The table-sized gradient is counted as the parameter's gradient.
            backward_transient: out.bytes(),
            cost: Cost {
                forward_bytes: out.bytes() * 2,
                backward_bytes: out.bytes() * 2
                    + if p.trainable {
                        table_bytes * 2
                    } else {
                        Bytes::ZERO
                    },
                forward_kernels: 1,
                backward_kernels: u32::from(p.trainable) * 2,
                modules: 1,
                ..Cost::default()
            },
            compute: dtype,
            in_backward: p.trainable,
        });
        out
    }

    /// The LM head and the loss.
    ///
    /// Causal LMs go through transformers' `ForCausalLMLoss`, which upcasts the logits with
    /// `.float()`; seq2seq models call `CrossEntropyLoss` on the logits, which autocast runs in
    /// fp32. `log_softmax` keeps its output; its backward and `nll_loss`'s each produce a
    /// vocabulary-sized gradient, the largest transient of the step.
    pub fn lm_head_and_loss(&mut self, x: Val, head: ParamId, bias: bool) -> usize {
        let vocab = self.model.vocab_size;
        let tokens = x.tokens;
        let head_param = self.graph.param(head).clone();
        let trainable = head_param.trainable;
        let compute = self.compute();
        let xin = if self.autocast {
            self.cast(Name::root("lm_head").then("cast"), x, DType::Bf16)
        } else {
            x
        };
        let mut saves: SmallVec<[TensorId; 6]> = SmallVec::new();
        if trainable {
            saves.push(xin.id);
        }
        let mut cached = None;
        if self.autocast && head_param.dtype == DType::F32 {
            let copy = self.weight_copy(DType::Bf16.bytes(head_param.elements), !x.grad);
            if x.grad {
                saves.push(copy);
            } else {
                cached = Some(copy);
            }
        }
        let mut params: SmallVec<[ParamId; 3]> = smallvec![head];
        if bias {
            params.push(self.base_param(
                Name::root("lm_head").then("bias"),
                (1, vocab),
                ParamRole::Bias,
            ));
        }
        let logits = self.val(vocab, tokens, compute, x.grad || trainable);
        let flops = 2.0 * tokens as f64 * x.width as f64 * vocab as f64;
        let grad = logits.grad;
        self.emit(OpSpec {
            name: Name::root("lm_head"),
            kind: OpKind::Matmul,
            params,
            saves: if grad { saves } else { SmallVec::new() }
                .into_iter()
                .chain(cached)
                .collect(),
            forward_transient: logits.bytes(),
            backward_transient: logits.bytes() + xin.bytes(),
            cost: Cost {
                forward_flops: Flops(flops),
                input_grad_flops: Flops(if x.grad { flops } else { 0.0 }),
                weight_grad_flops: Flops(if trainable { flops } else { 0.0 }),
                forward_bytes: xin.bytes() + logits.bytes() + compute.bytes(head_param.elements),
                backward_bytes: (xin.bytes() + logits.bytes()) * 2
                    + compute.bytes(head_param.elements) * 2,
                forward_kernels: 2,
                backward_kernels: 3,
                min_dim: tokens.min(x.width),
                modules: 1,
                misaligned: !vocab.is_multiple_of(8) || !x.width.is_multiple_of(8),
            },
            compute,
            in_backward: grad,
        });
        let loss_dtype = if self.model.is_encoder_decoder() && !self.autocast {
            logits.dtype
        } else {
            DType::F32
        };
        let logp = self.graph.add_tensor(Tensor {
            bytes: loss_dtype.bytes(tokens * vocab),
            kind: TensorKind::Logits,
            checkpoint_input: false,
            cache_only: false,
        });
        let upcast = if loss_dtype != logits.dtype {
            loss_dtype.bytes(tokens * vocab)
        } else {
            Bytes::ZERO
        };
        let vocab_grad = loss_dtype.bytes(tokens * vocab);
        self.emit(OpSpec {
            name: Name::root("loss"),
            kind: OpKind::Loss,
            params: SmallVec::new(),
            saves: smallvec![logp],
            // The bf16 logits stay referenced by the model output until the loss is computed.
            forward_transient: logits.bytes() + upcast,
            // nll_loss's gradient and log_softmax's gradient coexist with the saved output.
            backward_transient: vocab_grad * 2,
            cost: Cost {
                forward_flops: Flops(5.0 * (tokens * vocab) as f64),
                input_grad_flops: Flops(4.0 * (tokens * vocab) as f64),
                forward_bytes: logits.bytes() + upcast * 3,
                backward_bytes: vocab_grad * 4 + logits.bytes(),
                // float, pad, slice, contiguous, views, log_softmax, nll_loss.
                forward_kernels: 8,
                backward_kernels: 5,
                ..Cost::default()
            },
            compute: loss_dtype,
            in_backward: grad,
        })
    }

    pub fn is_base_trainable(&self) -> bool {
        self.base_trainable
    }

    pub fn finish(self) -> OpGraph {
        self.graph
    }
}

/// The widest of two float dtypes, as PyTorch's type promotion picks it.
pub fn wider(a: DType, b: DType) -> DType {
    if a == DType::F32 || b == DType::F32 {
        DType::F32
    } else {
        a
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ia3Site {
    /// Scales the layer's input (peft's feed-forward modules).
    Input,
    /// Scales the layer's output.
    Output,
}

/// What accompanies an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMask {
    /// Causal with no explicit mask (`is_causal=True`).
    Causal,
    /// No mask (encoder self-attention, cross-attention).
    Full,
    /// A boolean mask materialised by the caller (prefix tuning's extended mask).
    Explicit,
    /// A float bias that requires grad (T5's relative bias over a trainable base).
    TrainableBias,
    /// A float bias that requires no grad.
    FrozenBias,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Fused,
    Math,
    Eager,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::op::Scope;
    use crate::spec::model::{Dropouts, Family, Positions, Stack};
    use crate::spec::plan::{Lora, Optimizer};

    /// A small Llama-style decoder.
    fn tiny(layers: u64) -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            family: Family::Llama,
            hidden_size: 64,
            vocab_size: 128,
            decoder: Stack {
                layers,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                intermediate_size: 256,
            },
            encoder: None,
            gated_ffn: true,
            activation: Activation::Silu,
            norm: Norm::RmsNorm,
            post_norm: false,
            positions: Positions::Rotary { fraction: 1.0 },
            tie_word_embeddings: false,
            qkv_bias: false,
            linear_bias: false,
            parallel_block: false,
            fused_qkv: false,
            lm_head_bias: false,
            dropout: Dropouts::default(),
            published_params: None,
        }
    }

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
            batch: 2,
            seq: 32,
            target_seq: 0,
            grad_ckpt: false,
            attention: AttentionKernel::Sdpa,
            gpus: 1,
        }
    }

    #[test]
    fn a_linear_3x5_with_bias_has_20_parameters_and_2mnk_flops() {
        let model = tiny(1);
        let p = plan(Method::Full);
        let mut b = Builder::new(&model, &p);
        let x = b.val(3, 7, DType::F32, true);
        b.linear(Scope::default().at("fc"), x, 5, true, None);
        let g = b.finish();
        let params: u64 = g.params.iter().map(|p| p.elements).sum();
        assert_eq!(params, 20);
        let op = g
            .ops()
            .find(|o| o.kind == OpKind::Matmul)
            .expect("a matmul");
        // 2 x tokens x in x out, for the forward and for each gradient.
        assert_eq!(op.cost.forward_flops.0, 2.0 * 7.0 * 3.0 * 5.0);
        assert_eq!(op.cost.input_grad_flops.0, 210.0);
        assert_eq!(op.cost.weight_grad_flops.0, 210.0);
    }

    /// Matmul FLOPs of a step per token and per matmul parameter.
    fn flops_per_token_param(method: Method) -> f64 {
        let model = tiny(4);
        let p = plan(method);
        let g = crate::graph::build(&model, &p);
        let tokens = (p.batch * p.seq) as f64;
        let matmul_params: u64 = g
            .params
            .iter()
            .filter(|p| {
                p.role == ParamRole::Linear
                    || (p.role == ParamRole::Embedding
                        && p.shape.0 == 128
                        && p.name.part == "lm_head")
            })
            .map(|p| p.elements)
            .sum();
        let flops: f64 = g
            .ops()
            .filter(|o| o.kind == OpKind::Matmul)
            .map(|o| {
                o.cost.forward_flops.0 + o.cost.input_grad_flops.0 + o.cost.weight_grad_flops.0
            })
            .sum();
        flops / tokens / matmul_params as f64
    }

    #[test]
    fn full_fine_tuning_costs_6n_flops_per_token() {
        // Forward 2N, input gradients 2N, weight gradients 2N (Kaplan et al. 2020, sec. 2.1).
        assert_eq!(flops_per_token_param(Method::Full), 6.0);
    }

    #[test]
    fn a_frozen_base_costs_about_4n_flops_per_token() {
        // No weight gradients for the base; the first projections' input needs no gradient.
        let lora = Method::Lora(Lora {
            rank: 1,
            alpha: 2.0,
            targets: LoraTargets::QueryValue,
        });
        let f = flops_per_token_param(lora);
        assert!((3.8..=4.05).contains(&f), "{f}");
    }

    #[test]
    fn causal_attention_flops_are_half_of_4_b_h_s2_d() {
        let model = tiny(1);
        let p = plan(Method::Full);
        let g = crate::graph::build(&model, &p);
        let attn = g
            .ops()
            .find(|o| o.kind == OpKind::Attention)
            .expect("attention");
        let full = 4.0 * 2.0 * 4.0 * 32.0 * 32.0 * 16.0;
        assert_eq!(attn.cost.forward_flops.0, full / 2.0);
        assert_eq!(attn.cost.input_grad_flops.0, 2.5 * full / 2.0);
    }

    #[test]
    fn mixed_precision_keeps_a_bf16_copy_of_each_linear_weight() {
        let model = tiny(2);
        let g = crate::graph::build(&model, &plan(Method::Full));
        let linear: u64 = g
            .params
            .iter()
            .filter(|p| p.role == ParamRole::Linear || p.name.part == "lm_head")
            .map(|p| p.elements)
            .sum();
        let copies: u64 = g
            .tensors
            .iter()
            .filter(|t| t.kind == TensorKind::WeightCopy)
            .map(|t| t.bytes.0)
            .sum();
        assert_eq!(copies, 2 * linear);
    }

    #[test]
    fn a_frozen_linear_saves_no_input() {
        let model = tiny(1);
        let lora = Method::Lora(Lora {
            rank: 4,
            alpha: 8.0,
            targets: LoraTargets::QueryValue,
        });
        let p = plan(lora);
        let mut b = Builder::new(&model, &p);
        let x = b.val(64, 10, DType::Bf16, true);
        b.linear(Scope::default().at("k_proj"), x, 32, false, Some(Proj::K));
        let g = b.finish();
        let op = g.ops().find(|o| o.kind == OpKind::Matmul).expect("matmul");
        assert!(
            op.saves.is_empty(),
            "a frozen bf16 linear keeps nothing: {:?}",
            op.saves
        );
    }
}
