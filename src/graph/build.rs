//! The op builder: its dtype regime, values, and the generic ops (casts, adds, dropout,
//! checkpoint markers). Linear layers and PEFT insertions live in `linear.rs`, norms and
//! activations in `layers.rs`, attention in `attention.rs`, embeddings and the loss in `head.rs`.
//!
//! Each helper mirrors what PyTorch's autograd saves for the framework code it stands for:
//! autograd's generated code saves an operand only when the gradient that needs it will be
//! computed (e.g. `mm` keeps its input only if the weight requires grad), autocast casts inputs of
//! `linear`/`matmul`/SDPA to bf16 and runs `layer_norm`, `pow`, `softmax` and `log_softmax` in
//! fp32, and its cast cache keeps one bf16 copy per fp32 weight. Those rules, applied op by op,
//! are the whole activation model: there is no per-model multiplier.

use crate::graph::op::{
    Access, Cost, Name, Op, OpGraph, OpKind, Param, ParamId, ParamRole, Scope, SideKernels, Tensor,
    TensorId, TensorKind,
};
use crate::spec::model::{Family, ModelSpec};
use crate::spec::parallel::Engine;
use crate::spec::plan::{Method, Plan, Precision};
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
    pub(super) fn elements(&self) -> u64 {
        self.width.saturating_mul(self.tokens)
    }

    pub(super) fn bytes(&self) -> Bytes {
        self.dtype.bytes(self.elements())
    }
}

/// Builder state: the graph so far plus the dtype regime of the plan.
pub struct Builder<'a> {
    pub graph: OpGraph,
    pub model: &'a ModelSpec,
    pub plan: &'a Plan,
    pub(super) autocast: bool,
    /// Autocast's 16-bit dtype: fp16 under `--precision mixed-fp16`, else bf16 (same bytes; the
    /// time model reads the matching tensor-core rate).
    pub(super) half: DType,
    /// Storage dtype of the base model's dense weights.
    pub(super) base: DType,
    /// Storage dtype of trainable PEFT parameters (peft upcasts them to fp32).
    pub(super) adapter: DType,
    /// The block being built (its index across the encoder then the decoder), `None` outside
    /// the blocks; and how many blocks there are: what `Method::trains` needs.
    pub(super) layer: Option<u64>,
    pub(super) layers: u64,
    /// The block being built (its first real block, `layer` between `begin_block` and
    /// `end_block`): what the ops record as `Op::block`.
    block: Option<u32>,
    pub(super) segment: Option<u32>,
    pub(super) next_segment: u32,
    /// Copies the ops and parameters being built stand for.
    pub(super) repeat: u32,
    /// Storage dtypes kept between steps for base and PEFT parameters (differ from `base` and
    /// `adapter` only under FSDP's mixed-precision policy).
    pub(super) storage_base: DType,
    pub(super) storage_adapter: DType,
    /// Inside attention or the FFN (a tensor-parallel region: sequence parallelism leaves its
    /// activations whole).
    pub(super) tp_region: bool,
    /// Virtual key/value tokens in front of the self-attention keys of the stack being built
    /// (prefix tuning; the decoder's only, in an encoder-decoder model).
    pub(super) prefix: u64,
    /// Gemma 4's per-layer inputs (tokens x layers x width), built at the embeddings; each
    /// block reads its slice (a view that keeps the whole tensor).
    pub(super) per_layer_inputs: Option<Val>,
    /// Gradients autograd accumulates for the biases the stack being built hands every block
    /// (T5's), each with the kind of attention mask that reads its bias: every attention op
    /// with that mask adds to it in backward (`Op::grads`).
    pub(super) bias_grads: SmallVec<[(super::attention::AttnMask, TensorId); 2]>,
    /// The bytes of the keys and values a stack's layers store in Gemma 4's `shared_kv_states`,
    /// per attention type (full, sliding), as the last block of each type built them.
    pub(super) stored_kv: [Bytes; 2],
    /// What the Python frames around the ops being built still name (locals and arguments
    /// that no op need keep): each op emitted records them (`Op::frame`). Pushed and popped by
    /// [`Builder::name`] and [`Builder::unname`].
    frame: SmallVec<[TensorId; 8]>,
    /// The id the graph gave `frame` (`OpGraph::add_frame`), which ops record.
    frame_id: u32,
    /// The part of the model being built (a pipeline stage, or all of it).
    pub stage: crate::graph::arch::Stage,
    /// The sharding unit being built (0: root; `k + 1`: block `k`).
    pub(super) unit: u32,
    next_unit: u32,
}

/// Where the frames' names stood before a [`Builder::name`]: their count and the graph's id.
#[derive(Debug, Clone, Copy)]
pub(super) struct FrameMark(usize, u32);

/// Pieces of a matmul-like op that the callers fill.
pub(super) struct OpSpec {
    pub(super) name: Name,
    pub(super) kind: OpKind,
    pub(super) params: SmallVec<[ParamId; 3]>,
    pub(super) saves: SmallVec<[TensorId; 6]>,
    /// Its output's bytes (zero for markers that make nothing).
    pub(super) out: Bytes,
    pub(super) forward_transient: Bytes,
    pub(super) backward_transient: Bytes,
    pub(super) cost: Cost,
    pub(super) compute: DType,
    pub(super) in_backward: bool,
}

/// Whether the engine itself runs every parameter in bf16 (a sharding engine in 16-bit
/// precision: FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)` casts each unit as it gathers it,
/// DeepSpeed's `bf16` mode casts the module), whatever dtype a module made its weight in.
pub(super) fn engine_casts_parameters(plan: &Plan) -> bool {
    plan.parallel.engine != Engine::Ddp && plan.precision != Precision::Fp32
}

/// An op's output as part of its forward transient: its bytes, unless the op keeps it for
/// backward (`saves`, as emitted), when the walk holds it from this op on.
pub(super) fn unless_kept(saves: &[TensorId], out: Val) -> Bytes {
    if saves.contains(&out.id) {
        Bytes::ZERO
    } else {
        out.bytes()
    }
}

/// What autocast's cast of an fp32 weight leaves ([`Builder::autocast_weight`]); nothing when
/// there is no cast.
#[derive(Default)]
pub(super) struct WeightCast {
    /// The copy the op saves, if any.
    pub copy: Option<TensorId>,
    /// The copy's bytes when nothing keeps it: live only while the op runs.
    pub transient: Bytes,
    /// The cast's kernel (fp32 read, half written; `_to_copy`) and a trained weight's gradient
    /// cast back the other way (`ToCopyBackward`): kernels of their own beside the GEMM.
    pub side: SideKernels,
}

impl<'a> Builder<'a> {
    pub fn new(model: &'a ModelSpec, plan: &'a Plan) -> Builder<'a> {
        let base = match (&plan.method, plan.precision) {
            // peft's `prepare_model_for_kbit_training` upcasts every parameter that was not
            // quantized (embeddings, norms, LM head, biases) to fp32.
            (Method::Qlora(_), _) => DType::F32,
            (_, Precision::MixedBf16 | Precision::MixedFp16 | Precision::Fp32) => DType::F32,
            (_, Precision::Bf16) => DType::Bf16,
        };
        // A sharding engine in 16-bit precision runs the module in bf16 without autocast:
        // FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)` casts each unit as it gathers it
        // (the sharded parameter keeps its dtype), and DeepSpeed's `bf16` mode casts the
        // module itself and keeps fp32 master weights in its optimizer.
        let engine = plan.parallel.engine;
        let (compute_base, adapter, autocast) = if engine_casts_parameters(plan) {
            (DType::Bf16, DType::Bf16, false)
        } else {
            (base, DType::F32, plan.autocast())
        };
        let keep = |compute: DType, original: DType| {
            if engine.is_fsdp() { original } else { compute }
        };
        Builder {
            graph: OpGraph::default(),
            model,
            plan,
            autocast,
            half: if plan.precision == Precision::MixedFp16 {
                DType::F16
            } else {
                DType::Bf16
            },
            base: compute_base,
            storage_base: keep(compute_base, base),
            storage_adapter: keep(adapter, DType::F32),
            unit: 0,
            next_unit: 1,
            stage: crate::graph::arch::Stage::WHOLE,
            tp_region: false,
            prefix: 0,
            per_layer_inputs: None,
            bias_grads: SmallVec::new(),
            stored_kv: [Bytes::ZERO; 2],
            frame: SmallVec::new(),
            frame_id: 0,
            adapter,
            layer: None,
            layers: model.decoder.layers + model.encoder.map_or(0, |e| e.layers),
            block: None,
            segment: None,
            next_segment: 0,
            repeat: 1,
        }
    }

    /// The dtype matmuls produce.
    pub(super) fn compute(&self) -> DType {
        if self.autocast { self.half } else { self.base }
    }

    pub(super) fn tensor(&mut self, kind: TensorKind, bytes: Bytes) -> TensorId {
        self.graph.add_tensor(Tensor::new(kind, bytes))
    }

    /// Host-side cost with no device work (a module call, a dispatch that returns its input),
    /// charged to the op before it.
    pub(super) fn host_only(&mut self, modules: u32, dispatches: u32) {
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

    /// The bf16 copy autocast makes of an fp32 weight of `elements` for a matmul, given whether
    /// the weight trains and whether autograd keeps the copy (the matmul's input needs a
    /// gradient).
    ///
    /// ATen's `cached_cast` (aten/src/ATen/autocast_mode.h) caches only the casts of leaf
    /// tensors that require grad: a trainable weight is cast once and the cache holds the copy
    /// until the outermost autocast region exits, kept or not by autograd (a `WeightCopy`,
    /// `cache_only` when autograd does not keep it). A frozen fp32 weight (LoRA over an fp32
    /// base, the frozen part of BitFit or layer freezing) is cast at every use: autograd keeps
    /// that copy like any saved tensor, so checkpointing drops it with the block's other
    /// activations and the recompute casts again; when autograd does not keep it, it is freed
    /// as the op returns.
    pub(super) fn autocast_weight(
        &mut self,
        elements: u64,
        trainable: bool,
        kept: bool,
    ) -> WeightCast {
        let bytes = self.half.bytes(elements);
        let (copy, transient) = if trainable {
            let copy = self.graph.add_tensor(Tensor {
                cache_only: !kept,
                ..Tensor::new(TensorKind::WeightCopy, bytes)
            });
            (Some(copy), Bytes::ZERO)
        } else if kept {
            (
                Some(self.tensor(TensorKind::Activation, bytes)),
                Bytes::ZERO,
            )
        } else {
            (None, bytes)
        };
        let moved = DType::F32.bytes(elements) + bytes;
        WeightCast {
            copy,
            transient,
            side: SideKernels {
                forward_cast: moved,
                backward_cast: if trainable { moved } else { Bytes::ZERO },
                ..SideKernels::default()
            },
        }
    }

    /// A rank's share of a `width`-wide activation under sequence parallelism (Korthikanti et
    /// al. 2022, sec. 4.2.2): inside a block and outside its tensor-parallel regions, the
    /// hidden-width activations tensor parallelism replicates (norms, dropout and its masks,
    /// residual, the inputs the column-parallel linears keep) are split along the sequence.
    fn sequence_split(&self, width: u64, bytes: Bytes) -> Bytes {
        let par = self.plan.parallel;
        if par.sp && self.unit > 0 && !self.tp_region && width == self.model.hidden_size {
            bytes.div_ceil(par.tp)
        } else {
            bytes
        }
    }

    /// `v` in storage of its own: a part of a larger tensor (q, k or v as a head-split view of
    /// a fused projection's output) becomes a new tensor of the part's size, as a contiguous
    /// copy of it; anything else is returned as it is.
    pub fn own_storage(&mut self, v: Val) -> Val {
        if self.graph.tensor(v.id).bytes > self.val_bytes(v.width, v.tokens, v.dtype) {
            self.val(v.width, v.tokens, v.dtype, v.grad)
        } else {
            v
        }
    }

    /// The bytes a value of `width` x `tokens` elements takes on this rank.
    pub(super) fn val_bytes(&self, width: u64, tokens: u64, dtype: DType) -> Bytes {
        self.sequence_split(width, dtype.bytes(width.saturating_mul(tokens)))
    }

    /// A fresh value of `width` elements per token.
    pub fn val(&mut self, width: u64, tokens: u64, dtype: DType, grad: bool) -> Val {
        let bytes = self.val_bytes(width, tokens, dtype);
        let id = self.tensor(TensorKind::Activation, bytes);
        Val {
            id,
            dtype,
            width,
            tokens,
            grad,
        }
    }

    pub(super) fn param(
        &mut self,
        name: Name,
        shape: (u64, u64),
        dtype: DType,
        storage: DType,
        trainable: bool,
        role: ParamRole,
    ) -> ParamId {
        self.graph.add_param(Param {
            name,
            elements: shape.0.saturating_mul(shape.1),
            dtype,
            storage,
            unit: self.unit,
            trainable,
            role,
            extra: Bytes::ZERO,
            shape,
            copies: u64::from(self.repeat),
            layer: self.layer,
            idle: false,
        })
    }

    /// A frozen-or-trainable base parameter in the plan's base dtype.
    pub fn base_param(&mut self, name: Name, shape: (u64, u64), role: ParamRole) -> ParamId {
        let (base, storage, trainable) = (self.base, self.storage_base, self.trains(role));
        self.param(name, shape, base, storage, trainable, role)
    }

    /// A parameter the model itself freezes (`requires_grad=False`, Marian's and Pegasus's
    /// sinusoidal position tables): in the base dtype, trained by no method.
    pub fn frozen_param(&mut self, name: Name, shape: (u64, u64)) -> ParamId {
        let (base, storage) = (self.base, self.storage_base);
        self.param(name, shape, base, storage, false, ParamRole::Embedding)
    }

    /// A trainable PEFT parameter.
    pub fn adapter_param(&mut self, name: Name, shape: (u64, u64)) -> ParamId {
        let (dtype, storage) = (self.adapter, self.storage_adapter);
        self.param(name, shape, dtype, storage, true, ParamRole::Adapter)
    }

    pub(super) fn emit(&mut self, spec: OpSpec) -> usize {
        self.graph.push(Op {
            name: spec.name,
            kind: spec.kind,
            block: self.block,
            segment: self.segment,
            unit: self.unit,
            repeat: self.repeat,
            params: spec.params,
            saves: spec.saves,
            grads: SmallVec::new(),
            frame: self.frame_id,
            pinned: SmallVec::new(),
            out: spec.out,
            forward_transient: spec.forward_transient,
            first_forward_only: Bytes::ZERO,
            rerun_only: Bytes::ZERO,
            backward_transient: spec.backward_transient,
            in_backward: spec.in_backward,
            cost: spec.cost,
            compute: spec.compute,
        })
    }

    /// An element-wise op over `inputs` producing `out`, saving `saves`.
    pub(super) fn elementwise(
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
        // ReLU and sigmoid keep their output.
        let transient = unless_kept(&saves, out);
        self.emit(OpSpec {
            name,
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves,
            out: out.bytes(),
            forward_transient: transient,
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

    /// `x *= torch.empty_like(x).uniform_(1 - e, 1 + e)` in training (MoE input jitter): x keeps
    /// its storage; the noise is a new tensor of x's size, kept for backward when x needs a
    /// gradient (`mul_`'s derivative for x is the gradient times the other operand). Kernels:
    /// `uniform_` and `mul_` forward, one `mul` backward.
    pub fn jitter(&mut self, name: Name, x: Val) {
        let noise = self.tensor(TensorKind::Activation, x.bytes());
        let op = self.elementwise(name, &[x], x, smallvec![noise], 1.0);
        if let Some(o) = self.graph.op_mut(op) {
            // In place: nothing beyond the noise, which is kept (or, with no gradient, freed
            // as the multiply returns).
            o.forward_transient = if x.grad { Bytes::ZERO } else { x.bytes() };
            o.cost.forward_kernels = 2;
            o.cost.forward_bytes = x.bytes() * 3;
        }
    }

    /// `x.to(dtype)`: the same tensor when the dtype already matches, else a copy (saves nothing).
    pub fn cast(&mut self, name: Name, x: Val, dtype: DType) -> Val {
        if x.dtype == dtype {
            return x;
        }
        let out = self.val(x.width, x.tokens, dtype, x.grad);
        let op = self.elementwise(name, &[x], out, SmallVec::new(), 0.0);
        // `_to_copy`'s derivative casts the gradient back: one kernel reading the gradient in
        // the output dtype and writing it in the input dtype, the forward's bytes.
        self.set_backward_bytes(op, x.bytes() + out.bytes());
        // Whichever pass widens runs the slower dynamic-cast loop; narrowing to bf16 has its
        // own vectorized kernel (`bfloat16_copy_kernel_cuda`).
        let widening = dtype.bytes(1) > x.dtype.bytes(1);
        self.set_access(
            op,
            if widening {
                (Access::Widening, Access::Contiguous)
            } else {
                (Access::Contiguous, Access::Widening)
            },
        );
        out
    }

    /// Autocast's cast of `x` for the one op that reads it (a matmul's operand, a norm's fp32
    /// input): `cast`, its result bound to no Python name (`Tensor::unnamed`).
    pub fn autocast(&mut self, name: Name, x: Val, dtype: DType) -> Val {
        let out = self.cast(name, x, dtype);
        if out.id != x.id {
            self.graph.tensors[out.id.0 as usize].unnamed = true;
        }
        out
    }

    /// `x * s` for a Python float `s` (T5's head rescale, Granite's multipliers): a new tensor
    /// of x's size and dtype; `MulBackward` keeps no tensor for a scalar and multiplies the
    /// gradient by `s`, one kernel each way.
    pub fn scale(&mut self, name: Name, x: Val) -> Val {
        self.scale_into(name, x, x.dtype)
    }

    /// `scale` whose result has `dtype`: type promotion by an operand that keeps no tensor for
    /// backward (BART's fp32 `final_logits_bias` buffer added to bf16 logits).
    pub fn scale_into(&mut self, name: Name, x: Val, dtype: DType) -> Val {
        self.one_pass(name, x, dtype, Access::Contiguous)
    }

    /// A new tensor of x's size from one kernel reading x (and one reading its gradient back).
    fn one_pass(&mut self, name: Name, x: Val, dtype: DType, access: Access) -> Val {
        let out = self.val(x.width, x.tokens, dtype, x.grad);
        let op = self.elementwise(name, &[x], out, SmallVec::new(), 1.0);
        self.set_backward_bytes(op, x.bytes() + out.bytes());
        self.set_access(op, (access, access));
        out
    }

    /// `x.contiguous()` on a strided view (or `.clone()`): a copy of x, kept by nobody but its
    /// reader; its backward is the gradient's copy back, one kernel each way, as `scale`, both
    /// through the strided loop.
    pub fn contiguous(&mut self, name: Name, x: Val) -> Val {
        self.one_pass(name, x, x.dtype, Access::Strided)
    }

    /// `a + b` (residual adds): saves nothing; the result takes the wider dtype.
    pub fn add(&mut self, name: Name, a: Val, b: Val) -> Val {
        let dtype = wider(a.dtype, b.dtype);
        let out = self.val(a.width, a.tokens, dtype, a.grad || b.grad);
        let op = self.binary(name, (a, b), out, SmallVec::new());
        // add's derivative hands the gradient to both inputs unchanged (no kernel); the one
        // kernel is autograd's accumulation where an input forked (`InputBuffer::accumulate`):
        // the residual stream read by the block and by this add, or for LoRA the layer input
        // read by the base weight and by `lora_A`. Two gradients read, their sum written, the
        // forward's bytes; a CPU dispatch trace of a Llama block shows exactly that.
        self.set_backward_bytes(op, a.bytes() + b.bytes() + out.bytes());
        out
    }

    /// `x + branch`, where `branch` was computed after `x` (a block's residual add, an
    /// adapter's skip, LoRA's update beside its base output, a shared expert beside the routed
    /// ones). `AddBackward0` hands the sum's gradient to both sides, and the engine runs the
    /// branch's backward first (`ReadyQueue` pops the node with the highest sequence number,
    /// and the branch's nodes were made after `x`'s producer), so `x`'s side keeps that
    /// gradient in the `InputBuffer` of `x`'s producer until the branch's backward reaches `x`
    /// and the two are summed (torch/csrc/autograd/engine.cpp). It is x's size and dtype
    /// (`validate_outputs` casts it where the add promoted; sequence parallelism splits it
    /// where it splits x). The op that takes the sum's gradient first counts it among its own
    /// (`Op::backward_transient`); from there to the branch's first op it is held
    /// (`Op::grads`): a hidden-sized gradient beside every op of a block's MLP or attention
    /// backward. (A parallel block's inner `attention + mlp` is a plain add: its
    /// gradient is the outer residual's own tensor, held once.)
    pub fn residual(&mut self, name: Name, x: Val, branch: Val) -> Val {
        let last = self.graph.len().checked_sub(1);
        let out = self.add(name, x, branch);
        if let Some(last) = last.filter(|_| branch.grad) {
            self.hold_grad_sum(x, last);
        }
        out
    }

    /// The gradient autograd sums for `x` while the ops that read it run their backward: the
    /// engine adds each reader's contribution into the `InputBuffer` of `x`'s producer and
    /// passes the sum on once every reader is done (torch/csrc/autograd/engine.cpp,
    /// `InputBuffer::accumulate`). It is x's size and dtype and is held (`Op::grads`) from the
    /// backward of op `last` (the last reader made, whose backward runs first) through that of
    /// the first op after x's producer that takes part in backward (the first reader).
    pub(super) fn hold_grad_sum(&mut self, x: Val, last: usize) {
        if !x.grad {
            return;
        }
        let first = (self.graph.producer(x.id) + 1..last)
            .find(|&i| self.graph.op(i).is_some_and(|o| o.in_backward));
        if let Some(first) = first {
            let bytes = self.val_bytes(x.width, x.tokens, x.dtype);
            let g = self.tensor(TensorKind::Activation, bytes);
            for i in [first, last] {
                if let Some(o) = self.graph.op_mut(i) {
                    o.grads.push(g);
                }
            }
        }
    }

    /// Gradients that wait for their producer: for each `(x, reader)`, op `reader` makes x's
    /// gradient in its backward, and the engine hands it to x's producer only when it reaches
    /// that producer. It runs nodes in reverse creation order (`ReadyQueue` pops the highest
    /// sequence number, torch/csrc/autograd/engine.cpp), so every op built between the two runs
    /// its backward first while the gradient waits in the producer's `InputBuffer`: the query's
    /// and value's gradients beside the key's rotary backward, the key's beside the value
    /// projection's. Held as [`Builder::hold_grad_sum`] holds a sum (one buffer per value, so
    /// `reader` is the last op that reads x).
    pub(super) fn await_grads(&mut self, reads: &[(Val, usize)]) {
        for &(x, reader) in reads {
            self.hold_grad_sum(x, reader);
        }
    }

    /// The first op at or after `from` named `name` (one a helper built inside its call).
    pub(super) fn op_named_from(&self, from: usize, name: Name) -> Option<usize> {
        (from..self.graph.len()).find(|&i| self.graph.op(i).is_some_and(|o| o.name == name))
    }

    /// A value read by `consumers` ops: autograd sums their gradients before passing one on
    /// (`InputBuffer::accumulate`), `consumers - 1` adds each reading two gradients and
    /// writing their sum. Emitted before the consumers, so that its backward runs after
    /// theirs. Forward costs nothing and memory is unchanged (the sum replaces a gradient the
    /// walk already holds); a CPU dispatch trace of a Llama block shows the adds after the
    /// q/k/v and gate/up projections' backward.
    pub(super) fn fork(&mut self, name: Name, x: Val, consumers: u32) {
        if !x.grad || consumers < 2 {
            return;
        }
        let adds = consumers - 1;
        self.emit(OpSpec {
            name,
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves: SmallVec::new(),
            out: Bytes::ZERO,
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost {
                input_grad_flops: Flops(f64::from(adds) * x.elements() as f64),
                backward_bytes: x.bytes() * 3 * u64::from(adds),
                backward_kernels: adds,
                ..Cost::default()
            },
            compute: x.dtype,
            in_backward: true,
        });
    }

    /// Sets op `op`'s memory paths (forward, backward).
    pub(super) fn set_access(&mut self, op: usize, (forward, backward): (Access, Access)) {
        if let Some(o) = self.graph.op_mut(op) {
            o.cost.forward_access = forward;
            o.cost.backward_access = backward;
        }
    }

    /// An element-wise op of two activations (an add, a product): one kernel, which runs the
    /// dynamic-cast loop when their dtypes differ (`Access::Mixed`); its backward stays in
    /// one dtype.
    pub(super) fn binary(
        &mut self,
        name: Name,
        (a, b): (Val, Val),
        out: Val,
        saves: SmallVec<[TensorId; 6]>,
    ) -> usize {
        let op = self.elementwise(name, &[a, b], out, saves, 1.0);
        if a.dtype != b.dtype {
            self.set_access(op, (Access::Mixed, Access::Contiguous));
        }
        op
    }

    /// Sets op `op`'s backward traffic where its derivative is not the generic two passes.
    pub(super) fn set_backward_bytes(&mut self, op: usize, bytes: Bytes) {
        if let Some(o) = self.graph.op_mut(op) {
            o.cost.backward_bytes = bytes;
        }
    }

    /// `torch.cat` along the features (`[a, b]` per token): a new tensor; saves nothing.
    pub fn concat_width(&mut self, name: Name, a: Val, b: Val) -> Val {
        let dtype = wider(a.dtype, b.dtype);
        let out = self.val(a.width + b.width, a.tokens, dtype, a.grad || b.grad);
        self.elementwise(name, &[a, b], out, SmallVec::new(), 0.0);
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
        // GPT-2, T5 and Phi call `nn.Dropout` modules, BART, OPT, Falcon and Seed-OSS call
        // `F.dropout`; the Llama family has no dropout calls outside attention.
        let (modules, dispatch) = match self.model.family {
            Family::Gpt2
            | Family::GptBigcode
            | Family::GptNeo
            | Family::Gptj
            | Family::Codegen
            // MPT: an `nn.Dropout` after attention, `F.dropout` in the MLP.
            | Family::Mpt
            | Family::T5
            | Family::Mt5
            | Family::StableLm
            | Family::Phi
            | Family::Phi3
            | Family::GptNeox
            | Family::Starcoder2
            | Family::Olmo2 => (1, 1),
            Family::Bart
            | Family::Mbart
            | Family::Marian
            | Family::Pegasus
            | Family::Opt
            | Family::Falcon
            | Family::Bloom
            | Family::SeedOss => (0, 1),
            Family::Gemma2
            | Family::VaultGemma
            | Family::Gemma3
            | Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::Mellum
            | Family::HyV3
            | Family::Ernie45Moe
            | Family::HunyuanMoe
            | Family::Qwen35Moe
            | Family::Qwen3Next
            | Family::Deepseek
            | Family::Mistral4
            | Family::MiniCpm3
            | Family::Youtu
            | Family::Axk1
            | Family::Mamba
            | Family::FalconMamba
            | Family::Mamba2
            | Family::NemotronH
            | Family::FalconH1
            | Family::GraniteMoeHybrid
            | Family::GraniteMoe => (0, 0),
            Family::Llama
            | Family::Mistral
            | Family::Qwen2
            | Family::Gemma
            | Family::Palm
            | Family::Mixtral
            | Family::Phimoe
            | Family::Nemotron
            | Family::Arcee
            | Family::Apertus
            | Family::MinimaxM2
            | Family::Dots1
            | Family::Gemma4
            | Family::Lfm2
            | Family::Lfm2Moe
            | Family::Llama4
            | Family::Ernie45
            | Family::Ministral3
            | Family::Qwen3
            | Family::Qwen35
            | Family::Granite
            | Family::Exaone4
            | Family::ExaoneMoe
            | Family::Afmoe
            | Family::GptOss
            | Family::Glm4Moe
            | Family::SolarOpen
            | Family::Glm4
            | Family::Glm
            | Family::Jais2
            | Family::NanoChat
            | Family::HunyuanDense
            | Family::Helium
            | Family::Olmoe
            | Family::FlexOlmo
            | Family::Cohere
            | Family::Cohere2
            | Family::Cohere2Moe
            | Family::Cwm
            | Family::HyperClovaX
            | Family::Jamba
            | Family::Bamba
            | Family::Olmo => (0, 0),
        };
        if p <= 0.0 {
            // A call with p = 0 still costs its host time and returns its input.
            let _ = name;
            self.host_only(modules, dispatch);
            return x;
        }
        let mask_bytes = self.sequence_split(x.width, DType::U8.bytes(x.elements()));
        let mask = self.tensor(TensorKind::Activation, mask_bytes);
        let out = self.val(x.width, x.tokens, x.dtype, x.grad);
        // One `native_dropout` kernel each way (CUDA fuses the draw and the scaling); the
        // `nn.Dropout` module call is paid as with p = 0.
        self.elementwise(name, &[x], out, smallvec![mask], 2.0);
        self.host_only(modules, 0);
        out
    }

    /// Marks the start of a checkpointed block (HF's `gradient_checkpointing_enable`, one
    /// `torch.utils.checkpoint` per block): the block's inputs are kept, its interior is
    /// recomputed. A decoder block's inputs are its hidden state and the encoder's output
    /// (`memory`): every decoder block's checkpoint holds the encoder output itself, until the
    /// first decoder block's backward, whatever dtype its cross-attention casts it to inside;
    /// `also` are the other tensors the stack hands every block (T5's position biases).
    pub fn begin_block(&mut self, input: Val, memory: Option<Val>, also: &[TensorId]) {
        self.block = self.layer.and_then(|l| u32::try_from(l).ok());
        self.unit = self.next_unit;
        self.next_unit += 1;
        if !self.plan.grad_ckpt {
            return;
        }
        let segment = self.next_segment;
        self.segment = Some(segment);
        self.next_segment += 1;
        // The checkpoint keeps the block's inputs themselves (whoever else saves them).
        let mut saves: SmallVec<[TensorId; 6]> = smallvec![input.id];
        saves.extend(memory.map(|m| m.id));
        saves.extend_from_slice(also);
        for &t in &saves {
            self.graph.tensors[t.0 as usize].checkpoint_input = true;
        }
        self.graph.begin_segment(segment);
        // A zero-cost marker op that keeps the block inputs.
        self.emit(OpSpec {
            name: Name::root("checkpoint_input"),
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves,
            out: Bytes::ZERO,
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost::default(),
            compute: input.dtype,
            in_backward: input.grad || memory.is_some_and(|m| m.grad),
        });
    }

    /// The frames around the ops built from now on also name `names` (a function's arguments,
    /// the locals it holds until it returns or rebinds them): every op emitted records them
    /// (`Op::frame`) until [`Builder::unname`] with the mark this returns.
    pub(super) fn name(&mut self, names: &[TensorId]) -> FrameMark {
        let mark = FrameMark(self.frame.len(), self.frame_id);
        let fresh: SmallVec<[TensorId; 4]> = names
            .iter()
            .copied()
            .filter(|t| !self.frame.contains(t))
            .collect();
        if !fresh.is_empty() {
            self.frame.extend(fresh);
            self.frame_id = self.graph.add_frame(self.frame.clone());
        }
        mark
    }

    /// The frames entered since `mark` (what [`Builder::name`] returned) have returned.
    pub(super) fn unname(&mut self, mark: FrameMark) {
        self.frame.truncate(mark.0);
        self.frame_id = mark.1;
    }

    /// Whether the frames around the ops being built name `t`.
    pub(super) fn is_named(&self, t: TensorId) -> bool {
        self.frame.contains(&t)
    }

    /// A zero-cost op that keeps `x` until backward reaches it: a leaf that requires grad,
    /// which its AccumulateGrad node holds for the whole backward pass (backward reaches the
    /// op, built before anything that reads `x`, last).
    pub fn hold(&mut self, name: Name, x: Val) {
        self.hold_tensor(name, x.id, x.dtype);
    }

    /// [`Builder::hold`] of a tensor no op here made (the rotary tables a stack computes).
    pub fn hold_tensor(&mut self, name: Name, t: TensorId, dtype: DType) {
        self.emit(OpSpec {
            name,
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves: smallvec![t],
            out: Bytes::ZERO,
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost::default(),
            compute: dtype,
            in_backward: true,
        });
    }

    /// The stack's attention masks under gradient checkpointing: transformers builds one per
    /// mask type for the whole stack (eager's `masking_utils.eager_mask`: the boolean
    /// `sdpa_mask`, expanded to the batch, through `torch.where` into the embeddings' dtype, so
    /// `batch x q x k` elements each; SDPA's sliding window the boolean mask itself). Every
    /// checkpointed block keeps its inputs, the mask among them, until its backward, so the
    /// masks live until the first block's backward is done. (Without checkpointing nothing
    /// saves them: they are freed when the model's forward returns, before backward.)
    pub fn checkpointed_masks(&mut self, bytes: Bytes) {
        if !self.plan.grad_ckpt || bytes == Bytes::ZERO {
            return;
        }
        let mask = self.tensor(TensorKind::Activation, bytes);
        self.emit(OpSpec {
            name: Name::root("attention_masks"),
            kind: OpKind::Elementwise,
            params: SmallVec::new(),
            saves: smallvec![mask],
            out: Bytes::ZERO,
            forward_transient: Bytes::ZERO,
            backward_transient: Bytes::ZERO,
            cost: Cost {
                forward_bytes: bytes,
                forward_kernels: 1,
                ..Cost::default()
            },
            compute: DType::Bf16,
            in_backward: true,
        });
    }

    /// Tensors the model's forward hands every checkpointed block in a mutable container (Gemma
    /// 4's `shared_kv_states`): each block's checkpoint keeps the container with its inputs
    /// until its backward, so what a block puts in it lives to the end of backward, where
    /// autograd saves nothing in a checkpointed block's first forward. Held from the stack's
    /// last block on (`Tensor::graph_held`).
    pub fn held_by_checkpoints(&mut self, name: Name, bytes: Bytes) {
        if !self.plan.grad_ckpt || bytes == Bytes::ZERO {
            return;
        }
        let t = self.graph.add_tensor(super::op::Tensor {
            graph_held: true,
            ..super::op::Tensor::new(TensorKind::Activation, bytes)
        });
        self.hold_tensor(name, t, DType::Bf16);
    }

    pub fn end_block(&mut self) {
        self.block = None;
        self.unit = 0;
        self.segment = None;
    }

    pub fn is_base_trainable(&self) -> bool {
        self.trains(ParamRole::Linear)
    }

    /// Whether a base parameter of `role` trains here (the method decides).
    pub(super) fn trains(&self, role: ParamRole) -> bool {
        self.plan.method.trains(
            role,
            crate::spec::plan::Depth {
                layer: self.layer,
                layers: self.layers,
                encoder_layers: self.model.encoder.map_or(0, |e| e.layers),
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::op::Scope;
    use crate::spec::model::{Family, Stack};
    use crate::spec::plan::{AttentionKernel, LoraTargets, Proj};
    use crate::spec::plan::{Lora, Optimizer};

    /// A small Llama-style decoder.
    fn tiny(layers: u64) -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            ..ModelSpec::decoder_only(Family::Llama, 64, 128, Stack::new(layers, 4, 2, 16, 256))
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
            expert_load: 1.0,
            linear_kernel: crate::spec::plan::LinearKernel::Torch,
            parallel: crate::spec::parallel::Parallel::single(),
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
            dora: false,
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
            dora: false,
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
