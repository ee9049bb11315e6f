//! `check`, `fit`, `compare` and `sweep`: planning answers built on the same estimate.

use super::args::{
    CheckArgs, CompareArgs, FitArgs, Format, MethodArg, ObjectiveArg, SweepArgs, SweepAxis,
};
use super::plan::{PlanInput, Resolved};
use super::{DOES_NOT_FIT, FITS, estimate_resolved, note};
use ftplan::error::Error;
use ftplan::explore::{self, Case};
use ftplan::layouts::Objective;
use ftplan::report::{self, chart};
use ftplan::spec::hardware::Hardware;
use ftplan::spec::registry::{self, hardware_files, parse_hardware_toml};
use ftplan::time::Rates;
use std::path::PathBuf;
use std::process::ExitCode;

const INVALID: u8 = 2;

/// Plan files named on the command line, folders expanded to their `*.toml` files.
fn plan_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case("toml"))
                })
                .collect();
            if files.is_empty() {
                return Err(Error::Plan {
                    message: format!("no plan files (`*.toml`) in `{}`", p.display()),
                    hint: Some("name plan files, or a folder that holds some".into()),
                }
                .into());
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Plan flags typed beside plan files would be silently dropped: refuse them.
pub(crate) fn no_flags_beside_plan_files(files: bool) -> anyhow::Result<()> {
    let given = super::given_plan_flags();
    if files && !given.is_empty() {
        let names: Vec<String> = given.iter().map(|id| super::flag(id)).collect();
        return Err(Error::field(
            "command line",
            given[0].as_str(),
            format!(
                "({}) would not apply: the plan file sets the plan",
                names.join(", ")
            ),
        )
        .with_hint("put the setting in the plan file, or give the whole plan as flags")
        .into());
    }
    Ok(())
}

pub fn check(a: &CheckArgs) -> anyhow::Result<ExitCode> {
    no_flags_beside_plan_files(!a.plans.is_empty())?;
    let inputs: Vec<Result<PlanInput, ftplan::Error>> = if a.plans.is_empty() {
        vec![Ok(PlanInput::from_args(&a.plan))]
    } else {
        plan_files(&a.plans)?
            .iter()
            .map(|p| PlanInput::from_file(p))
            .collect()
    };
    let mut plans = Vec::new();
    for input in inputs {
        let resolved = input.and_then(|i| i.resolve());
        match resolved.and_then(|r| estimate_resolved(&r).map(|e| (r, e))) {
            Ok((r, e)) => plans.push(explore::Checked::plan(&r.name, &r.hardware, r.budget(), &e)),
            Err(err) => {
                eprintln!("error: {err}");
                plans.push(explore::Checked::invalid(err_origin(&err), &err));
            }
        }
    }
    let result = explore::Check { plans };
    match a.format {
        Format::Table => outln!("{}", report::table::check(&result)),
        Format::Json => outln!("{}", serde_json::to_string_pretty(&result)?),
    }
    Ok(ExitCode::from(if result.invalid() {
        INVALID
    } else if result.misfit() {
        DOES_NOT_FIT
    } else {
        FITS
    }))
}

fn err_origin(e: &ftplan::Error) -> String {
    match e {
        ftplan::Error::Field { path, .. } | ftplan::Error::Parse { path, .. } => path.clone(),
        ftplan::Error::Read { path, .. } => path.display().to_string(),
        other => other.to_string(),
    }
}

/// Every shipped GPU with its datasheet rates.
fn catalogue() -> anyhow::Result<Vec<(Hardware, Rates)>> {
    let mut out = Vec::new();
    for (stem, text) in hardware_files() {
        let (h, _) = parse_hardware_toml(&format!("hardware/{stem}.toml"), stem, text)?;
        let rates = Rates::from_datasheet(&h);
        out.push((h, rates));
    }
    Ok(out)
}

pub fn fit(a: &FitArgs) -> anyhow::Result<ExitCode> {
    no_flags_beside_plan_files(a.plan_file.is_some())?;
    let input = match &a.plan_file {
        Some(p) => PlanInput::from_file(p)?,
        None => PlanInput::from_args(&a.plan),
    };
    let r = input.resolve()?;
    let e = estimate_resolved(&r)?;
    if !(1..=ftplan::spec::parallel::MAX_GPUS).contains(&a.max_gpus) {
        return Err(Error::field(
            "command line",
            "max-gpus",
            format!(
                "must be 1 to {}, found {}",
                ftplan::spec::parallel::MAX_GPUS,
                a.max_gpus
            ),
        )
        .into());
    }
    let host_memory = match a.host_memory {
        Some(g) if g.is_finite() && g > 0.0 && g <= 1e6 => Some(ftplan::units::Bytes::from_gib(g)),
        Some(g) => {
            return Err(Error::field(
                "command line",
                "host-memory",
                format!("must be a positive number of GiB up to 1e6, found {g}"),
            )
            .into());
        }
        None => None,
    };
    let objective = match a.objective {
        ObjectiveArg::Gpus => Objective::Gpus,
        ObjectiveArg::Time => Objective::Time,
        ObjectiveArg::Cost => Objective::Cost,
    };
    let search = explore::LayoutSearch {
        fixed: input.layout.fixed(&input.origin, r.plan.grad_ckpt)?,
        max_gpus: a.max_gpus,
        host_memory,
        objective,
        keep: a.layouts,
    };
    // The same plan on each other GPU type of --gpus-list (not the plan's own again).
    let mut notes = r.notes.clone();
    let mut others = Vec::new();
    if let Some(list) = &a.gpus_list {
        let gpus = gpu_list(input.gpu.as_deref(), Some(list))?;
        for (gpu, _) in gpus.into_iter().skip(1) {
            let mut i = input.clone();
            i.gpu = Some(gpu);
            let o = i.resolve()?;
            let new: Vec<String> = o
                .notes
                .iter()
                .filter(|n| !notes.contains(n))
                .cloned()
                .collect();
            notes.extend(new);
            others.push(case(o));
        }
    }
    let name = r.name.clone();
    let result = explore::fit(&name, &case(r), &e, &catalogue()?, &search, &others)?;
    // Notes qualify a result: a refused plan or a bad flag gets its one error line alone.
    note(&notes);
    match a.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&result)?),
        Format::Table => outln!("{}", report::table::fit(&result, a.max_gpus, objective)),
    }
    Ok(ExitCode::from(if e.fits { FITS } else { DOES_NOT_FIT }))
}

fn methods(list: &str) -> anyhow::Result<Vec<MethodArg>> {
    use clap::ValueEnum;
    let typed = entries("methods", list)?;
    let methods = typed
        .iter()
        .map(|s| {
            MethodArg::from_str(s, true).map_err(|_| {
                // The names clap knows for `--method`: one definition.
                let names: Vec<String> = MethodArg::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value())
                    .map(|v| v.get_name().to_string())
                    .collect();
                let hint = ftplan::error::did_you_mean(s, names.iter().map(String::as_str))
                    .map(|h| format!("did you mean `{h}`?"))
                    .unwrap_or_else(|| names.join(", "));
                anyhow::Error::from(
                    Error::field("command line", "methods", format!("`{s}` is not a method"))
                        .with_hint(hint),
                )
            })
        })
        .collect::<anyhow::Result<Vec<MethodArg>>>()?;
    let ids: Vec<String> = methods.iter().map(|&m| method_name(m)).collect();
    distinct("methods", &typed, &ids, None)?;
    Ok(methods)
}

/// The entries of a comma-separated list flag (`--methods`, `--models`, `--gpus-list`), trimmed,
/// a trailing comma's empty entry dropped; a list that names nothing is refused.
fn entries(flag: &str, list: &str) -> anyhow::Result<Vec<String>> {
    let typed: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if typed.is_empty() {
        return Err(Error::field("command line", flag, "names nothing")
            .with_hint(format!("pass a comma-separated list: --{flag} A,B"))
            .into());
    }
    Ok(typed)
}

/// Refuses a list entry that names what an earlier one named: `ids` are what each of `typed`
/// resolved to (an alias and the name it resolves to are one GPU), so the second would only
/// repeat a bar, a row or a column. `first`, when given, is the flag whose value stands before
/// the list (`--gpu` before `--gpus-list`).
fn distinct(
    flag: &str,
    typed: &[String],
    ids: &[String],
    first: Option<&str>,
) -> anyhow::Result<()> {
    for (j, id) in ids.iter().enumerate() {
        if let Some(i) = ids[..j].iter().position(|x| x == id) {
            let (a, b) = (&typed[i], &typed[j]);
            let problem = match (i, first) {
                (0, Some(f)) if a == b => format!("names `{b}`, which --{f} already names"),
                (0, Some(f)) => format!("names `{b}`, which is --{f} `{a}` again (`{id}`)"),
                _ if a == b => format!("names `{b}` twice"),
                _ => format!("names `{a}` and `{b}`, which are both `{id}`"),
            };
            return Err(Error::field("command line", flag, problem)
                .with_hint("drop one; each would repeat the other's results")
                .into());
        }
    }
    Ok(())
}

/// What a list entry names: the shipped model or GPU it resolves to (`a100` is `a100-80gb`),
/// or, for a file, the file itself (a user's edited `h100-sxm.toml` is not the shipped one).
fn identity(typed: &str, resolved: String) -> String {
    if registry::names_a_file(typed) {
        typed.to_string()
    } else {
        resolved
    }
}

/// `--gpu` and then the GPUs of `--gpus-list`, no GPU twice, each with its own name.
fn gpu_list(first: Option<&str>, list: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<String> = first.into_iter().map(String::from).collect();
    if let Some(l) = list {
        out.extend(entries("gpus-list", l)?);
    }
    named_gpus(out, first.map(|_| "gpu"))
}

/// Each GPU of `--gpus-list` (after `first`'s, when given) with its own name, no GPU twice. A
/// GPU no profile answers to (or a file that cannot be read) is an input error, not a refusal
/// an exploration leaves out or marks: those are for what a model or method refuses.
fn named_gpus(typed: Vec<String>, first: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    let names = typed
        .iter()
        .map(|g| Ok(registry::resolve_hardware(g)?.value.name))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let ids: Vec<String> = typed
        .iter()
        .zip(&names)
        .map(|(t, n)| identity(t, n.clone()))
        .collect();
    distinct("gpus-list", &typed, &ids, first)?;
    Ok(typed.into_iter().zip(names).collect())
}

/// `--models`, or `default` when it is not given; each must resolve, and none twice (as
/// [`named_gpus`]).
fn model_list(given: Option<&str>, default: &str) -> anyhow::Result<Vec<String>> {
    let models = entries("models", given.unwrap_or(default))?;
    let ids = models
        .iter()
        .map(|m| Ok(identity(m, registry::resolve_model(m)?.value.name)))
        .collect::<anyhow::Result<Vec<String>>>()?;
    distinct("models", &models, &ids, None)?;
    Ok(models)
}

/// A resolved plan as the library's exploration case.
fn case(r: Resolved) -> Case {
    let budget = r.budget();
    Case {
        model: r.model,
        plan: r.plan,
        hardware: r.hardware,
        rates: r.rates,
        budget,
        origin: r.origin,
    }
}

/// A list the user chose fails on a method the model refuses; a default list leaves it out.
fn refused_by(chosen: bool) -> explore::Refused {
    if chosen {
        explore::Refused::Fail
    } else {
        explore::Refused::LeaveOut
    }
}

/// A method's name as `--method` spells it.
fn method_name(m: MethodArg) -> String {
    use clap::ValueEnum;
    m.to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// Writes a report's charts and Markdown together (staged), says which files, then prints
/// `notes` (methods left out, curves stopped), which the Markdown also carries under its table.
fn publish(
    out: &std::path::Path,
    stem: &str,
    title: &str,
    table: &str,
    notes: &[String],
    draw: impl FnOnce(&std::path::Path) -> ftplan::Result<Vec<PathBuf>>,
) -> anyhow::Result<()> {
    let stage = report::Stage::new(out)?;
    let mut files = draw(stage.path())?;
    let mut noted = table.to_string();
    for n in notes {
        noted += &format!("\nnote: {n}");
    }
    files.push(report::write_markdown(
        stage.path(),
        stem,
        title,
        &noted,
        &files,
    )?);
    let all = stage.commit(&files)?;
    let names: Vec<String> = all.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(())
}

pub fn compare(a: &CompareArgs) -> anyhow::Result<ExitCode> {
    if super::given("method") {
        return Err(Error::field(
            "command line",
            "method",
            "is not read by compare, which compares --methods",
        )
        .with_hint("pass --methods full,lora,qlora")
        .into());
    }
    let methods = methods(&a.methods)?;
    let gpus = gpu_list(a.plan.gpu.as_deref(), a.gpus_list.as_deref())?;
    let mut resolved = Vec::new();
    for (gpu, name) in &gpus {
        // A left-out method is labelled like the bars, by the GPU's own name.
        for &m in &methods {
            let mut input = PlanInput::from_args(&a.plan);
            input.method = m;
            input.gpu = Some(gpu.clone());
            let label = if gpus.len() > 1 {
                format!("{} @ {name}", method_name(m))
            } else {
                method_name(m)
            };
            resolved.push((label, input.resolve().map(case)));
        }
    }
    let (estimated, left_out) = explore::triage(resolved, refused_by(super::given("methods")))?;
    let result = explore::compare(estimated, left_out)?;
    let stem = format!("compare-{}", result.model);
    let table = report::table::compare(&result.bars);
    let left_out: Vec<String> = result.left_out.iter().map(ToString::to_string).collect();
    publish(&a.out, &stem, &result.title, &table, &left_out, |dir| {
        chart::write_compare(dir, &stem, &result.title, &result.bars)
    })?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&report::json::compare(&result))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sweep(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let axis = match a.over {
        SweepAxis::Matrix => return matrix(a),
        SweepAxis::Gpus => return gpus_needed(a),
        SweepAxis::Updates => return updates(a),
        SweepAxis::Scale => return scale(a),
        SweepAxis::Seq => explore::Axis::Seq,
        SweepAxis::Batch => explore::Axis::Batch,
    };
    let values: Vec<u64> = match axis {
        explore::Axis::Seq => (7..=15).map(|p| 1u64 << p).collect(),
        explore::Axis::Batch => (0..=7).map(|p| 1u64 << p).collect(),
    };
    let mut resolved = Vec::new();
    for &m in &methods(a.methods.as_deref().unwrap_or("full,lora,qlora"))? {
        let mut input = PlanInput::from_args(&a.plan);
        input.method = m;
        // The swept field's first value stands in for the plan's own, which the sweep replaces
        // (a 1,024-token default past a 512-position table must not refuse a sweep from 128).
        match axis {
            explore::Axis::Seq => input.seq = values[0],
            explore::Axis::Batch => input.batch = values[0],
        }
        resolved.push((method_name(m), input.resolve().map(case)));
    }
    let (estimated, left_out) = explore::triage(resolved, refused_by(a.methods.is_some()))?;
    let result = explore::sweep(&estimated, &left_out, axis, &values)?;
    let stem = format!(
        "sweep-{}-{}",
        result.model,
        if axis == explore::Axis::Seq {
            "seq"
        } else {
            "batch"
        }
    );
    let table = report::table::sweep(axis.label(), &result.series, result.budget);
    publish(
        &a.out,
        &stem,
        &result.title,
        &table,
        &result.stopped,
        |dir| {
            chart::write_sweep(
                dir,
                &stem,
                &result.title,
                axis.label(),
                &result.series,
                result.budget,
            )
        },
    )?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&report::json::sweep(&result))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every method, for the charts that compare them all.
const EVERY_METHOD: &str = "full,lora,adapter,prefix,prompt,ia3,bitfit,ln-tuning,freeze";

/// Which parameters each method updates, by part and block.
fn updates(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let mut resolved = Vec::new();
    for &m in &methods(a.methods.as_deref().unwrap_or(EVERY_METHOD))? {
        let mut input = PlanInput::from_args(&a.plan);
        input.method = m;
        resolved.push((method_name(m), input.resolve().map(case)));
    }
    let (estimated, left_out) = explore::triage(resolved, refused_by(a.methods.is_some()))?;
    let model = &estimated
        .first()
        .ok_or_else(|| Error::field("command line", "methods", "names no method"))?
        .0
        .model;
    let plans: Vec<_> = estimated.iter().map(|(c, _)| c.plan.clone()).collect();
    let result = explore::updates(model, &plans, left_out);
    let table = report::table::updates(&result);
    let stem = format!("updates-{}", result.model);
    let left_out: Vec<String> = result.left_out.iter().map(ToString::to_string).collect();
    publish(&a.out, &stem, &result.title, &table, &left_out, |dir| {
        chart::write_updates(dir, &stem, &result)
    })?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!("{}", serde_json::to_string_pretty(&result)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Trainable parameters and peak memory per method across model sizes.
fn scale(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let models = model_list(
        a.models.as_deref(),
        "gpt3-125m,gpt3-1.3b,gpt3-13b,gpt3-175b,palm-540b",
    )?;
    let mut rows = Vec::new();
    for &m in &methods(a.methods.as_deref().unwrap_or(EVERY_METHOD))? {
        let mut cases = Vec::new();
        for model in &models {
            let mut input = PlanInput::from_args(&a.plan);
            input.method = m;
            input.model = Some(model.clone());
            cases.push(input.resolve().map(case));
        }
        rows.push((method_name(m), cases));
    }
    let result = explore::scale(&models, rows)?;
    let table = report::table::scale(&result);
    let stem = "why-peft";
    let left_out: Vec<String> = result.left_out.iter().map(ToString::to_string).collect();
    publish(&a.out, stem, &result.title, &table, &left_out, |dir| {
        chart::write_scale(dir, stem, &result)
    })?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!("{}", serde_json::to_string_pretty(&result)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// The fewest GPUs each method needs, per model: why parameter-efficient methods exist.
fn gpus_needed(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let models = model_list(
        a.models.as_deref(),
        "llama2-7b,llama2-13b,llama2-70b,gpt3-175b",
    )?;
    let mut rows = Vec::new();
    let mut fixed = None;
    for &m in &methods(a.methods.as_deref().unwrap_or("full,lora,qlora"))? {
        let mut cases = Vec::new();
        for model in &models {
            let mut input = PlanInput::from_args(&a.plan);
            input.method = m;
            input.model = Some(model.clone());
            let r = input.resolve();
            if let Ok(r) = &r {
                fixed = Some(input.layout.fixed(&input.origin, r.plan.grad_ckpt)?);
            }
            cases.push(r.map(case));
        }
        rows.push((method_name(m), cases));
    }
    let result = explore::gpus_needed(models, rows, fixed.unwrap_or_default(), 4096)?;
    let table = report::table::gpus_needed(&result);
    let stem = "gpus-needed";
    let refused: Vec<String> = result
        .series
        .iter()
        .flat_map(|s| {
            let on = result.models.iter().zip(&s.refused);
            on.filter_map(move |(model, why)| {
                let label = format!("{} on {model}", s.method);
                why.clone()
                    .map(|reason| explore::LeftOut { label, reason }.to_string())
            })
        })
        .collect();
    publish(&a.out, stem, &result.title, &table, &refused, |dir| {
        chart::write_gpus_needed(dir, stem, &result.title, &result.models, &result.series)
    })?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&report::json::gpus_needed(&result))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Fit matrix: models x GPUs for one method.
fn matrix(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let models = model_list(
        a.models.as_deref(),
        "gpt2,tinyllama-1.1b,llama2-7b,llama2-13b,llama3-8b,llama2-70b",
    )?;
    let gpus = named_gpus(
        entries(
            "gpus-list",
            a.gpus_list
                .as_deref()
                .unwrap_or("t4,l4,a10g,rtx4090,a100-40gb,a100-80gb,h100-sxm,h200"),
        )?,
        None,
    )?;
    let mut rows = Vec::new();
    for m in &models {
        let mut cases = Vec::new();
        for (g, _) in &gpus {
            let mut input = PlanInput::from_args(&a.plan);
            input.model = Some(m.clone());
            input.gpu = Some(g.clone());
            cases.push(input.resolve().map(case));
        }
        rows.push((m.clone(), cases));
    }
    // The GPUs by their own names (`a100` resolves to `a100-80gb`).
    let gpu_names = gpus.into_iter().map(|(_, name)| name).collect();
    let method = method_name(a.plan.method);
    let title = format!(
        "fit matrix: {method} fine-tuning, batch {} x seq {}",
        a.plan.batch, a.plan.seq
    );
    let result = explore::matrix(title, gpu_names, rows)?;
    let table = report::table::matrix(&result.gpus, &result.rows);
    let stem = "fit-matrix";
    let left_out: Vec<String> = result.left_out.iter().map(ToString::to_string).collect();
    publish(&a.out, stem, &result.title, &table, &left_out, |dir| {
        chart::write_matrix(dir, stem, &result.title, &result.gpus, &result.rows)
    })?;
    match a.format {
        Format::Table => outln!("{table}"),
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&report::json::matrix(&method, &result))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}
