//! The parallel layout of a job: how many GPUs, which engine shards what, what is offloaded, and
//! the tensor- and pipeline-parallel degrees. The walkers read it as data (shard factors per
//! parameter state, collectives per step); nothing downstream branches on "more than one GPU".

use serde::Serialize;

/// The data-parallel engine, and so which of the model states each data-parallel rank keeps
/// whole and which it keeps a 1/dp shard of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// PyTorch DDP: every rank a full replica; gradients all-reduced in buckets during backward.
    Ddp,
    /// DeepSpeed ZeRO stage 1: optimizer states (with the fp32 master weights) sharded.
    Zero1,
    /// DeepSpeed ZeRO stage 2: optimizer states and gradients sharded (reduce-scatter).
    Zero2,
    /// DeepSpeed ZeRO stage 3: parameters too, gathered per module for its forward and backward.
    Zero3,
    /// PyTorch FSDP2 `fully_shard` per block with `reshard_after_forward=True` (FULL_SHARD).
    Fsdp,
    /// FSDP with `reshard_after_forward=False` (SHARD_GRAD_OP): gathered units stay from their
    /// forward to their backward.
    FsdpGradOp,
    /// FSDP HYBRID_SHARD: FULL_SHARD inside a node, replicas across nodes (all-reduce).
    FsdpHybrid,
}

impl Engine {
    pub const ALL: [(&'static str, Engine); 7] = [
        ("ddp", Engine::Ddp),
        ("zero1", Engine::Zero1),
        ("zero2", Engine::Zero2),
        ("zero3", Engine::Zero3),
        ("fsdp", Engine::Fsdp),
        ("fsdp-grad-op", Engine::FsdpGradOp),
        ("fsdp-hybrid", Engine::FsdpHybrid),
    ];

    pub fn name(self) -> &'static str {
        super::name_in(&Engine::ALL, self).unwrap_or("ddp")
    }

    /// Which states are sharded (Rajbhandari et al. 2020, sec. 5: P_os, P_os+g, P_os+g+p).
    pub fn shards(self) -> Sharded {
        let (optimizer, gradients, parameters) = match self {
            Engine::Ddp => (false, false, false),
            Engine::Zero1 => (true, false, false),
            Engine::Zero2 => (true, true, false),
            Engine::Zero3 | Engine::Fsdp | Engine::FsdpGradOp | Engine::FsdpHybrid => {
                (true, true, true)
            }
        };
        Sharded {
            optimizer,
            gradients,
            parameters,
        }
    }

    /// PyTorch FSDP's engines (their mixed-precision policy casts each gathered unit to bf16;
    /// DeepSpeed instead keeps a bf16 module and fp32 master weights in the optimizer).
    pub fn is_fsdp(self) -> bool {
        matches!(self, Engine::Fsdp | Engine::FsdpGradOp | Engine::FsdpHybrid)
    }

    /// DeepSpeed's ZeRO stages.
    pub fn is_zero(self) -> bool {
        matches!(self, Engine::Zero1 | Engine::Zero2 | Engine::Zero3)
    }
}

/// Which model states an engine shards over the data-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sharded {
    pub optimizer: bool,
    pub gradients: bool,
    pub parameters: bool,
}

/// What lives in host memory instead of the GPU (ZeRO-Offload, ZeRO-Infinity, FSDP CPU offload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Offload {
    /// Everything on the GPU.
    None,
    /// Optimizer states and fp32 master weights on the host; the optimizer steps on the CPU and
    /// gradients travel down, updated weights up, every step (Ren et al. 2021, ZeRO-Offload).
    Optimizer,
    /// Parameters too (ZeRO-Infinity's `offload_param`, FSDP's `CPUOffload(offload_params=True)`):
    /// each unit is copied up for its forward and backward.
    Params,
}

impl Offload {
    pub const ALL: [(&'static str, Offload); 3] = [
        ("none", Offload::None),
        ("optimizer", Offload::Optimizer),
        ("params", Offload::Params),
    ];

    pub fn name(self) -> &'static str {
        super::name_in(&Offload::ALL, self).unwrap_or("none")
    }
}

/// The whole layout of a job. `gpus = dp x tp x pp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Parallel {
    /// GPUs in the job.
    pub gpus: u64,
    pub gpus_per_node: u64,
    pub engine: Engine,
    pub offload: Offload,
    /// Tensor-parallel degree (Megatron-LM column/row splits; Shoeybi et al. 2019).
    pub tp: u64,
    /// Sequence parallelism beside TP (Korthikanti et al. 2022): norm and dropout activations
    /// split by `tp` along the sequence.
    pub sp: bool,
    /// Pipeline stages (1F1B schedule; Narayanan et al. 2021).
    pub pp: u64,
    /// Micro-batches per step through the pipeline (1 without PP).
    pub micro_batches: u64,
    /// Gradient-accumulation steps per optimizer step.
    pub grad_accum: u64,
}

/// Most GPUs one layout may name (the largest published training runs use tens of thousands).
pub const MAX_GPUS: u64 = 1 << 20;

impl Parallel {
    /// One GPU, no parallelism: every estimate equals the single-GPU one.
    pub fn single() -> Parallel {
        Parallel {
            gpus: 1,
            gpus_per_node: 8,
            engine: Engine::Ddp,
            offload: Offload::None,
            tp: 1,
            sp: false,
            pp: 1,
            micro_batches: 1,
            grad_accum: 1,
        }
    }

    /// Data-parallel degree.
    pub fn dp(&self) -> u64 {
        (self.gpus / (self.tp * self.pp).max(1)).max(1)
    }

    pub fn nodes(&self) -> u64 {
        self.gpus.div_ceil(self.gpus_per_node.max(1))
    }

    /// Ranks each sharded state is split over: the data-parallel group, or for HYBRID_SHARD the
    /// data-parallel ranks inside one node.
    pub fn shard_degree(&self) -> u64 {
        match self.engine {
            Engine::FsdpHybrid => {
                let per_node = (self.gpus_per_node / (self.tp * self.pp).max(1)).max(1);
                self.dp().min(per_node)
            }
            _ => self.dp(),
        }
    }

    /// The divisor of each state's per-GPU size: (parameters, gradients, optimizer states).
    pub fn divisors(&self) -> (u64, u64, u64) {
        let s = self.engine.shards();
        let d = self.shard_degree();
        let pick = |b: bool| if b { d } else { 1 };
        (pick(s.parameters), pick(s.gradients), pick(s.optimizer))
    }

    /// Whether the data-parallel group spans nodes (its collectives then cross the network).
    pub fn crosses_nodes(&self, group: u64) -> bool {
        group * self.tp * self.pp > self.gpus_per_node || self.tp > self.gpus_per_node
    }

    /// `tp`, `pp` and `sp` as a short label (`dp8`, `dp4 tp2 sp`).
    pub fn label(&self) -> String {
        let mut s = format!("{} dp{}", self.engine.name(), self.dp());
        if self.tp > 1 {
            s += &format!(" tp{}", self.tp);
            if self.sp {
                s += " sp";
            }
        }
        if self.pp > 1 {
            s += &format!(" pp{} m{}", self.pp, self.micro_batches);
        }
        if self.offload != Offload::None {
            s += &format!(" offload-{}", self.offload.name());
        }
        s
    }
}

/// Checks the rules a layout must obey; the error names the rule.
pub fn check(p: &Parallel, layers: u64, heads: u64, kv_heads: u64) -> Result<(), (String, String)> {
    let rule = |field: &str, msg: String| Err((field.to_string(), msg));
    if p.gpus == 0 || p.gpus > MAX_GPUS {
        return rule("gpus", format!("must be 1 to {MAX_GPUS}, found {}", p.gpus));
    }
    if p.gpus_per_node == 0 || p.gpus_per_node > 1024 {
        return rule(
            "gpus-per-node",
            format!("must be 1 to 1024, found {}", p.gpus_per_node),
        );
    }
    if p.tp == 0 || p.tp > 1024 {
        return rule("tp", format!("must be 1 to 1024, found {}", p.tp));
    }
    if p.pp == 0 || p.pp > 4096 {
        return rule("pp", format!("must be 1 to 4096, found {}", p.pp));
    }
    if p.micro_batches == 0 || p.micro_batches > 1 << 16 {
        return rule(
            "micro-batches",
            format!("must be 1 to 65536, found {}", p.micro_batches),
        );
    }
    if p.grad_accum == 0 || p.grad_accum > 1 << 16 {
        return rule(
            "grad-accum",
            format!("must be 1 to 65536, found {}", p.grad_accum),
        );
    }
    if !p.gpus.is_multiple_of(p.tp * p.pp) {
        return rule(
            "gpus",
            format!(
                "({}) must be a multiple of tp x pp ({} x {})",
                p.gpus, p.tp, p.pp
            ),
        );
    }
    if !heads.is_multiple_of(p.tp) || !kv_heads.is_multiple_of(p.tp) {
        return rule(
            "tp",
            format!(
                "({}) must divide the attention heads ({heads}) and KV heads ({kv_heads})",
                p.tp
            ),
        );
    }
    if p.pp > layers {
        return rule(
            "pp",
            format!("({}) exceeds the model's layers ({layers})", p.pp),
        );
    }
    if p.sp && p.tp == 1 {
        return rule("sp", "sequence parallelism needs --tp 2 or more".into());
    }
    if p.pp > 1 && matches!(p.engine, Engine::Zero2 | Engine::Zero3) {
        return rule(
            "engine",
            "DeepSpeed's pipeline engine supports ZeRO stage 1 at most with --pp".into(),
        );
    }
    if p.pp > 1 && p.engine.is_fsdp() {
        return rule(
            "engine",
            "FSDP with pipeline stages is not modelled; use --engine zero1 or ddp with --pp".into(),
        );
    }
    if p.pp == 1 && p.micro_batches > 1 {
        return rule(
            "micro-batches",
            "needs --pp 2 or more (use --grad-accum without a pipeline)".into(),
        );
    }
    if p.offload != Offload::None && matches!(p.engine, Engine::Ddp) {
        return rule(
            "offload",
            "needs a sharding engine (--engine zero1/2/3 or fsdp); DDP cannot offload".into(),
        );
    }
    // FSDP's only offload (FSDP1 `CPUOffload(offload_params=True)`, FSDP2
    // `CPUOffloadPolicy`) moves parameters, gradients and the optimizer step to the host
    // together; keeping parameters on the GPU with the optimizer on the host is ZeRO-Offload.
    if p.offload == Offload::Optimizer && p.engine.is_fsdp() {
        return rule(
            "offload",
            "`optimizer` is not an FSDP offload: FSDP's CPU offload moves parameters, \
             gradients and the optimizer step together (--offload params); ZeRO-Offload keeps \
             parameters on the GPU (--engine zero1/2/3)"
                .into(),
        );
    }
    if p.offload == Offload::Params && !p.engine.shards().parameters {
        return rule(
            "offload",
            "`params` needs sharded parameters (--engine zero3 or fsdp)".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_stages_shard_what_the_paper_says() {
        let mut p = Parallel::single();
        p.gpus = 64;
        for (engine, want) in [
            (Engine::Ddp, (1, 1, 1)),
            (Engine::Zero1, (1, 1, 64)),
            (Engine::Zero2, (1, 64, 64)),
            (Engine::Zero3, (64, 64, 64)),
        ] {
            p.engine = engine;
            assert_eq!(p.divisors(), want, "{engine:?}");
        }
        // HYBRID_SHARD: sharded within a node of 8, replicated across the 8 nodes.
        p.engine = Engine::FsdpHybrid;
        assert_eq!(p.divisors(), (8, 8, 8));
    }

    #[test]
    fn rules_name_what_is_wrong() {
        let mut p = Parallel::single();
        p.gpus = 6;
        p.tp = 4;
        assert_eq!(check(&p, 32, 32, 8).map_err(|e| e.0), Err("gpus".into()));
        p.gpus = 8;
        p.tp = 3;
        p.gpus = 6;
        assert_eq!(check(&p, 32, 32, 8).map_err(|e| e.0), Err("tp".into()));
        p.tp = 1;
        p.offload = Offload::Optimizer;
        assert_eq!(check(&p, 32, 32, 8).map_err(|e| e.0), Err("offload".into()));
    }
}
