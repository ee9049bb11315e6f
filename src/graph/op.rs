//! Ops, the tensors they save for backward, the parameters they own, and the [`OpGraph`] that
//! holds them in execution order.
//!
//! petgraph stays private: callers see typed ids and plain structs.

use crate::units::{Bytes, DType, Flops};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use smallvec::SmallVec;

/// An interned name prefix (`decoder.layers.3.self_attn`), one string per module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scope(pub u32);

impl Scope {
    /// A leaf inside this scope.
    pub fn at(self, part: &'static str) -> Name {
        Name {
            scope: self,
            part,
            sub: "",
        }
    }
}

/// An op's or parameter's name without an allocation: scope, module and sub-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Name {
    pub scope: Scope,
    pub part: &'static str,
    pub sub: &'static str,
}

impl Name {
    /// A top-level name (`lm_head`).
    pub fn root(part: &'static str) -> Name {
        Scope(0).at(part)
    }

    /// An op inside this one (`q_proj` -> `q_proj.cast`).
    pub fn then(self, sub: &'static str) -> Name {
        Name { sub, ..self }
    }
}

/// Index of a tensor in [`OpGraph::tensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

/// Index of a parameter in [`OpGraph::params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub u32);

/// What a saved tensor is, for the breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// An activation saved for backward.
    Activation,
    /// A bf16 copy of an fp32 weight made by autocast's cast cache (`torch.autocast` caches casts
    /// of leaf tensors that require grad until the autocast region exits; a saved copy lives on
    /// until its op's backward).
    WeightCopy,
    /// Logits and the loss's saved log-probabilities.
    Logits,
}

/// A tensor that some op keeps for backward.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tensor {
    pub bytes: Bytes,
    pub kind: TensorKind,
    /// Kept by a checkpointed block across its forward (the block input).
    pub checkpoint_input: bool,
    /// Held only by autocast's cast cache, not by autograd: freed when the forward pass ends.
    pub cache_only: bool,
    /// Held by autograd's graph for as long as the graph lives: a leaf that requires grad
    /// (T5's cross-attention zeros under checkpointing) is kept by its `AccumulateGrad` node,
    /// which the loss's `grad_fn` chain references after backward has run, and so is the
    /// `.grad` accumulated into it: to the end of backward. (Then as long as the loss: Hugging
    /// Face's `Trainer` drops it before the optimizer step, `training_step` returning
    /// `loss.detach()`; `measure.py`'s `train_step` keeps it through the step, two such
    /// tensors more there.)
    pub graph_held: bool,
    /// Made by autocast for the one op that reads it, and bound to no Python name: only autograd
    /// keeps it (for that op's backward). In a checkpointed block's first forward, where
    /// non-reentrant checkpointing's pack hook keeps nothing (`torch/utils/checkpoint.py`,
    /// `_checkpoint_hook.pack_hook` returns an empty `_Holder`), it dies when the op returns.
    pub unnamed: bool,
}

impl Tensor {
    /// A tensor that some op keeps, with nothing special about its lifetime.
    pub fn new(kind: TensorKind, bytes: Bytes) -> Tensor {
        Tensor {
            bytes,
            kind,
            checkpoint_input: false,
            cache_only: false,
            graph_held: false,
            unnamed: false,
        }
    }
}

pub use crate::spec::model::ParamRole;

/// One parameter tensor (or a group of identical ones).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Param {
    #[serde(skip)]
    pub name: Name,
    pub elements: u64,
    /// The dtype the module computes with, and so of its gradient and of a gathered copy (NF4
    /// for QLoRA's quantized weights; bf16 under FSDP's mixed-precision policy).
    pub dtype: DType,
    /// The dtype kept between steps: `dtype`, except under FSDP's mixed precision, where the
    /// sharded parameter keeps its original (fp32) dtype and is cast to `dtype` when gathered.
    pub storage: DType,
    /// The sharding unit: 0 for the root (embeddings, final norm, head), `k + 1` for block `k`
    /// (FSDP's `fully_shard` per block; ZeRO-3 gathers per module, grouped the same way).
    pub unit: u32,
    pub trainable: bool,
    pub role: ParamRole,
    /// Extra storage that belongs to the parameter (QLoRA's quantization constants).
    pub extra: Bytes,
    /// Shape as (rows, cols) for matrices; optimizers such as Adafactor factor it.
    pub shape: (u64, u64),
    /// Identical copies this parameter stands for (one per layer of a repeated block).
    pub copies: u64,
    /// The block it belongs to (the first of its run of identical blocks); None outside.
    pub layer: Option<u64>,
    /// Trainable, but no op reads it (LoRA factors on a module whose forward reads only its
    /// base weight): autograd never gives it a gradient, so the optimizer keeps no state for
    /// it and nothing reduces it, though peft counts it as trainable.
    pub idle: bool,
}

impl Param {
    /// Makes this parameter stand for `factor` stacked instances of itself (a mixture-of-
    /// experts layer's experts): elements, extra storage and rows.
    pub fn stack(&mut self, factor: u64) {
        self.elements = self.elements.saturating_mul(factor);
        self.extra = self.extra * factor;
        self.shape.0 = self.shape.0.saturating_mul(factor);
    }

    /// Whether the step updates it: trainable and read by some op.
    pub fn updated(&self) -> bool {
        self.trainable && !self.idle
    }

    /// Storage of one copy, as kept between steps.
    pub fn copy_bytes(&self) -> Bytes {
        self.storage.bytes(self.elements) + self.extra
    }

    /// One copy as the module computes with it (a gathered FSDP unit holds this).
    pub fn compute_bytes(&self) -> Bytes {
        self.dtype.bytes(self.elements) + self.extra
    }

    /// Storage of all copies.
    pub fn bytes(&self) -> Bytes {
        self.copy_bytes() * self.copies
    }

    /// Elements of all copies.
    pub fn count(&self) -> u64 {
        self.elements.saturating_mul(self.copies)
    }

    /// Gradient storage of all copies (gradients take the parameter's dtype; a sharded FSDP
    /// gradient its storage dtype).
    pub fn grad_bytes(&self) -> Bytes {
        self.storage.bytes(self.elements) * self.copies
    }
}

/// Which kind of kernel an op runs; the time model picks its roofline by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// A GEMM on tensor cores.
    Matmul,
    /// Fused attention (flash / memory-efficient) or its eager/math equivalent.
    Attention,
    /// A norm (memory-bound reduction).
    Norm,
    /// Element-wise ops: activations, residual adds, casts, dropout, rotary.
    Elementwise,
    /// Embedding gather.
    Embedding,
    /// Log-softmax and cross-entropy over the vocabulary.
    Loss,
}

/// How an element-wise op's kernels walk memory: PyTorch's TensorIterator picks the loop per
/// call (`gpu_kernel_impl` in aten/src/ATen/native/cuda/CUDALoops.cuh), and the loops sustain
/// different fractions of the copy bandwidth (`validation/kbench-h200.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Contiguous operands of one dtype: `vectorized_elementwise_kernel`, 4- or 8-wide loads.
    #[default]
    Contiguous,
    /// A contiguous copy into a wider dtype (`x.float()` of a bf16 tensor): the dynamic-cast
    /// `unrolled_elementwise_kernel`, one element per load.
    Widening,
    /// A broadcast or strided operand (rotary's `q * cos` on a transposed view, `.contiguous()`
    /// of a transpose): the legacy `elementwise_kernel`, which computes every operand's offset
    /// per element with an `OffsetCalculator`.
    Strided,
    /// Contiguous operands of different dtypes (mixed precision's fp32 residual plus a bf16
    /// branch): TensorIterator casts each element as it loads it, so the vectorized loop is out
    /// and the dynamic-cast `unrolled_elementwise_kernel` runs the binary op.
    Mixed,
}

/// How an attention op reaches its scores, for the time model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionPath {
    /// One fused kernel each way (flash, memory-efficient, cuDNN), causal or unmasked.
    #[default]
    Fused,
    /// A fused kernel that reads a materialised mask (prefix tuning's extended mask): every
    /// score is computed and the mask is read per tile.
    FusedMasked,
    /// A fused kernel that drops attention probabilities: it draws Philox random numbers per
    /// score in both passes.
    FusedDropout,
    /// Op by op (eager, SDPA's math path): the two batched products at the GEMM rate, and the
    /// score matrix's passes (scale, mask, softmax, dropout) through row-wise kernels between
    /// them, one after the other.
    Unfused,
}

/// FLOPs and bytes moved by an op in each pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Cost {
    pub forward_flops: Flops,
    /// Gradient with respect to the op's inputs.
    pub input_grad_flops: Flops,
    /// Gradient with respect to its trainable weights.
    pub weight_grad_flops: Flops,
    /// Bytes read and written in the forward pass.
    pub forward_bytes: Bytes,
    /// Bytes read and written in the backward pass.
    pub backward_bytes: Bytes,
    /// Kernel launches in the forward pass.
    pub forward_kernels: u32,
    /// Kernel launches in the backward pass.
    pub backward_kernels: u32,
    /// The GEMM's smallest dimension (decides tensor-core efficiency); 0 when not a GEMM.
    pub min_dim: u64,
    /// `nn.Module` calls in the forward pass (Python-side hooks and argument handling).
    pub modules: u32,
    /// A GEMM with a dimension that is not a multiple of 8 elements, which 16-bit tensor-core
    /// kernels cannot load with aligned vector accesses.
    pub misaligned: bool,
    /// Python-level `autograd.Function`s whose backward runs Python (bitsandbytes'
    /// `MatMul4Bit`): each costs the host about one `nn.Module` call in backward.
    pub backward_modules: u32,
    /// How an attention op computes (other kinds: `Fused`, unused).
    pub attention: AttentionPath,
    /// The memory path of an element-wise op's forward and backward kernels.
    pub forward_access: Access,
    pub backward_access: Access,
    /// Memory-bound kernels the op launches beside its GEMM.
    pub side: SideKernels,
    /// Each pass's bytes by the loop that moves them, for an op PyTorch runs as a chain of
    /// separate kernels (empty: the op's bytes move at its kind's or access path's one rate).
    pub forward_loops: Loops,
    pub backward_loops: Loops,
}

/// The traffic of a chain of separate memory-bound kernels (transformers' `LlamaRMSNorm` op by
/// op, torch's single-tensor Adafactor step per parameter) by the loop each kernel runs: TensorIterator picks the element-wise loop per call
/// (`gpu_kernel_impl` in aten/src/ATen/native/cuda/CUDALoops.cuh) and reductions run
/// `reduce_kernel` (Reduce.cuh). The loops sustain different rates, so the time model times
/// each part at its own (`time::loops_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Loops {
    /// Contiguous operands of one dtype: `vectorized_elementwise_kernel`.
    pub contiguous: Bytes,
    /// Contiguous copies into a wider dtype: the dynamic-cast `unrolled_elementwise_kernel`.
    pub widening: Bytes,
    /// Products with a broadcast operand (a row's rsqrt, a weight across the rows, mean's
    /// expanded gradient): the legacy `elementwise_kernel`, which computes each operand's
    /// offset per element with an `OffsetCalculator`, so its elements bound it as much as its
    /// bytes. Bytes moved and elements written.
    pub broadcast: Bytes,
    pub broadcast_elements: u64,
    /// Sums and means along each row (the last dimension): bytes read.
    pub row_reduce: Bytes,
    /// Sums over the tokens (a weight's gradient from its broadcast product): bytes read.
    pub token_reduce: Bytes,
}

impl Loops {
    /// Everything the chain reads and writes.
    pub fn bytes(&self) -> Bytes {
        self.contiguous + self.widening + self.broadcast + self.row_reduce + self.token_reduce
    }

    /// `factor` identical chains one after another.
    fn scaled(self, factor: u64) -> Self {
        Self {
            contiguous: self.contiguous * factor,
            widening: self.widening * factor,
            broadcast: self.broadcast * factor,
            broadcast_elements: self.broadcast_elements.saturating_mul(factor),
            row_reduce: self.row_reduce * factor,
            token_reduce: self.token_reduce * factor,
        }
    }
}

/// Bytes moved by the memory-bound kernels a matmul op launches beside its GEMM. Each is a
/// kernel of its own on the same stream, so its time adds to the GEMM's roofline rather than
/// hiding under it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SideKernels {
    /// Autocast's half-precision copy of an fp32 weight before the GEMM (fp32 read, half
    /// written), and a trained weight's gradient cast back to fp32 after it (half read, fp32
    /// written).
    pub forward_cast: Bytes,
    pub backward_cast: Bytes,
    /// bitsandbytes' dequantization of an NF4 weight to the compute dtype before each use
    /// (`kDequantizeBlockwise`: NF4 read, half written), forward and, where the input needs a
    /// gradient, again in backward (`MatMul4Bit.backward`).
    pub forward_dequant: Bytes,
    pub backward_dequant: Bytes,
    /// The output gradient a trained bias's gradient sums over the tokens: `addmm`'s bias
    /// input is broadcast, and its gradient is that sum, a reduction kernel after the GEMMs.
    pub backward_bias_sum: Bytes,
}

impl SideKernels {
    /// `factor` identical ops' side kernels.
    fn scaled(self, factor: u64) -> Self {
        Self {
            forward_cast: self.forward_cast * factor,
            backward_cast: self.backward_cast * factor,
            forward_dequant: self.forward_dequant * factor,
            backward_dequant: self.backward_dequant * factor,
            backward_bias_sum: self.backward_bias_sum * factor,
        }
    }
}

/// One operation of the forward pass, with everything backward will need.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub name: Name,
    pub kind: OpKind,
    /// The block it belongs to, as the first real block of the run it was built for (see
    /// `OpGraph::built_as` for the others it stands for); `None` outside the blocks.
    pub block: Option<u32>,
    /// The checkpointed block this op belongs to, if gradient checkpointing is on.
    pub segment: Option<u32>,
    /// The sharding unit it runs in (see [`Param::unit`]).
    pub unit: u32,
    /// Identical consecutive blocks this op stands for: the ops of layers 1..L-1 are built once
    /// as a template with `repeat = L - 1` (they are the same ops on the same shapes), and the
    /// memory walk and time model account for the copies.
    pub repeat: u32,
    /// Parameters read by the op (a tied weight appears in two ops).
    pub params: SmallVec<[ParamId; 3]>,
    /// Tensors it keeps alive for its backward.
    pub saves: SmallVec<[TensorId; 6]>,
    /// Gradients its backward adds to, for a tensor several ops read (T5's position bias,
    /// which the stack hands every block). Autograd sums them in the `InputBuffer` of the
    /// tensor's producer (or, for a leaf, its `AccumulateGrad`): the sum exists from the
    /// backward of the last op that names it (in forward order) to the backward of the first
    /// (the producer's side), or, `graph_held`, to the end. Never live in forward.
    pub grads: SmallVec<[TensorId; 1]>,
    /// What the Python frames around the op still name while its forward runs, which no op
    /// need keep (`OpGraph::frame`: the block's input, a residual's sum, a sub-layer's input,
    /// a function's locals), and beyond them what only this op's moment sees
    /// (`pinned`: SDPA's operands as its caller names them, CodeGen's and GPT-J's rotary locals
    /// at the attention core). The walk counts those not already held ([`OpGraph::named`]).
    pub frame: u32,
    pub pinned: SmallVec<[TensorId; 4]>,
    /// Its output's bytes, and so those of the gradient backward hands it (zero for markers
    /// that make nothing).
    pub out: Bytes,
    /// Memory live only while its forward runs (unsaved outputs, casts, scratch).
    pub forward_transient: Bytes,
    /// How that differs when a checkpointed block reruns its forward in backward: what is
    /// part of `forward_transient` in the first forward only (what other blocks left the
    /// frames holding), and what the rerun adds (saves the walk charges to the op in a
    /// checkpointed block's first forward and deducts from its transient, held in the rerun).
    pub first_forward_only: Bytes,
    pub rerun_only: Bytes,
    /// Memory live only while its backward runs (incoming and outgoing gradients, scratch).
    pub backward_transient: Bytes,
    /// Whether backward reaches this op at all (false before the first trainable op).
    pub in_backward: bool,
    pub cost: Cost,
    /// The dtype its matmuls run in (for the time model).
    pub compute: DType,
}

/// The op graph of one training step: ops in forward execution order, each linked to the op
/// that consumes its output. petgraph holds the topology; node `i` is `ops[i]`.
#[derive(Debug, Clone)]
pub struct OpGraph {
    graph: DiGraph<(), ()>,
    ops: Vec<Op>,
    pub tensors: Vec<Tensor>,
    /// For each tensor, how many ops the graph held when it was made: the index of the op that
    /// produces it (builders make an op's output just before they push the op).
    born: Vec<u32>,
    pub params: Vec<Param>,
    /// Interned scope strings; scope 0 is the model root.
    scopes: Vec<String>,
    /// First tensor id created inside each checkpointed block (by segment id): a block's
    /// recomputation concerns the tensors it creates, not those it reads from outside.
    segment_tensors: Vec<u32>,
    /// For each block (numbered across the encoder, then the decoder), the block that was built
    /// for it: the first of its run of identical blocks.
    pub built_as: Vec<u64>,
    /// Module buffers resident beside the weights, not parameters (GPTBigCode's causal-mask
    /// table): replicated on every rank, never trained.
    pub buffers: Bytes,
    /// The sets of tensors the Python frames name, as the builder entered them (`Op::frame`);
    /// frame 0 names nothing.
    frames: Vec<SmallVec<[TensorId; 8]>>,
}

impl Default for OpGraph {
    fn default() -> OpGraph {
        OpGraph {
            graph: DiGraph::with_capacity(2048, 2048),
            ops: Vec::with_capacity(2048),
            tensors: Vec::with_capacity(4096),
            born: Vec::with_capacity(4096),
            params: Vec::with_capacity(1024),
            scopes: vec![String::new()],
            segment_tensors: Vec::new(),
            built_as: Vec::new(),
            buffers: Bytes::ZERO,
            frames: vec![SmallVec::new()],
        }
    }
}

impl OpGraph {
    /// Records a set of names the frames hold; ops refer to it by the id returned.
    pub fn add_frame(&mut self, names: SmallVec<[TensorId; 8]>) -> u32 {
        self.frames.push(names);
        u32::try_from(self.frames.len() - 1).unwrap_or(0)
    }

    /// The tensors frame `id` names.
    pub fn frame(&self, id: u32) -> &[TensorId] {
        self.frames.get(id as usize).map_or(&[], |f| f.as_slice())
    }

    /// Everything named while `op`'s forward runs: its frame's names, then its own.
    pub fn named<'a>(&'a self, op: &'a Op) -> impl Iterator<Item = TensorId> + 'a {
        self.frame(op.frame).iter().chain(&op.pinned).copied()
    }

    /// How many parameters `op`'s autograd node saves through `save_for_backward`, which
    /// saved-tensor hooks (non-reentrant checkpointing's pack hook) see: every parameter it
    /// reads where backward reaches it (a frozen linear saves its weight for its input's
    /// gradient, a norm its weight), none for a 4-bit linear: bitsandbytes' `MatMul4Bit` is a
    /// Python `autograd.Function` that keeps its weight as a `ctx` attribute and runs its
    /// matmul with grad mode off.
    pub fn packed_params(&self, op: &Op) -> usize {
        let four_bit = op
            .params
            .iter()
            .any(|&p| self.param(p).dtype == crate::units::DType::Nf4);
        if op.in_backward && !four_bit {
            op.params.len()
        } else {
            0
        }
    }

    /// Records that checkpointed block `segment` starts now.
    pub fn begin_segment(&mut self, segment: u32) {
        let first = self.tensors.len() as u32;
        let i = segment as usize;
        if self.segment_tensors.len() <= i {
            self.segment_tensors.resize(i + 1, first);
        }
        self.segment_tensors[i] = first;
    }

    /// Whether `t` was created inside checkpointed block `segment` (and so is dropped after its
    /// forward and recomputed before its backward).
    pub fn created_in(&self, segment: Option<u32>, t: TensorId) -> bool {
        segment
            .and_then(|s| self.segment_tensors.get(s as usize))
            .is_some_and(|&first| t.0 >= first)
    }

    /// Interns `parent.child`.
    pub fn scope(&mut self, parent: Scope, child: &str) -> Scope {
        let base = &self.scopes[parent.0 as usize];
        let s = if base.is_empty() {
            child.to_string()
        } else {
            format!("{base}.{child}")
        };
        self.scopes.push(s);
        Scope((self.scopes.len() - 1) as u32)
    }

    /// The dotted name.
    pub fn name(&self, n: Name) -> String {
        [self.scopes[n.scope.0 as usize].as_str(), n.part, n.sub]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".")
    }

    pub fn add_tensor(&mut self, tensor: Tensor) -> TensorId {
        self.tensors.push(tensor);
        self.born.push(self.ops.len() as u32);
        TensorId((self.tensors.len() - 1) as u32)
    }

    /// The index of the op that produces `t` (see `born`).
    pub fn producer(&self, t: TensorId) -> usize {
        self.born[t.0 as usize] as usize
    }

    /// Records op `op` as the one that completes `t`: a sum that several ops add into, made
    /// before the first of them.
    pub fn set_producer(&mut self, t: TensorId, op: usize) {
        if let Some(born) = self.born.get_mut(t.0 as usize) {
            *born = op as u32;
        }
    }

    pub fn add_param(&mut self, param: Param) -> ParamId {
        self.params.push(param);
        ParamId((self.params.len() - 1) as u32)
    }

    /// Appends an op after the previous one, which feeds it.
    pub fn push(&mut self, op: Op) -> usize {
        let node = self.graph.add_node(());
        if node.index() > 0 {
            self.graph
                .add_edge(NodeIndex::new(node.index() - 1), node, ());
        }
        self.ops.push(op);
        self.ops.len() - 1
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Ops in forward execution order.
    pub fn ops(&self) -> std::slice::Iter<'_, Op> {
        self.ops.iter()
    }

    /// Where the graph stands (ops, tensors, parameters), for [`OpGraph::scale_since`].
    pub fn mark(&self) -> (usize, usize, usize) {
        (self.ops.len(), self.tensors.len(), self.params.len())
    }

    /// Makes everything added since `mark` stand for `factor` identical instances that run one
    /// after another (a mixture-of-experts layer's experts): their tensors, parameters, FLOPs,
    /// bytes moved (side kernels' and chains' too) and kernel launches count `factor` times, while each op's transient
    /// buffers stay those of one instance. Keeps a layer of many experts a handful of ops.
    pub fn scale_since(&mut self, (ops, tensors, params): (usize, usize, usize), factor: u64) {
        let f = factor.max(1);
        let k = u32::try_from(f).unwrap_or(u32::MAX);
        for t in &mut self.tensors[tensors..] {
            t.bytes = t.bytes * f;
        }
        for p in &mut self.params[params..] {
            p.stack(f);
        }
        for o in &mut self.ops[ops..] {
            let c = &mut o.cost;
            c.forward_flops = Flops(c.forward_flops.0 * f as f64);
            c.input_grad_flops = Flops(c.input_grad_flops.0 * f as f64);
            c.weight_grad_flops = Flops(c.weight_grad_flops.0 * f as f64);
            c.forward_bytes = c.forward_bytes * f;
            c.backward_bytes = c.backward_bytes * f;
            c.side = c.side.scaled(f);
            c.forward_loops = c.forward_loops.scaled(f);
            c.backward_loops = c.backward_loops.scaled(f);
            c.forward_kernels = c.forward_kernels.saturating_mul(k);
            c.backward_kernels = c.backward_kernels.saturating_mul(k);
            c.modules = c.modules.saturating_mul(k);
        }
    }

    pub fn op(&self, index: usize) -> Option<&Op> {
        self.ops.get(index)
    }

    pub fn op_mut(&mut self, index: usize) -> Option<&mut Op> {
        self.ops.get_mut(index)
    }

    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id.0 as usize]
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.0 as usize]
    }

    /// Bytes each sharding unit holds when gathered (one copy of a repeated block), by unit id:
    /// what an FSDP/ZeRO-3 all-gather brings in.
    pub fn unit_bytes(&self) -> Vec<Bytes> {
        let units = self.ops().map(|o| o.unit).max().unwrap_or(0) as usize + 1;
        let mut bytes = vec![Bytes::ZERO; units];
        for p in &self.params {
            if let Some(b) = bytes.get_mut(p.unit as usize) {
                *b += p.compute_bytes();
            }
        }
        bytes
    }

    /// Checks the invariants every consumer relies on: the graph is acyclic and every edge points
    /// forward in execution order, every id refers to an existing tensor or parameter, and a
    /// checkpointed block's ops are contiguous.
    pub fn verify(&self) -> Result<(), String> {
        if self.graph.node_count() != self.ops.len() {
            return Err("op graph and op list disagree".into());
        }
        // Every edge pointing forward in execution order also proves the graph acyclic (and,
        // unlike a recursive cycle search, needs no stack depth proportional to the model).
        for edge in self.graph.raw_edges() {
            if edge.source().index() >= edge.target().index() {
                return Err("an edge points backwards in execution order".into());
            }
        }
        let mut seen_segments = std::collections::HashSet::new();
        let mut last_segment = None;
        for op in self.ops() {
            for t in &op.saves {
                if t.0 as usize >= self.tensors.len() {
                    return Err(format!(
                        "op `{}` saves a tensor that does not exist",
                        self.name(op.name)
                    ));
                }
            }
            for p in &op.params {
                if p.0 as usize >= self.params.len() {
                    return Err(format!(
                        "op `{}` uses a parameter that does not exist",
                        self.name(op.name)
                    ));
                }
            }
            if op.segment != last_segment {
                if let Some(s) = op.segment
                    && !seen_segments.insert(s)
                {
                    return Err(format!("checkpoint segment {s} is not contiguous"));
                }
                last_segment = op.segment;
            }
        }
        Ok(())
    }
}

/// Parameter counts of a graph: (total, base model without a method's additions, trainable).
pub fn counts(graph: &OpGraph) -> (u64, u64, u64) {
    let (mut total, mut base, mut trainable) = (0u64, 0u64, 0u64);
    for p in &graph.params {
        total = total.saturating_add(p.count());
        if p.role != ParamRole::Adapter {
            base = base.saturating_add(p.count());
        }
        if p.trainable {
            trainable = trainable.saturating_add(p.count());
        }
    }
    (total, base, trainable)
}
