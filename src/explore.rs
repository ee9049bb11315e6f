//! The answers behind `check`, `fit`, `compare`, `sweep` and the fit matrix: estimates and
//! searches over resolved cases, gathered into one typed, serialisable result per command, which
//! the table, JSON, Markdown and chart writers in `report` render. The CLI resolves the cases
//! and renders.

use crate::error::{Error, Result};
use crate::estimate::{Estimate, estimate_within};
use crate::layouts::{self, Bounds, Fixed, Layout};
use crate::search::Target;
use crate::spec::hardware::Hardware;
use crate::spec::model::ModelSpec;
use crate::spec::plan::Plan;
use crate::time::Rates;
use crate::units::Bytes;
use serde::Serialize;

/// One resolved plan to estimate: a model, plan and GPU with its rates and memory budget.
#[derive(Debug, Clone)]
pub struct Case {
    pub model: ModelSpec,
    pub plan: Plan,
    pub hardware: Hardware,
    pub rates: Rates,
    /// Device memory the plan may use (less headroom).
    pub budget: Bytes,
    /// Where the plan came from (the command line, a plan file): what its refusals name.
    pub origin: String,
}

impl Case {
    /// What the searches read of it: the model, GPU, rates and budget.
    fn target(&self) -> Target<'_> {
        Target {
            model: &self.model,
            hardware: &self.hardware,
            rates: &self.rates,
            budget: self.budget,
        }
    }

    fn run(&self) -> Result<Estimate> {
        estimate_within(
            &self.model,
            &self.plan,
            &self.hardware,
            &self.rates,
            self.budget,
        )
        .map_err(|e| e.from_origin(&self.origin))
    }
}

/// One method (or GPU) in a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Bar {
    pub label: String,
    pub estimate: Estimate,
    pub budget: Bytes,
}

/// `compare`: methods (and GPUs) side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub model: String,
    pub title: String,
    pub bars: Vec<Bar>,
    /// Methods the plan's rules refuse for the model, left out (see [`triage`]).
    pub left_out: Vec<LeftOut>,
}

/// A method (on a GPU) the plan's rules refuse for the model: prefix tuning where peft's prefix
/// does not fit the cache, prompt tokens past a learned position table, LoRA's default
/// targets on a model without attention.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOut {
    pub label: String,
    /// The refusal and its hint, on one line.
    pub reason: String,
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is left out: {}", self.label, self.reason)
    }
}

/// What an exploration does with a method the model refuses: a list the user chose fails on
/// it; a default list (every method) leaves it out and says why, so it shows what applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Fail,
    LeaveOut,
}

/// A case and its estimate.
pub type Estimated = (Case, Estimate);

/// Splits labelled resolutions into the cases that resolve and estimate (with their estimate)
/// and the ones left out, per `refused` (some refusals need the estimate: peft's targets
/// matching nothing). When every one is refused, the first refusal is the error: nothing
/// applies.
pub fn triage(
    resolved: Vec<(String, Result<Case>)>,
    refused: Refused,
) -> Result<(Vec<Estimated>, Vec<LeftOut>)> {
    let (mut cases, mut left_out, mut first_refusal) = (Vec::new(), Vec::new(), None);
    for (label, r) in resolved {
        match r.and_then(|case| case.run().map(|e| (case, e))) {
            Ok(estimated) => cases.push(estimated),
            Err(err) if refused == Refused::LeaveOut => {
                left_out.push(LeftOut {
                    label,
                    reason: one_line(&err),
                });
                first_refusal.get_or_insert(err);
            }
            Err(err) => return Err(err),
        }
    }
    match first_refusal {
        Some(err) if cases.is_empty() => Err(err),
        _ => Ok((cases, left_out)),
    }
}

/// An error on one line (a note's reason): the refusal, then its hint.
fn one_line(err: &Error) -> String {
    err.to_string().replace("\nhint: ", "; ")
}

/// The estimated cases ([`triage`]) side by side; bars are labelled by method, and by GPU when
/// there are several.
pub fn compare(estimated: Vec<Estimated>, left_out: Vec<LeftOut>) -> Result<Comparison> {
    let (first, _) = estimated.first().ok_or_else(|| Error::Plan {
        message: "nothing to compare".into(),
        hint: Some("pass --methods and/or --gpus-list".into()),
    })?;
    let several_gpus = estimated
        .iter()
        .any(|(c, _)| c.hardware.name != first.hardware.name);
    let p = &first.plan;
    let seq = if first.model.is_encoder_decoder() {
        format!("{}+{}", p.seq, p.target_seq)
    } else {
        p.seq.to_string()
    };
    let model = first.model.name.clone();
    let title = format!(
        "{model}: required memory by method (GiB; batch {} x seq {seq}{})",
        p.batch,
        if p.grad_ckpt { ", grad-ckpt" } else { "" }
    );
    let bars = estimated
        .into_iter()
        .map(|(c, estimate)| Bar {
            label: format!(
                "{}{}",
                c.plan.method.name(),
                if several_gpus {
                    format!(" @ {}", c.hardware.name)
                } else {
                    String::new()
                }
            ),
            estimate,
            budget: c.budget,
        })
        .collect();
    Ok(Comparison {
        model,
        title,
        bars,
        left_out,
    })
}

/// What a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Seq,
    Batch,
}

impl Axis {
    pub fn label(self) -> &'static str {
        match self {
            Axis::Seq => "sequence length (tokens)",
            Axis::Batch => "micro-batch",
        }
    }
}

/// A value of the swept variable.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SweepPoint {
    pub x: u64,
    pub required: Bytes,
    pub step_seconds: f64,
}

/// One curve of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<SweepPoint>,
}

/// `sweep --over seq|batch`: one curve per method.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub model: String,
    pub title: String,
    pub axis: Axis,
    pub budget: Bytes,
    pub series: Vec<Series>,
    /// Where a curve ended early, and why (a learned position table, say).
    pub stopped: Vec<String>,
}

/// Sweeps `axis` over `values` for each case (one per method); `left_out` are the methods
/// [`triage`] left out, said in `stopped`.
pub fn sweep(
    estimated: &[Estimated],
    left_out: &[LeftOut],
    axis: Axis,
    values: &[u64],
) -> Result<Sweep> {
    let (first, _) = estimated.first().ok_or_else(|| Error::Plan {
        message: "nothing to sweep".into(),
        hint: Some("pass --methods".into()),
    })?;
    let mut series = Vec::new();
    let mut stopped: Vec<String> = left_out
        .iter()
        .map(|l| format!("the {} curve is left out: {}", l.label, l.reason))
        .collect();
    for (c, given) in estimated {
        let mut points = Vec::new();
        for &v in values {
            let mut case = c.clone();
            let at = match axis {
                Axis::Seq => &mut case.plan.seq,
                Axis::Batch => &mut case.plan.batch,
            };
            // The case's own estimate where it already sits at this value (triage estimated
            // each curve at its first).
            let e = if *at == v {
                Ok(given.clone())
            } else {
                *at = v;
                case.run()
            };
            // The curve ends where the model stops.
            let e = match e {
                Ok(e) => e,
                Err(err) if !points.is_empty() => {
                    stopped.push(format!(
                        "the {} curve stops at {v}: {err}",
                        c.plan.method.name()
                    ));
                    break;
                }
                Err(err) => return Err(err),
            };
            points.push(SweepPoint {
                x: v,
                required: e.memory.required,
                step_seconds: e.time.step_seconds,
            });
        }
        series.push(Series {
            name: c.plan.method.name().to_string(),
            points,
        });
    }
    Ok(Sweep {
        model: first.model.name.clone(),
        title: format!(
            "{} on {}: memory vs {}",
            first.model.name,
            first.hardware.display_name,
            axis.label()
        ),
        axis,
        budget: first.budget,
        series,
        stopped,
    })
}

/// One model x GPU cell of a fit matrix.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cell {
    pub required: Bytes,
    pub budget: Bytes,
    pub fits: bool,
}

/// `sweep --over matrix`: models x GPUs for one method.
#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub title: String,
    pub gpus: Vec<String>,
    pub rows: Vec<(String, Vec<Cell>)>,
    /// Models that refuse the method, left out of the rows.
    pub left_out: Vec<LeftOut>,
}

/// Estimates each row's cases (one per GPU; a row is labelled by the model as given). A model
/// that refuses the method on any GPU is left out; when every one does, the first refusal is
/// the error.
pub fn matrix(
    title: String,
    gpus: Vec<String>,
    rows: Vec<(String, Vec<Result<Case>>)>,
) -> Result<Matrix> {
    let (mut kept, mut left_out, mut first_refusal) = (Vec::new(), Vec::new(), None);
    for (label, cases) in rows {
        let cells = cases
            .into_iter()
            .map(|c| {
                let c = c?;
                let e = c.run()?;
                Ok((
                    c.model.name,
                    Cell {
                        required: e.memory.required,
                        budget: c.budget,
                        fits: e.fits,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>();
        match cells {
            Ok(cells) => {
                let model = cells.first().map_or(label, |(name, _)| name.clone());
                kept.push((model, cells.into_iter().map(|(_, c)| c).collect()));
            }
            Err(err) => {
                left_out.push(LeftOut {
                    label,
                    reason: one_line(&err),
                });
                first_refusal.get_or_insert(err);
            }
        }
    }
    match first_refusal {
        Some(err) if kept.is_empty() => Err(err),
        _ => Ok(Matrix {
            title,
            gpus,
            rows: kept,
            left_out,
        }),
    }
}

/// One method's fewest GPUs for each model (`None`: none within the search's bound, or the
/// model refuses the method).
#[derive(Debug, Clone, Serialize)]
pub struct Needed {
    pub method: String,
    pub gpus: Vec<Option<u64>>,
    pub layouts: Vec<Option<Layout>>,
    /// Why the model refuses the method (LoRA's q,v targets on Mamba, say), where it does.
    pub refused: Vec<Option<String>>,
}

/// `sweep --over gpus`: the fewest GPUs each method needs, per model.
#[derive(Debug, Clone, Serialize)]
pub struct GpusNeeded {
    pub title: String,
    pub models: Vec<String>,
    pub series: Vec<Needed>,
}

/// For each method (a row of cases, one per model), the fewest-GPU layout of each model. A
/// method a model refuses has no layout there and says why; when every one is refused, the
/// first refusal is the error.
pub fn gpus_needed(
    models: Vec<String>,
    methods: Vec<(String, Vec<Result<Case>>)>,
    fixed: Fixed,
    max_gpus: u64,
) -> Result<GpusNeeded> {
    let mut gpu_name = String::new();
    let mut series = Vec::new();
    let (mut any, mut first_refusal) = (false, None);
    for (method, cases) in methods {
        let mut needed = Needed {
            method,
            gpus: Vec::new(),
            layouts: Vec::new(),
            refused: Vec::new(),
        };
        for c in cases {
            let best = c.and_then(|c| {
                gpu_name = c.hardware.display_name.clone();
                let target = c.target();
                let bounds = Bounds {
                    max_gpus,
                    host_memory: c.hardware.host_memory,
                    price_per_gpu_hour: c.hardware.price_per_hour_usd,
                };
                // A refusal the estimate finds (peft's targets matching nothing) comes back
                // from the search's estimates.
                layouts::fewest_gpus(&target, &c.plan, fixed, bounds)
                    .map_err(|e| e.from_origin(&c.origin))
            });
            match best {
                Ok(best) => {
                    any = true;
                    needed.gpus.push(best.as_ref().map(|l| l.parallel.gpus));
                    needed.layouts.push(best);
                    needed.refused.push(None);
                }
                Err(err) => {
                    needed.gpus.push(None);
                    needed.layouts.push(None);
                    needed.refused.push(Some(one_line(&err)));
                    first_refusal.get_or_insert(err);
                }
            }
        }
        series.push(needed);
    }
    if let Some(err) = first_refusal.filter(|_| !any) {
        return Err(err);
    }
    Ok(GpusNeeded {
        title: format!("GPUs needed per method on {gpu_name}"),
        models,
        series,
    })
}

/// What a method does to one part of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    /// The part has no parameters here.
    Absent,
    Frozen,
    /// Some of its parameters train (BitFit's biases, LN tuning's shifts beside a frozen weight).
    Partly,
    Trains,
    /// The method adds trainable parameters here (LoRA, adapters, prefixes, prompts, IA3).
    Added,
}

/// The parts of a model the "which parameters update" chart shows, in its row order.
pub const PARTS: [&str; 5] = ["embeddings", "attention / mixer", "FFN", "norms", "LM head"];

/// One method's view: `cells[column][part]`, column 0 outside the blocks, then block by block.
#[derive(Debug, Clone, Serialize)]
pub struct UpdatePanel {
    pub method: String,
    pub trainable_params: u64,
    pub cells: Vec<[Update; 5]>,
}

/// `sweep --over updates`: which parameters each method updates, by part and block, read from
/// each plan's op graph (the parameters it builds and whether each trains).
#[derive(Debug, Clone, Serialize)]
pub struct Updates {
    pub title: String,
    pub model: String,
    pub blocks: u64,
    pub panels: Vec<UpdatePanel>,
    /// Methods the model refuses, left out of the panels.
    pub left_out: Vec<LeftOut>,
}

fn part_of(name: &str, role: crate::spec::model::ParamRole) -> usize {
    use crate::spec::model::ParamRole;
    if name.contains("lm_head") {
        4
    } else if role == ParamRole::Embedding || name.contains("prompt") {
        0
    } else if matches!(role, ParamRole::Norm | ParamRole::NormBias) || name.contains("norm") {
        3
    } else if name.contains("attn")
        || name.contains("attention")
        || name.contains("mixer")
        || name.contains("prefix")
    {
        1
    } else {
        2
    }
}

/// Which parameters update under each of `plans` for `model`.
pub fn updates(model: &ModelSpec, plans: &[Plan], left_out: Vec<LeftOut>) -> Updates {
    let blocks = model.decoder.layers + model.encoder.map_or(0, |e| e.layers);
    let columns = blocks as usize + 1;
    let mut panels = Vec::new();
    for plan in plans {
        let g = crate::graph::build(model, plan);
        // (trainable, frozen, added) per cell.
        let mut tally = vec![[(0u64, 0u64, 0u64); 5]; columns];
        let mut trainable_params = 0;
        for p in &g.params {
            let name = g.name(p.name);
            let part = part_of(&name, p.role);
            let added = p.role == crate::spec::model::ParamRole::Adapter;
            if p.trainable {
                trainable_params += p.count();
            }
            // Prefix tuning's one embedding feeds every block's attention.
            let cols: Vec<usize> = match p.layer {
                None if name.contains("prefix") => (1..columns).collect(),
                None => vec![0],
                Some(first) => (0..blocks)
                    .filter(|&l| g.built_as.get(l as usize) == Some(&first))
                    .map(|l| l as usize + 1)
                    .collect(),
            };
            for c in cols {
                let t = &mut tally[c][part];
                match (added, p.trainable) {
                    (true, _) => t.2 += 1,
                    (false, true) => t.0 += 1,
                    (false, false) => t.1 += 1,
                }
            }
        }
        let cells = tally
            .iter()
            .map(|row| {
                row.map(|(trains, frozen, added)| match (trains, frozen, added) {
                    (_, _, a) if a > 0 => Update::Added,
                    (0, 0, _) => Update::Absent,
                    (0, _, _) => Update::Frozen,
                    (_, 0, _) => Update::Trains,
                    _ => Update::Partly,
                })
            })
            .collect();
        panels.push(UpdatePanel {
            method: plan.method.name().to_string(),
            trainable_params,
            cells,
        });
    }
    Updates {
        title: format!("Which parameters update: {}", model.name),
        model: model.name.clone(),
        blocks,
        panels,
        left_out,
    }
}

/// One method across model scales.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleSeries {
    pub method: String,
    pub trainable_params: Vec<u64>,
    /// Peak memory per GPU (GiB); None where the method does not apply.
    pub peak_gib: Vec<Option<f64>>,
}

/// `sweep --over scale`: trainable parameters and peak memory per method across model sizes
/// (why parameter-efficient methods exist).
#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    pub title: String,
    pub models: Vec<String>,
    pub total_params: Vec<u64>,
    pub series: Vec<ScaleSeries>,
    /// Models every method is refused on, left out of the columns.
    pub left_out: Vec<LeftOut>,
}

/// Estimates each method (`cases[method][model]`) across the models (labelled as given). A
/// method the plan's rules refuse on a model (prefix tuning on PaLM's multi-query cache, say)
/// has no point there; a model every method is refused on is left out, as the fit matrix
/// leaves one out; when every model is, the first refusal is the error.
pub fn scale(models: &[String], methods: Vec<(String, Vec<Result<Case>>)>) -> Result<Scale> {
    let columns = methods.first().map_or(0, |(_, c)| c.len());
    // Each model's first resolved case (any method), or its first refusal.
    let mut firsts: Vec<&Case> = Vec::new();
    let (mut left_out, mut first_refusal) = (Vec::new(), None);
    let mut kept = vec![true; columns];
    for (j, keep) in kept.iter_mut().enumerate() {
        let mut column = methods.iter().filter_map(|(_, cases)| cases.get(j));
        match column.clone().find_map(|c| c.as_ref().ok()) {
            Some(c) => firsts.push(c),
            None => {
                *keep = false;
                if let Some(err) = column.find_map(|c| c.as_ref().err()) {
                    left_out.push(LeftOut {
                        label: models.get(j).cloned().unwrap_or_default(),
                        reason: one_line(err),
                    });
                    first_refusal.get_or_insert(j);
                }
            }
        }
    }
    let Some(&first) = firsts.first() else {
        // Every model is refused: the first refusal is the error.
        let refusal = first_refusal.and_then(|j| {
            methods
                .into_iter()
                .find_map(|(_, mut cases)| (j < cases.len()).then(|| cases.swap_remove(j).err())?)
        });
        return Err(refusal.unwrap_or_else(|| Error::Plan {
            message: "nothing to compare".into(),
            hint: Some("pass --methods and --models".into()),
        }));
    };
    let mut models = Vec::new();
    let mut total_params = Vec::new();
    for c in &firsts {
        models.push(c.model.name.clone());
        // The base model's parameters, whichever method resolved first.
        let full = Plan {
            method: crate::spec::plan::Method::Full,
            ..c.plan.clone()
        };
        let g = crate::graph::build(&c.model, &full);
        total_params.push(g.params.iter().map(|p| p.count()).sum());
    }
    let mut series = Vec::new();
    for (method, cases) in &methods {
        let mut s = ScaleSeries {
            method: method.clone(),
            trainable_params: Vec::new(),
            peak_gib: Vec::new(),
        };
        for (c, _) in cases.iter().zip(&kept).filter(|(_, k)| **k) {
            match c.as_ref().map(Case::run) {
                Ok(Ok(e)) => {
                    s.trainable_params.push(e.memory.trainable_params);
                    s.peak_gib.push(Some(e.memory.peak.gib()));
                }
                Ok(Err(_)) | Err(_) => {
                    s.trainable_params.push(0);
                    s.peak_gib.push(None);
                }
            }
        }
        series.push(s);
    }
    Ok(Scale {
        title: format!(
            "Why PEFT: trainable parameters and peak memory per GPU ({}, batch {} x seq {})",
            first.hardware.display_name, first.plan.batch, first.plan.seq
        ),
        models,
        total_params,
        series,
        left_out,
    })
}

/// `fit`'s answer for one plan: whether it fits, the largest batch and sequence that do, the
/// changes that make it fit when it does not ([`crate::search::fixes`]), and the best layouts
/// (on its GPU, and on any other GPU types searched with it).
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    pub plan: String,
    pub fits: bool,
    /// Bytes per GPU.
    pub required: u64,
    pub budget: u64,
    pub max_batch: Option<u64>,
    pub max_seq: Option<u64>,
    pub fixes: Vec<crate::search::Fix>,
    pub layouts: Vec<Layout>,
    /// The batch and sequence the searches held fixed (for the table).
    #[serde(skip)]
    pub batch: u64,
    #[serde(skip)]
    pub seq: u64,
    /// The GPU types whose layouts were searched, the plan's first, and how many layouts were
    /// asked for (0: none, no search).
    #[serde(skip)]
    pub searched: Vec<String>,
    #[serde(skip)]
    pub keep: usize,
}

/// How `fit` searches layouts: what the plan fixes, the bounds, the objective and how many
/// layouts to keep.
#[derive(Debug, Clone, Copy)]
pub struct LayoutSearch {
    pub fixed: Fixed,
    pub max_gpus: u64,
    /// Host memory per node for offload; `None`: each GPU's usual server.
    pub host_memory: Option<Bytes>,
    pub objective: layouts::Objective,
    pub keep: usize,
}

/// Answers `fit` for a case named `plan` whose estimate is `e`: the batch and sequence searches,
/// the fixes over `catalogue` when it does not fit, and the best layouts by the objective over
/// the case's GPU and the GPU types of `others` (the same plan on each), ranked together.
pub fn fit(
    plan: &str,
    case: &Case,
    e: &Estimate,
    catalogue: &[(Hardware, Rates)],
    search: &LayoutSearch,
    others: &[Case],
) -> Result<Fit> {
    let t = case.target();
    // Refusals name where the plan came from.
    let here = |e: Error| e.from_origin(&case.origin);
    let fixes = if e.fits {
        Vec::new()
    } else {
        crate::search::fixes(&t, &case.plan, catalogue).map_err(here)?
    };
    let mut found = Vec::new();
    // `keep` 0 asks for no layouts: no search.
    for c in std::iter::once(case)
        .chain(others)
        .filter(|_| search.keep > 0)
    {
        let bounds = Bounds {
            max_gpus: search.max_gpus,
            host_memory: search.host_memory.unwrap_or(c.hardware.host_memory),
            price_per_gpu_hour: c.hardware.price_per_hour_usd,
        };
        let (layouts, _) = layouts::search(
            &c.target(),
            &c.plan,
            search.fixed,
            bounds,
            search.objective,
            search.keep,
        )
        .map_err(|e| e.from_origin(&c.origin))?;
        found.extend(layouts);
    }
    layouts::rank(&mut found, search.objective);
    found.truncate(search.keep);
    Ok(Fit {
        plan: plan.to_string(),
        fits: e.fits,
        required: e.memory.required.0,
        budget: case.budget.0,
        max_batch: crate::search::max_batch(&t, &case.plan).map_err(here)?,
        max_seq: crate::search::max_seq(&t, &case.plan).map_err(here)?,
        fixes,
        layouts: found,
        batch: case.plan.batch,
        seq: case.plan.seq,
        searched: std::iter::once(case)
            .chain(others)
            .map(|c| c.hardware.name.clone())
            .collect(),
        keep: search.keep,
    })
}

/// `check`'s answer: one row per plan, in the order given.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub plans: Vec<Checked>,
}

impl Check {
    /// Whether a plan was invalid (exit 2).
    pub fn invalid(&self) -> bool {
        self.plans
            .iter()
            .any(|p| matches!(p, Checked::Invalid { .. }))
    }

    /// Whether a valid plan does not fit (exit 1).
    pub fn misfit(&self) -> bool {
        self.plans
            .iter()
            .any(|p| matches!(p, Checked::Plan(c) if !c.fits))
    }
}

/// One plan checked: its memory against its GPU, or why it is invalid.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Checked {
    Plan(CheckedPlan),
    Invalid {
        error: String,
        /// Always null: an invalid plan neither fits nor fails to.
        fits: Option<bool>,
        /// The file (or "command line") the plan came from, for the table.
        #[serde(skip)]
        origin: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedPlan {
    pub plan: String,
    /// Bytes per GPU.
    pub required: u64,
    pub peak: u64,
    pub device: CheckedDevice,
    pub budget: u64,
    /// Budget less required, bytes (negative when it does not fit).
    pub margin: i64,
    pub fits: bool,
    pub step_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckedDevice {
    pub name: String,
    pub memory: u64,
}

impl Checked {
    /// A plan named `plan` on `hardware` with memory `budget`, estimated as `e`.
    pub fn plan(plan: &str, hardware: &Hardware, budget: Bytes, e: &Estimate) -> Checked {
        Checked::Plan(CheckedPlan {
            plan: plan.to_string(),
            required: e.memory.required.0,
            peak: e.memory.peak.0,
            device: CheckedDevice {
                name: hardware.name.clone(),
                memory: hardware.memory.0,
            },
            budget: budget.0,
            margin: (budget.0 as f64 - e.memory.required.0 as f64) as i64,
            fits: e.fits,
            step_seconds: e.time.step_seconds,
        })
    }

    /// A plan from `origin` refused with `error`.
    pub fn invalid(origin: String, error: &Error) -> Checked {
        Checked::Invalid {
            error: error.to_string(),
            fits: None,
            origin,
        }
    }
}
