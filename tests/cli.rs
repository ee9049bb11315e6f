//! The command line end to end: exit codes, output contracts, files.

use crate::{ftplan, repo};
use serde_json::Value;

fn stdout(cmd: &mut assert_cmd::Command, code: i32) -> String {
    let out = cmd.assert().code(code);
    String::from_utf8_lossy(&out.get_output().stdout).to_string()
}

fn json(cmd: &mut assert_cmd::Command, code: i32) -> Value {
    let text = stdout(cmd, code);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `ftplan fit ARGS --format json` for a plan that does not fit (exit 1).
fn fit_json(args: &[&str]) -> Value {
    json(ftplan().arg("fit").args(args).args(["--format", "json"]), 1)
}

#[test]
fn the_readme_command_fits_and_exits_zero() {
    let text = stdout(
        ftplan().args([
            "estimate", "--model", "llama7b", "--method", "lora", "--gpu", "a100",
        ]),
        0,
    );
    insta::assert_snapshot!("estimate_llama7b_lora_a100", text);
}

#[test]
fn the_peak_row_names_its_phase_in_words() {
    // Llama-2-7B trained in pure bf16 with Adafactor and checkpointing peaks in the optimizer
    // step (Adafactor's full-size variance estimate on top of weights and gradients); the row
    // says so as words, not as the enum's squashed name.
    let text = stdout(
        ftplan().args([
            "estimate",
            "--model",
            "llama2-7b",
            "--gpu",
            "a100-80gb",
            "--method",
            "full",
            "--optimizer",
            "adafactor",
            "--precision",
            "bf16",
            "--seq",
            "1024",
            "--grad-ckpt",
        ]),
        0,
    );
    assert!(
        text.contains("optimizer step at `optimizer.step`"),
        "{text}"
    );
}

#[test]
fn aliases_are_reported_on_stderr() {
    let out = ftplan()
        .args([
            "estimate", "--model", "llama7b", "--method", "lora", "--gpu", "a100",
        ])
        .assert()
        .success();
    let err = crate::stderr_of(&out);
    assert!(err.contains("`a100` resolves to `a100-80gb`"), "{err}");
}

#[test]
fn the_device_names_torch_reports_resolve_to_their_profiles() {
    // `torch.cuda.get_device_name()` as pasted from a notebook: lowercased, spaces to hyphens.
    for (name, stem) in [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("AMD Instinct MI300X", "mi300x"),
        ("NVIDIA B200", "b200"),
    ] {
        let hw = ftplan::spec::registry::resolve_hardware(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .value;
        assert_eq!(hw.name, stem, "{name}");
    }
    // torch 2.11 gives cuBLAS its 32 MiB workspace on compute capability 9.0 only
    // (`parseChosenWorkspaceSize`): a B200 (10.0) gets 4 MiB x 2 + 16 KiB x 8 per handle.
    let b200 = ftplan::spec::registry::resolve_hardware("b200")
        .expect("ships")
        .value;
    assert_eq!(b200.cublas_workspace.0, 4 * 1024 * 1024 * 2 + 16 * 1024 * 8);
    let h200 = ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value;
    assert_eq!(h200.cublas_workspace.0, 32 * 1024 * 1024);
}

#[test]
fn json_output_keeps_its_contract() {
    let v = json(
        ftplan().args([
            "estimate", "--model", "gpt2", "--method", "full", "--gpu", "h100", "--format", "json",
        ]),
        0,
    );
    for key in [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "temporary",
        "peak",
        "overhead",
        "required",
    ] {
        assert!(v["memory"][key].is_u64(), "memory.{key} is an integer: {v}");
    }
    assert_eq!(v["model"]["name"], "gpt2");
    assert_eq!(v["model"]["params"], 124_439_808);
    assert_eq!(v["method"], "full");
    assert_eq!(v["trainable_params"], 124_439_808);
    assert_eq!(v["device"]["name"], "h100-sxm");
    assert!(v["device"]["memory"].is_u64());
    assert_eq!(v["fits"], true);
    for key in ["step_seconds", "tokens_per_second", "mfu"] {
        assert!(
            v["time"][key].as_f64().is_some_and(|x| x > 0.0),
            "time.{key}: {v}"
        );
    }
    let m = &v["memory"];
    let sum: u64 = [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "temporary",
    ]
    .iter()
    .map(|k| m[k].as_u64().unwrap_or(0))
    .sum();
    assert_eq!(
        sum,
        m["peak"].as_u64().unwrap_or(0),
        "breakdown sums to the peak"
    );
    assert_eq!(
        m["peak"].as_u64().unwrap_or(0) + m["overhead"].as_u64().unwrap_or(0),
        m["required"].as_u64().unwrap_or(1)
    );
}

#[test]
fn a_plan_that_does_not_fit_exits_one() {
    let v = json(
        ftplan().args([
            "estimate",
            "--model",
            "llama2-70b",
            "--method",
            "full",
            "--gpu",
            "a100-80gb",
            "--format",
            "json",
        ]),
        1,
    );
    assert_eq!(v["fits"], false);
}

#[test]
fn wall_time_and_cost_follow_from_tokens_and_price() {
    let v = json(
        ftplan().args([
            "estimate", "--model", "gpt2", "--gpu", "h100", "--format", "json", "--tokens", "1e9",
            "--price", "2",
        ]),
        0,
    );
    let tps = v["time"]["tokens_per_second"].as_f64().unwrap_or(0.0);
    let wall = v["time"]["wall_seconds"].as_f64().unwrap_or(0.0);
    assert!((wall - 1e9 / tps).abs() / wall < 1e-9);
    let cost = v["time"]["cost_usd"].as_f64().unwrap_or(0.0);
    assert!((cost - wall / 3600.0 * 2.0).abs() < 1e-6);
}

#[test]
fn unknown_names_get_a_suggestion_and_exit_two() {
    for (args, want) in [
        (
            vec!["--model", "llama2-7", "--gpu", "h100"],
            "did you mean `llama2-7b`",
        ),
        (vec!["--model", "gpt2", "--gpu", "h1000"], "did you mean `h"),
        (
            vec![
                "--model",
                "gpt2",
                "--gpu",
                "h100",
                "--lora-targets",
                "q,vv",
                "--method",
                "lora",
            ],
            "did you mean `v`",
        ),
    ] {
        let out = ftplan().arg("estimate").args(&args).assert().code(2);
        let err = crate::stderr_of(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        crate::assert_message_policy(&err);
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn impossible_plans_are_errors_not_panics() {
    for (args, want) in [
        (vec!["--batch", "0"], "`batch`"),
        (vec!["--seq", "0"], "`seq`"),
        (
            vec!["--batch", "100000000", "--seq", "100000000"],
            "`seq` must be at most",
        ),
        (
            vec!["--batch", "100000000", "--seq", "100000"],
            "absurdly large",
        ),
        (vec!["--method", "lora", "--lora-rank", "0"], "`lora-rank`"),
        (vec!["--headroom", "150"], "`headroom`"),
        (vec!["--gpus", "0"], "`gpus`"),
    ] {
        let out = ftplan()
            .args(["estimate", "--model", "gpt2", "--gpu", "h100"])
            .args(&args)
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn list_shows_every_shipped_model_and_gpu() {
    let models = stdout(ftplan().args(["list", "models"]), 0);
    for name in [
        "gpt2-xl",
        "llama3-70b",
        "flan-t5-xl",
        "bart-base",
        "falcon-7b",
        "phi-2",
    ] {
        assert!(models.contains(name), "{name} missing from {models}");
    }
    let gpus = stdout(ftplan().args(["list", "gpus"]), 0);
    for name in ["a100-40gb", "h100-pcie", "mi300x", "rtx-a6000", "t4"] {
        assert!(gpus.contains(name), "{name} missing from {gpus}");
    }
}

#[test]
fn config_json_is_accepted_wherever_a_model_name_is() {
    let a = json(
        ftplan().args([
            "estimate",
            "--model",
            "examples/configs/mistral-7b-config.json",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--format",
            "json",
        ]),
        0,
    );
    let b = json(
        ftplan().args([
            "estimate",
            "--model",
            "mistral-7b",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--format",
            "json",
        ]),
        0,
    );
    assert_eq!(a["memory"]["peak"], b["memory"]["peak"]);
    assert_eq!(a["model"]["params"], 7_241_732_096u64);
}

#[test]
fn a_config_json_as_python_writes_it_with_infinity_is_read() {
    // transformers saves Mamba-2's `time_step_limit` as `[0.0, Infinity]` (Python's JSON).
    let v = json(
        ftplan().args([
            "estimate",
            "--model",
            "tests/fixtures/models/mamba2-python-json.json",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--lora-targets",
            "in_proj",
            "--format",
            "json",
        ]),
        0,
    );
    assert!(v["memory"]["peak"].as_u64().is_some_and(|p| p > 0));
}

#[test]
fn check_exit_codes_follow_the_worst_plan() {
    stdout(ftplan().args(["check", "examples"]), 0);
    stdout(
        ftplan().args([
            "check",
            "tests/fixtures/plans/llama2-7b-full-a100-40gb.toml",
        ]),
        1,
    );
    stdout(
        ftplan().args(["check", "tests/fixtures/plans/invalid-method.toml"]),
        2,
    );
    // A folder with a failing and an invalid plan: invalid wins.
    stdout(ftplan().args(["check", "tests/fixtures/plans"]), 2);
    // A single plan from flags.
    stdout(
        ftplan().args(["check", "--model", "gpt2", "--gpu", "t4"]),
        0,
    );
    let v = json(
        ftplan().args([
            "check",
            "examples",
            "tests/fixtures/plans/llama2-7b-full-a100-40gb.toml",
            "--format",
            "json",
        ]),
        1,
    );
    let plans = v["plans"].as_array().cloned().unwrap_or_default();
    assert_eq!(plans.len(), 5);
    assert_eq!(plans.iter().filter(|p| p["fits"] == false).count(), 1);
}

#[test]
fn invalid_plan_files_name_file_and_field() {
    let out = ftplan()
        .args(["check", "tests/fixtures/plans/invalid-method.toml"])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("invalid-method.toml")
            && err.contains("`method`")
            && err.contains("did you mean `lora`"),
        "{err}"
    );
}

fn required(args: &[String]) -> u64 {
    let out = ftplan()
        .args(["estimate", "--format", "json"])
        .args(args)
        .output()
        .expect("runs");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    v["memory"]["required"].as_u64().expect("required")
}

#[test]
fn fit_search_agrees_with_the_estimate() {
    let base = |batch: u64, seq: u64| -> Vec<String> {
        [
            "--model",
            "llama2-7b",
            "--gpu",
            "a100-80gb",
            "--method",
            "lora",
            "--batch",
            &batch.to_string(),
            "--seq",
            &seq.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let v = json(
        ftplan()
            .arg("fit")
            .args(base(1, 2048))
            .args(["--format", "json"]),
        0,
    );
    let budget = v["budget"].as_u64().expect("budget");
    let max_batch = v["max_batch"].as_u64().expect("a batch fits");
    assert!(required(&base(max_batch, 2048)) <= budget);
    assert!(required(&base(max_batch + 1, 2048)) > budget);
    let max_seq = v["max_seq"].as_u64().expect("a length fits");
    assert!(required(&base(1, max_seq)) <= budget);
    assert!(required(&base(1, max_seq + 1)) > budget);
}

#[test]
fn fit_ranks_fixes_for_a_plan_that_does_not_fit() {
    let v = fit_json(&[
        "--model",
        "llama2-7b",
        "--gpu",
        "a100-40gb",
        "--method",
        "full",
        "--batch",
        "2",
        "--seq",
        "1024",
    ]);
    let fixes = v["fixes"].as_array().cloned().unwrap_or_default();
    assert!(!fixes.is_empty(), "{v}");
    let budget = v["budget"].as_u64().expect("budget");
    for f in &fixes {
        assert!(f["change"].is_string());
        let gpu_change = f["gpu"].is_string();
        assert!(
            gpu_change || f["required"].as_u64().expect("required") <= budget,
            "{f}"
        );
    }
    let changes: Vec<&str> = fixes.iter().filter_map(|f| f["change"].as_str()).collect();
    assert!(changes.iter().any(|c| c.contains("LoRA")), "{changes:?}");
    let slow: Vec<f64> = fixes
        .iter()
        .filter_map(|f| f["slowdown"].as_f64())
        .collect();
    assert!(
        slow.windows(2).all(|w| w[0] <= w[1]),
        "ranked by time cost: {slow:?}"
    );
    // Single changes fit here, so no pairs are tried.
    assert!(fixes.iter().all(|f| f["changes"] == 1), "{v}");
}

#[test]
fn fit_offers_two_changes_together_when_no_single_one_fits() {
    // LoRA r64 on every linear of Llama-2-7B, batch 4 x 4096, on a 24 GB RTX 4090 (23.64 GiB
    // budget): 126.3 GiB. Checkpointing alone leaves 25.98 GiB, QLoRA alone 151.6 (no
    // checkpointing: the step keeps every block's activations), so no single change fits
    // without truncating the samples; both together need 21.55 GiB. Pairs that keep the data
    // (checkpointing with QLoRA, or with a smaller micro-batch and accumulation) are offered
    // before those that shorten the sequence, and the whole list stays ranked by time cost.
    let v = fit_json(&[
        "--model",
        "llama2-7b",
        "--gpu",
        "rtx4090",
        "--method",
        "lora",
        "--lora-rank",
        "64",
        "--lora-targets",
        "all",
        "--batch",
        "4",
        "--seq",
        "4096",
        "--max-gpus",
        "1",
    ]);
    let fixes = v["fixes"].as_array().expect("fixes");
    let single = |want: &str| {
        fixes
            .iter()
            .any(|f| f["changes"] == 1 && f["change"].as_str().is_some_and(|c| c.contains(want)))
    };
    assert!(!single("checkpointing") && !single("QLoRA"), "{v}");
    let pair = fixes
        .iter()
        .find(|f| {
            f["changes"] == 2
                && f["change"]
                    .as_str()
                    .is_some_and(|c| c.contains("checkpointing") && c.contains("QLoRA"))
        })
        .unwrap_or_else(|| panic!("no checkpointing + QLoRA pair: {v}"));
    let gib = pair["required"].as_f64().expect("required") / (1u64 << 30) as f64;
    assert!((gib - 21.55).abs() < 0.01 && pair["fits"] == true, "{pair}");
    let slow: Vec<f64> = fixes
        .iter()
        .filter_map(|f| f["slowdown"].as_f64())
        .collect();
    assert!(slow.windows(2).all(|w| w[0] <= w[1]), "{slow:?}");
}

#[test]
fn compare_writes_charts_and_a_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().display().to_string();
    stdout(
        ftplan().args([
            "compare",
            "--model",
            "tinyllama",
            "--gpu",
            "l4",
            "--methods",
            "full,lora,qlora",
            "--out",
            &out,
        ]),
        0,
    );
    let svg = std::fs::read_to_string(dir.path().join("compare-tinyllama-1.1b.svg")).expect("svg");
    for label in [
        "full",
        "lora",
        "qlora",
        "activations",
        "device memory",
        "memory (GiB)",
    ] {
        assert!(svg.contains(label), "SVG lacks {label}");
    }
    let png = std::fs::metadata(dir.path().join("compare-tinyllama-1.1b.png"))
        .expect("png")
        .len();
    assert!(png > 10_000, "PNG is {png} bytes");
    let md = std::fs::read_to_string(dir.path().join("compare-tinyllama-1.1b.md")).expect("md");
    assert!(
        md.contains("compare-tinyllama-1.1b.png") && md.contains("qlora"),
        "{md}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn sweeps_write_curves_and_a_fit_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().display().to_string();
    stdout(
        ftplan().args([
            "sweep",
            "--model",
            "gpt2",
            "--gpu",
            "t4",
            "--over",
            "seq",
            "--methods",
            "full,lora",
            "--out",
            &out,
        ]),
        0,
    );
    let svg = std::fs::read_to_string(dir.path().join("sweep-gpt2-seq.svg")).expect("svg");
    assert!(svg.contains("full") && svg.contains("lora") && svg.contains("device limit"));
    stdout(
        ftplan().args([
            "sweep", "--model", "gpt2", "--gpu", "t4", "--over", "batch", "--out", &out,
        ]),
        0,
    );
    assert!(dir.path().join("sweep-gpt2-batch.png").exists());
    stdout(
        ftplan().args([
            "sweep",
            "--over",
            "matrix",
            "--method",
            "lora",
            "--models",
            "gpt2,llama2-7b",
            "--gpus-list",
            "t4,h100",
            "--out",
            &out,
        ]),
        0,
    );
    let svg = std::fs::read_to_string(dir.path().join("fit-matrix.svg")).expect("svg");
    assert!(svg.contains("llama2-7b") && svg.contains("h100-sxm"));
}

#[test]
fn an_unwritable_output_is_an_error_with_no_partial_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a folder").expect("write");
    let out = ftplan()
        .args([
            "compare",
            "--model",
            "gpt2",
            "--gpu",
            "t4",
            "--methods",
            "lora",
            "--out",
        ])
        .arg(&blocker)
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    crate::assert_message_policy(&err);
    assert!(
        err.contains("is a file, not a folder for the reports"),
        "{err}"
    );
    let target = blocker.join("cal.toml");
    ftplan()
        .args(["calibrate", "--mock", "--quick", "--out"])
        .arg(&target)
        .assert()
        .code(2);
    assert!(!target.exists());
}

#[test]
fn calibration_file_round_trips_into_the_estimate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cal = dir.path().join("cal.toml");
    ftplan()
        .args(["calibrate", "--mock", "--quick", "--out"])
        .arg(&cal)
        .assert()
        .success();
    let text = std::fs::read_to_string(&cal).expect("written");
    assert!(
        text.contains("fp32_matmul") && text.contains("copy_gbps"),
        "{text}"
    );
    let with = json(
        ftplan()
            .args([
                "estimate",
                "--model",
                "gpt2",
                "--gpu",
                "h100",
                "--format",
                "json",
                "--calibration",
            ])
            .arg(&cal),
        0,
    );
    let without = json(
        ftplan().args([
            "estimate", "--model", "gpt2", "--gpu", "h100", "--format", "json",
        ]),
        0,
    );
    // The mock's copy bandwidth (1 TB/s) is below the datasheet's: the device time grows.
    assert!(with["time"]["forward_seconds"].as_f64() > without["time"]["forward_seconds"].as_f64());
    assert_eq!(
        with["memory"], without["memory"],
        "calibration changes time, not memory"
    );
    let harness = repo("validation/calib-h200.json");
    json(
        ftplan()
            .args([
                "estimate",
                "--model",
                "gpt2",
                "--gpu",
                "h200",
                "--format",
                "json",
                "--calibration",
            ])
            .arg(&harness),
        0,
    );
}

#[test]
fn a_wgpu_calibration_says_its_fp32_rate_is_a_floor_for_fp32_plans() {
    // validation/calib-wgpu-h200.toml: the WGSL fp32 product peaked at 19.9 TFLOP/s on the
    // H200, where PyTorch's fp32 GEMM reached 50.7; an fp32 plan estimated with it says so, a
    // mixed-precision plan (bf16 GEMMs, the datasheet's) does not.
    let note = |precision: &str| {
        let out = ftplan()
            .args(["estimate", "--model", "gpt2", "--gpu", "h200"])
            .args(["--precision", precision])
            .args(["--calibration", "validation/calib-wgpu-h200.toml"])
            .assert()
            .code(0);
        crate::stderr_of(&out).contains("19.9 TFLOP/s at best")
    };
    assert!(note("fp32"));
    assert!(!note("mixed-bf16"));
}

#[test]
fn no_adapter_is_a_clear_error() {
    let out = ftplan()
        .args([
            "calibrate",
            "--backend",
            "none",
            "--quick",
            "--out",
            "/tmp/ftplan-none.toml",
        ])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("no GPU adapter") && err.contains("mesa-vulkan-drivers"),
        "{err}"
    );
}

#[test]
fn fit_offers_pure_bf16_and_adafactor_for_full_7b_on_an_a100() {
    // Full fine-tuning of Llama-2-7B needs ~106 GiB on an 80 GB A100; pure bf16 (no fp32 master
    // weights, bf16 states) and Adafactor (factored states) each fit on their own.
    let v = json(
        ftplan().args([
            "fit",
            "--model",
            "llama2-7b",
            "--gpu",
            "a100",
            "--method",
            "full",
            "--max-gpus",
            "1",
            "--format",
            "json",
        ]),
        1,
    );
    let fixes = v["fixes"].as_array().expect("fixes");
    for want in ["pure bf16", "Adafactor", "8-bit AdamW"] {
        let fix = fixes
            .iter()
            .find(|f| f["change"].as_str().is_some_and(|c| c.contains(want)))
            .unwrap_or_else(|| panic!("no `{want}` fix: {v}"));
        assert_eq!(fix["fits"], true, "{fix}");
    }
}

#[test]
fn bf16_on_a_gpu_without_bf16_tensor_cores_is_said() {
    let out = ftplan()
        .args(["estimate", "--model", "gpt2", "--gpu", "t4"])
        .assert()
        .code(0);
    let err = crate::stderr_of(&out);
    assert!(err.contains("no bf16 tensor cores"), "{err}");
}

#[test]
fn the_updates_and_why_peft_charts_are_written_with_their_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().to_str().expect("utf-8");
    let v = json(
        ftplan().args([
            "sweep", "--over", "updates", "--model", "gpt2", "--seq", "512", "--gpu", "h100",
            "--out", out, "--format", "json",
        ]),
        0,
    );
    let panels = v["panels"].as_array().expect("panels");
    assert_eq!(panels.len(), 9, "every method");
    // LoRA (q, v through GPT-2's c_attn) adds to the attention of all 12 blocks and leaves the
    // FFN frozen; column 0 is outside the blocks.
    let lora = panels.iter().find(|p| p["method"] == "lora").expect("lora");
    let cells = lora["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 13);
    assert!(
        cells[1..]
            .iter()
            .all(|c| c[1] == "added" && c[2] == "frozen")
    );
    for f in ["updates-gpt2.svg", "updates-gpt2.png", "updates-gpt2.md"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let v = json(
        ftplan().args([
            "sweep",
            "--over",
            "scale",
            "--models",
            "gpt3-125m,gpt3-13b",
            "--methods",
            "full,lora",
            "--seq",
            "512",
            "--gpu",
            "a100",
            "--out",
            out,
            "--format",
            "json",
        ]),
        0,
    );
    let series = v["series"].as_array().expect("series");
    let trainable = |i: usize, j: usize| series[i]["trainable_params"][j].as_u64().expect("n");
    // Full fine-tuning trains everything, LoRA a small fraction, at both scales.
    assert_eq!(trainable(0, 0), v["total_params"][0].as_u64().expect("n"));
    assert!(trainable(1, 1) * 100 < trainable(0, 1));
    assert!(dir.path().join("why-peft.png").exists());
}

#[test]
fn list_flags_refuse_an_empty_list_and_a_thing_named_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().display().to_string();
    let refused = |args: &[&str], want: &str| {
        let a = ftplan().args(args).args(["--out", &out]).assert().code(2);
        let err = crate::stderr_of(&a);
        crate::assert_message_policy(&err);
        assert!(err.contains(want), "{err}");
    };
    let compare = ["compare", "--model", "gpt2", "--gpu", "a100"];
    let with = |extra: &[&'static str]| [&compare[..], extra].concat();
    let sweep = |over, models| ["sweep", "--over", over, "--gpu", "h100", "--models", models];
    // The same method twice, in any case, would draw its bar twice.
    refused(
        &with(&["--methods", "lora,LoRA"]),
        "field `methods` names `lora` and `LoRA`, which are both `lora`",
    );
    refused(
        &with(&["--methods", " , "]),
        "field `methods` names nothing",
    );
    // An alias and the profile it resolves to are one GPU, also across --gpu and --gpus-list.
    refused(
        &with(&["--gpus-list", "t4,a100-80gb"]),
        "field `gpus-list` names `a100-80gb`, which is --gpu `a100` again (`a100-80gb`)",
    );
    refused(
        &["sweep", "--over", "matrix", "--gpus-list", "h100,h100-sxm"],
        "field `gpus-list` names `h100` and `h100-sxm`, which are both `h100-sxm`",
    );
    // Models by alias: `llama7b` is `llama2-7b`; an empty entry between commas is no model.
    refused(
        &sweep("matrix", "gpt2,,llama7b,llama2-7b"),
        "field `models` names `llama7b` and `llama2-7b`, which are both `llama2-7b`",
    );
    refused(
        &sweep("gpus", "gpt2,gpt2"),
        "field `models` names `gpt2` twice",
    );
    // A name nothing answers to, or a file that cannot be read, is an input error, not a
    // refusal an exploration leaves out or marks as it does a method a model refuses.
    refused(&with(&["--gpus-list", "t4,a1000"]), "unknown GPU `a1000`");
    refused(&with(&["--gpus-list", "./no-such-gpu.toml"]), "cannot read");
    refused(
        &sweep("matrix", "gpt2,lama2-7b"),
        "unknown model `lama2-7b`",
    );
    refused(&sweep("gpus", "gpt2,gpt9"), "unknown model `gpt9`");
    // Nothing was written by a refused exploration.
    assert_eq!(std::fs::read_dir(dir.path()).expect("out").count(), 0);
    // A trailing comma is no entry; a left-out method is labelled by the GPU's own name, as
    // the bars are.
    let a = ftplan()
        .args(with(&["--gpus-list", "t4,"]))
        .args(["--out", &out])
        .assert()
        .code(0);
    let err = crate::stderr_of(&a);
    assert!(
        err.contains("note: prompt @ a100-80gb is left out: "),
        "{err}"
    );
}

#[test]
fn explorations_over_every_method_leave_out_what_the_model_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().display().to_string();
    let run = |args: &[&str], code: i32| {
        let a = ftplan()
            .args(args)
            .args(["--out", &out])
            .assert()
            .code(code);
        crate::stderr_of(&a)
    };
    // compare's default list on GPT-2 at 1,024 tokens: prompt tuning's 20 virtual tokens make
    // 1,044 positions of its 1,024, so it is left out and said; the rest are compared.
    let err = run(&["compare", "--model", "gpt2", "--gpu", "a100"], 0);
    assert!(err.contains("note: prompt is left out: ") && err.contains("1024 learned positions"));
    let md = std::fs::read_to_string(dir.path().join("compare-gpt2.md")).expect("report");
    assert!(md.contains("│ prefix") && !md.contains("│ prompt"), "{md}");
    assert!(md.contains("note: prompt is left out: "), "{md}");
    // The same method named by the user is an error.
    let err = run(
        &[
            "compare",
            "--model",
            "gpt2",
            "--gpu",
            "a100",
            "--methods",
            "lora,prompt",
        ],
        2,
    );
    crate::assert_message_policy(&err);
    // sweep's default list on Mamba: LoRA's default targets (q, v) find nothing in a model
    // without attention, so the full curve alone is drawn.
    let err = run(
        &[
            "sweep",
            "--model",
            "mamba-130m",
            "--gpu",
            "a100",
            "--over",
            "seq",
        ],
        0,
    );
    assert!(err.contains("the lora curve is left out") && err.contains("the qlora curve"));
    // The panels of what each method updates say in JSON which methods they leave out.
    let a = ftplan()
        .args([
            "sweep",
            "--over",
            "updates",
            "--model",
            "mamba-130m",
            "--gpu",
            "a100",
        ])
        .args(["--format", "json", "--out", &out])
        .assert()
        .code(0);
    let v: serde_json::Value = serde_json::from_slice(&a.get_output().stdout).expect("json");
    let left: Vec<&str> = v["left_out"]
        .as_array()
        .expect("left_out")
        .iter()
        .filter_map(|l| l["label"].as_str())
        .collect();
    assert!(
        left.contains(&"lora") && !left.contains(&"full"),
        "{left:?}"
    );
    // A sequence sweep replaces the plan's own length: Marian's 512 positions do not refuse
    // the default 1,024 before the sweep starts at 128.
    run(
        &[
            "sweep",
            "--model",
            "opus-mt-en-de",
            "--gpu",
            "a100",
            "--over",
            "seq",
        ],
        0,
    );
    // "Why PEFT" over its default models: prefix tuning does not fit PaLM's multi-query cache,
    // so that one point is missing, not the figure.
    let a = ftplan()
        .args([
            "sweep", "--over", "scale", "--gpu", "a100", "--format", "json",
        ])
        .args(["--out", &out])
        .assert()
        .code(0);
    let v: serde_json::Value = serde_json::from_slice(&a.get_output().stdout).expect("json");
    let prefix = v["series"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["method"] == "prefix"))
        .expect("prefix series");
    let peaks = prefix["peak_gib"].as_array().expect("peaks");
    assert!(
        peaks[..4].iter().all(|p| p.is_f64()) && peaks[4].is_null(),
        "{peaks:?}"
    );
    // A model every method is refused on (Marian's 512 positions at 1,024 tokens) is left out
    // of the columns and said, as the fit matrix leaves out a row; alone, it is the error.
    let scale = |models: &str, code: i32| {
        let a = ftplan()
            .args([
                "sweep", "--over", "scale", "--gpu", "a100", "--format", "json",
            ])
            .args(["--models", models, "--out", &out])
            .assert()
            .code(code);
        let v = serde_json::from_slice(&a.get_output().stdout).unwrap_or_default();
        (v, crate::stderr_of(&a))
    };
    let (v, err): (serde_json::Value, String) = scale("gpt2,opus-mt-en-de,t5-small", 0);
    assert_eq!(v["models"], serde_json::json!(["gpt2", "t5-small"]), "{v}");
    assert_eq!(v["left_out"][0]["label"], "opus-mt-en-de", "{v}");
    assert!(err.contains("note: opus-mt-en-de is left out: "), "{err}");
    let (_, err) = scale("opus-mt-en-de", 2);
    crate::assert_message_policy(&err);
    assert!(err.contains("512 learned positions"), "{err}");
}

#[test]
fn grids_of_models_mark_a_method_a_model_refuses() {
    // LoRA's default targets (q, v) find nothing in Mamba: that cell says why; GPT-2's stands.
    let dir = tempfile::tempdir().expect("tempdir");
    let sweep = |over: &[&str]| {
        let out = ftplan()
            .args(["sweep", "--models", "mamba-130m,gpt2", "--format", "json"])
            .args(over)
            .arg("--out")
            .arg(dir.path())
            .assert()
            .code(0);
        let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("json");
        (v, crate::stderr_of(&out))
    };
    let (v, err) = sweep(&["--over", "gpus", "--gpu", "a100"]);
    // The refusal names where the plan came from, as `estimate` and `fit` do.
    assert!(
        err.contains("note: lora on mamba-130m is left out: `command line`: field `lora-targets`"),
        "{err}"
    );
    let cell = |model: &str, method: &str| {
        v["needed"]
            .as_array()
            .and_then(|n| {
                n.iter()
                    .find(|c| c["model"] == model && c["method"] == method)
                    .cloned()
            })
            .expect("cell")
    };
    // The fit matrix for LoRA leaves Mamba's row out, and says why.
    let (mv, _) = sweep(&["--over", "matrix", "--method", "lora"]);
    assert_eq!(mv["rows"].as_array().map(Vec::len), Some(1), "{mv}");
    assert_eq!(mv["rows"][0]["model"], "gpt2");
    assert_eq!(mv["left_out"][0]["label"], "mamba-130m");
    let refused = cell("mamba-130m", "lora");
    assert!(
        refused["gpus"].is_null() && refused["refused"].is_string(),
        "{refused}"
    );
    let fine = cell("gpt2", "lora");
    assert_eq!(fine["gpus"], 1, "{fine}");
    assert!(fine["refused"].is_null());
    assert_eq!(cell("mamba-130m", "full")["gpus"], 1);
}
