//! Peak memory of a training step, by walking the op graph as PyTorch's allocator sees it.
//!
//! Forward: every op's saved tensors become live (shared tensors once) and its transient
//! outputs are live while it runs. Backward, in reverse: a checkpointed block's saved tensors
//! come back when backward enters it (recomputation), each trainable parameter's gradient is
//! allocated when its op's backward runs and stays until `zero_grad(set_to_none=True)`, and a
//! saved tensor is freed once the earliest op that saved it has run backward. The optimizer step
//! then holds parameters, gradients, states and its own temporaries. The peak is the largest
//! total over all of these moments, which is what `torch.cuda.max_memory_allocated` reports.

use crate::graph::op::{Name, OpGraph, OpKind, TensorId, TensorKind};
use crate::optimizer;
use crate::spec::hardware::Hardware;
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
    Backward,
    OptimizerStep,
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
    /// Weights and optimizer states: what stays between steps.
    pub persistent: Bytes,
    pub total_params: u64,
    /// Parameters of the base model (what the model card states), without a method's additions.
    pub base_params: u64,
    pub trainable_params: u64,
    /// CUDA context and allocator headroom, outside `max_memory_allocated`.
    pub overhead: Bytes,
    /// Peak plus overhead: what the device must hold.
    pub required: Bytes,
}

/// Fraction of the peak kept free for the caching allocator's fragmentation (its reserved
/// memory exceeds what is allocated by the slack of partly used segments).
pub const ALLOCATOR_SLACK: f64 = 0.05;

/// Walks the graph and returns the peak and its breakdown.
pub fn estimate(graph: &OpGraph, plan: &Plan, hardware: &Hardware) -> MemoryEstimate {
    let params: Vec<_> = graph.params.iter().collect();
    let trainable: Vec<_> = params.iter().copied().filter(|p| p.trainable).collect();
    let weights: Bytes = params.iter().map(|p| p.bytes()).sum();
    let states = optimizer::state_bytes(plan.optimizer, &trainable);
    let all_grads: Bytes = trainable.iter().map(|p| p.dtype.bytes(p.elements)).sum();
    // DDP's reducer copies gradients into flat buckets (gradient_as_bucket_view=False).
    let ddp_buckets = if plan.gpus > 1 {
        all_grads
    } else {
        Bytes::ZERO
    };
    // One cuBLAS workspace per (thread, stream): the forward thread and autograd's device thread.
    let workspace = hardware.cublas_workspace * 2;

    let ops: Vec<_> = graph.ops().collect();
    // The earliest op saving each tensor frees it in backward.
    let mut first_saver = vec![usize::MAX; graph.tensors.len()];
    for (i, op) in ops.iter().enumerate() {
        for &t in &op.saves {
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
        best: None,
        best_total: Bytes::ZERO,
        base: Breakdown {
            weights,
            optimizer: states,
            temporary: workspace,
            ..Breakdown::default()
        },
        base_total: weights + states + workspace,
    };

    // Forward.
    let mut segment_start = 0;
    for (i, op) in ops.iter().enumerate() {
        for &t in &op.saves {
            walk.hold(t);
        }
        let (act_t, logit_t) = split_transient(op.kind, op.forward_transient);
        walk.observe(Phase::Forward, Some(op.name), act_t, logit_t);
        if op.segment.is_some() && (i == 0 || ops[i - 1].segment != op.segment) {
            segment_start = i;
        }
        let segment_ends =
            op.segment.is_some() && ops.get(i + 1).map(|n| n.segment) != Some(op.segment);
        if segment_ends {
            // Checkpointing drops the block's saved activations, keeping its input; autocast's
            // cache keeps the weight copies until the autocast region exits. (Segments are
            // contiguous: `OpGraph::verify`.)
            for o in &ops[segment_start..=i] {
                for &t in &o.saves {
                    let tensor = graph.tensor(t);
                    if !tensor.checkpoint_input && tensor.kind != TensorKind::WeightCopy {
                        walk.release(t);
                    }
                }
            }
        }
    }
    // Autocast exits: copies held only by the cache (checkpointed blocks, ops autograd does not
    // record) go.
    let cached: Vec<TensorId> = ops
        .iter()
        .flat_map(|o| o.saves.iter().map(move |&t| (o.segment, t)))
        .filter(|&(segment, t)| {
            let tensor = graph.tensor(t);
            tensor.kind == TensorKind::WeightCopy && (segment.is_some() || tensor.cache_only)
        })
        .map(|(_, t)| t)
        .collect();
    for t in cached {
        walk.release(t);
    }

    // Backward.
    let mut has_grad = vec![false; graph.params.len()];
    let mut current_segment = None;
    for (i, op) in ops.iter().enumerate().rev() {
        if !op.in_backward {
            continue;
        }
        if op.segment.is_some() && op.segment != current_segment {
            // Recompute the block's forward: its saved tensors come back.
            let start = ops[..i]
                .iter()
                .rposition(|o| o.segment != op.segment)
                .map_or(0, |p| p + 1);
            for o in &ops[start..=i] {
                for &t in o.saves.iter().filter(|&&t| !graph.tensor(t).cache_only) {
                    walk.hold(t);
                }
            }
        }
        current_segment = op.segment;
        let mut transient = op.backward_transient;
        for &p in &op.params {
            let param = graph.param(p);
            if !param.trainable {
                continue;
            }
            let bytes = param.dtype.bytes(param.elements);
            if !std::mem::replace(&mut has_grad[p.0 as usize], true) {
                walk.grads += bytes;
            } else {
                // A tied weight's second gradient is computed, then accumulated into `.grad`.
                transient += bytes;
            }
        }
        let (act_t, logit_t) = split_transient(op.kind, transient);
        walk.observe(Phase::Backward, Some(op.name), act_t, logit_t);
        for &t in &op.saves {
            if first_saver[t.0 as usize] == i {
                walk.release(t);
            }
        }
    }
    // Whatever a frozen prefix saved and never freed is gone by now.
    walk.live.iter_mut().for_each(|l| *l = false);
    walk.live_act = Bytes::ZERO;
    walk.live_logits = Bytes::ZERO;

    // Optimizer step: parameters, all gradients, states and step temporaries.
    walk.grads = all_grads + ddp_buckets;
    let step_temp = optimizer::step_temporary(plan.optimizer, &trainable);
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
        persistent: weights + states,
        total_params: params.iter().map(|p| p.elements).sum(),
        base_params: params
            .iter()
            .filter(|p| p.role != crate::graph::op::ParamRole::Adapter)
            .map(|p| p.elements)
            .sum(),
        trainable_params: trainable.iter().map(|p| p.elements).sum(),
        overhead,
        required: peak + overhead,
    }
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

struct Walk<'g> {
    graph: &'g OpGraph,
    live: Vec<bool>,
    live_act: Bytes,
    live_logits: Bytes,
    grads: Bytes,
    best: Option<(Breakdown, Phase, Option<Name>)>,
    best_total: Bytes,
    base: Breakdown,
    base_total: Bytes,
}

impl Walk<'_> {
    fn hold(&mut self, t: TensorId) {
        if !std::mem::replace(&mut self.live[t.0 as usize], true) {
            let tensor = self.graph.tensor(t);
            match tensor.kind {
                TensorKind::Logits => self.live_logits += tensor.bytes,
                TensorKind::Activation | TensorKind::WeightCopy => self.live_act += tensor.bytes,
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

    fn observe(&mut self, phase: Phase, op: Option<Name>, temporary: Bytes, logits: Bytes) {
        // Compare totals first; build the breakdown only for a new maximum (hot loop).
        let total =
            self.base_total + self.grads + self.live_act + self.live_logits + logits + temporary;
        if self.best.is_some() && total <= self.best_total {
            return;
        }
        let now = Breakdown {
            gradients: self.grads,
            activations: self.live_act,
            logits: self.live_logits + logits,
            temporary: self.base.temporary + temporary,
            ..self.base
        };
        self.best_total = total;
        self.best = Some((now, phase, op));
    }
}
