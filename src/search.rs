//! Searches over the simulator: the largest batch and sequence that fit, and the changes
//! (one, or two when no one fits) that make a plan fit. Memory never decreases with batch or sequence length (a property the
//! tests check), so a doubling probe followed by bisection finds the exact boundary.

use crate::error::Result;
use crate::estimate::{Estimate, estimate};
use crate::spec::hardware::Hardware;
use crate::spec::model::ModelSpec;
use crate::spec::plan::{Lora, LoraTargets, Method, Optimizer, Plan};
use crate::time::Rates;
use crate::units::Bytes;
use serde::Serialize;

/// What a search needs besides the plan.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub model: &'a ModelSpec,
    pub hardware: &'a Hardware,
    pub rates: &'a Rates,
    /// Memory the plan may use (device memory less headroom).
    pub budget: Bytes,
}

impl Target<'_> {
    pub fn run(&self, plan: &Plan) -> Result<Estimate> {
        estimate(self.model, plan, self.hardware, self.rates)
    }

    fn fits(&self, plan: &Plan) -> Result<bool> {
        Ok(self.run(plan)?.memory.required <= self.budget)
    }
}

/// Upper end of the searches (beyond it no GPU has the memory).
const LIMIT: u64 = 1 << 24;

/// The largest value of a field in [1, LIMIT] for which `set(plan, v)` fits, if 1 fits.
fn largest(target: &Target, plan: &Plan, set: impl Fn(&mut Plan, u64)) -> Result<Option<u64>> {
    // A probe past the plan limits (tokens per step, sequence) does not fit: the search is
    // capped there instead of failing a valid plan.
    let at = |v: u64| -> Result<bool> {
        let mut p = plan.clone();
        set(&mut p, v);
        match target.fits(&p) {
            Ok(fits) => Ok(fits),
            Err(_) if v > 1 => Ok(false),
            Err(e) => Err(e),
        }
    };
    if !at(1)? {
        return Ok(None);
    }
    let mut lo = 1;
    let mut hi = 2;
    while hi <= LIMIT && at(hi)? {
        lo = hi;
        hi *= 2;
    }
    if hi > LIMIT {
        return Ok(Some(lo));
    }
    // lo fits, hi does not.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if at(mid)? { lo = mid } else { hi = mid }
    }
    Ok(Some(lo))
}

/// Largest micro-batch at the plan's sequence length.
pub fn max_batch(target: &Target, plan: &Plan) -> Result<Option<u64>> {
    largest(target, plan, |p, v| p.batch = v)
}

/// Longest sequence (encoder-decoder: source length) at the plan's batch.
pub fn max_seq(target: &Target, plan: &Plan) -> Result<Option<u64>> {
    largest(target, plan, |p, v| p.seq = v)
}

/// One change to a plan (or two together, when no single one fits) and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct Fix {
    /// What to change, for people.
    pub change: String,
    /// How many changes it makes (1, or 2 when no single change fits on this GPU without
    /// shortening the sequence).
    pub changes: u32,
    /// Required memory after the change.
    pub required: u64,
    pub fits: bool,
    /// Step time after the change (with gradient accumulation, the time for the original
    /// effective batch).
    pub step_seconds: f64,
    /// Time per token relative to the original plan (1.25 = 25% slower).
    pub slowdown: f64,
    /// A GPU to switch to, when the change is a GPU.
    pub gpu: Option<String>,
}

/// Which part of a plan an edit changes: two edits combine only when they change different
/// parts (QLoRA and LoRA rank 8 are both the method, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Checkpointing,
    Method,
    Optimizer,
    Precision,
}

/// One change a practitioner would try, applicable to the plan it was made for and to that
/// plan with another part changed.
struct Edit {
    label: String,
    part: Part,
    apply: Box<dyn Fn(&Plan) -> Plan>,
}

fn edit(label: &str, part: Part, apply: impl Fn(&Plan) -> Plan + 'static) -> Edit {
    Edit {
        label: label.into(),
        part,
        apply: Box::new(apply),
    }
}

/// The changes that apply to `plan`: checkpointing, a lighter method (LoRA, QLoRA, a smaller
/// rank, fewer targets), a lighter optimizer (8-bit, paged, Adafactor) and pure bf16.
fn edits(plan: &Plan, model: &ModelSpec) -> Vec<Edit> {
    let mut out = Vec::new();
    if !plan.grad_ckpt {
        out.push(edit(
            "turn on gradient checkpointing",
            Part::Checkpointing,
            |p| Plan {
                grad_ckpt: true,
                ..p.clone()
            },
        ));
    }
    // peft's default targets, q and v; a multimodal checkpoint, which peft has no default for,
    // names them.
    let qv = if model.vision.is_some() {
        LoraTargets::Named(vec![crate::spec::plan::Proj::Q, crate::spec::plan::Proj::V])
    } else {
        LoraTargets::QueryValue
    };
    let lora = Lora {
        rank: 16,
        alpha: 32.0,
        targets: qv.clone(),
        dora: false,
    };
    match &plan.method {
        Method::Full => {
            let l = lora.clone();
            out.push(edit("switch to LoRA (r16, qv)", Part::Method, move |p| {
                Plan {
                    method: Method::Lora(l.clone()),
                    precision: crate::spec::plan::Precision::Bf16,
                    ..p.clone()
                }
            }));
            out.push(edit("switch to QLoRA (r16, qv)", Part::Method, move |p| {
                Plan {
                    method: Method::Qlora(lora.clone()),
                    precision: crate::spec::plan::Precision::Bf16,
                    ..p.clone()
                }
            }));
        }
        Method::Lora(l) | Method::Qlora(l) => {
            let qlora = matches!(plan.method, Method::Qlora(_));
            let with = move |l: Lora| {
                if qlora {
                    Method::Qlora(l)
                } else {
                    Method::Lora(l)
                }
            };
            if !qlora {
                let l = l.clone();
                out.push(edit(
                    "switch to QLoRA (4-bit base)",
                    Part::Method,
                    move |p| Plan {
                        method: Method::Qlora(l.clone()),
                        ..p.clone()
                    },
                ));
            }
            // A smaller rank or fewer adapted projections: less adapter state and fewer
            // saved low-rank activations.
            if l.rank > 8 {
                let l = Lora {
                    rank: 8,
                    alpha: l.alpha * 8.0 / l.rank as f64,
                    ..l.clone()
                };
                out.push(edit("LoRA rank 8", Part::Method, move |p| Plan {
                    method: with(l.clone()),
                    ..p.clone()
                }));
            }
            if l.targets != qv {
                let l = Lora {
                    targets: qv,
                    ..l.clone()
                };
                out.push(edit("LoRA on q and v only", Part::Method, move |p| Plan {
                    method: with(l.clone()),
                    ..p.clone()
                }));
            }
        }
        Method::Adapter { .. }
        | Method::Prefix { .. }
        | Method::Prompt { .. }
        | Method::Ia3
        | Method::BitFit
        | Method::LnTuning
        | Method::Freeze { .. } => {}
    }
    let optimizer = |label: &str, o: Optimizer| {
        edit(label, Part::Optimizer, move |p| Plan {
            optimizer: o,
            ..p.clone()
        })
    };
    // Paged 8-bit AdamW (the QLoRA recipe): states in unified memory, which the driver evicts
    // to host memory when the GPU has no room; slower only by the pages it moves.
    let paged = "use paged 8-bit AdamW (states evicted to host under pressure)";
    match plan.optimizer {
        Optimizer::Adamw | Optimizer::AdamwForeach => {
            out.push(optimizer(
                "use 8-bit AdamW (bitsandbytes)",
                Optimizer::Adamw8bit,
            ));
            out.push(optimizer(paged, Optimizer::PagedAdamw8bit));
            // Factored second moments, no first moment (Shazeer & Stern 2018).
            out.push(optimizer(
                "use Adafactor (factored states)",
                Optimizer::Adafactor,
            ));
        }
        Optimizer::Adamw8bit => out.push(optimizer(paged, Optimizer::PagedAdamw8bit)),
        Optimizer::PagedAdamw8bit
        | Optimizer::PagedAdamw32bit
        | Optimizer::Sgd
        | Optimizer::Adafactor => {}
    }
    // Full fine-tuning in pure bf16: bf16 weights, gradients and optimizer states, no fp32
    // master copy (what many recipes do when memory is short).
    if plan.method == Method::Full && plan.precision != crate::spec::plan::Precision::Bf16 {
        out.push(edit(
            "train in pure bf16 (bf16 weights and optimizer states)",
            Part::Precision,
            |p| Plan {
                // A switch to LoRA or QLoRA already set the precision its method runs in.
                precision: if p.method == Method::Full {
                    crate::spec::plan::Precision::Bf16
                } else {
                    p.precision
                },
                ..p.clone()
            },
        ));
    }
    out
}

/// How many combined fixes are kept when no single change fits.
const PAIRS_SHOWN: usize = 5;

/// Changes that make `plan` fit, ranked by their time cost (cheapest first): each single
/// change, a bigger GPU, and, when no single change fits on this GPU without shortening the
/// sequence, pairs of changes to different parts of the plan (or a change with a smaller
/// batch or a shorter sequence).
pub fn fixes(target: &Target, plan: &Plan, gpus: &[(Hardware, Rates)]) -> Result<Vec<Fix>> {
    let base = target.run(plan)?;
    let base_time_per_token =
        base.time.step_seconds / (plan.batch * (plan.seq + plan.target_seq)) as f64;
    let mut out = Vec::new();
    let assess = |change: String,
                  changes: u32,
                  p: &Plan,
                  t: &Target,
                  accumulation: u64,
                  gpu: Option<String>|
     -> Result<Option<Fix>> {
        // A change the model cannot take (LoRA on q and v of a model without attention) is
        // not a fix: it is left out, not an error of the plan being fixed.
        let Ok(e) = t.run(p) else {
            return Ok(None);
        };
        let tokens = (p.batch * accumulation * (p.seq + p.target_seq)) as f64;
        let step = e.time.step_seconds * accumulation as f64;
        Ok(Some(Fix {
            change,
            changes,
            required: e.memory.required.0,
            fits: e.memory.required <= t.budget,
            step_seconds: step,
            slowdown: step / tokens / base_time_per_token,
            gpu,
        }))
    };
    // The batch and sequence that fit with the rest of `p` as it is: a smaller micro-batch
    // with gradient accumulation keeps the effective batch; a shorter sequence does not.
    let shrink = |p: &Plan| -> Result<Vec<(String, Plan, u64)>> {
        let mut v = Vec::new();
        if p.batch > 1
            && let Some(b) = max_batch(target, p)?.filter(|&b| b < p.batch)
        {
            let accumulation = p.batch.div_ceil(b);
            v.push((
                format!("batch {b} with {accumulation} gradient-accumulation steps"),
                Plan {
                    batch: b,
                    ..p.clone()
                },
                accumulation,
            ));
        }
        if let Some(s) = max_seq(target, p)?.filter(|&s| s < p.seq) {
            v.push((
                format!("shorten the sequence to {s}"),
                Plan {
                    seq: s,
                    ..p.clone()
                },
                1,
            ));
        }
        Ok(v)
    };
    let edits = edits(plan, target.model);
    for e in &edits {
        out.extend(assess(
            e.label.clone(),
            1,
            &(e.apply)(plan),
            target,
            1,
            None,
        )?);
    }
    // Whether a single change fits that trains on the same data: a smaller micro-batch with
    // gradient accumulation does, a shorter sequence does not (it truncates every sample).
    let mut same_data_fits = out.iter().any(|f| f.fits);
    for (label, p, accumulation) in shrink(plan)? {
        let fix = assess(label, 1, &p, target, accumulation, None)?;
        same_data_fits |= p.seq == plan.seq && fix.as_ref().is_some_and(|f| f.fits);
        out.extend(fix);
    }
    if !same_data_fits {
        // No single change fits on this GPU without truncating the samples: two changes
        // together, to different parts of the plan.
        // (whether it trains on the same data, the fix)
        let mut pairs: Vec<(bool, Fix)> = Vec::new();
        for (i, a) in edits.iter().enumerate() {
            let pa = (a.apply)(plan);
            // A change the model cannot take has no pairs either.
            if target.run(&pa).is_err() {
                continue;
            }
            for b in edits[i + 1..].iter().filter(|b| b.part != a.part) {
                let label = format!("{}, and {}", a.label, b.label);
                let fix = assess(label, 2, &(b.apply)(&pa), target, 1, None)?;
                pairs.extend(fix.map(|f| (true, f)));
            }
            for (label, p, accumulation) in shrink(&pa)? {
                let label = format!("{}, and {label}", a.label);
                let fix = assess(label, 2, &p, target, accumulation, None)?;
                pairs.extend(fix.map(|f| (p.seq == plan.seq, f)));
            }
        }
        pairs.retain(|(_, f)| f.fits);
        // Those that keep the data first (a shorter sequence looks cheap per token, but it
        // trains on less of each sample), each group by its time cost.
        pairs.sort_by(|(a_keeps, a), (b_keeps, b)| {
            b_keeps.cmp(a_keeps).then(a.slowdown.total_cmp(&b.slowdown))
        });
        out.extend(pairs.into_iter().take(PAIRS_SHOWN).map(|(_, f)| f));
    }
    // The smallest catalogue GPU with more memory on which the plan fits.
    let mut bigger: Vec<&(Hardware, Rates)> = gpus
        .iter()
        .filter(|(h, _)| h.memory > target.hardware.memory)
        .collect();
    bigger.sort_by_key(|(h, _)| h.memory);
    for (hw, rates) in bigger {
        let headroom = target.budget.0 as f64 / target.hardware.memory.0 as f64;
        let t = Target {
            model: target.model,
            hardware: hw,
            rates,
            budget: Bytes((hw.memory.0 as f64 * headroom) as u64),
        };
        if t.fits(plan)? {
            out.extend(assess(
                format!("use a bigger GPU: {}", hw.display_name),
                1,
                plan,
                &t,
                1,
                Some(hw.name.clone()),
            )?);
            break;
        }
    }
    out.retain(|f| f.fits);
    out.sort_by(|a, b| {
        a.slowdown
            .total_cmp(&b.slowdown)
            .then(a.required.cmp(&b.required))
    });
    Ok(out)
}
