//! The headline figure: estimates against the measured H200 runs in `validation/`.

use crate::repo;
use ftplan::calibrate::Calibration;
use ftplan::spec::registry::resolve_hardware;
use ftplan::validate::{self, MEDIAN_BOUND, TIME_MEDIAN_BOUND, WORST_BOUND};

fn rows() -> Vec<validate::Row> {
    let hw = resolve_hardware("h200").expect("h200 ships").value;
    let rates = Calibration::load(&repo("validation/calib-h200.json"))
        .expect("calibration loads")
        .rates(&hw);
    let path = repo("validation/measured.jsonl");
    let text =
        std::fs::read_to_string(&path).expect("validation/measured.jsonl is in the repository");
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
fn validate_command_prints_the_table_and_passes() {
    let out = crate::ftplan().arg("validate").assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(text.contains("peak memory: median |error|"), "{text}");
    assert!(
        text.contains("llama2-7b|lora|b1|s512|gc0|sdpa|r16|qv"),
        "{text}"
    );
}
