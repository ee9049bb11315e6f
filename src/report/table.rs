//! Tables for people (comfy-table).

use super::{count, duration, gib};
use crate::estimate::Estimate;
use crate::spec::plan::{LoraTargets, Method, Plan};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Table};

/// One line describing a plan: method and its settings, precision, shapes.
pub fn describe(plan: &Plan, enc_dec: bool) -> String {
    let method = match &plan.method {
        Method::Full => "full".to_string(),
        Method::Lora(l) | Method::Qlora(l) => {
            let t = match &l.targets {
                LoraTargets::QueryValue => "qv".to_string(),
                LoraTargets::AllLinear => "all".to_string(),
                LoraTargets::Named(p) => {
                    let names: Vec<&str> = p.iter().map(|p| p.label()).collect();
                    format!("[{}]", names.join(", "))
                }
            };
            format!("{} r{} {}", plan.method.name(), l.rank, t)
        }
        Method::Adapter { size } => format!("adapter {size}"),
        Method::Prefix { virtual_tokens } => format!("prefix {virtual_tokens}"),
        Method::Prompt { virtual_tokens } => format!("prompt {virtual_tokens}"),
        Method::Ia3 => "ia3".to_string(),
        Method::BitFit => "bitfit".to_string(),
        Method::LnTuning => "ln-tuning".to_string(),
        Method::Freeze {
            top_layers,
            embeddings,
            side,
        } => {
            let side = match side {
                Some(crate::spec::plan::Side::Encoder) => "encoder ",
                Some(crate::spec::plan::Side::Decoder) => "decoder ",
                None => "",
            };
            let top = match (top_layers, side.is_empty()) {
                (Some(n), _) => format!("top {n} {side}layers"),
                (None, true) => "top 1 layers".to_string(),
                (None, false) => format!("{side}only"),
            };
            format!(
                "freeze ({top}{})",
                if *embeddings { " + embeddings" } else { "" }
            )
        }
    };
    let seq = if enc_dec {
        format!("{}+{}", plan.seq, plan.target_seq)
    } else {
        plan.seq.to_string()
    };
    let precision = serde_json::to_value(plan.precision)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let optimizer = serde_json::to_value(plan.optimizer)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    format!(
        "{method}, {precision}, {optimizer}, batch {} x seq {seq}{}{}{}",
        plan.batch,
        if plan.grad_ckpt { ", grad-ckpt" } else { "" },
        if plan.attention == crate::spec::plan::AttentionKernel::Eager {
            ", eager attention"
        } else {
            ""
        },
        if plan.parallel.gpus > 1 {
            format!(", {} GPUs ({})", plan.parallel.gpus, plan.parallel.label())
        } else {
            String::new()
        },
    )
}

fn row(table: &mut Table, name: &str, value: String, note: &str) {
    table.add_row(vec![
        Cell::new(name),
        Cell::new(value).set_alignment(CellAlignment::Right),
        Cell::new(note),
    ]);
}

/// The estimate as a table; `budget` adds wall time and cost rows.
pub fn estimate(e: &Estimate, budget: Option<super::json::Budget>) -> String {
    let m = &e.memory;
    let b = &m.at_peak;
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(vec!["", "GiB", ""]);
    row(&mut t, "weights", gib(b.weights), "");
    row(&mut t, "gradients", gib(b.gradients), "");
    row(&mut t, "optimizer states", gib(b.optimizer), "");
    row(
        &mut t,
        "activations",
        gib(b.activations),
        "saved for backward, autocast weight copies",
    );
    row(&mut t, "logits / loss", gib(b.logits), "");
    row(
        &mut t,
        "temporary",
        gib(b.temporary),
        "op buffers, optimizer step, cuBLAS workspaces",
    );
    let phase = format!("{} at `{}`", m.peak_phase.label(), m.peak_op);
    row(
        &mut t,
        "peak (allocated)",
        gib(m.peak),
        &format!("torch.cuda.max_memory_allocated; {phase}"),
    );
    row(
        &mut t,
        "runtime overhead",
        gib(m.overhead),
        "CUDA context, allocator slack",
    );
    row(&mut t, "required", gib(m.required), "");
    if m.paged > crate::units::Bytes::ZERO {
        // Paged optimizer states: outside the allocator's peak; resident while there is room.
        let note = if m.paged_evicted > crate::units::Bytes::ZERO {
            format!(
                "unified memory: {} GiB evicted to host, paged in every step (+{:.0} ms)",
                gib(m.paged_evicted),
                e.time.paging_seconds * 1e3
            )
        } else {
            format!(
                "unified memory, resident: {} GiB on the GPU with them; up to {} GiB of host memory under pressure",
                gib(m.required + m.paged),
                gib(m.paged)
            )
        };
        row(&mut t, "paged optimizer states", gib(m.paged), &note);
    }
    let par = &e.plan.parallel;
    if par.gpus > 1 || par.engine != crate::spec::parallel::Engine::Ddp {
        row(
            &mut t,
            "model states",
            gib(m.model_states),
            "weights, gradients and optimizer states this GPU keeps",
        );
    }
    if m.host > crate::units::Bytes::ZERO {
        row(
            &mut t,
            "host memory",
            gib(m.host),
            &format!(
                "per node, for offload ({} GiB in the server)",
                gib(e.hardware.host_memory)
            ),
        );
    }
    row(
        &mut t,
        "device memory",
        gib(e.hardware.memory),
        &e.hardware.display_name,
    );
    if par.gpus > 1 {
        let (device, host) = e.job_memory();
        let nodes = par.nodes();
        let mut note = format!(
            "{}{} GPUs x required{}",
            if par.pp > 1 { "at most " } else { "" },
            par.gpus,
            if par.pp > 1 {
                " (each stage counted as the largest)"
            } else {
                ""
            }
        );
        if host > crate::units::Bytes::ZERO {
            note.push_str(&format!(
                "; host {} GiB over {nodes} node{}",
                gib(host),
                if nodes == 1 { "" } else { "s" }
            ));
        }
        row(&mut t, "job", gib(device), &note);
    }
    let pct = 100.0 * m.trainable_params as f64 / m.total_params.max(1) as f64;
    t.add_row(vec![
        Cell::new("trainable params"),
        Cell::new(count(m.trainable_params)).set_alignment(CellAlignment::Right),
        Cell::new(format!("{pct:.3}% of {}", count(m.total_params))),
    ]);
    if let Some(moe) = e.model.moe {
        row(
            &mut t,
            "active params",
            count(e.model.active_params(m.total_params)),
            &format!("per token: top-{} of {} experts", moe.top_k, moe.experts),
        );
    }
    let tm = &e.time;
    let bound = if tm.launch_bound {
        format!(
            "host-bound: {:.0} op dispatches and {:.0} module calls",
            tm.host_dispatches, tm.host_module_calls
        )
    } else {
        "GPU-bound".to_string()
    };
    row(&mut t, "step time", duration(tm.step_seconds), &bound);
    if tm.communication_seconds > 0.0 {
        row(
            &mut t,
            "communication",
            duration(tm.communication_seconds),
            &format!(
                "{} not hidden by compute",
                duration(tm.exposed_communication_seconds)
            ),
        );
    }
    if tm.bubble_fraction > 0.0 {
        row(
            &mut t,
            "pipeline bubble",
            format!("{:.1}%", tm.bubble_fraction * 100.0),
            "(p - 1) / (M + p - 1)",
        );
    }
    row(
        &mut t,
        "tokens / s",
        format!("{:.0}", tm.tokens_per_second),
        "",
    );
    row(
        &mut t,
        "MFU",
        format!("{:.1}%", tm.mfu * 100.0),
        "model FLOPs over datasheet peak",
    );
    if let Some(budget) = budget {
        let wall = budget.tokens / tm.tokens_per_second;
        row(
            &mut t,
            "wall time",
            duration(wall),
            &format!("{:.3e} tokens", budget.tokens),
        );
        if let Some(price) = budget.price_per_gpu_hour {
            row(
                &mut t,
                "cost",
                format!(
                    "${:.2}",
                    wall / 3600.0 * price * e.plan.parallel.gpus as f64
                ),
                &format!("${price:.2} per GPU-hour"),
            );
        }
    }
    let verdict = if e.fits { "FITS" } else { "DOES NOT FIT" };
    // Against the budget (device memory less headroom), the same figure `fits` compares with.
    let margin = e.budget.0 as f64 - m.required.0 as f64;
    row(
        &mut t,
        "verdict",
        verdict.to_string(),
        &format!("margin {:+.2} GiB", margin / (1u64 << 30) as f64),
    );
    format!(
        "{} on {}: {}\n{t}\n",
        e.model.name,
        e.hardware.name,
        describe(&e.plan, e.model.is_encoder_decoder())
    )
}

/// The accuracy table against measured runs.
pub fn validation(
    rows: &[crate::validate::Row],
    s: &crate::validate::Summary,
    rates: &str,
) -> String {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "run",
        "measured GiB",
        "estimate GiB",
        "error",
        "measured ms",
        "estimate ms",
        "error",
    ]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for r in rows {
        t.add_row(vec![
            Cell::new(&r.name),
            right(format!(
                "{:.2}",
                r.measured_peak as f64 / (1u64 << 30) as f64
            )),
            right(format!(
                "{:.2}",
                r.estimated_peak as f64 / (1u64 << 30) as f64
            )),
            right(format!("{:+.1}%", r.error * 100.0)),
            right(
                r.measured_step_s
                    .map(|m| format!("{:.1}", m * 1e3))
                    .unwrap_or_default(),
            ),
            right(format!("{:.1}", r.estimated_step_s * 1e3)),
            right(
                r.time_error()
                    .map(|e| format!("{:+.1}%", e * 100.0))
                    .unwrap_or_default(),
            ),
        ]);
    }
    let timed = rows.iter().any(|r| r.measured_step_s.is_some());
    let time_line = if timed {
        format!(
            "step time:   median |error| {:.1}%, worst {:.1}% (bounds {:.0}% / {:.0}%; rates: {rates})",
            s.time_median * 100.0,
            s.time_worst * 100.0,
            crate::validate::TIME_MEDIAN_BOUND * 100.0,
            crate::validate::TIME_WORST_BOUND * 100.0,
        )
    } else {
        "step time:   not measured in these runs".to_string()
    };
    format!(
        "{t}\npeak memory: median |error| {:.1}%, worst {:.1}% over {} runs (bounds {:.0}% / {:.0}%); trainable parameters {}\n{time_line}\n",
        s.memory_median * 100.0,
        s.memory_worst * 100.0,
        s.runs,
        crate::validate::MEDIAN_BOUND * 100.0,
        crate::validate::WORST_BOUND * 100.0,
        if s.trainable_exact {
            "all exact"
        } else {
            "NOT all exact"
        },
    )
}

fn styled(header: Vec<String>) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(header);
    t
}

/// Methods (or GPUs) side by side.
pub fn compare(bars: &[super::chart::Bar]) -> String {
    let mut t = styled(
        [
            "method",
            "trainable",
            "weights",
            "grads",
            "optimizer",
            "activations",
            "logits",
            "temp",
            "peak",
            "required",
            "device",
            "step",
            "tokens/s",
            "verdict",
        ]
        .map(String::from)
        .to_vec(),
    );
    for b in bars {
        let e = &b.estimate;
        let m = &e.memory;
        let p = &m.at_peak;
        t.add_row(vec![
            b.label.clone(),
            count(m.trainable_params),
            gib(p.weights),
            gib(p.gradients),
            gib(p.optimizer),
            gib(p.activations),
            gib(p.logits),
            gib(p.temporary),
            gib(m.peak),
            gib(m.required),
            gib(b.budget),
            duration(e.time.step_seconds),
            format!("{:.0}", e.time.tokens_per_second),
            if e.fits {
                "fits".into()
            } else {
                "DOES NOT FIT".into()
            },
        ]);
    }
    format!("memory in GiB\n{t}")
}

/// A sweep: required memory (and step time) per value, one column pair per method.
pub fn sweep(axis: &str, series: &[super::chart::Series], budget: crate::units::Bytes) -> String {
    let mut header = vec![axis.to_string()];
    for s in series {
        header.push(format!("{} GiB", s.name));
        header.push(format!("{} step", s.name));
    }
    let mut t = styled(header);
    let n = series.first().map_or(0, |s| s.points.len());
    for i in 0..n {
        let mut row = vec![series[0].points[i].x.to_string()];
        for s in series {
            let p = &s.points[i];
            let mark = if p.required > budget { " x" } else { "" };
            row.push(format!("{}{mark}", gib(p.required)));
            row.push(duration(p.step_seconds));
        }
        t.add_row(row);
    }
    format!(
        "required memory (x: over the {} GiB limit) and step time\n{t}",
        gib(budget)
    )
}

/// The models x GPUs fit matrix.
pub fn matrix(gpus: &[String], rows: &[(String, Vec<super::chart::Cell>)]) -> String {
    let mut header = vec!["model".to_string()];
    header.extend(gpus.iter().cloned());
    let mut t = styled(header);
    for (name, cells) in rows {
        let mut row = vec![name.clone()];
        row.extend(
            cells
                .iter()
                .map(|c| format!("{} {}", if c.fits { "fits" } else { "no" }, gib(c.required))),
        );
        t.add_row(row);
    }
    format!("required GiB per model and GPU\n{t}")
}

/// `list models`.
pub fn models(entries: &[crate::spec::registry::ModelEntry]) -> String {
    let header = [
        "name", "type", "params", "layers", "hidden", "heads/kv", "vocab",
    ];
    let mut t = styled(header.iter().map(|h| h.to_string()).collect());
    for m in entries {
        t.add_row(vec![
            m.name.clone(),
            m.model_type.into(),
            m.params.map(count).unwrap_or_default(),
            match m.encoder_layers {
                Some(e) => format!("{e}+{}", m.layers),
                None => m.layers.to_string(),
            },
            m.hidden_size.to_string(),
            format!("{}/{}", m.heads, m.kv_heads),
            m.vocab_size.to_string(),
        ]);
    }
    t.to_string()
}

/// `list gpus`.
pub fn gpus(entries: &[crate::spec::registry::GpuEntry]) -> String {
    let header = [
        "name",
        "device",
        "memory GiB",
        "bf16 TFLOP/s",
        "HBM GB/s",
        "interconnect",
    ];
    let mut t = styled(header.iter().map(|h| h.to_string()).collect());
    for g in entries {
        t.add_row(vec![
            g.name.clone(),
            g.display_name.clone(),
            format!("{:.1}", crate::units::Bytes(g.memory).gib()),
            format!("{:.0}", g.bf16_tflops),
            format!("{:.0}", g.hbm_gbps),
            g.interconnect.clone(),
        ]);
    }
    t.to_string()
}

/// `check`: one row per plan, its required memory against its GPU's budget, or INVALID.
pub fn check(c: &crate::explore::Check) -> String {
    let header = [
        "plan",
        "required GiB",
        "device",
        "device GiB",
        "margin GiB",
        "verdict",
    ];
    let mut t = styled(header.iter().map(|h| h.to_string()).collect());
    for p in &c.plans {
        t.add_row(match p {
            crate::explore::Checked::Plan(p) => vec![
                p.plan.clone(),
                gib(crate::units::Bytes(p.required)),
                p.device.name.clone(),
                gib(crate::units::Bytes(p.budget)),
                format!("{:+.2}", p.margin as f64 / (1u64 << 30) as f64),
                if p.fits { "fits" } else { "DOES NOT FIT" }.into(),
            ],
            crate::explore::Checked::Invalid { origin, .. } => {
                let mut row = vec![origin.clone()];
                row.extend([String::new(), String::new(), String::new(), String::new()]);
                row.push("INVALID".into());
                row
            }
        });
    }
    t.to_string()
}

/// `fit`: the verdict, the largest batch and sequence, the fixes when it does not fit, and
/// the layouts (searched up to `max_gpus`, ranked by `objective`).
pub fn fit(f: &crate::explore::Fit, max_gpus: u64, objective: crate::layouts::Objective) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let verdict = if f.fits { "fits" } else { "does not fit" };
    let _ = writeln!(
        out,
        "{}: needs {} GiB of {} GiB on {}: {verdict}",
        f.plan,
        gib(crate::units::Bytes(f.required)),
        gib(crate::units::Bytes(f.budget)),
        f.searched.first().map_or("", String::as_str)
    );
    let show = |v: Option<u64>| {
        v.map_or("none (batch 1 / length 1 does not fit)".to_string(), |v| {
            v.to_string()
        })
    };
    let _ = writeln!(
        out,
        "largest micro-batch at seq {}: {}",
        f.seq,
        show(f.max_batch)
    );
    let _ = writeln!(
        out,
        "longest sequence at batch {}: {}",
        f.batch,
        show(f.max_seq)
    );
    if !f.fits {
        if f.fixes.is_empty() {
            let _ = writeln!(out, "no change, nor two together, makes it fit");
        } else {
            let header = ["#", "change", "required GiB", "time per token"];
            let mut t = styled(header.iter().map(|h| h.to_string()).collect());
            for (i, x) in f.fixes.iter().enumerate() {
                t.add_row(vec![
                    (i + 1).to_string(),
                    x.change.clone(),
                    format!("{:.2}", x.required as f64 / (1u64 << 30) as f64),
                    format!("{:.2}x", x.slowdown),
                ]);
            }
            let _ = writeln!(out, "{t}");
        }
    }
    if f.keep > 0 {
        let several = f.searched.len() > 1;
        out.push_str(&layouts(&f.layouts, max_gpus, objective, several));
    }
    out
}

/// `fit`'s layout search: one line per layout, best first by `objective`.
pub fn layouts(
    found: &[crate::layouts::Layout],
    max_gpus: u64,
    objective: crate::layouts::Objective,
    several_gpu_types: bool,
) -> String {
    if found.is_empty() {
        return format!("no layout of up to {max_gpus} GPUs fits\n");
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    let gpu = several_gpu_types.then_some("GPU");
    t.set_header(["#"].into_iter().chain(gpu).chain([
        "GPUs",
        "layout",
        "ckpt",
        "GiB per GPU",
        "host GiB/node",
        "step",
        "tokens / s",
        "$ / M tokens",
    ]));
    for (i, l) in found.iter().enumerate() {
        let gpu = several_gpu_types.then(|| l.gpu.clone());
        t.add_row(
            [(i + 1).to_string()].into_iter().chain(gpu).chain([
                format!(
                    "{} ({} node{})",
                    l.parallel.gpus,
                    l.parallel.nodes(),
                    if l.parallel.nodes() == 1 { "" } else { "s" }
                ),
                l.parallel.label(),
                if l.grad_ckpt { "yes" } else { "no" }.to_string(),
                gib(crate::units::Bytes(l.memory.required)),
                if l.memory.host > 0 {
                    gib(crate::units::Bytes(l.memory.host))
                } else {
                    String::new()
                },
                duration(l.time.step_seconds),
                format!("{:.0}", l.time.tokens_per_second),
                l.time
                    .cost_per_million_tokens
                    .map_or(String::new(), |c| format!("{c:.2}")),
            ]),
        );
    }
    let by = match objective {
        crate::layouts::Objective::Gpus => "fewest GPUs, then fastest step",
        crate::layouts::Objective::Time => "most tokens per second",
        crate::layouts::Objective::Cost => "lowest cost per million tokens",
    };
    format!("layouts that fit, best first ({by}; --objective to change):\n{t}\n")
}

/// `sweep --over gpus`: methods x models, the fewest GPUs each needs.
pub fn gpus_needed(g: &crate::explore::GpusNeeded) -> String {
    let mut header = vec!["method".to_string()];
    header.extend(g.models.iter().cloned());
    let mut t = styled(header);
    for s in &g.series {
        let mut row = vec![s.method.clone()];
        row.extend(
            s.gpus
                .iter()
                .zip(&s.refused)
                .map(|(n, refused)| match (n, refused) {
                    (Some(n), _) => n.to_string(),
                    (None, Some(_)) => "n/a".to_string(),
                    (None, None) => "> 4096".to_string(),
                }),
        );
        t.add_row(row);
    }
    t.to_string()
}

/// `sweep --over updates`: per method, how many blocks each part trains in.
pub fn updates(u: &crate::explore::Updates) -> String {
    use crate::explore::{PARTS, Update};
    let mut header = vec!["method".to_string(), "trainable".to_string()];
    header.extend(PARTS.iter().map(|p| p.to_string()));
    let mut t = styled(header);
    for p in &u.panels {
        let mut row = vec![p.method.clone(), p.trainable_params.to_string()];
        for part in 0..PARTS.len() {
            let cells: Vec<Update> = p.cells.iter().map(|c| c[part]).collect();
            let present = cells.iter().filter(|c| **c != Update::Absent).count();
            let count = |k: Update| cells.iter().filter(|c| **c == k).count();
            let said: Vec<String> = [
                (Update::Trains, "trains"),
                (Update::Partly, "partly"),
                (Update::Added, "added"),
            ]
            .iter()
            .filter(|(k, _)| count(*k) > 0)
            .map(|(k, w)| format!("{w} {}/{present}", count(*k)))
            .collect();
            row.push(if present == 0 {
                "-".to_string()
            } else if said.is_empty() {
                "frozen".to_string()
            } else {
                said.join(", ")
            });
        }
        t.add_row(row);
    }
    t.to_string()
}

/// `sweep --over scale`: trainable parameters and peak GiB per method and model.
pub fn scale(s: &crate::explore::Scale) -> String {
    let mut header = vec!["method".to_string()];
    header.extend(s.models.iter().cloned());
    let mut t = styled(header);
    for m in &s.series {
        let mut row = vec![m.method.clone()];
        row.extend(
            m.trainable_params
                .iter()
                .zip(&m.peak_gib)
                .map(|(t, p)| match p {
                    Some(p) => format!("{t} / {p:.1} GiB"),
                    None => "n/a".to_string(),
                }),
        );
        t.add_row(row);
    }
    t.to_string()
}

/// `ftplan measure`: estimate and measurement side by side.
pub fn measure(c: &crate::measure::Comparison) -> String {
    let mut t = styled(vec![
        String::new(),
        "estimate".into(),
        "measured".into(),
        "error".into(),
    ]);
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let pct = |e: f64| format!("{:+.1}%", e * 100.0);
    let e = &c.estimate;
    let m = &c.measured;
    t.add_row(vec![
        "peak memory".into(),
        mib(e.memory.peak.0),
        mib(m.peak),
        pct(c.errors.peak),
    ]);
    t.add_row(vec![
        "step time".into(),
        format!("{:.1} ms", e.time.step_seconds * 1e3),
        format!("{:.1} ms", m.step_seconds * 1e3),
        pct(c.errors.step_seconds),
    ]);
    t.add_row(vec![
        "tokens / s".into(),
        format!("{:.0}", e.time.tokens_per_second),
        format!("{:.0}", m.tokens_per_second),
        pct(c.errors.tokens_per_second),
    ]);
    t.add_row(vec![
        "trainable params".into(),
        e.memory.trainable_params.to_string(),
        m.params_trainable.to_string(),
        pct(c.errors.params_trainable),
    ]);
    t.to_string()
}
