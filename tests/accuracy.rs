//! The headline figure: estimates against the measured H200 runs in `validation/`.

use crate::repo;
use ftplan::calibrate::Calibration;
use ftplan::spec::registry::resolve_hardware;
use ftplan::validate::{self, MEDIAN_BOUND, TIME_MEDIAN_BOUND, TIME_WORST_BOUND, WORST_BOUND};

fn rows() -> Vec<validate::Row> {
    rows_of("validation/measured.jsonl")
}

/// A measured file's runs against the H200 estimate with the harness's calibration.
fn rows_of(file: &str) -> Vec<validate::Row> {
    let hw = resolve_hardware("h200").expect("h200 ships").value;
    let rates = Calibration::load(&repo("validation/calib-h200.json"))
        .expect("calibration loads")
        .rates(&hw);
    let path = repo(file);
    let text = std::fs::read_to_string(&path).expect("the file is in the repository");
    validate::compare(&path.display().to_string(), &text, &hw, &rates)
        .expect("every measured run plans")
}

#[test]
fn peak_memory_is_within_the_bounds_on_every_measured_run() {
    let rows = rows();
    let s = validate::summary(&rows);
    println!(
        "{}",
        ftplan::report::table::validation(&rows, &s, "validation/calib-h200.json")
    );
    assert!(
        rows.len() >= 34,
        "expected the 34 measured runs, found {}",
        rows.len()
    );
    assert!(
        s.memory_median <= MEDIAN_BOUND,
        "median |error| {:.2}% exceeds {:.0}%",
        s.memory_median * 100.0,
        MEDIAN_BOUND * 100.0
    );
    for r in &rows {
        assert!(
            r.error.abs() <= WORST_BOUND,
            "{}: error {:+.1}% exceeds {:.0}%",
            r.name,
            r.error * 100.0,
            WORST_BOUND * 100.0
        );
    }
}

#[test]
fn trainable_parameter_counts_match_exactly() {
    for r in rows() {
        assert_eq!(r.estimated_trainable, r.measured_trainable, "{}", r.name);
    }
}

#[test]
fn step_time_median_error_is_within_the_bound() {
    let s = validate::summary(&rows());
    assert!(
        s.time_median <= TIME_MEDIAN_BOUND,
        "step-time median |error| {:.1}% exceeds {:.0}%",
        s.time_median * 100.0,
        TIME_MEDIAN_BOUND * 100.0
    );
}

#[test]
fn step_time_worst_error_is_within_the_bound() {
    for r in rows() {
        let e = r.time_error().expect("every measured run is timed");
        assert!(
            e.abs() <= TIME_WORST_BOUND,
            "{}: step-time error {:+.1}% exceeds {:.0}%",
            r.name,
            e * 100.0,
            TIME_WORST_BOUND * 100.0
        );
    }
}

/// Every run's peak within `memory` and step time within `time` (relative errors), and its
/// trainable count exact.
fn each_within(rows: &[validate::Row], memory: f64, time: f64) {
    for r in rows {
        assert!(
            r.error.abs() <= memory,
            "{}: {:+.2}%",
            r.name,
            r.error * 100.0
        );
        assert_eq!(r.estimated_trainable, r.measured_trainable, "{}", r.name);
        let e = r.time_error().expect("timed");
        assert!(e.abs() <= time, "{}: step {:+.1}%", r.name, e * 100.0);
    }
}

#[test]
fn bitsandbytes_runs_on_the_h200_match_on_memory_and_step_time() {
    // QLoRA (NF4, double quantization, bf16 compute), 8-bit AdamW and the paged optimizers
    // measured on an H200 (validation/bnb-h200.jsonl; QLoRA compared on its step peaks): every
    // peak within 1 %, step times within the headline bounds.
    let rows = rows_of("validation/bnb-h200.jsonl");
    assert_eq!(rows.len(), 8);
    each_within(&rows, 0.01, 0.25);
    let s = validate::summary(&rows);
    assert!(
        s.time_median <= TIME_MEDIAN_BOUND,
        "{:.1}%",
        s.time_median * 100.0
    );
}

#[test]
fn host_bound_runs_re_measured_on_another_h200_are_within_30_percent() {
    // validation/remeasure-h200.jsonl: eight host-bound runs measured twice on a third H200;
    // the machine's own first and second passes differ by up to 39 %.
    let rows = rows_of("validation/remeasure-h200.jsonl");
    assert_eq!(rows.len(), 16);
    each_within(&rows, 0.05, 0.30);
}

#[test]
fn validate_command_prints_the_table_and_passes() {
    let out = crate::ftplan().arg("validate").assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(text.contains("peak memory: median |error|"), "{text}");
    assert!(
        text.contains("llama2-7b|lora|b1|s512|gc0|sdpa|r16|qv"),
        "{text}"
    );
}
