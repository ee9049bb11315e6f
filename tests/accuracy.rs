//! The headline figure: estimates against the measured H200 runs in `validation/`.

use crate::{each_within, repo};
use ftplan::calibrate::Calibration;
use ftplan::spec::registry::resolve_hardware;
use ftplan::validate::{self, MEDIAN_BOUND, TIME_MEDIAN_BOUND, TIME_WORST_BOUND, WORST_BOUND};

fn rows() -> Vec<validate::Row> {
    rows_of("validation/measured.jsonl")
}

/// A measured file's runs against the H200 estimate with the harness's calibration.
fn rows_of(file: &str) -> Vec<validate::Row> {
    rows_with(file, "validation/calib-h200.json")
}

/// A measured file's runs against the H200 estimate with a calibration file's rates.
fn rows_with(file: &str, calibration: &str) -> Vec<validate::Row> {
    let hw = resolve_hardware("h200").expect("h200 ships").value;
    let rates = Calibration::load(&repo(calibration))
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
    each_within(&rows(), WORST_BOUND, Some(TIME_WORST_BOUND));
}

#[test]
fn bitsandbytes_runs_on_the_h200_match_on_memory_and_step_time() {
    // QLoRA (NF4, double quantization, bf16 compute), 8-bit AdamW and the paged optimizers
    // measured on an H200 (validation/bnb-h200.jsonl; QLoRA compared on its step peaks): every
    // peak within 1 %, step times within the headline bounds.
    let rows = rows_of("validation/bnb-h200.jsonl");
    assert_eq!(rows.len(), 8);
    each_within(&rows, 0.01, Some(0.25));
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
    each_within(&rows, 0.05, Some(0.30));
}

#[test]
fn the_h200_as_ftplan_calibrates_it_keeps_the_step_time_bounds() {
    // validation/calib-wgpu-h200.toml: `ftplan calibrate` (WGSL fp32 matmul and copy) and
    // `ftplan measure --calibrate-host` run on the lent H200, nothing fitted; bf16 GEMMs stay
    // the datasheet's. Its copy rate is memory's, not the L2's: 3,904 GB/s at 256 MiB, under the
    // HBM's 4,800 and 92 % of the 4,251 PyTorch's copy reached (16 MiB copies ran at 4,955 from
    // the cache). Its module cost (94.2 us) is the profiles' 90 within 5 %.
    let hw = resolve_hardware("h200").expect("h200 ships").value;
    let cal = Calibration::load(&repo("validation/calib-wgpu-h200.toml")).expect("loads");
    assert!(
        cal.copy_gbps < hw.hbm_gbps && cal.copy_gbps > 0.9 * 4251.0,
        "{}",
        cal.copy_gbps
    );
    let host = cal.host.expect("host costs timed");
    assert!(
        (host.module_us / hw.module_overhead_us - 1.0).abs() < 0.05,
        "{host:?}"
    );
    // With it in place of the harness's PyTorch-measured rates, the 34 measured runs keep both
    // step-time bounds (median 6.6 %, worst 33.7 %).
    let rows = rows_with(
        "validation/measured.jsonl",
        "validation/calib-wgpu-h200.toml",
    );
    let s = validate::summary(&rows);
    assert!(
        s.time_median <= TIME_MEDIAN_BOUND,
        "{:.1}%",
        s.time_median * 100.0
    );
    each_within(&rows, WORST_BOUND, Some(TIME_WORST_BOUND));
}

#[test]
fn the_h200_hosts_forward_python_per_module_call_is_the_profiles_module_cost() {
    // validation/host-h200.jsonl, pass 1: measure.py's runs at batch 1 and 16 tokens on the lent
    // H200, where kernels take microseconds and a synchronized forward's wall time is the host's. Per
    // run: (forward seconds - top-level aten ops x 15.7 us, the dispatch `--calibrate-host`
    // timed on that machine) / module calls. E.g. BART-large full fine-tuning: (44.9 ms - 860 x
    // 15.7 us) / 348 = 90 us. The median over the 29 runs is the module cost every GPU profile
    // charges (90 us, set from the step times of other machines) within 5 %.
    let text = std::fs::read_to_string(repo("validation/host-h200.jsonl")).expect("in the repo");
    let mut per_module: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["pass"] == 1)
        .filter_map(|r| {
            let p = r.get("phases")?;
            let forward = p["forward_s"].as_f64()?;
            let ops = p["aten_top"]["forward"].as_f64()?;
            let modules = p["module_calls"].as_f64()?;
            Some((forward - ops * 15.7e-6) / modules * 1e6)
        })
        .collect();
    assert_eq!(per_module.len(), 29);
    per_module.sort_by(f64::total_cmp);
    let median = per_module[per_module.len() / 2];
    let hw = resolve_hardware("h200").expect("h200 ships").value;
    assert!(
        (median / hw.module_overhead_us - 1.0).abs() < 0.05,
        "median {median:.1} us against {} us",
        hw.module_overhead_us
    );
}

#[test]
fn the_host_probes_toy_and_full_runs_match_on_memory() {
    // validation/host-h200.jsonl: 50 runs on three H200 hosts, 39 of them at batch 1 and 16
    // tokens, where the model and its optimizer states are nearly all of the peak. Those whose
    // whole-run peak is the harness's setup (random initialization from a config: T5 with LoRA
    // or a prompt, BART with adapters, 0.6-1.0 GB against step peaks 4-10 % lower) are compared
    // on their step peaks, as the estimate is of training. Every peak within 5 %, every
    // trainable count exact; their step times are the hosts' (see validation/README.md).
    let rows = rows_of("validation/host-h200.jsonl");
    assert_eq!(rows.len(), 50);
    each_within(&rows, 0.05, None);
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

/// One measured record compared with the H200's datasheet estimate.
fn row_of_line(line: &str) -> validate::Row {
    let hw = resolve_hardware("h200").expect("ships").value;
    let rates = ftplan::time::Rates::from_datasheet(&hw);
    validate::compare("record", line, &hw, &rates)
        .expect("plans")
        .remove(0)
}

/// One line of a shipped `validation/*.jsonl` file, by run name.
fn line_of(file: &str, name: &str) -> String {
    let text = std::fs::read_to_string(repo(file)).expect("ships");
    text.lines()
        .find(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["name"] == name))
        .expect("the run is in the file")
        .to_string()
}

#[test]
fn a_memtracker_replay_is_compared_without_the_trackers_leak_and_without_cublas() {
    // T5-base with adapters of 64, batch 16, 512 + 128 tokens, checkpointing, one rank of 8-way
    // FSDP2 replayed by `fsdp_fake.py` (validation/fsdp.jsonl). Its steps peaked at
    // 1,020,235,332, 1,057,217,988 and 1,091,820,996 B: FSDPMemTracker keeps 34,603,008 B of each
    // checkpointed step alive (1,091,820,996 - 1,057,217,988; validation/tracker_leak.py shows
    // PyTorch alone frees them), so step k (from 0) carries k x 34,603,008 and its own peaks are
    // 1,020,235,332, 1,022,614,980 and 1,022,614,980: the run's is 1,022,614,980 B.
    let name = "t5-base|adapter|b16|s(512, 128)|gc1|sdpa|fsdp|w8";
    let row = row_of_line(&line_of("validation/fsdp.jsonl", name));
    assert_eq!(row.measured_peak, 1_022_614_980);
    // A CPU has no cuBLAS: the estimate compared is the H200's less its two 32 MiB workspaces
    // (67,108,864 B), as `ftplan measure --device cpu` compares.
    let hw = resolve_hardware("h200").expect("ships").value;
    let rates = ftplan::time::Rates::from_datasheet(&hw);
    let est = ftplan::estimate::estimate(&row.model, &row.plan, &hw, &rates).expect("estimates");
    assert_eq!(row.estimated_peak, est.memory.peak.0 - 67_108_864);
    // The same correction on a single-GPU replay (TinyLlama LoRA q/v at batch 8 x 1,024,
    // checkpointed, sweep.jsonl: steps at 6,160,511,240, 6,245,642,856 and 6,312,751,720, a
    // leak of 67,108,864 a step, so 6,178,533,992) equals, to the byte, that run's peak
    // re-measured by a tracker without module hooks (validation/peak_live.py,
    // `peak_plain_bytes`), which `validate` compares where present.
    let line = line_of(
        "validation/sweep.jsonl",
        "tinyllama-1.1b|lora|b8|s1024|gc1|sdpa|r16|qv",
    );
    let rec: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(rec["peak_plain_bytes"], 6_178_533_992_u64);
    assert_eq!(
        rec["peak_by_step"],
        serde_json::json!([6_160_511_240_u64, 6_245_642_856_u64, 6_312_751_720_u64])
    );
    assert_eq!(row_of_line(&line).measured_peak, 6_178_533_992);
}

#[test]
fn a_run_measured_on_a_gpu_keeps_its_peak_and_workspaces() {
    // The same comparison for a GPU run: TinyLlama LoRA at batch 8 on the H200
    // (measured.jsonl) is compared on its `peak_run` with the workspaces in the estimate; the
    // same record marked as run on the CPU (`"device": "cpu"`, as `ftplan measure --device cpu
    // --save` writes) is estimated 67,108,864 B lower.
    let name = "tinyllama-1.1b|lora|b8|s1024|gc0|sdpa|r16|qv";
    let line = line_of("validation/measured.jsonl", name);
    let gpu = row_of_line(&line);
    let rec: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(
        gpu.measured_peak,
        rec["peak_run"].as_u64().expect("peak_run")
    );
    let mut cpu: serde_json::Value = rec.clone();
    cpu["device"] = serde_json::json!("cpu");
    let cpu = row_of_line(&cpu.to_string());
    assert_eq!(gpu.estimated_peak - cpu.estimated_peak, 67_108_864);
}

#[test]
fn a_saved_dora_run_is_estimated_as_dora() {
    // `ftplan measure --dora --save` writes `"lora_dora": true` into the run; `validate` read it
    // as plain LoRA. TinyLlama LoRA r16 on q and v: DoRA adds one trainable magnitude per output
    // of each target, 22 layers x (2,048 + 256) = 50,688 parameters beside LoRA's 2,252,800.
    let name = "tinyllama-1.1b|lora|b8|s1024|gc0|sdpa|r16|qv";
    let line = line_of("validation/measured.jsonl", name);
    let mut rec: serde_json::Value = serde_json::from_str(&line).expect("json");
    rec["run"]["lora_dora"] = serde_json::json!(true);
    let plain = row_of_line(&line);
    let dora = row_of_line(&rec.to_string());
    assert_eq!(plain.estimated_trainable, 2_252_800);
    assert_eq!(dora.estimated_trainable, 2_252_800 + 22 * (2_048 + 256));
    assert!(dora.estimated_peak > plain.estimated_peak);
}
