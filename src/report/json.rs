//! JSON output. Field names are a contract: add, never rename.

use crate::estimate::Estimate;
use serde_json::{Value, json};

/// Wall time and cost for a number of training tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub tokens: f64,
    pub price_per_gpu_hour: Option<f64>,
}

pub fn estimate(e: &Estimate, budget: Option<Budget>, notes: &[String]) -> Value {
    let m = &e.memory;
    let b = &m.at_peak;
    let (job_device, job_host) = e.job_memory();
    let mut time = json!({
        "step_seconds": e.time.step_seconds,
        "tokens_per_second": e.time.tokens_per_second,
        "mfu": e.time.mfu,
        "launch_bound": e.time.launch_bound,
        "host_seconds": e.time.host_seconds,
        "host_dispatches": e.time.host_dispatches,
        "host_module_calls": e.time.host_module_calls,
        "forward_seconds": e.time.forward_seconds,
        "backward_seconds": e.time.backward_seconds,
        "optimizer_seconds": e.time.optimizer_seconds,
        "allreduce_seconds": e.time.allreduce_seconds,
        "communication_seconds": e.time.communication_seconds,
        "data_parallel_bytes": e.time.data_parallel_bytes,
        "exposed_communication_seconds": e.time.exposed_communication_seconds,
        "bubble_fraction": e.time.bubble_fraction,
        "paging_seconds": e.time.paging_seconds,
    });
    if let Some(budget) = budget {
        let wall = budget.tokens / e.time.tokens_per_second;
        time["training_tokens"] = json!(budget.tokens);
        time["wall_seconds"] = json!(wall);
        if let Some(price) = budget.price_per_gpu_hour {
            time["cost_usd"] = json!(wall / 3600.0 * price * e.plan.parallel.gpus as f64);
        }
    }
    let mut plan = json!(e.plan);
    // The contract kept `plan.gpus` before the layout became `plan.parallel`.
    plan["gpus"] = json!(e.plan.parallel.gpus);
    json!({
        "model": { "name": e.model.name, "params": m.base_params, "family": e.model.family },
        "total_params": m.total_params,
        "active_params": e.model.active_params(m.total_params),
        "method": e.plan.method.name(),
        "plan": plan,
        "trainable_params": m.trainable_params,
        "memory": {
            "weights": b.weights.0,
            "gradients": b.gradients.0,
            "optimizer": b.optimizer.0,
            "activations": b.activations.0,
            "logits": b.logits.0,
            "temporary": b.temporary.0,
            "peak": m.peak.0,
            "overhead": m.overhead.0,
            "required": m.required.0,
            "peak_phase": m.peak_phase,
            "peak_op": m.peak_op,
            "persistent": m.persistent.0,
            "model_states": m.model_states.0,
            "paged": m.paged.0,
            "paged_evicted": m.paged_evicted.0,
        },
        "parallel": {
            "gpus": e.plan.parallel.gpus,
            "nodes": e.plan.parallel.nodes(),
            "gpus_per_node": e.plan.parallel.gpus_per_node,
            "engine": e.plan.parallel.engine,
            "offload": e.plan.parallel.offload,
            "tp": e.plan.parallel.tp,
            "sp": e.plan.parallel.sp,
            "pp": e.plan.parallel.pp,
            "micro_batches": e.plan.parallel.micro_batches,
            "grad_accum": e.plan.parallel.grad_accum,
            "dp": e.plan.parallel.dp(),
        },
        "host_memory": m.host.0,
        "job": {
            "gpus": e.plan.parallel.gpus,
            "nodes": e.plan.parallel.nodes(),
            "required": job_device.0,
            "host_memory": job_host.0,
        },
        "device": { "name": e.hardware.name, "memory": e.hardware.memory.0, "display_name": e.hardware.display_name },
        "fits": e.fits,
        "time": time,
        "notes": notes,
    })
}

/// `compare`: one `estimate` object per bar (the contract since the first release).
pub fn compare(c: &crate::explore::Comparison) -> Value {
    Value::Array(
        c.bars
            .iter()
            .map(|b| estimate(&b.estimate, None, &[]))
            .collect(),
    )
}

/// `sweep --over seq|batch`.
pub fn sweep(s: &crate::explore::Sweep) -> Value {
    json!({ "axis": s.axis.label(), "budget": s.budget.0, "series": s.series, "stopped": s.stopped })
}

/// `sweep --over matrix`.
pub fn matrix(method: &str, m: &crate::explore::Matrix) -> Value {
    json!({
        "method": method,
        "gpus": m.gpus,
        "rows": m.rows.iter().map(|(model, cells)| json!({ "model": model, "cells": cells })).collect::<Vec<_>>(),
        "left_out": m.left_out,
    })
}

/// `sweep --over gpus`.
pub fn gpus_needed(g: &crate::explore::GpusNeeded) -> Value {
    let mut needed = Vec::new();
    for s in &g.series {
        for (i, model) in g.models.iter().enumerate() {
            needed.push(json!({
                "model": model,
                "method": s.method,
                "gpus": s.gpus.get(i).copied().flatten(),
                "layout": s.layouts.get(i).cloned().flatten(),
                "refused": s.refused.get(i).cloned().flatten(),
            }));
        }
    }
    json!({ "needed": needed })
}

/// `measure`'s JSON: the estimate (as `estimate` prints it, with its `notes`) beside the
/// measurement, their relative errors and the Python stack that ran.
pub fn measure(c: &crate::measure::Comparison, notes: &[String]) -> Value {
    json!({
        "estimate": estimate(&c.estimate, None, notes),
        "measured": c.measured,
        "errors": c.errors,
        "environment": c.environment,
    })
}
