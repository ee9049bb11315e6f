//! Peak memory of a training step, by walking the op graph as PyTorch's allocator sees it.
//!
//! Forward: every op's saved tensors become live (shared tensors once) and its transient
//! outputs are live while it runs. Backward, in reverse: a checkpointed block's saved tensors
//! come back when backward enters it (recomputation), each trainable parameter's gradient is
//! allocated when its op's backward runs and stays until `zero_grad(set_to_none=True)`, and a
//! saved tensor is freed once the earliest op that saved it has run backward. The optimizer step
//! then holds parameters, gradients, states and its own temporaries. The peak is the largest
//! total over all of these moments, which is what `torch.cuda.max_memory_allocated` reports.

use crate::graph::op::{Name, Op, OpGraph, OpKind, Param, ParamId, TensorId, TensorKind};
use crate::shard::Layout;
use crate::spec::hardware::Hardware;
use crate::spec::parallel::Offload;
use crate::spec::plan::Plan;
use crate::units::Bytes;
use serde::Serialize;

/// Memory by what it holds, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// Parameters, trainable and frozen, in their storage dtypes.
    pub weights: Bytes,
    /// Gradients of trainable parameters.
    pub gradients: Bytes,
    /// Optimizer states.
    pub optimizer: Bytes,
    /// Saved activations, including autocast's bf16 weight copies.
    pub activations: Bytes,
    /// Logits and loss tensors (saved and transient).
    pub logits: Bytes,
    /// Transient buffers of the running op, optimizer-step temporaries and cuBLAS workspaces.
    pub temporary: Bytes,
}

impl Breakdown {
    pub fn total(&self) -> Bytes {
        self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.temporary
    }
}

/// Which phase of the step a moment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Forward,
    /// A checkpointed block's forward, rerun in backward.
    Recompute,
    Backward,
    OptimizerStep,
}

impl Phase {
    /// The phase as a report names it.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Recompute => "recompute",
            Phase::Backward => "backward",
            Phase::OptimizerStep => "optimizer step",
        }
    }
}

/// The result of the walk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// The breakdown at the peak moment.
    pub at_peak: Breakdown,
    pub peak: Bytes,
    pub peak_phase: Phase,
    /// The op running at the peak (or "optimizer.step").
    pub peak_op: String,
    /// Saved activations when the forward pass ends (what one more in-flight pipeline
    /// micro-batch adds).
    pub saved_after_forward: Bytes,
    /// Weights and optimizer states: what stays between steps.
    pub persistent: Bytes,
    /// Weights, gradients and optimizer states this GPU keeps (its shards), without transient
    /// gathers and buckets: the ZeRO paper's "model states" (Rajbhandari et al. 2020, sec. 3).
    pub model_states: Bytes,
    /// Host memory per node that offload uses (zero without offload).
    pub host: Bytes,
    pub total_params: u64,
    /// Parameters of the base model (what the model card states), without a method's additions.
    pub base_params: u64,
    pub trainable_params: u64,
    /// CUDA context and allocator headroom, outside `max_memory_allocated`.
    pub overhead: Bytes,
    /// Optimizer states in CUDA unified memory (paged optimizers): in neither `peak` nor
    /// `required`, since the driver can evict them to host memory.
    pub paged: Bytes,
    /// The part of `paged` with no room beside `required` on the device: evicted to the host
    /// and paged back for every optimizer step (set by the estimate, which knows the device).
    pub paged_evicted: Bytes,
    /// Peak plus overhead: what the device must hold.
    pub required: Bytes,
}

/// Fraction of the peak kept free for the caching allocator's fragmentation (its reserved
/// memory exceeds what is allocated by the slack of partly used segments).
pub const ALLOCATOR_SLACK: f64 = 0.05;

/// Walks the graph and returns the peak and its breakdown.
pub fn estimate(graph: &OpGraph, plan: &Plan, hardware: &Hardware) -> MemoryEstimate {
    let params: Vec<_> = graph.params.iter().collect();
    let trainable: Vec<_> = params.iter().copied().filter(|p| p.updated()).collect();
    let layout = Layout::new(graph, plan);
    let states = layout.optimizer_states(plan, &trainable);
    let all_grads: Bytes = trainable.iter().map(|p| p.grad_bytes()).sum();
    let full_weights: Bytes = params.iter().map(|p| p.bytes()).sum();
    let weights = if layout.offload == Offload::Params {
        // The sharded parameters live on the host; units are copied up to be gathered.
        Bytes::ZERO
    } else {
        full_weights.div_ceil(layout.params_div)
    } + graph.buffers;
    let states_on_gpu = if layout.offload == Offload::None {
        states.div_ceil(layout.optimizer_div)
    } else {
        Bytes::ZERO
    };
    // bitsandbytes' paged optimizers allocate their large states with `cudaMallocManaged`
    // (`F.get_paged`): outside PyTorch's caching allocator, so outside its peak; resident on
    // the GPU while there is room, evicted page by page to host memory when there is not.
    let (states_on_gpu, paged) = if plan.optimizer.paged() {
        let paged = crate::optimizer::paged_state_bytes(plan.optimizer, &trainable)
            .div_ceil(layout.optimizer_div)
            .min(states_on_gpu);
        (states_on_gpu - paged, paged)
    } else {
        (states_on_gpu, Bytes::ZERO)
    };
    let ddp_buckets = layout.ddp_buckets(all_grads);
    // One cuBLAS workspace per (thread, stream): the forward thread and autograd's device thread.
    let workspace = hardware.cublas_workspace * 2;

    let ops: Vec<_> = graph.ops().collect();
    // The earliest op saving each tensor frees it in backward; the earliest adding to an
    // accumulated gradient (`Op::grads`) ends it there.
    let mut first_saver = vec![usize::MAX; graph.tensors.len()];
    for (i, op) in ops.iter().enumerate() {
        for &t in op.saves.iter().chain(&op.grads) {
            let f = &mut first_saver[t.0 as usize];
            *f = (*f).min(i);
        }
    }

    let mut walk = Walk {
        graph,
        live: vec![false; graph.tensors.len()],
        live_act: Bytes::ZERO,
        live_logits: Bytes::ZERO,
        grads: Bytes::ZERO,
        pending: Bytes::ZERO,
        pending_ids: Vec::new(),
        copy_start_pending: Vec::new(),
        best: None,
        best_total: Bytes::ZERO,
        base: Breakdown {
            weights,
            optimizer: states_on_gpu,
            temporary: workspace,
            ..Breakdown::default()
        },
        base_total: weights + states_on_gpu + workspace,
        local: None,
        reducing: false,
        gathered: Bytes::ZERO,
        held_units: Bytes::ZERO,
        reduce_buffer: Bytes::ZERO,
    };
    walk.gathered = layout.root_gathered();

    // Forward. A repeated block (`Op::repeat`) is walked once; each of its other copies adds
    // what one copy leaves held, and its peak is that of the last copy.
    let mut segment_start = 0;
    let mut cache_copies = Bytes::ZERO;
    // The last block unit whose forward ran (its all-gather output outlives it).
    let mut previous_unit = 0;
    let mut i = 0;
    while i < ops.len() {
        let end = group_end(&ops, i);
        let copies = u64::from(ops[i].repeat);
        let before = walk.state();
        walk.local = (copies > 1).then_some([None, None]);
        for k in i..end {
            let op = ops[k];
            if k == 0 || ops[k - 1].unit != op.unit {
                if k > 0 && ops[k - 1].unit > 0 {
                    previous_unit = ops[k - 1].unit;
                }
                walk.gathered = layout.forward_gathered(op.unit, previous_unit);
            }
            let (mut act_t, logit_t) = split_transient(op.kind, op.forward_transient);
            for &t in &op.saves {
                // A checkpointed block's first forward keeps nothing for backward: what only
                // autograd would keep lives while the op that reads it runs.
                if op.segment.is_some() && graph.tensor(t).unnamed {
                    act_t += walk.unheld(t);
                    continue;
                }
                walk.hold(t);
            }
            act_t += graph.named(op).map(|t| walk.unheld(t)).sum();
            walk.observe(Phase::Forward, Some(op.name), act_t, logit_t);
            if op.segment.is_some() && (k == 0 || ops[k - 1].segment != op.segment) {
                segment_start = k;
            }
            if ops.get(k + 1).is_none_or(|n| n.unit != op.unit) {
                // Leaving a unit: it is resharded, or (SHARD_GRAD_OP) stays gathered until its
                // backward.
                walk.held_units += layout.kept_after_forward(op.unit);
            }
            let segment_ends =
                op.segment.is_some() && ops.get(k + 1).map(|n| n.segment) != Some(op.segment);
            if segment_ends {
                // Checkpointing drops the block's saved activations, keeping its input;
                // autocast's cache keeps the weight copies until the autocast region exits.
                // (Segments are contiguous: `OpGraph::verify`.)
                for o in &ops[segment_start..=k] {
                    for &t in &o.saves {
                        let tensor = graph.tensor(t);
                        if graph.created_in(op.segment, t)
                            && !tensor.checkpoint_input
                            && tensor.kind != TensorKind::WeightCopy
                        {
                            walk.release(t);
                        }
                    }
                }
            }
        }
        if copies > 1 {
            // Cache-held weight copies of the other copies go when autocast exits.
            let cached: Bytes = ops[i..end]
                .iter()
                .flat_map(|o| o.saves.iter().map(move |&t| (o.segment, t)))
                .filter(|&(segment, t)| walk.live[t.0 as usize] && is_cache_held(graph, segment, t))
                .map(|(_, t)| graph.tensor(t).bytes)
                .sum();
            cache_copies += cached * (copies - 1);
            walk.repeat(before, copies - 1, &[], 0);
        }
        i = end;
    }
    // Autocast exits: copies held only by the cache (checkpointed blocks, ops autograd does not
    // record) go.
    let cached: Vec<TensorId> = ops
        .iter()
        .flat_map(|o| o.saves.iter().map(move |&t| (o.segment, t)))
        .filter(|&(segment, t)| is_cache_held(graph, segment, t))
        .map(|(_, t)| t)
        .collect();
    for t in cached {
        walk.release(t);
    }
    walk.live_act = walk.live_act - cache_copies;
    let saved_after_forward = walk.live_act + walk.live_logits;

    // Backward, in reverse; a repeated block again once, its copies accounted for.
    let mut held = vec![HeldGrad::None; graph.params.len()];
    // Gradients produced inside the unit whose backward is running (reduced when it ends).
    let mut unit_grads: Vec<ParamId> = Vec::new();
    // The checkpointed block whose forward was last rerun.
    let mut rerun = None;
    let mut order = BlockOrder::new(graph, &layout, &ops, &first_saver, &walk.live);
    let mut end = ops.len();
    while end > 0 {
        let start = group_start(&ops, end - 1);
        let copies = u64::from(ops[end - 1].repeat);
        order.enter(&mut walk, ops[end - 1].block, copies.max(1));
        let before = walk.state();
        walk.local = (copies > 1).then_some([None, None]);
        walk.copy_start_pending.clone_from(&walk.pending_ids);
        for i in (start..end).rev() {
            let op = ops[i];
            if i + 1 == ops.len() || ops[i + 1].unit != op.unit {
                walk.gathered = layout.backward_gathered(i, op.unit);
            }
            // The root reduces once, when backward ends (FSDP2's root post-backward).
            let unit_starts = i == 0 || (op.unit > 0 && ops[i - 1].unit != op.unit);
            if !op.in_backward {
                if unit_starts {
                    walk.finish_unit(&layout, i, op.unit, &mut unit_grads);
                }
                continue;
            }
            // A checkpointed block's forward is rerun when backward first unpacks one of its
            // saved tensors, at the last op of the block that saves one. The ops after it are
            // the residual and branch sums, whose backward hands its incoming gradient on
            // without a copy: the rerun is walked before them, so that their pending sums
            // (aliases of that gradient) are not yet counted beside it.
            if op.segment.is_some() && op.segment != rerun {
                let seg_start = ops[..i]
                    .iter()
                    .rposition(|o| o.segment != op.segment)
                    .map_or(0, |p| p + 1);
                if let Some(trigger) = ops[seg_start..=i].iter().rposition(|o| walk.restores(o)) {
                    walk.recompute(&ops[seg_start..=seg_start + trigger]);
                }
                rerun = op.segment;
            }
            let mut transient = op.backward_transient;
            // The gradients the op's backward makes for the parameters it reads, and (below)
            // those made in the matmul's dtype and cast back to the parameter's.
            let mut new_grads = Bytes::ZERO;
            let mut half_grads = Bytes::ZERO;
            for &p in &op.params {
                let param = graph.param(p);
                if !param.trainable {
                    continue;
                }
                if op.kind == OpKind::Matmul && op.compute != param.dtype {
                    half_grads += op.compute.bytes(param.elements);
                }
                // One copy's gradient; a repeated block's other copies are added after it.
                let bytes = param.dtype.bytes(param.elements);
                match held[p.0 as usize] {
                    HeldGrad::None => {
                        new_grads += bytes;
                        unit_grads.push(p);
                        held[p.0 as usize] = HeldGrad::first_from(op, param);
                    }
                    HeldGrad::Fresh => {
                        // A tied weight's next gradient is computed, then added into the one held.
                        transient += bytes;
                    }
                    HeldGrad::View => {
                        // Added out of place: the sum is a third gradient-sized tensor beside the
                        // two, and a fresh one that later gradients are added into.
                        transient += bytes * 2;
                        held[p.0 as usize] = HeldGrad::Fresh;
                    }
                }
            }
            let last_use =
                |t: &TensorId| first_saver[t.0 as usize] == i && !graph.tensor(*t).graph_held;
            if half_grads > Bytes::ZERO {
                // Under autocast the matmul's node (`MmBackward`) makes the weight's gradient in
                // its own dtype, beside its incoming gradient and its saved tensors (the weight's
                // cast copy among them); the cast back to the fp32 parameter is a node of its
                // own (`ToCopyBackward`), which runs after the matmul's node has released its
                // saved tensors and its incoming gradient (`Node::release_variables`; the
                // engine frees a node's inputs once it has run). A CPU trace of GPT-2's tied LM
                // head shows the two moments: 77 MB of bf16 gradient beside the 77 MB weight
                // copy and the logits' gradient, then beside the fp32 gradient alone.
                let (act_t, logit_t) = split_transient(op.kind, transient + half_grads);
                walk.observe(Phase::Backward, Some(op.name), act_t, logit_t);
                for &t in op.saves.iter().filter(|t| last_use(t)) {
                    walk.release(t);
                }
                transient = transient - op.out;
            }
            walk.grads += new_grads;
            let (act_t, logit_t) = split_transient(op.kind, transient + half_grads);
            walk.observe(Phase::Backward, Some(op.name), act_t, logit_t);
            // Its contribution to an accumulated gradient exists once its backward is done;
            // the earliest contributor's backward passes the sum on.
            for &g in &op.grads {
                walk.accumulate(g);
            }
            for &t in op.saves.iter().filter(|t| last_use(t)) {
                walk.release(t);
            }
            for &g in op.grads.iter().filter(|t| last_use(t)) {
                walk.settle(g);
            }
            if unit_starts {
                walk.finish_unit(&layout, i, op.unit, &mut unit_grads);
            }
        }
        if copies > 1 {
            let offsets = order.copy_offsets();
            let last_prefetch = layout.last_copy_prefetch_change(ops[end - 1].unit);
            walk.repeat(before, copies - 1, &offsets, last_prefetch);
        }
        end = start;
    }
    order.enter(&mut walk, None, 1);
    // Whatever a frozen prefix saved and never freed is gone by now, and so is what the graph
    // held (the training loop has dropped the loss: `Tensor::graph_held`).
    walk.live.iter_mut().for_each(|l| *l = false);
    walk.live_act = Bytes::ZERO;
    walk.live_logits = Bytes::ZERO;
    walk.pending = Bytes::ZERO;
    walk.pending_ids.clear();

    walk.gathered = Bytes::ZERO;
    walk.held_units = Bytes::ZERO;
    walk.reduce_buffer = Bytes::ZERO;

    // Optimizer step: parameters, this rank's gradients, states and step temporaries.
    walk.grads = all_grads.div_ceil(layout.grads_div) + ddp_buckets;
    let step_temp = if layout.offload == Offload::None {
        layout.step_temporary(plan, &trainable)
    } else {
        // ZeRO-Offload steps on the CPU.
        Bytes::ZERO
    };
    walk.observe(Phase::OptimizerStep, None, step_temp, Bytes::ZERO);

    let (at_peak, peak_phase, peak_name) = walk.best.unwrap_or((walk.base, Phase::Forward, None));
    let peak_op = peak_name.map_or_else(|| "optimizer.step".to_string(), |n| graph.name(n));
    let peak = at_peak.total();
    let slack = Bytes((peak.0 as f64 * ALLOCATOR_SLACK) as u64);
    let overhead = hardware.context + slack;
    MemoryEstimate {
        at_peak,
        peak,
        peak_phase,
        peak_op,
        saved_after_forward,
        persistent: weights + states_on_gpu,
        model_states: weights + states_on_gpu + layout.kept_grads(all_grads),
        host: layout.host_bytes(
            full_weights,
            states,
            trainable.iter().map(|p| p.count()).sum(),
        ),
        total_params: params.iter().map(|p| p.count()).sum(),
        base_params: params
            .iter()
            .filter(|p| p.role != crate::graph::op::ParamRole::Adapter)
            .map(|p| p.count())
            .sum(),
        trainable_params: params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.count())
            .sum(),
        overhead,
        required: peak + overhead,
        paged,
        paged_evicted: Bytes::ZERO,
    }
}

/// The gradient autograd holds for a parameter while backward runs, before `.grad` takes it: a
/// tied weight's gradients from its several readers are summed in the engine's `InputBuffer`.
///
/// `InputBuffer::accumulate` (torch/csrc/autograd/input_buffer.cpp) adds in place only into a
/// gradient it holds the last reference to (`can_accumulate_inplace`). A weight read by a matmul
/// in its own dtype (pure bf16 or fp32, or FSDP's gathered bf16 copy) gets its gradient as the
/// transpose view of the matmul's product (F.linear's `mm_mat2_backward`, then `TBackward`), and
/// the first sum into it is out of place. Under autocast the gradient passes through the cast's
/// backward (`ToCopyBackward`), a fresh tensor, and sums go into it in place. On real CPU tensors
/// the profiler shows `aten::add` for the first case and `aten::add_` for the second (a tied
/// Llama at toy widths; `validation/peak_live.py` says how the replays follow this).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HeldGrad {
    None,
    Fresh,
    View,
}

impl HeldGrad {
    /// The first gradient of `param`, computed by `op`.
    fn first_from(op: &Op, param: &Param) -> HeldGrad {
        if op.kind == OpKind::Matmul && op.compute == param.dtype {
            HeldGrad::View
        } else {
            HeldGrad::Fresh
        }
    }
}

/// Whether two ops belong to one repeated run: a block built once for its copies, whose ops
/// share its copy count and its sharding unit (two neighbouring runs with the same count are
/// two blocks).
fn same_run(a: &Op, b: &Op) -> bool {
    a.repeat == b.repeat && a.unit == b.unit
}

/// End (exclusive) of the run of ops that share `ops[i]`'s repeat count (1: just `i`).
fn group_end(ops: &[&Op], i: usize) -> usize {
    if ops[i].repeat <= 1 {
        return i + 1;
    }
    let mut e = i + 1;
    while e < ops.len() && same_run(ops[e], ops[i]) {
        e += 1;
    }
    e
}

/// Start of the run of ops that share `ops[i]`'s repeat count (walking backwards).
fn group_start(ops: &[&Op], i: usize) -> usize {
    if ops[i].repeat <= 1 {
        return i;
    }
    let mut s = i;
    while s > 0 && same_run(ops[s - 1], ops[i]) {
        s -= 1;
    }
    s
}

/// The model's order of blocks against the walk's. A hybrid's blocks are built once per kind
/// and grouped (`arch.rs`: Gemma-2's local and global layers, LFM2's convolutions and
/// attention), so the walk's backward runs one kind's blocks all together, while autograd runs
/// each block's backward in the model's order. When the walk reaches a group, the model, at
/// that group's last block (the first to run backward), still holds what every block below it
/// keeps after the forward, whatever its kind, and has made the gradients of the blocks above
/// it only; the walk has released what the groups it walked keep and made their gradients,
/// all their blocks'. The difference, per group, is what each block of another group keeps
/// (its checkpoint inputs, or every tensor it saved) less its gradients, times how many of that
/// group's blocks lie on the wrong side: walked already but below, or not yet walked but above.
struct BlockOrder {
    groups: Vec<Group>,
    /// The group the walk is in, the gradients when it entered, and the offset applied for it
    /// (activations added and taken, gradients taken and added).
    current: Option<u32>,
    entered: (Bytes, u64),
    applied: [Bytes; 4],
}

struct Group {
    /// The first block it was built for, and every block it stands for.
    first: u32,
    blocks: Vec<u32>,
    /// What one of its blocks keeps after the forward.
    keeps: Bytes,
    /// One block's gradients: as the walk made them, once walked; before, what the layout
    /// leaves of the trainable parameters' gradients after a block's backward.
    grads: Bytes,
    walked: bool,
}

impl BlockOrder {
    fn new(
        graph: &OpGraph,
        layout: &Layout,
        ops: &[&Op],
        first_saver: &[usize],
        live: &[bool],
    ) -> BlockOrder {
        let mut groups: Vec<Group> = Vec::new();
        for op in ops {
            let Some(b) = op.block else { continue };
            if groups.last().is_none_or(|g| g.first != b) {
                let blocks = (0..graph.built_as.len() as u32)
                    .filter(|&l| graph.built_as[l as usize] == u64::from(b))
                    .collect();
                groups.push(Group {
                    first: b,
                    blocks,
                    keeps: Bytes::ZERO,
                    grads: Bytes::ZERO,
                    walked: false,
                });
            }
        }
        // Groups in the model's order (every block of one below every block of the next: no
        // hybrid, or one kind after another) walk as the model runs: nothing to correct.
        let in_order = groups.windows(2).all(|w| {
            let low = w[0].blocks.iter().max();
            let high = w[1].blocks.iter().min();
            low.zip(high).is_none_or(|(l, h)| l < h)
        });
        if in_order {
            groups.clear();
        } else {
            // One block's trainable parameters' gradients once its backward has ended (a shard
            // where the layout reduce-scatters per unit), by the group that first reads them.
            let mut seen = vec![false; graph.params.len()];
            for op in ops {
                let Some(g) = op
                    .block
                    .and_then(|b| groups.iter_mut().find(|g| g.first == b))
                else {
                    continue;
                };
                for &p in &op.params {
                    let param = graph.param(p);
                    if param.trainable && !std::mem::replace(&mut seen[p.0 as usize], true) {
                        g.grads += layout.grad_after_unit(param);
                    }
                }
            }
            // One block's tensors still held after the forward, by the group of their first
            // saver.
            for (t, &f) in first_saver.iter().enumerate() {
                if f == usize::MAX || !live[t] {
                    continue;
                }
                if let Some(b) = ops[f].block
                    && let Some(g) = groups.iter_mut().find(|g| g.first == b)
                {
                    g.keeps += graph.tensors[t].bytes;
                }
            }
        }
        BlockOrder {
            groups,
            current: None,
            entered: (Bytes::ZERO, 1),
            applied: [Bytes::ZERO; 4],
        }
    }

    /// The backward moves into the group of `block` (copies of it at once), or out of the
    /// blocks.
    fn enter(&mut self, walk: &mut Walk, block: Option<u32>, copies: u64) {
        if block == self.current {
            return;
        }
        let (grads_before, walked_copies) = self.entered;
        if let Some(g) = self
            .groups
            .iter_mut()
            .find(|g| Some(g.first) == self.current)
        {
            g.walked = true;
            g.grads = Bytes(walk.grads.0.saturating_sub(grads_before.0) / walked_copies.max(1));
        }
        let [added, taken, grads_taken, grads_added] = self.applied;
        walk.live_act = walk.live_act + taken - added;
        walk.grads = walk.grads + grads_taken - grads_added;
        self.current = block;
        self.applied = [Bytes::ZERO; 4];
        let Some(top) = self.blocks().and_then(|b| b.iter().max().copied()) else {
            return;
        };
        self.applied = self.offset(top);
        let [added, taken, grads_taken, grads_added] = self.applied;
        walk.live_act = walk.live_act + added - taken;
        walk.grads = walk.grads + grads_added - grads_taken;
        self.entered = (walk.grads, copies);
    }

    /// The blocks the current group stands for.
    fn blocks(&self) -> Option<&[u32]> {
        let b = self.current?;
        self.groups
            .iter()
            .find(|g| g.first == b)
            .map(|g| g.blocks.as_slice())
    }

    /// At block `at` of the current group: what the other groups' blocks on the wrong side of
    /// it change (activations added, taken; gradients taken, added).
    fn offset(&self, at: u32) -> [Bytes; 4] {
        let mut out = [Bytes::ZERO; 4];
        for g in &self.groups {
            if Some(g.first) == self.current {
                continue;
            }
            let wrong = g
                .blocks
                .iter()
                .filter(|&&l| if g.walked { l < at } else { l > at })
                .count() as u64;
            if g.walked {
                out[0] += g.keeps * wrong;
                out[2] += g.grads * wrong;
            } else {
                out[1] += g.keeps * wrong;
                out[3] += g.grads * wrong;
            }
        }
        out
    }

    /// For the current group's other blocks, in the order their backward runs (from the top
    /// down), how their offsets differ from the first's: (activations, gradients).
    fn copy_offsets(&self) -> Vec<(i128, i128)> {
        let Some(blocks) = self.blocks() else {
            return Vec::new();
        };
        let mut order = blocks.to_vec();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let net = |o: [Bytes; 4]| {
            (
                i128::from(o[0].0) - i128::from(o[1].0),
                i128::from(o[3].0) - i128::from(o[2].0),
            )
        };
        let Some(&top) = order.first() else {
            return Vec::new();
        };
        let first = net(self.offset(top));
        order[1..]
            .iter()
            .map(|&l| {
                let o = net(self.offset(l));
                (o.0 - first.0, o.1 - first.1)
            })
            .collect()
    }
}

/// A weight copy that only autocast's cache holds past its block (freed when autocast exits).
fn is_cache_held(graph: &OpGraph, segment: Option<u32>, t: TensorId) -> bool {
    let tensor = graph.tensor(t);
    tensor.kind == TensorKind::WeightCopy && (segment.is_some() || tensor.cache_only)
}

/// Transient memory counts as logits for the loss and LM head, as temporary elsewhere.
fn split_transient(kind: OpKind, bytes: Bytes) -> (Bytes, Bytes) {
    match kind {
        OpKind::Loss => (Bytes::ZERO, bytes),
        OpKind::Matmul
        | OpKind::Attention
        | OpKind::Norm
        | OpKind::Elementwise
        | OpKind::Embedding => (bytes, Bytes::ZERO),
    }
}

/// A moment of the walk: what is live, in which phase, at which op.
type Moment = (Breakdown, Phase, Option<Name>);

struct Walk<'g> {
    graph: &'g OpGraph,
    live: Vec<bool>,
    live_act: Bytes,
    live_logits: Bytes,
    grads: Bytes,
    /// Accumulated gradients of tensors several ops read, or waiting for their producer's
    /// backward (`Op::grads`): their bytes, and which they are.
    pending: Bytes,
    pending_ids: Vec<TensorId>,
    /// Those pending when the repeated block being walked began its backward.
    copy_start_pending: Vec<TensorId>,
    best: Option<Moment>,
    best_total: Bytes,
    base: Breakdown,
    base_total: Bytes,
    /// While walking a repeated block: its own best moment (compared across copies afterwards)
    /// and the pending gradients then (their bytes, and those the copy began); one among its
    /// ops, one while it reduces (which frees the previous copy's reduce-scatter input first, so
    /// later copies do not run it beside that level).
    local: Option<[Option<LocalMoment>; 2]>,
    /// The moment being observed is a unit's reduction (`Walk::observe_reduce`).
    reducing: bool,
    /// Gathered (unsharded) parameters of the units running now and prefetched: a level.
    gathered: Bytes,
    /// Units kept gathered from their forward to their backward (SHARD_GRAD_OP): cumulative.
    held_units: Bytes,
    /// The last unit's reduce-scatter buffer, freed when the next one is issued: a level.
    reduce_buffer: Bytes,
}

/// A repeated block's highest moment in the copy walked, with its pending gradients' bytes and
/// those of them the copy began.
type LocalMoment = (Moment, Bytes, Vec<TensorId>);

/// Live totals at a moment, to measure what one copy of a block changes.
#[derive(Clone, Copy)]
struct State {
    act: Bytes,
    logits: Bytes,
    grads: Bytes,
    held: Bytes,
    reduce: Bytes,
}

/// `base + k * (now - before)` per field, clamped at zero.
fn extend(base: Bytes, before: Bytes, now: Bytes, k: u64) -> Bytes {
    let d = i128::from(now.0) - i128::from(before.0);
    Bytes((i128::from(base.0) + d * i128::from(k)).clamp(0, i128::from(u64::MAX)) as u64)
}

impl Walk<'_> {
    /// `t`'s bytes where nothing holds it: what it adds to a moment it is alive at.
    fn unheld(&self, t: TensorId) -> Bytes {
        if self.live[t.0 as usize] {
            Bytes::ZERO
        } else {
            self.graph.tensor(t).bytes
        }
    }

    fn hold(&mut self, t: TensorId) {
        if !std::mem::replace(&mut self.live[t.0 as usize], true) {
            let tensor = self.graph.tensor(t);
            match tensor.kind {
                TensorKind::Logits => self.live_logits += tensor.bytes,
                TensorKind::Activation | TensorKind::WeightCopy => self.live_act += tensor.bytes,
            }
        }
    }

    /// An op's backward has added to the gradient autograd accumulates for `t`.
    fn accumulate(&mut self, t: TensorId) {
        if !std::mem::replace(&mut self.live[t.0 as usize], true) {
            self.pending += self.graph.tensor(t).bytes;
            self.pending_ids.push(t);
        }
    }

    /// The accumulated gradient for `t` has been passed on.
    fn settle(&mut self, t: TensorId) {
        if std::mem::replace(&mut self.live[t.0 as usize], false) {
            self.pending = self.pending - self.graph.tensor(t).bytes;
            if let Some(at) = self.pending_ids.iter().position(|&p| p == t) {
                self.pending_ids.swap_remove(at);
            }
        }
    }

    fn release(&mut self, t: TensorId) {
        if std::mem::replace(&mut self.live[t.0 as usize], false) {
            let tensor = self.graph.tensor(t);
            match tensor.kind {
                TensorKind::Logits => self.live_logits = self.live_logits - tensor.bytes,
                TensorKind::Activation | TensorKind::WeightCopy => {
                    self.live_act = self.live_act - tensor.bytes
                }
            }
        }
    }

    fn state(&self) -> State {
        State {
            act: self.live_act,
            logits: self.live_logits,
            grads: self.grads,
            held: self.held_units,
            reduce: self.reduce_buffer,
        }
    }

    /// After walking one copy of a block that stands for `1 + more` copies: the other copies
    /// change the live totals by the same amount each, so the block's highest moment is in its
    /// first copy (when one copy lowers the total) or its last (when it raises it). In
    /// backward, every copy after the first also runs beside the reduce-scatter input the copy
    /// before it left (a level: FSDP2 frees it when the next unit's reduce-scatter is issued),
    /// which the first copy ran without when the unit before it reduces nothing (the root).
    ///
    /// Under FSDP the last copy prefetches the unit below the block, the others another copy
    /// (`last_prefetch`: how much more the last one gathers).
    fn repeat(&mut self, before: State, more: u64, offsets: &[(i128, i128)], last_prefetch: i128) {
        let now = self.state();
        let slots = self.local.take().unwrap_or_default();
        for (slot, reducing) in slots.into_iter().zip([false, true]) {
            let Some(((b, phase, name), pending, begun)) = slot else {
                continue;
            };
            // What was pending at the moment is, in a later copy, what is pending when this
            // copy ends (a level the copies share: T5's position-bias gradient, which every
            // block adds to) plus the gradients this copy began and passed on before it ended
            // (the residual stream's, whose MLP share waits for the input norm's backward),
            // which every copy holds at the same moment of its own.
            let own: Bytes = begun
                .iter()
                .filter(|t| !self.live[t.0 as usize])
                .map(|&t| self.graph.tensor(t).bytes)
                .sum();
            let delta = i128::from(now.act.0)
                + i128::from(now.logits.0)
                + i128::from(now.grads.0)
                + i128::from(now.held.0)
                - i128::from(before.act.0)
                - i128::from(before.logits.0)
                - i128::from(before.grads.0)
                - i128::from(before.held.0);
            // The reduce-scatter input a later copy runs beside, except while it reduces.
            let reduce = |j: u64| if reducing { 0 } else { j.min(1) };
            let shift = |x: Bytes, by: i128| {
                Bytes((i128::from(x.0) + by).clamp(0, i128::from(u64::MAX)) as u64)
            };
            let prefetch = |j: u64| if j == more { last_prefetch } else { 0 };
            // Copy `k` after the first, its activations and gradients shifted by `act` and
            // `grads`: it runs beside all of the accumulated gradients the first one made.
            let copy = |k: u64, act: i128, grads: i128| Breakdown {
                activations: shift(
                    extend(b.activations, before.act, now.act, k) + self.pending + own - pending,
                    act,
                ),
                logits: extend(b.logits, before.logits, now.logits, k),
                gradients: shift(extend(b.gradients, before.grads, now.grads, k), grads),
                weights: shift(extend(b.weights, before.held, now.held, k), prefetch(k)),
                temporary: extend(b.temporary, before.reduce, now.reduce, reduce(k)),
                ..b
            };
            // The highest of copies 2 ..= 1 + more: the last if each copy adds, else the second;
            // the one before the last too where the last prefetches less.
            let last = if delta > 0 { more } else { more.min(1) };
            let before_last = if delta > 0 && last_prefetch < 0 {
                more - 1
            } else {
                0
            };
            let mut candidate = b;
            // Copies whose place in the model differs from the first's (a hybrid's blocks of
            // one kind, interleaved with another's: `BlockOrder`) each get their own moment.
            let placed = offsets
                .iter()
                .enumerate()
                .map(|(j, &(act, grads))| copy(j as u64 + 1, act, grads));
            let plain = [last, before_last]
                .into_iter()
                .filter(|&k| k > 0)
                .map(|k| copy(k, 0, 0));
            for c in plain.chain(placed) {
                if c.total() > candidate.total() {
                    candidate = c;
                }
            }
            if self.best.is_none() || candidate.total() > self.best_total {
                self.best_total = candidate.total();
                self.best = Some((candidate, phase, name));
            }
        }
        self.local = None;
        self.live_act = extend(now.act, before.act, now.act, more);
        self.live_logits = extend(now.logits, before.logits, now.logits, more);
        self.grads = extend(now.grads, before.grads, now.grads, more);
        self.held_units = extend(now.held, before.held, now.held, more);
    }

    /// A unit's backward has ended: its gradients are reduced. A sharding engine reduce-scatters
    /// them (the unsharded gradients go, this rank's shard stays, the reduce buffer lives until
    /// the next unit's is issued) and reshards the unit.
    ///
    /// FSDP2's post-backward (`FSDPParamGroup.post_backward`, `foreach_reduce` in
    /// `_fsdp_collectives.py`) first reshards the unit, then frees the previous unit's
    /// reduce-scatter input, allocates this unit's (fp32, every gradient of the unit) and copies
    /// the gradients into it; only after the copy-in are the unsharded gradients freed. That
    /// moment holds a unit's gradients twice over, in their dtype and in fp32: for a root with
    /// a large untied vocabulary (embedding and head), more than any block's backward.
    fn finish_unit(&mut self, layout: &Layout, index: usize, unit: u32, grads: &mut Vec<ParamId>) {
        let (unsharded, kept, buffer) = layout.reduce(self.graph, unit, grads);
        self.held_units = self.held_units - layout.kept_after_forward(unit);
        if buffer > Bytes::ZERO && layout.copies_in_before_freeing() {
            let gathered = self.gathered;
            self.gathered = layout.gathered_after_backward(index, unit);
            self.reduce_buffer = buffer;
            self.observe_reduce("reduce_scatter_copy_in");
            // Then the reduce-scatter writes this rank's shard in fp32 beside its input, and a
            // 16-bit parameter's gradient is cast from it (`_to_dtype_if_needed`): the input,
            // the fp32 shard and its cast at once, after the unsharded gradients have gone.
            // Above the copy-in only over few ranks (4/N + 2/N > 2 bytes a bf16 parameter: N = 2).
            let output = Bytes(buffer.0.div_ceil(layout.grads_div));
            if kept != output {
                let grads = self.grads;
                self.grads = self.grads - unsharded + kept;
                self.reduce_buffer = buffer + output;
                self.observe_reduce("reduce_scatter");
                self.grads = grads;
            }
            self.gathered = gathered;
        }
        self.grads = self.grads - unsharded + kept;
        if buffer > Bytes::ZERO {
            self.reduce_buffer = buffer;
        }
    }

    /// Whether a checkpointed block's rerun must reach `op`: it keeps a tensor its block made,
    /// which the rerun makes again, or it packs a parameter it reads (a frozen linear saves only
    /// its weight, for its input's gradient; a norm its weight). Checkpointing's early stop
    /// counts every packed tensor, parameters included: the rerun ends when its count reaches
    /// the forward's (`recomp_counter` against `weak_holders`, `torch/utils/checkpoint.py`), so
    /// a block whose last saving op is a frozen `down_proj` reruns up to it
    /// (`OpGraph::packed_params`).
    fn restores(&self, op: &Op) -> bool {
        self.graph.packed_params(op) > 0 || op.saves.iter().any(|&t| self.restored(op.segment, t))
    }

    fn restored(&self, segment: Option<u32>, t: TensorId) -> bool {
        self.graph.created_in(segment, t) && !self.graph.tensor(t).cache_only
    }

    /// A checkpointed block's forward, rerun when backward first unpacks one of its saved
    /// tensors (non-reentrant checkpointing, `torch/utils/checkpoint.py`): at the backward of
    /// the block's last op that saves one, a packed parameter included (`restores`;
    /// `segment`'s last op here, the trigger), whose
    /// output's gradient waits meanwhile. Its saved tensors come back one op at a time, each
    /// op's forward transients and what the frames around it name (`OpGraph::named`) beside
    /// them. The rerun stops as soon as the trigger packs its saved inputs, before it makes
    /// its output (checkpointing's early stop, on by default: `_StopRecomputationError` from
    /// the pack hook, which autograd's generated code calls before the kernel).
    fn recompute(&mut self, segment: &[&Op]) {
        let graph = self.graph;
        let Some(trigger) = segment.last() else {
            return;
        };
        // The gradient of the block's output (its input's shape) waits, and so does the
        // trigger's own where it is another tensor: where the trigger ends a branch the block
        // sums (its output has the block output's size), the sums hand that same gradient down.
        let output = segment
            .first()
            .and_then(|o| o.saves.first())
            .map(|&t| graph.tensor(t))
            .filter(|t| t.checkpoint_input)
            .map_or(Bytes::ZERO, |t| t.bytes);
        let waiting = if trigger.out == output {
            output
        } else {
            output + trigger.out
        };
        for (k, o) in segment.iter().enumerate() {
            for &t in &o.saves {
                if self.restored(o.segment, t) {
                    self.hold(t);
                }
            }
            let mut transient = o.forward_transient + o.rerun_only - o.first_forward_only;
            if k + 1 == segment.len() {
                transient = transient - o.out;
            }
            let (act_t, logit_t) = split_transient(o.kind, transient);
            let named: Bytes = graph.named(o).map(|t| self.unheld(t)).sum();
            self.observe(
                Phase::Recompute,
                Some(o.name),
                act_t + named + waiting,
                logit_t,
            );
        }
    }

    /// A moment of a unit's reduction, after the previous unit's reduce-scatter input is freed.
    fn observe_reduce(&mut self, part: &'static str) {
        self.reducing = true;
        self.observe(
            Phase::Backward,
            Some(Name::root(part)),
            Bytes::ZERO,
            Bytes::ZERO,
        );
        self.reducing = false;
    }

    fn observe(&mut self, phase: Phase, op: Option<Name>, temporary: Bytes, logits: Bytes) {
        // Compare totals first; build the breakdown only for a new maximum (hot loop).
        let comm = self.gathered + self.held_units + self.reduce_buffer;
        let total = self.base_total
            + self.grads
            + self.pending
            + self.live_act
            + self.live_logits
            + logits
            + temporary
            + comm;
        let now = Breakdown {
            weights: self.base.weights + self.gathered + self.held_units,
            gradients: self.grads,
            activations: self.live_act + self.pending,
            logits: self.live_logits + logits,
            temporary: self.base.temporary + temporary + self.reduce_buffer,
            ..self.base
        };
        if let Some(local) = &mut self.local {
            let slot = &mut local[usize::from(self.reducing)];
            if slot.as_ref().is_none_or(|((b, ..), ..)| total > b.total()) {
                let begun = self
                    .pending_ids
                    .iter()
                    .copied()
                    .filter(|t| !self.copy_start_pending.contains(t))
                    .collect();
                *slot = Some(((now, phase, op), self.pending, begun));
            }
            return;
        }
        if self.best.is_some() && total <= self.best_total {
            return;
        }
        self.best_total = total;
        self.best = Some((now, phase, op));
    }
}
