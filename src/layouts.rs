//! The layout search behind `ftplan fit`: for a model, method and GPU type, which parallel
//! layouts (GPUs, engine, offload, tensor and pipeline degree, checkpointing) fit, and which is
//! best by the fewest GPUs, the fastest step or the lowest cost.
//!
//! Per-GPU memory never rises as data-parallel ranks are added (a property the tests check), so
//! for each combination of the other choices the fewest fitting GPUs is found by bisection over
//! data-parallel degrees; the time and cost objectives then also look at every larger degree.

use crate::error::Result;
use crate::estimate::{Estimate, check_plan, estimate};
use crate::search::Target;
use crate::spec::parallel::{Engine, Offload, Parallel};
use crate::spec::plan::Plan;
use crate::units::Bytes;
use serde::Serialize;

/// What the search ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Fewest GPUs, then fastest step.
    Gpus,
    /// Most tokens per second for the job, then fewest GPUs.
    Time,
    /// Lowest cost per million tokens, then fewest GPUs.
    Cost,
}

/// Choices the user fixed; the rest are searched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed {
    pub gpus: Option<u64>,
    pub engine: Option<Engine>,
    pub offload: Option<Offload>,
    pub tp: Option<u64>,
    pub pp: Option<u64>,
    pub grad_ckpt: Option<bool>,
}

/// The search's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_gpus: u64,
    /// Host memory per node that offload may use.
    pub host_memory: Bytes,
    pub price_per_gpu_hour: Option<f64>,
}

/// One layout and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    /// The GPU type it runs on.
    pub gpu: String,
    pub parallel: Parallel,
    pub grad_ckpt: bool,
    pub memory: LayoutMemory,
    pub time: LayoutTime,
    pub fits: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayoutMemory {
    /// Per GPU, bytes.
    pub required: u64,
    pub peak: u64,
    pub model_states: u64,
    /// Per node, bytes (offload).
    pub host: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayoutTime {
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub communication_seconds: f64,
    pub cost_per_million_tokens: Option<f64>,
}

fn powers_of_two(max: u64) -> impl Iterator<Item = u64> {
    (0..=20u32)
        .map(|k| 1u64 << k)
        .take_while(move |&v| v <= max)
}

/// Layouts that fit, best first (at most `keep`), and how many estimates the search ran.
pub fn search(
    target: &Target,
    plan: &Plan,
    fixed: Fixed,
    bounds: Bounds,
    objective: Objective,
    keep: usize,
) -> Result<(Vec<Layout>, usize)> {
    let model = target.model;
    let hw = target.hardware;
    let layers = model.decoder.layers + model.encoder.map_or(0, |e| e.layers);
    let engines: Vec<Engine> = match fixed.engine {
        Some(e) => vec![e],
        None => Engine::ALL.iter().map(|(_, e)| *e).collect(),
    };
    let offloads: Vec<Offload> = match fixed.offload {
        Some(o) => vec![o],
        None => Offload::ALL.iter().map(|(_, o)| *o).collect(),
    };
    let tps: Vec<u64> = match fixed.tp {
        Some(t) => vec![t],
        None => powers_of_two(hw.gpus_per_node.min(bounds.max_gpus)).collect(),
    };
    let pps: Vec<u64> = match fixed.pp {
        Some(p) => vec![p],
        None => powers_of_two(layers.min(bounds.max_gpus).min(64)).collect(),
    };
    let ckpts: Vec<bool> = match fixed.grad_ckpt {
        Some(c) => vec![c],
        None => vec![false, true],
    };
    let mut found: Vec<Layout> = Vec::new();
    let mut runs = 0usize;
    for &engine in &engines {
        for &offload in &offloads {
            for &tp in &tps {
                for &pp in &pps {
                    // 1F1B keeps min(p, M) micro-batches in flight, so M >= p costs the same
                    // memory and a smaller bubble (with a larger batch per step).
                    let micro: Vec<u64> = if pp > 1 {
                        vec![pp, 2 * pp, 4 * pp]
                    } else {
                        vec![1]
                    };
                    for (&grad_ckpt, &micro_batches) in
                        ckpts.iter().flat_map(|c| micro.iter().map(move |m| (c, m)))
                    {
                        let at = |dp: u64, runs: &mut usize| -> Result<Option<Layout>> {
                            let gpus = dp * tp * pp;
                            let parallel = Parallel {
                                gpus,
                                gpus_per_node: hw.gpus_per_node.min(gpus),
                                engine,
                                offload,
                                tp,
                                sp: false,
                                pp,
                                micro_batches,
                                grad_accum: 1,
                            };
                            // A sharding engine on one data-parallel rank without offload is
                            // plain training: the DDP layout stands for it.
                            // So is HYBRID_SHARD inside one node: FULL_SHARD.
                            let pointless = (parallel.dp() == 1
                                && offload == Offload::None
                                && engine != Engine::Ddp)
                                || (engine == Engine::FsdpHybrid && parallel.nodes() == 1);
                            let p = Plan {
                                parallel,
                                grad_ckpt,
                                ..plan.clone()
                            };
                            // A layout the plan's rules refuse for this model (its heads do
                            // not split tp ways, Mamba-1 mixers under tp, pipeline stages of
                            // an encoder-decoder) is not a candidate; the plan itself passed
                            // them before the search.
                            if pointless || check_plan(model, &p, hw).is_err() {
                                return Ok(None);
                            }
                            *runs += 1;
                            let e = estimate(model, &p, hw, target.rates)?;
                            Ok(Some(layout(&e, target, bounds)))
                        };
                        let dps: Vec<u64> = match fixed.gpus {
                            Some(g) if g % (tp * pp) == 0 => vec![g / (tp * pp)],
                            Some(_) => continue,
                            None => powers_of_two(bounds.max_gpus / (tp * pp)).collect(),
                        };
                        // Bisection for the fewest fitting data-parallel degree.
                        let (mut lo, mut hi) = (0usize, dps.len());
                        let mut first_fit: Option<(usize, Layout)> = None;
                        while lo < hi {
                            let mid = (lo + hi) / 2;
                            match at(dps[mid], &mut runs)? {
                                // Invalid at this degree (a sharding engine on one rank, say):
                                // more ranks may be valid.
                                None => lo = mid + 1,
                                Some(l) if l.fits => {
                                    hi = mid;
                                    first_fit = Some((mid, l));
                                }
                                Some(_) => lo = mid + 1,
                            }
                        }
                        let Some((i, l)) = first_fit else { continue };
                        found.push(l);
                        if objective != Objective::Gpus {
                            for &dp in &dps[i + 1..] {
                                if let Some(l) = at(dp, &mut runs)?.filter(|l| l.fits) {
                                    found.push(l);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let mut found = undominated(found);
    rank(&mut found, objective);
    found.truncate(keep);
    Ok((found, runs))
}

/// Whether `b` is at least as good as `a` on everything a user weighs: GPUs, memory per GPU,
/// host memory, speed (within the 3 % buckets the ranking uses), cost and moving parts.
fn no_worse(b: &Layout, a: &Layout) -> bool {
    let cost = |l: &Layout| l.time.cost_per_million_tokens.unwrap_or(f64::INFINITY);
    b.parallel.gpus <= a.parallel.gpus
        && b.memory.required <= a.memory.required
        && b.memory.host <= a.memory.host
        && speed_bucket(b) <= speed_bucket(a)
        && cost(b) <= cost(a)
        && complexity(b) <= complexity(a)
}

/// Drops every layout another one dominates (no worse on anything, better on something; of
/// layouts equal on everything, the first found stays). On one data-parallel rank ZeRO-1, -2
/// and -3 with the optimizer offloaded hold the same states in the same places, as FSDP's
/// FULL_SHARD and SHARD_GRAD_OP do, so only the simplest of each shows: the list offers
/// choices, not names for one.
fn undominated(found: Vec<Layout>) -> Vec<Layout> {
    let keep: Vec<bool> = found
        .iter()
        .enumerate()
        .map(|(i, a)| {
            !found
                .iter()
                .enumerate()
                .any(|(j, b)| j != i && no_worse(b, a) && (!no_worse(a, b) || j < i))
        })
        .collect();
    found
        .into_iter()
        .zip(keep)
        .filter_map(|(l, k)| k.then_some(l))
        .collect()
}

fn layout(e: &Estimate, target: &Target, bounds: Bounds) -> Layout {
    let par = e.plan.parallel;
    let cost = bounds
        .price_per_gpu_hour
        .map(|price| par.gpus as f64 * price / 3600.0 / e.time.tokens_per_second * 1e6);
    let host_ok = e.memory.host <= bounds.host_memory;
    Layout {
        gpu: target.hardware.name.clone(),
        parallel: par,
        grad_ckpt: e.plan.grad_ckpt,
        memory: LayoutMemory {
            required: e.memory.required.0,
            peak: e.memory.peak.0,
            model_states: e.memory.model_states.0,
            host: e.memory.host.0,
        },
        time: LayoutTime {
            step_seconds: e.time.step_seconds,
            tokens_per_second: e.time.tokens_per_second,
            communication_seconds: e.time.communication_seconds,
            cost_per_million_tokens: cost,
        },
        fits: e.memory.required <= target.budget && host_ok,
    }
}

/// How far a layout is from plain data parallelism: fewer moving parts rank first among layouts
/// of about the same speed.
fn complexity(l: &Layout) -> u64 {
    let engine = Engine::ALL
        .iter()
        .position(|(_, e)| *e == l.parallel.engine)
        .unwrap_or(0) as u64;
    let offload = Offload::ALL
        .iter()
        .position(|(_, o)| *o == l.parallel.offload)
        .unwrap_or(0) as u64;
    offload * 100 + (l.parallel.tp + l.parallel.pp) * 10 + engine + u64::from(l.grad_ckpt)
}

/// Time per token in buckets of 3 %: layouts this close are equally fast within the model's
/// accuracy, and the simpler one goes first (a bucketed key keeps the order total).
fn speed_bucket(l: &Layout) -> i64 {
    let per_token = 1.0 / l.time.tokens_per_second.max(1e-30);
    (per_token.ln() / 1.03f64.ln()).floor() as i64
}

/// Best first by the objective; ties go to fewer GPUs, then the faster, then the simpler layout.
pub fn rank(found: &mut [Layout], objective: Objective) {
    found.sort_by(|a, b| {
        let by_gpus = a.parallel.gpus.cmp(&b.parallel.gpus);
        let by_time = speed_bucket(a)
            .cmp(&speed_bucket(b))
            .then(complexity(a).cmp(&complexity(b)));
        let by_cost = a
            .time
            .cost_per_million_tokens
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.time.cost_per_million_tokens.unwrap_or(f64::INFINITY));
        match objective {
            Objective::Gpus => by_gpus.then(by_time),
            Objective::Time => by_time.then(by_gpus),
            Objective::Cost => by_cost.then(by_gpus).then(by_time),
        }
    });
}

/// The layout with the fewest GPUs (up to `bounds.max_gpus`) that fits `plan`'s model and method,
/// what `fixed` does not fix searched.
pub fn fewest_gpus(
    target: &Target,
    plan: &Plan,
    fixed: Fixed,
    bounds: Bounds,
) -> Result<Option<Layout>> {
    let (found, _) = search(target, plan, fixed, bounds, Objective::Gpus, 1)?;
    Ok(found.into_iter().next())
}
