//! The thin CLI: parse, run the library, print, map to an exit code.

/// `print!` to stdout that returns the write's error instead of panicking: a closed pipe
/// (`ftplan ... | head -1`) becomes an error that `main` ends quietly on (as ripgrep does).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(
            write!(std::io::stdout().lock(), $($t)*),
            "cannot write to standard output",
        )?
    }};
}

/// `println!` counterpart of [`out!`].
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(
            writeln!(std::io::stdout().lock(), $($t)*),
            "cannot write to standard output",
        )?
    }};
}

pub mod args;
pub mod plan;
mod planning;

use args::{CalibrateArgs, Cli, Command, EstimateArgs, ExportArgs, Format, ListWhat, ValidateArgs};
use ftplan::error::Error;
use ftplan::estimate::Estimate;
use ftplan::report::{self, json::Budget};
use plan::{PlanInput, Resolved};
use std::process::ExitCode;

/// The subcommand's flags the user typed (clap ids, e.g. `lora_rank`), as opposed to defaults.
static GIVEN: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Records which flags came from the command line.
pub fn record_given(matches: &clap::ArgMatches) {
    let given = matches
        .subcommand()
        .map(|(_, sub)| {
            sub.ids()
                .filter(|id| {
                    sub.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    let _ = GIVEN.set(given);
}

/// Whether the user typed flag `id` (clap's id: the field name).
pub fn given(id: &str) -> bool {
    GIVEN.get().is_some_and(|g| g.iter().any(|x| x == id))
}

/// The plan flags the user typed (for commands where a plan file replaces them).
pub fn given_plan_flags() -> Vec<String> {
    use clap::Args as _;
    let plan_ids: Vec<String> = args::PlanArgs::augment_args(clap::Command::new("plan"))
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .collect();
    GIVEN
        .get()
        .map(|g| {
            g.iter()
                .filter(|id| plan_ids.contains(id))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// `--lora-rank` for clap's id `lora_rank`.
pub fn flag(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// Exit codes: 0 fits (or success), 1 does not fit (or a bound was exceeded), 2 error.
pub const FITS: u8 = 0;
pub const DOES_NOT_FIT: u8 = 1;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Estimate(a) => run_estimate(&a),
        Command::List { what, format } => list(what, format),
        Command::Validate(a) => validate(&a),
        Command::Calibrate(a) => calibrate(&a),
        Command::Check(a) => planning::check(&a),
        Command::Fit(a) => planning::fit(&a),
        Command::Compare(a) => planning::compare(&a),
        Command::Sweep(a) => planning::sweep(&a),
        Command::Export(a) => export(&a),
        Command::Measure(a) => measure(&a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ftplan", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs one resolved plan; `fits` accounts for the headroom.
pub fn estimate_resolved(r: &Resolved) -> ftplan::Result<Estimate> {
    ftplan::estimate::estimate_within(&r.model, &r.plan, &r.hardware, &r.rates, r.budget())
        .map_err(|e| plan::relabel(e, &r.origin))
}

/// A number as a person reads it: plain when moderate, exponent form when huge or tiny.
pub(crate) fn show(x: f64) -> String {
    if x.is_finite() && x != 0.0 && !(1e-3..1e9).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

fn note(notes: &[String]) {
    for n in notes {
        eprintln!("note: {n}");
    }
}

fn run_estimate(a: &EstimateArgs) -> anyhow::Result<ExitCode> {
    let r = PlanInput::from_args(&a.plan).resolve()?;
    // Notes qualify a result: a refused plan, or a bad budget flag, gets its one error line
    // alone, so the notes wait until every input has been read.
    let e = estimate_resolved(&r)?;
    // The one place the budget flags get their ranges.
    let ranged = |field: &str, v: Option<f64>, max: f64| -> anyhow::Result<Option<f64>> {
        match v {
            Some(x) if !(x.is_finite() && x > 0.0 && x <= max) => Err(Error::field(
                "command line",
                field,
                format!("must be a positive number up to {max:e}, found {}", show(x)),
            )
            .into()),
            other => Ok(other),
        }
    };
    let epochs = ranged("epochs", a.epochs, 1e6)?;
    let dataset = ranged("dataset-tokens", a.dataset_tokens, 1e15)?;
    let tokens = match (ranged("tokens", a.tokens, 1e18)?, epochs, dataset) {
        (Some(t), _, _) => Some(t),
        (None, Some(ep), Some(ds)) => Some(ep * ds),
        (None, Some(_), None) => {
            return Err(Error::field("command line", "epochs", "needs --dataset-tokens").into());
        }
        _ => None,
    };
    let price = match a.price {
        Some(p) if !(p.is_finite() && (0.0..=1e6).contains(&p)) => {
            return Err(Error::field(
                "command line",
                "price",
                format!(
                    "must be a price per GPU-hour from 0 to 1e6, found {}",
                    show(p)
                ),
            )
            .into());
        }
        other => other,
    };
    let budget = tokens.map(|t| Budget {
        tokens: t,
        price_per_gpu_hour: price.or(r.hardware.price_per_hour_usd),
    });
    note(&r.notes);
    match a.format {
        Format::Table => out!("{}", report::table::estimate(&e, budget)),
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&report::json::estimate(&e, budget, &r.notes))?
        ),
    }
    Ok(ExitCode::from(if e.fits { FITS } else { DOES_NOT_FIT }))
}

/// Writes the plan as DeepSpeed JSON and/or Accelerate YAML (atomically; nothing is written
/// unless every requested file can be made).
/// `ftplan measure`: the plan run for real beside its estimate; out of memory is a result
/// (exit 1, like `check`), a missing package or device an error (exit 2).
fn measure(a: &args::MeasureArgs) -> anyhow::Result<ExitCode> {
    use ftplan::measure::{self, Comparison, Device, Outcome};
    let device = match a.device {
        args::DeviceArg::Cuda => Device::Cuda,
        args::DeviceArg::Cpu => Device::Cpu,
    };
    if a.calibrate_host {
        let path = a.plan.calibration.as_ref().ok_or_else(|| {
            Error::field("command line", "calibration", "names no file to write").with_hint(
                "pass --calibration FILE (a TOML file from `ftplan calibrate --out FILE`)",
            )
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            return Err(Error::field(
                path.display().to_string(),
                "calibration",
                "is the ground-truth harness's JSON, which ftplan reads but does not write",
            )
            .with_hint("give a TOML calibration from `ftplan calibrate --out FILE`")
            .into());
        }
        let mut cal = ftplan::calibrate::Calibration::load(path).map_err(|e| {
            anyhow::Error::from(e).context(format!(
                "run `ftplan calibrate --out {}` first",
                path.display()
            ))
        })?;
        let (host, env) = measure::host_costs(&a.python, device)?;
        cal.host = Some(host);
        cal.save(path)?;
        let checkpoint = match (host.checkpoint_block_us, host.checkpoint_tensor_us) {
            (Some(b), Some(t)) => {
                format!(", a checkpointed block {b:.0} us and each tensor it saves {t:.1} us")
            }
            _ => String::new(),
        };
        outln!(
            "{}: one op's dispatch {:.1} us, one module call {:.1} us{checkpoint} (torch {}); \
             written to {}",
            env["device"].as_str().unwrap_or("?"),
            host.dispatch_us,
            host.module_us,
            env["torch"].as_str().unwrap_or("?"),
            path.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    planning::no_flags_beside_plan_files(a.plan_file.is_some())?;
    let input = match &a.plan_file {
        Some(p) => PlanInput::from_file(p)?,
        None => PlanInput::from_args(&a.plan),
    };
    if !(2..=100).contains(&a.steps) {
        return Err(Error::field(
            "command line",
            "steps",
            format!("must be 2 to 100, found {}", a.steps),
        )
        .into());
    }
    let r = input.resolve()?;
    let layout = measure::layout(&r.plan)?;
    let model_arg = input.model.clone().unwrap_or_default();
    if r.model.family == ftplan::spec::model::Family::Palm {
        // PaLM is built from its paper (no transformers class): nothing for the harness to run.
        return Err(Error::field(
            "command line",
            "model",
            format!(
                "`{}` has no transformers class, so `measure` cannot build it",
                r.model.name
            ),
        )
        .with_hint("measure a model with a transformers config (`ftplan list models`)")
        .into());
    }
    let mut config = ftplan::spec::registry::model_config(&model_arg)?;
    let mut model = r.model.clone();
    if a.tiny {
        config = measure::tiny_config(&config);
        let name = format!("{}-tiny", model.name);
        model = ftplan::spec::hf::parse_config(&model_arg, &config, &name, false)?;
    }
    let hardware = match device {
        Device::Cpu => r.hardware.as_cpu_replay(),
        Device::Cuda => r.hardware.clone(),
    };
    let estimate = ftplan::estimate::estimate(&model, &r.plan, &hardware, &r.rates)?;
    // The plan is accepted: its notes come before the (long) run, a refusal without them.
    note(&r.notes);
    let mut run = measure::run_record(&model, &r.plan);
    // Module names as given reach peft unchanged (`query_key_value`, `c_attn`, ...).
    if r.plan.method.lora().is_some()
        && !matches!(input.lora_targets.trim(), "qv" | "all" | "all-linear")
    {
        let names: Vec<&str> = input
            .lora_targets
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        run["lora_targets"] = serde_json::json!(names);
    }
    if let Some((world, engine)) = layout {
        run["world_size"] = serde_json::json!(world);
        run["engine"] = serde_json::json!(engine);
    }
    match measure::run_harness(&a.python, &config, &run, device, a.steps, layout)? {
        Outcome::OutOfMemory(message) => {
            eprintln!(
                "out of memory: {message} (estimated peak {:.2} GiB)",
                estimate.memory.peak.gib()
            );
            Ok(ExitCode::from(1))
        }
        Outcome::Measured {
            measured,
            environment,
        } => {
            if let Some(path) = &a.save {
                let line = measure::record(&config, &run, device, &measured, &environment);
                report::append_line(path, &line.to_string())?;
                eprintln!("appended the run to {}", path.display());
            }
            let c = Comparison::new(estimate, measured, environment);
            match a.format {
                Format::Table => {
                    let ranks = match layout {
                        Some((world, engine)) => format!(
                            ", {world} ranks ({engine}; the estimate is per GPU, the peak the largest rank's)"
                        ),
                        None => String::new(),
                    };
                    outln!(
                        "{} {} on {}{ranks}: estimate against a run of {} steps",
                        model.name,
                        r.plan.method.name(),
                        c.environment["device"].as_str().unwrap_or("?"),
                        a.steps
                    );
                    outln!("{}", report::table::measure(&c));
                    if device == Device::Cpu {
                        outln!(
                            "step time and tokens/s: the CPU's, against the estimate for `{}`",
                            hardware.name
                        );
                    }
                    outln!(
                        "torch {}, transformers {}, peft {}",
                        c.environment["torch"].as_str().unwrap_or("?"),
                        c.environment["transformers"].as_str().unwrap_or("?"),
                        c.environment["peft"].as_str().unwrap_or("-")
                    );
                }
                Format::Json => outln!(
                    "{}",
                    serde_json::to_string_pretty(&report::json::measure(&c, &r.notes))?
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn export(a: &ExportArgs) -> anyhow::Result<ExitCode> {
    // With `export`, `--deepspeed` names the file to write, not one to read.
    let mut plan_args = a.plan.clone();
    let deepspeed_out = plan_args.deepspeed.take();
    if deepspeed_out.is_none() && a.accelerate.is_none() {
        return Err(
            Error::field("command line", "deepspeed", "names no file to write")
                .with_hint("pass --deepspeed FILE and/or --accelerate FILE")
                .into(),
        );
    }
    let r = PlanInput::from_args(&plan_args).resolve()?;
    let mut files: Vec<(std::path::PathBuf, String)> = Vec::new();
    if let Some(path) = deepspeed_out {
        let v = ftplan::interop::deepspeed::write(&r.plan)?;
        files.push((path, serde_json::to_string_pretty(&v)? + "\n"));
    }
    if let Some(path) = &a.accelerate {
        files.push((path.clone(), ftplan::interop::accelerate::write(&r.plan)?));
    }
    // Notes qualify the written plan: one the engine cannot run gets its error line alone.
    note(&r.notes);
    for (path, text) in &files {
        report::write_atomic(path, text.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn list(what: ListWhat, format: Format) -> anyhow::Result<ExitCode> {
    use ftplan::spec::registry;
    // Numbers are numbers in JSON (bytes for memory), as in `estimate`'s.
    match (what, format) {
        (ListWhat::Models, Format::Table) => {
            outln!("{}", report::table::models(&registry::models()?))
        }
        (ListWhat::Models, Format::Json) => {
            outln!("{}", serde_json::to_string_pretty(&registry::models()?)?)
        }
        (ListWhat::Gpus, Format::Table) => outln!("{}", report::table::gpus(&registry::gpus()?)),
        (ListWhat::Gpus, Format::Json) => {
            outln!("{}", serde_json::to_string_pretty(&registry::gpus()?)?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(a: &ValidateArgs) -> anyhow::Result<ExitCode> {
    // Without --file: the measured runs embedded in the binary (so an installed `ftplan
    // validate` works from any folder).
    let (path, text) = match &a.file {
        Some(f) => (f.display().to_string(), ftplan::io::read_text(f)?),
        None => (
            "validation/measured.jsonl".to_string(),
            ftplan::validate::MEASURED.to_string(),
        ),
    };
    if text.lines().all(|l| l.trim().is_empty()) {
        return Err(Error::field(&path, "runs", "holds no measured runs")
            .with_hint("one JSON object per line, as in validation/measured.jsonl")
            .into());
    }
    let hw = ftplan::spec::registry::resolve_hardware("h200")?.value;
    let rates = match &a.calibration {
        Some(p) => ftplan::calibrate::Calibration::load(p)?.rates(&hw),
        None => ftplan::calibrate::Calibration::parse(
            "validation/calib-h200.json",
            ftplan::validate::CALIBRATION,
        )?
        .rates(&hw),
    };
    let (rows, mut failed) = ftplan::validate::compare_all(&path, &text, &hw, &rates);
    if rows.is_empty() && !failed.is_empty() {
        // Nothing could be planned: the file is bad input, not a comparison that failed.
        let (_, e) = failed.swap_remove(0);
        return Err(e.into());
    }
    for (at, e) in &failed {
        eprintln!("error: {at}: run not planned: {e}");
    }
    let v = ftplan::validate::Validation::new(rows, failed.len());
    match a.format {
        Format::Table => out!(
            "{}",
            report::table::validation(&v.rows, &v.summary, &rates.source)
        ),
        Format::Json => outln!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(ExitCode::from(if v.within_bounds { 0 } else { 1 }))
}

fn calibrate(a: &CalibrateArgs) -> anyhow::Result<ExitCode> {
    use ftplan::calibrate::{self, GpuBench, Settings, mock::MockGpu, wgpu_bench::WgpuBench};
    if !(a.budget.is_finite() && (0.5..=3600.0).contains(&a.budget)) {
        return Err(Error::field(
            "command line",
            "budget",
            format!("must be 0.5 to 3600 seconds, found {}", show(a.budget)),
        )
        .into());
    }
    let mut gpu: Box<dyn GpuBench> = if a.mock {
        Box::new(MockGpu::default())
    } else {
        let backends = match a.backend {
            args::BackendArg::All => wgpu::Backends::all(),
            args::BackendArg::Vulkan => wgpu::Backends::VULKAN,
            args::BackendArg::Metal => wgpu::Backends::METAL,
            args::BackendArg::Dx12 => wgpu::Backends::DX12,
            args::BackendArg::Gl => wgpu::Backends::GL,
            args::BackendArg::None => wgpu::Backends::empty(),
        };
        Box::new(WgpuBench::open(backends)?)
    };
    let info = gpu.info();
    eprintln!(
        "adapter: {} ({}, {})",
        info.name, info.backend, info.device_type
    );
    let start = std::time::Instant::now();
    // Progress goes to stderr as each measurement finishes: this is the one long command.
    let mut progress = |line: &str| eprintln!("  {line}");
    let cal = if a.quick {
        calibrate::run(gpu.as_mut(), &Settings::quick(), &mut progress)?
    } else {
        calibrate::run_within(gpu.as_mut(), a.budget, &mut progress)?
    };
    for limit in &cal.limits {
        eprintln!("  stopped: {limit}");
    }
    cal.save(&a.out)?;
    let best = cal.fp32_matmul.iter().map(|p| p.flops).fold(0.0, f64::max);
    let best_f16 = cal.f16_matmul.iter().map(|p| p.flops).fold(0.0, f64::max);
    let f16 = if best_f16 > 0.0 {
        format!(", f16-input matmul up to {}", calibrate::rate(best_f16))
    } else {
        String::new()
    };
    outln!(
        "{}: fp32 matmul up to {}{f16}, copy {:.1} GB/s ({} timing, {:.1} s); wrote {}",
        info.name,
        calibrate::rate(best),
        cal.copy_gbps,
        cal.timing,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
