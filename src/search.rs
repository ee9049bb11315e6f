//! Searches over the simulator: the largest batch and sequence that fit, and single changes
//! that make a plan fit. Memory never decreases with batch or sequence length (a property the
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

/// One single change to a plan and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct Fix {
    /// What to change, for people.
    pub change: String,
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

/// Single changes that make `plan` fit, ranked by their time cost (cheapest first).
pub fn fixes(target: &Target, plan: &Plan, gpus: &[(Hardware, Rates)]) -> Result<Vec<Fix>> {
    let base = target.run(plan)?;
    let base_time_per_token =
        base.time.step_seconds / (plan.batch * (plan.seq + plan.target_seq)) as f64;
    let mut out = Vec::new();
    let mut consider = |change: String,
                        p: &Plan,
                        t: &Target,
                        accumulation: u64,
                        gpu: Option<String>|
     -> Result<()> {
        // A change the model cannot take (LoRA on q and v of a model without attention) is
        // not a fix: it is left out, not an error of the plan being fixed.
        let Ok(e) = t.run(p) else {
            return Ok(());
        };
        let tokens = (p.batch * accumulation * (p.seq + p.target_seq)) as f64;
        let step = e.time.step_seconds * accumulation as f64;
        out.push(Fix {
            change,
            required: e.memory.required.0,
            fits: e.memory.required <= t.budget,
            step_seconds: step,
            slowdown: step / tokens / base_time_per_token,
            gpu,
        });
        Ok(())
    };
    if !plan.grad_ckpt {
        let p = Plan {
            grad_ckpt: true,
            ..plan.clone()
        };
        consider("turn on gradient checkpointing".into(), &p, target, 1, None)?;
    }
    let lora = Lora {
        rank: 16,
        alpha: 32.0,
        targets: LoraTargets::QueryValue,
        dora: false,
    };
    match &plan.method {
        Method::Full => {
            let p = Plan {
                method: Method::Lora(lora.clone()),
                precision: crate::spec::plan::Precision::Bf16,
                ..plan.clone()
            };
            consider("switch to LoRA (r16, qv)".into(), &p, target, 1, None)?;
            let p = Plan {
                method: Method::Qlora(lora),
                precision: crate::spec::plan::Precision::Bf16,
                ..plan.clone()
            };
            consider("switch to QLoRA (r16, qv)".into(), &p, target, 1, None)?;
        }
        Method::Lora(l) | Method::Qlora(l) => {
            let with = |l: Lora| match &plan.method {
                Method::Lora(_) => Method::Lora(l),
                _ => Method::Qlora(l),
            };
            if matches!(plan.method, Method::Lora(_)) {
                let p = Plan {
                    method: Method::Qlora(l.clone()),
                    ..plan.clone()
                };
                consider("switch to QLoRA (4-bit base)".into(), &p, target, 1, None)?;
            }
            // A smaller rank or fewer adapted projections: less adapter state and fewer
            // saved low-rank activations.
            if l.rank > 8 {
                let p = Plan {
                    method: with(Lora {
                        rank: 8,
                        alpha: l.alpha * 8.0 / l.rank as f64,
                        ..l.clone()
                    }),
                    ..plan.clone()
                };
                consider("LoRA rank 8".into(), &p, target, 1, None)?;
            }
            if l.targets != LoraTargets::QueryValue {
                let p = Plan {
                    method: with(Lora {
                        targets: LoraTargets::QueryValue,
                        ..l.clone()
                    }),
                    ..plan.clone()
                };
                consider("LoRA on q and v only".into(), &p, target, 1, None)?;
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
    // Paged 8-bit AdamW (the QLoRA recipe): states in unified memory, which the driver evicts
    // to host memory when the GPU has no room; slower only by the pages it moves.
    let paged = Plan {
        optimizer: Optimizer::PagedAdamw8bit,
        ..plan.clone()
    };
    match plan.optimizer {
        Optimizer::Adamw | Optimizer::AdamwForeach => {
            let p = Plan {
                optimizer: Optimizer::Adamw8bit,
                ..plan.clone()
            };
            consider("use 8-bit AdamW (bitsandbytes)".into(), &p, target, 1, None)?;
            consider(
                "use paged 8-bit AdamW (states evicted to host under pressure)".into(),
                &paged,
                target,
                1,
                None,
            )?;
            // Factored second moments, no first moment (Shazeer & Stern 2018).
            let p = Plan {
                optimizer: Optimizer::Adafactor,
                ..plan.clone()
            };
            consider(
                "use Adafactor (factored states)".into(),
                &p,
                target,
                1,
                None,
            )?;
        }
        Optimizer::Adamw8bit => consider(
            "use paged 8-bit AdamW (states evicted to host under pressure)".into(),
            &paged,
            target,
            1,
            None,
        )?,
        Optimizer::PagedAdamw8bit
        | Optimizer::PagedAdamw32bit
        | Optimizer::Sgd
        | Optimizer::Adafactor => {}
    }
    // Full fine-tuning in pure bf16: bf16 weights, gradients and optimizer states, no fp32
    // master copy (what many recipes do when memory is short).
    if plan.method == Method::Full && plan.precision != crate::spec::plan::Precision::Bf16 {
        let p = Plan {
            precision: crate::spec::plan::Precision::Bf16,
            ..plan.clone()
        };
        consider(
            "train in pure bf16 (bf16 weights and optimizer states)".into(),
            &p,
            target,
            1,
            None,
        )?;
    }
    if plan.batch > 1
        && let Some(b) = max_batch(target, plan)?.filter(|&b| b < plan.batch)
    {
        let accumulation = plan.batch.div_ceil(b);
        let p = Plan {
            batch: b,
            ..plan.clone()
        };
        consider(
            format!("batch {b} with {accumulation} gradient-accumulation steps"),
            &p,
            target,
            accumulation,
            None,
        )?;
    }
    if let Some(s) = max_seq(target, plan)?.filter(|&s| s < plan.seq) {
        let p = Plan {
            seq: s,
            ..plan.clone()
        };
        consider(format!("shorten the sequence to {s}"), &p, target, 1, None)?;
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
            consider(
                format!("use a bigger GPU: {}", hw.display_name),
                plan,
                &t,
                1,
                Some(hw.name.clone()),
            )?;
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
