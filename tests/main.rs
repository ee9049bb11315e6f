//! Integration tests in one binary (faster to link than one per file).

mod accuracy;
mod architectures;
mod cli;
mod cluster;
mod contracts;
mod fidelity;
mod fuzz;
mod gpu;
mod hardening;
mod invalid;
mod measure;
mod models;
mod properties;

use std::path::PathBuf;

/// Bytes an op keeps for its backward.
pub fn kept_bytes(g: &ftplan::graph::op::OpGraph, op: &ftplan::graph::op::Op) -> u64 {
    op.saves.iter().map(|&t| g.tensor(t).bytes.0).sum()
}

/// The first op whose full name ends with `suffix` (the first block's, for a per-layer op).
pub fn op_ending<'g>(g: &'g ftplan::graph::op::OpGraph, suffix: &str) -> &'g ftplan::graph::op::Op {
    g.ops()
        .find(|o| g.name(o.name).ends_with(suffix))
        .unwrap_or_else(|| panic!("no op ending {suffix}"))
}

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The runs of a shipped `validation/*.jsonl` file compared with their H200 estimates.
pub fn shipped_rows(file: &str) -> Vec<ftplan::validate::Row> {
    let hw = ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value;
    let rates = ftplan::time::Rates::from_datasheet(&hw);
    let path = repo(file);
    let text = std::fs::read_to_string(&path).expect("ships");
    ftplan::validate::compare(&path.display().to_string(), &text, &hw, &rates).expect("plans")
}

/// Every run's peak within `memory` and, where a bound is given, step time within `time`
/// (relative errors), and its trainable count exact.
pub fn each_within(rows: &[ftplan::validate::Row], memory: f64, time: Option<f64>) {
    for r in rows {
        assert!(
            r.error.abs() <= memory,
            "{}: {:+.2}%",
            r.name,
            r.error * 100.0
        );
        assert_eq!(r.estimated_trainable, r.measured_trainable, "{}", r.name);
        if let Some(time) = time {
            let e = r.time_error().expect("timed");
            assert!(e.abs() <= time, "{}: step {:+.1}%", r.name, e * 100.0);
        }
    }
}

/// The `ftplan` binary, run from the repository root.
pub fn ftplan() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("ftplan").expect("the ftplan binary is built");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// What a finished `ftplan` run wrote to stderr.
pub fn stderr_of(out: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&out.get_output().stderr).to_string()
}

/// The message policy: one `error:` line naming what failed (file and field), then at most one
/// `hint:` line, and nothing else: a refused plan's notes (GPU aliases, ignored flags) are not
/// printed, since they qualify a result it does not have.
pub fn assert_message_policy(err: &str) {
    let lines: Vec<&str> = err.trim_end().lines().filter(|l| !l.is_empty()).collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("error: ")),
        "no error line: {err}"
    );
    assert!(
        lines.len() <= 2,
        "more than an error and a hint line: {err}"
    );
    if let Some(hint) = lines.get(1) {
        assert!(
            hint.starts_with("hint: "),
            "second line is not a hint: {err}"
        );
    }
}

/// One plan per PEFT method, with small settings (shared by the graph, model and cluster tests).
pub fn peft_methods() -> Vec<ftplan::spec::plan::Method> {
    vec![
        ftplan::spec::plan::Method::Lora(ftplan::spec::plan::Lora {
            rank: 8,
            alpha: 16.0,
            targets: ftplan::spec::plan::LoraTargets::AllLinear,
            dora: false,
        }),
        ftplan::spec::plan::Method::Qlora(ftplan::spec::plan::Lora {
            rank: 8,
            alpha: 16.0,
            targets: ftplan::spec::plan::LoraTargets::QueryValue,
            dora: false,
        }),
        ftplan::spec::plan::Method::Adapter { size: 32 },
        ftplan::spec::plan::Method::Prefix { virtual_tokens: 10 },
        ftplan::spec::plan::Method::Prompt { virtual_tokens: 10 },
        ftplan::spec::plan::Method::Ia3,
    ]
}

/// Full fine-tuning and every PEFT method.
pub fn all_methods() -> Vec<ftplan::spec::plan::Method> {
    std::iter::once(ftplan::spec::plan::Method::Full)
        .chain(peft_methods())
        .collect()
}
