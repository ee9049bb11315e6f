//! The step as a dataflow DAG of compute and communication: each unit's forward and backward on
//! the compute stream, the layout's collectives on the communication stream, edges for data
//! dependencies and for each stream's order. The step time is the DAG's critical path (petgraph
//! orders it topologically), so overlap comes out of the schedule rather than a factor.
//!
//! Collectives cost what a ring moves (Patarasuk & Yuan 2009; NCCL's "bus bandwidth"): an
//! all-gather or reduce-scatter of S bytes over n ranks sends S(n-1)/n per rank, an all-reduce
//! twice that, each hop paying a latency. Volumes per step follow the ZeRO paper (Rajbhandari et
//! al. 2020, sec. 7): DDP and ZeRO-1/2 move 2 x parameters (reduce-scatter + all-gather, or one
//! all-reduce), ZeRO-3 and FSDP 3 x (an all-gather in forward and in backward, a reduce-scatter).
//! Megatron's tensor parallelism all-reduces the block output twice in forward and twice in
//! backward (Shoeybi et al. 2019, fig. 4); a pipeline stage sends its activation on and the
//! gradient back (Narayanan et al. 2021).

use crate::graph::op::OpGraph;
use crate::spec::hardware::Hardware;
use crate::spec::parallel::{Engine, Offload};
use crate::spec::plan::Plan;
use crate::units::DType;
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};

/// NCCL's per-hop latency on NVLink and on InfiniBand (NCCL's tuning model uses a few
/// microseconds per step; nccl-tests show ~10-20 us small-message all-reduce latency).
const HOP_LATENCY_INTRA: f64 = 5e-6;
const HOP_LATENCY_INTER: f64 = 10e-6;

/// A link of 1 byte/s and no latency: a collective's "seconds" over it are the bytes one rank
/// sends.
const VOLUME: Link = Link {
    bytes_per_second: 1.0,
    latency: 0.0,
};

/// One rank's compute for one micro-batch, per unit instance in execution order.
#[derive(Debug, Clone, Default)]
pub struct Compute {
    /// (unit, device seconds) in forward order.
    pub forward: Vec<(u32, f64)>,
    /// (unit, device seconds) in backward order (recomputation included).
    pub backward: Vec<(u32, f64)>,
    /// Forward and backward together, host stalls included.
    pub total: f64,
    pub optimizer: f64,
}

/// The schedule's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub step_seconds: f64,
    pub communication_seconds: f64,
    /// Bytes one rank sends in data-parallel collectives per step (ring volumes).
    pub data_parallel_bytes: f64,
    pub exposed_seconds: f64,
    pub bubble_fraction: f64,
}

/// A link a collective runs over: bytes per second per rank and per-hop latency.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub bytes_per_second: f64,
    pub latency: f64,
}

impl Link {
    /// The link between `ranks` GPUs: NVLink/PCIe inside a node, the slower of that and the
    /// GPU's NIC when the group spans nodes.
    pub fn between(hw: &Hardware, spans_nodes: bool) -> Link {
        // NVLink and Infinity Fabric datasheets quote both directions together; PCIe profiles
        // give one direction. A ring sends in one direction.
        let intra = if hw.interconnect.contains("PCIe") {
            hw.interconnect_gbps
        } else {
            hw.interconnect_gbps / 2.0
        } * 1e9;
        if spans_nodes {
            Link {
                bytes_per_second: intra.min(hw.network_gbps / 8.0 * 1e9),
                latency: HOP_LATENCY_INTER,
            }
        } else {
            Link {
                bytes_per_second: intra,
                latency: HOP_LATENCY_INTRA,
            }
        }
    }

    /// Ring all-gather or reduce-scatter of `bytes` (the whole, unsharded size) over `ranks`.
    pub fn gather(&self, bytes: f64, ranks: u64) -> f64 {
        if ranks <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let n = ranks as f64;
        bytes * (n - 1.0) / n / self.bytes_per_second + (n - 1.0) * self.latency
    }

    /// Ring all-reduce: a reduce-scatter then an all-gather.
    pub fn all_reduce(&self, bytes: f64, ranks: u64) -> f64 {
        2.0 * self.gather(bytes, ranks)
    }
}

/// Builds and solves one rank's step.
pub fn schedule(graph: &OpGraph, plan: &Plan, hw: &Hardware, compute: &Compute) -> Schedule {
    let par = plan.parallel;
    let engine = par.engine;
    let shards = engine.shards();
    let group = par.shard_degree();
    let dp_link = Link::between(hw, par.crosses_nodes(group));
    // Bytes each unit gathers (its parameters in the compute dtype) and reduces (its gradients
    // in the reduce dtype: FSDP's fp32 `reduce_dtype`, DeepSpeed's module dtype, DDP's
    // gradient dtype).
    // Per unit: one copy of a repeated block; the totals count every copy.
    let gather: Vec<f64> = graph.unit_bytes().iter().map(|b| b.0 as f64).collect();
    let mut reduce = vec![0.0; gather.len()];
    let (mut gather_total, mut reduce_total) = (0.0, 0.0);
    for p in &graph.params {
        gather_total += p.compute_bytes().0 as f64 * p.copies as f64;
        if p.updated() {
            let dtype = if engine.is_fsdp() {
                DType::F32
            } else {
                p.dtype
            };
            let bytes = dtype.bytes(p.elements).0 as f64;
            reduce[p.unit as usize] += bytes;
            reduce_total += bytes * p.copies as f64;
        }
    }
    // Each cost is a function of the links, so the same code gives seconds over the real
    // links and bytes sent per rank over `VOLUME` (1 byte/s, no latency).
    let inter = Link::between(hw, true);
    let all_gather = |u: u32, dp: &Link| {
        if shards.parameters {
            dp.gather(gather[u as usize], group)
        } else {
            0.0
        }
    };
    let reduce_cost = |u: u32, dp: &Link, across: &Link| {
        let bytes = reduce[u as usize];
        match engine {
            Engine::Ddp => dp.all_reduce(bytes, par.dp()),
            // ZeRO-1 reduces into the owning rank's partition like ZeRO-2 (reduce-scatter).
            Engine::Zero1 | Engine::Zero2 | Engine::Zero3 | Engine::Fsdp | Engine::FsdpGradOp => {
                dp.gather(bytes, group)
            }
            // HYBRID_SHARD: reduce-scatter in the node, then all-reduce the shard across nodes.
            Engine::FsdpHybrid => {
                let replicas = par.dp() / group.max(1);
                dp.gather(bytes, group) + across.all_reduce(bytes / group as f64, replicas)
            }
        }
    };
    let mut volume = 0.0;
    // Tensor parallelism: two all-reduces of the block's output activation per block in
    // forward and two in backward, on the critical path (Megatron's f and g operators).
    let tp_link = Link::between(hw, par.tp > par.gpus_per_node);
    let act_bytes = DType::Bf16
        .bytes(plan.batch * (plan.seq + plan.target_seq))
        .0 as f64
        * graph_hidden(graph) as f64;
    let tp_per_block = 2.0 * tp_link.all_reduce(act_bytes, par.tp);

    let mut s = Streams::default();
    // Without a pipeline the DAG runs every accumulation step; with one it holds one
    // micro-batch, and the 1F1B schedule below repeats it.
    let micro = if par.pp > 1 { 1 } else { par.grad_accum.max(1) };
    // Host stalls stretch the device work evenly.
    let device: f64 = compute
        .forward
        .iter()
        .chain(&compute.backward)
        .map(|u| u.1)
        .sum();
    let scale = if device > 0.0 {
        compute.total / device
    } else {
        1.0
    };
    let tp_of = |u: u32| if u > 0 { tp_per_block } else { 0.0 };
    // The root unit runs twice per pass (embeddings, then head): it is gathered once per pass
    // and reduced once, when backward ends.
    let last_root = compute.backward.iter().rposition(|&(u, _)| u == 0);
    for m in 0..micro {
        let sync = m + 1 == micro;
        let mut root_gathered = false;
        let mut root_regathered = false;
        // Forward: each unit waits for its all-gather (FSDP prefetches the next while it runs).
        for &(u, t) in &compute.forward {
            let gather_now = u > 0 || !std::mem::replace(&mut root_gathered, true);
            let ag = if gather_now {
                volume += all_gather(u, &VOLUME);
                all_gather(u, &dp_link)
            } else {
                0.0
            };
            s.unit(ag, t * scale, tp_of(u));
        }
        // Backward: gathered again (FULL_SHARD), reduced after (overlapping the next unit's).
        for (k, &(u, t)) in compute.backward.iter().enumerate() {
            // FSDP2 keeps its root gathered through backward; DeepSpeed re-gathers it.
            let regather = u > 0 || !std::mem::replace(&mut root_regathered, true);
            let ag = if engine == Engine::FsdpGradOp || (u == 0 && engine.is_fsdp()) || !regather {
                0.0
            } else {
                volume += all_gather(u, &VOLUME);
                all_gather(u, &dp_link)
            };
            let b = s.unit(ag, t * scale, tp_of(u));
            // DDP and ZeRO-1/2 reduce once per optimizer step (no_sync while accumulating);
            // FSDP reduce-scatters every backward.
            let reduces_here = u > 0 || Some(k) == last_root;
            if reduces_here && (sync || engine.is_fsdp() || engine == Engine::Zero3) {
                let r = reduce_cost(u, &dp_link, &inter);
                volume += reduce_cost(u, &VOLUME, &VOLUME);
                if r > 0.0 {
                    s.comm_total += r;
                    s.task(r, true, &[b]);
                }
            }
        }
    }
    // The step waits for every reduction; ZeRO-1/2 then all-gather the updated parameters.
    let all_done: Vec<NodeIndex> = s.last_comm.iter().copied().collect();
    let mut after_step = 0.0;
    if matches!(engine, Engine::Zero1 | Engine::Zero2) && par.dp() > 1 {
        after_step += dp_link.gather(gather_total, group);
        volume += VOLUME.gather(gather_total, group);
        s.comm_total += after_step;
    }
    // Offload: gradients go down to the host and updated parameters come back each step
    // (ZeRO-Offload, Ren et al. 2021, sec. 4), over each GPU's host link; the CPU steps.
    let mut offload = 0.0;
    if par.offload != Offload::None {
        let link = hw.host_link_gbps * 1e9;
        let shard_grads = reduce_total / group.max(1) as f64;
        let shard_params = gather_total / group.max(1) as f64;
        offload += (shard_grads + shard_params) / link;
        if par.offload == Offload::Params {
            // Each unit's shard comes up for forward and backward.
            offload += 2.0 * shard_params / link * micro as f64;
        }
        s.comm_total += offload;
    }
    let opt = compute.optimizer;
    s.task(opt + after_step + offload, false, &all_done);
    let step = critical_path(&s.dag);
    // Communication compute does not hide: the critical path beyond the compute stream's work
    // (tensor-parallel all-reduces sit inside the compute tasks, and count too).
    // The differences subtract the sums the critical path added, in the order it added them
    // (the compute chain, then the final task's weight), so that a layout with nothing to hide
    // reports exactly zero rather than a rounding residue: `(a + b) - a` need not equal `b`.
    let (compute_sum, mut comm_total) = (s.compute_sum, s.comm_total);
    let mut exposed = (step - (compute_sum + opt)).max(0.0) + s.tp_sum;
    // 1F1B: the stage's micro-batches plus p - 1 slots of bubble; a send and a receive of the
    // boundary activation per micro-batch each way.
    let (step, bubble) = if par.pp > 1 {
        // 1F1B: (M + p - 1) slots per accumulation step, each one micro-batch's forward and
        // backward on this stage plus sending the boundary activation on and its gradient back;
        // the data-parallel reduction's exposed tail and the optimizer once per step.
        let p = par.pp as f64;
        let m = par.micro_batches as f64;
        let slots = (m + p - 1.0) * par.grad_accum as f64;
        let p2p_link = Link::between(hw, par.gpus_per_node < par.tp * par.pp);
        let send = 2.0 * (act_bytes / p2p_link.bytes_per_second + p2p_link.latency);
        comm_total += send * m * par.grad_accum as f64;
        let tail = (step - (compute_sum + (opt + after_step + offload))).max(0.0);
        exposed = tail + send * slots;
        let bubble = (p - 1.0) / (m + p - 1.0);
        (
            (compute_sum + send) * slots + tail + opt + after_step + offload,
            bubble,
        )
    } else {
        (step, 0.0)
    };
    Schedule {
        step_seconds: step,
        communication_seconds: comm_total,
        data_parallel_bytes: volume,
        exposed_seconds: exposed,
        bubble_fraction: bubble,
    }
}

/// The step DAG being built: compute tasks chained on one stream, collectives on the other.
#[derive(Default)]
struct Streams {
    dag: DiGraph<f64, ()>,
    last_compute: Option<NodeIndex>,
    last_comm: Option<NodeIndex>,
    /// Compute tasks so far, in order.
    computes: Vec<NodeIndex>,
    compute_sum: f64,
    comm_total: f64,
    /// Tensor-parallel all-reduce time, which sits inside the compute tasks.
    tp_sum: f64,
}

impl Streams {
    /// A task after the last one on its stream and after `after`.
    fn task(&mut self, seconds: f64, on_comm: bool, after: &[NodeIndex]) -> NodeIndex {
        let n = self.dag.add_node(seconds);
        let previous = if on_comm {
            self.last_comm
        } else {
            self.last_compute
        };
        for p in previous.iter().chain(after) {
            self.dag.add_edge(*p, n, ());
        }
        if on_comm {
            self.last_comm = Some(n);
        } else {
            self.last_compute = Some(n);
        }
        n
    }

    /// One unit's compute (with `tp` of tensor-parallel all-reduces inside it), after its
    /// all-gather when it has one. The all-gather may start once the unit two before has run:
    /// prefetching one unit ahead, as FSDP does, bounds the gathered memory.
    fn unit(&mut self, gather: f64, seconds: f64, tp: f64) -> NodeIndex {
        let deps: Vec<NodeIndex> = if gather > 0.0 {
            self.comm_total += gather;
            let after: Vec<NodeIndex> = self
                .computes
                .len()
                .checked_sub(2)
                .map(|i| self.computes[i])
                .into_iter()
                .collect();
            vec![self.task(gather, true, &after)]
        } else {
            Vec::new()
        };
        let total = seconds + tp;
        self.compute_sum += total;
        self.comm_total += tp;
        self.tp_sum += tp;
        let n = self.task(total, false, &deps);
        self.computes.push(n);
        n
    }
}

/// The hidden width a tensor-parallel all-reduce moves: the width of the largest activation
/// an embedding produces (the residual stream).
fn graph_hidden(graph: &OpGraph) -> u64 {
    graph
        .params
        .iter()
        .filter(|p| p.role == crate::graph::op::ParamRole::Embedding)
        .map(|p| p.shape.1)
        .max()
        .unwrap_or(0)
}

/// The longest path through the DAG, each node weighted by its duration.
fn critical_path(dag: &DiGraph<f64, ()>) -> f64 {
    let Ok(order) = toposort(dag, None) else {
        return f64::NAN;
    };
    let mut finish = vec![0.0f64; dag.node_count()];
    for n in order {
        let start = dag
            .neighbors_directed(n, petgraph::Direction::Incoming)
            .map(|p| finish[p.index()])
            .fold(0.0, f64::max);
        finish[n.index()] = start + dag[n];
    }
    finish.into_iter().fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_costs_follow_the_textbook_formulas() {
        let link = Link {
            bytes_per_second: 100e9,
            latency: 0.0,
        };
        // 8 ranks: an all-gather of 800 GB sends 700 GB per rank: 7 s at 100 GB/s.
        assert!((link.gather(800e9, 8) - 7.0).abs() < 1e-9);
        assert!((link.all_reduce(800e9, 8) - 14.0).abs() < 1e-9);
        assert_eq!(link.gather(800e9, 1), 0.0);
    }

    #[test]
    fn the_critical_path_overlaps_the_two_streams() {
        // compute a(2) -> b(3); comm c(4) after a; d(1) after b and c: 2 + 4 + 1 = 7.
        let mut g: DiGraph<f64, ()> = DiGraph::new();
        let a = g.add_node(2.0);
        let b = g.add_node(3.0);
        let c = g.add_node(4.0);
        let d = g.add_node(1.0);
        g.add_edge(a, b, ());
        g.add_edge(a, c, ());
        g.add_edge(b, d, ());
        g.add_edge(c, d, ());
        assert_eq!(critical_path(&g), 7.0);
    }
}
