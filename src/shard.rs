//! What the parallel layout does to one GPU's memory, as data the memory walk reads: the divisor
//! of each model state, the size of each sharding unit when gathered, which unit is prefetched
//! while another runs, and what an engine allocates to reduce a unit's gradients.
//!
//! Sources, per engine:
//! - ZeRO stages 1-3 (Rajbhandari et al. 2020, sec. 5): optimizer states, then gradients, then
//!   parameters partitioned over the data-parallel ranks. DeepSpeed's bf16 mode runs a bf16
//!   module and keeps fp32 master weights beside the fp32 Adam states in its optimizer
//!   (`stage_1_and_2.py`: `single_partition_of_fp32_groups`; `stage3.py`:
//!   `fp32_partitioned_groups_flat`), whose step first makes an fp32 copy of the gradient
//!   partition. Gradients are reduced in buckets of `reduce_bucket_size` (default 5e8 elements).
//! - FSDP2 (`torch.distributed.fsdp.fully_shard`, `_fsdp_param_group.py`, `_fsdp_collectives.py`):
//!   each block is a unit; its sharded parameters keep their dtype; `MixedPrecisionPolicy
//!   (param_dtype=bf16)` all-gathers a bf16 copy for the unit's forward and again for its
//!   backward (resharding in between unless SHARD_GRAD_OP). The root unit (embeddings, final
//!   norm, head) is not resharded after forward, since backward needs it at once. Backward
//!   prefetches the next unit's all-gather while one runs. When a unit's backward ends, its
//!   gradients are cast to `reduce_dtype` (fp32) into the reduce-scatter input, which lives until
//!   the next unit's reduce-scatter is issued; the rank keeps a sharded gradient in the
//!   parameter's dtype.

use crate::graph::op::{OpGraph, Param, ParamId};
use crate::optimizer;
use crate::spec::parallel::{Engine, Offload};
use crate::spec::plan::Plan;
use crate::units::{Bytes, DType};

/// DeepSpeed's default `reduce_bucket_size` (elements).
pub const ZERO_REDUCE_BUCKET: u64 = 500_000_000;

/// One GPU's view of the layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub params_div: u64,
    pub grads_div: u64,
    pub optimizer_div: u64,
    pub offload: Offload,
    engine: Engine,
    /// Whether units are gathered to run (parameters sharded).
    gathers: bool,
    /// FULL_SHARD (and ZeRO-3) reshard a unit after its forward; SHARD_GRAD_OP keeps it.
    reshard_after_forward: bool,
    /// Gradients reduced per unit during backward (reduce-scatter), leaving a shard.
    reduces_per_unit: bool,
    /// A 16-bit module under DeepSpeed: fp32 master weights and fp32 states.
    master_weights: bool,
    /// Gathered bytes of one copy of each unit (index: unit id; 0 is the root).
    unit_bytes: Vec<Bytes>,
    /// For each op (forward order): the gathered bytes of the unit backward runs next after the
    /// op's own unit, which backward prefetches. A repeated block's walked copy stands for the
    /// first of its copies to run backward, whose next is another copy of the same unit.
    prefetch: Vec<Bytes>,
    /// Per unit of a repeated block: how much larger the last copy's prefetch (the unit before
    /// the block in the model) is than the other copies' (another copy of the block).
    last_copy_prefetch: Vec<i128>,
    ranks_per_node: u64,
    /// Data-parallel replicas.
    replicas: u64,
}

impl Layout {
    pub fn new(graph: &OpGraph, plan: &Plan) -> Layout {
        let p = &plan.parallel;
        let (params_div, grads_div, optimizer_div) = p.divisors();
        let shards = p.engine.shards();
        let unit_bytes = graph.unit_bytes();
        // The block unit that runs before each op's unit in forward order runs after it in
        // backward.
        let mut prefetch = Vec::with_capacity(graph.len());
        let mut last_copy_prefetch = vec![0i128; unit_bytes.len()];
        let mut last_block = 0u32;
        let mut previous_block = 0u32;
        for op in graph.ops() {
            if op.unit != last_block && op.unit > 0 {
                previous_block = last_block;
                last_block = op.unit;
            }
            let next = if op.unit > 0 {
                previous_block
            } else {
                last_block
            };
            let before = unit_bytes[next as usize] * u64::from(next > 0);
            if op.repeat > 1 && op.unit > 0 {
                // Llama-2's layers 1-31 (layer 0 is built apart) prefetch one another, and so do
                // GLM-4.5's MoE layers above its dense first layer, whose own prefetch is the
                // dense layer's smaller unit.
                let own = unit_bytes[op.unit as usize];
                last_copy_prefetch[op.unit as usize] = i128::from(before.0) - i128::from(own.0);
                prefetch.push(own);
            } else {
                prefetch.push(before);
            }
        }
        Layout {
            params_div,
            grads_div,
            optimizer_div,
            offload: p.offload,
            engine: p.engine,
            gathers: shards.parameters,
            reshard_after_forward: p.engine != Engine::FsdpGradOp,
            reduces_per_unit: shards.gradients,
            master_weights: p.engine.is_zero()
                && graph
                    .params
                    .iter()
                    .any(|q| q.trainable && q.storage.bits() == 16),
            unit_bytes,
            prefetch,
            last_copy_prefetch,
            ranks_per_node: p.gpus_per_node.min(p.gpus).max(1),
            replicas: p.dp(),
        }
    }

    fn unit(&self, unit: u32) -> Bytes {
        self.unit_bytes
            .get(unit as usize)
            .copied()
            .unwrap_or(Bytes::ZERO)
    }

    /// The root unit, gathered from the first op until backward ends.
    pub fn root_gathered(&self) -> Bytes {
        if self.gathers {
            self.unit(0)
        } else {
            Bytes::ZERO
        }
    }

    /// Gathered parameters while `unit`'s forward runs, `previous` being the last block unit
    /// whose forward has run (0: none yet).
    ///
    /// FSDP2 copies a unit's all-gather output out into its unsharded parameters and, in
    /// forward, defers freeing that output (`FSDPParamGroup.wait_for_unshard` keeps it in
    /// `comm_ctx.all_gather_state`) until the next unit's forward copies out its own, or the
    /// root's post-forward frees the last one: every unit's forward runs beside its own
    /// all-gather output, and the root's ops beside the last one's (the LM head and the loss,
    /// which a Hugging Face model computes inside its forward, beside the last block's).
    pub fn forward_gathered(&self, unit: u32, previous: u32) -> Bytes {
        if !self.gathers {
            return Bytes::ZERO;
        }
        let own = if unit > 0 {
            self.unit(unit)
        } else {
            Bytes::ZERO
        };
        let deferred = if !self.engine.is_fsdp() {
            Bytes::ZERO
        } else if unit > 0 {
            self.unit(unit)
        } else {
            self.unit(previous)
        };
        self.unit(0) + own + deferred
    }

    /// Gathered parameters while the backward of op `index` (in `unit`) runs: the root, the unit
    /// itself and the next unit's prefetched all-gather (SHARD_GRAD_OP's units are held anyway).
    pub fn backward_gathered(&self, index: usize, unit: u32) -> Bytes {
        if !self.gathers {
            return Bytes::ZERO;
        }
        if !self.reshard_after_forward {
            return self.unit(0);
        }
        let own = if unit > 0 {
            self.unit(unit)
        } else {
            Bytes::ZERO
        };
        self.unit(0) + own + self.prefetch.get(index).copied().unwrap_or(Bytes::ZERO)
    }

    /// How much more the last copy of a repeated block (`unit`) has prefetched in its backward
    /// than the copy the walk went through (negative: less).
    pub fn last_copy_prefetch_change(&self, unit: u32) -> i128 {
        if !self.gathers || !self.reshard_after_forward {
            return 0;
        }
        self.last_copy_prefetch
            .get(unit as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Gathered parameters once `unit`'s post-backward has resharded it (FSDP2 reshards a unit
    /// after its backward in either mode, before it reduces): the root and the next unit's
    /// prefetched all-gather while a block finishes, nothing once the root does.
    pub fn gathered_after_backward(&self, index: usize, unit: u32) -> Bytes {
        if !self.gathers || unit == 0 {
            return Bytes::ZERO;
        }
        if !self.reshard_after_forward {
            return self.unit(0);
        }
        self.unit(0) + self.prefetch.get(index).copied().unwrap_or(Bytes::ZERO)
    }

    /// Whether a unit's gradients are copied into its reduce-scatter input before they are
    /// freed (FSDP2's `foreach_reduce`), so that both exist at once. DeepSpeed's ZeRO copies
    /// each gradient into its bucket as backward makes it.
    pub fn copies_in_before_freeing(&self) -> bool {
        self.reduces_per_unit && self.engine.is_fsdp()
    }

    /// What stays gathered once `unit`'s forward ends (SHARD_GRAD_OP keeps block units).
    pub fn kept_after_forward(&self, unit: u32) -> Bytes {
        if self.gathers && !self.reshard_after_forward && unit > 0 {
            self.unit(unit)
        } else {
            Bytes::ZERO
        }
    }

    /// Reduces the gradients of `unit` among `pending` (removing them): the unsharded bytes
    /// that go, this rank's shard that stays, and the reduce buffer.
    pub fn reduce(
        &self,
        graph: &OpGraph,
        unit: u32,
        pending: &mut Vec<ParamId>,
    ) -> (Bytes, Bytes, Bytes) {
        if !self.reduces_per_unit {
            pending.retain(|&p| graph.param(p).unit != unit);
            return (Bytes::ZERO, Bytes::ZERO, Bytes::ZERO);
        }
        let (mut unsharded, mut kept, mut elements) = (Bytes::ZERO, Bytes::ZERO, 0u64);
        pending.retain(|&id| {
            let p = graph.param(id);
            if p.unit != unit {
                return true;
            }
            unsharded += p.dtype.bytes(p.elements);
            kept += self.grad_after_unit(p);
            elements = elements.saturating_add(p.elements);
            false
        });
        let buffer = if self.engine.is_fsdp() {
            // FSDP2's reduce-scatter input in `reduce_dtype` (fp32).
            DType::F32.bytes(elements)
        } else {
            // DeepSpeed's reduce bucket in the module's dtype.
            DType::Bf16.bytes(elements.min(ZERO_REDUCE_BUCKET))
        };
        (unsharded, kept, buffer)
    }

    /// What this rank keeps of `p`'s gradient once its unit's backward has ended: the shard a
    /// per-unit reduce-scatter leaves (in the parameter's storage dtype), else the whole
    /// gradient as backward made it.
    pub fn grad_after_unit(&self, p: &Param) -> Bytes {
        if self.reduces_per_unit {
            p.storage.bytes(p.elements).div_ceil(self.grads_div)
        } else {
            p.dtype.bytes(p.elements)
        }
    }

    /// Optimizer states for all ranks together (divide by `optimizer_div` for one rank),
    /// DeepSpeed's fp32 master weights included.
    pub fn optimizer_states(&self, plan: &Plan, trainable: &[&Param]) -> Bytes {
        if !self.master_weights {
            return optimizer::state_bytes(plan.optimizer, trainable);
        }
        let fp32: Vec<Param> = trainable
            .iter()
            .map(|p| Param {
                storage: DType::F32,
                ..(*p).clone()
            })
            .collect();
        let refs: Vec<&Param> = fp32.iter().collect();
        let master: Bytes = fp32
            .iter()
            .map(|p| DType::F32.bytes(p.elements) * p.copies)
            .sum();
        optimizer::state_bytes(plan.optimizer, &refs) + master
    }

    /// What the optimizer step allocates on one rank.
    pub fn step_temporary(&self, plan: &Plan, trainable: &[&Param]) -> Bytes {
        let own = optimizer::step_temporary(plan.optimizer, trainable).div_ceil(self.optimizer_div);
        if self.master_weights {
            // DeepSpeed's step casts the gradient partition to fp32 first.
            let elements: u64 = trainable.iter().map(|p| p.count()).sum();
            own + DType::F32.bytes(elements).div_ceil(self.optimizer_div)
        } else {
            own
        }
    }

    /// DDP's reducer copies every gradient into flat buckets (`gradient_as_bucket_view=False`)
    /// when there is more than one replica; the sharding engines reduce through their own
    /// buffers instead.
    pub fn ddp_buckets(&self, all_grads: Bytes) -> Bytes {
        if self.engine == Engine::Ddp && self.replicas > 1 {
            all_grads
        } else {
            Bytes::ZERO
        }
    }

    /// Gradients one rank keeps between backward and the step.
    pub fn kept_grads(&self, all: Bytes) -> Bytes {
        all.div_ceil(self.grads_div)
    }

    /// Host memory per node used by offload: each rank's optimizer states (and fp32 gradient
    /// partition, which ZeRO-Offload's CPU Adam reads), and with `params` its parameter shard.
    pub fn host_bytes(&self, weights: Bytes, states: Bytes, trainable_elements: u64) -> Bytes {
        let grads = DType::F32
            .bytes(trainable_elements)
            .div_ceil(self.grads_div);
        let per_rank = match self.offload {
            Offload::None => return Bytes::ZERO,
            Offload::Optimizer => states.div_ceil(self.optimizer_div) + grads,
            Offload::Params => {
                states.div_ceil(self.optimizer_div) + grads + weights.div_ceil(self.params_div)
            }
        };
        per_rank * self.ranks_per_node
    }
}
