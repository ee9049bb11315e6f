//! The edges around the estimator (issue: hardening): closed pipes, plan folders with nothing in
//! them, the headroom margin, and writes that leave nothing behind.

use crate::{ftplan, repo};
use std::process::{Command, Stdio};

/// The built binary, run directly so a test controls its pipes.
fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftplan"));
    cmd.current_dir(repo("."));
    cmd
}

#[test]
fn a_closed_stdout_ends_quietly_with_exit_zero() {
    for args in [
        &["list", "gpus", "--format", "json"][..],
        &["list", "models"],
        &["estimate", "--model", "gpt2", "--gpu", "h100"],
    ] {
        let mut child = binary()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftplan");
        // Close the read end before the program writes (as `| head -0` would).
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("ftplan ends");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_an_error_that_names_it() {
    // /dev/full takes no bytes (ENOSPC): the result was not delivered, so exit 2, one line.
    for args in [
        &["estimate", "--model", "gpt2", "--gpu", "h100-sxm"][..],
        &["completions", "bash"],
    ] {
        let full = std::fs::File::create("/dev/full").expect("/dev/full");
        let out = binary()
            .args(args)
            .stdout(Stdio::from(full))
            .output()
            .expect("ftplan ends");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error: cannot write to standard output: "),
            "{args:?}: {err}"
        );
        crate::assert_message_policy(&err);
    }
}

#[test]
fn check_on_a_folder_without_plans_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = ftplan().args(["check"]).arg(dir.path()).assert().code(2);
    let err = crate::stderr_of(&out);
    assert!(err.contains("no plan files"), "{err}");
    // A plan named `*.TOML` is a plan: extensions match case-insensitively.
    std::fs::copy(
        repo("examples/llama2-7b-lora-a100.toml"),
        dir.path().join("PLAN.TOML"),
    )
    .expect("copy plan");
    ftplan().args(["check"]).arg(dir.path()).assert().code(0);
}

#[test]
fn the_margin_accounts_for_the_headroom() {
    // GPT-2 full, batch 12, on an RTX 4090 needs about 19 GiB of 23.6; with 30 % kept free it does not fit,
    // and the margin says so (negative) instead of showing the device's whole memory.
    let out = ftplan()
        .args([
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "rtx4090",
            "--batch",
            "12",
            "--headroom",
            "30",
        ])
        .assert()
        .code(1);
    let text = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("verdict"))
        .expect("a verdict row");
    assert!(
        line.contains("DOES NOT FIT") && line.contains("margin -"),
        "{line}"
    );
}

#[test]
fn reports_leave_no_temporary_files_and_replace_planted_links() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A link planted where a predictable temporary name used to be is never followed.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "keep").expect("write victim");
    ftplan()
        .args([
            "compare",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--methods",
            "full,lora",
            "--out",
        ])
        .arg(dir.path())
        .assert()
        .code(0);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "temporary files left: {names:?}"
    );
    assert!(names.iter().any(|n| n.ends_with(".png")), "{names:?}");
    assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep");
}

#[test]
fn special_files_are_refused_not_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A FIFO used to block forever; a folder is not a file either.
    let fifo = dir.path().join("model.json");
    let made = Command::new("mkfifo").arg(&fifo).status();
    let mut inputs = vec![dir.path().to_path_buf()];
    if made.is_ok_and(|s| s.success()) {
        inputs.push(fifo);
    }
    for path in inputs {
        let out = ftplan()
            .args(["estimate", "--gpu", "h100", "--model"])
            .arg(&path)
            .timeout(std::time::Duration::from_secs(20))
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        assert!(
            err.contains("not a regular file") || err.contains("is a folder"),
            "{err}"
        );
        crate::assert_message_policy(&err);
    }
}

#[test]
fn the_os_error_is_printed_once() {
    let out = ftplan()
        .args([
            "estimate",
            "--gpu",
            "h100",
            "--model",
            "no/such/config.json",
        ])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// Runs `ftplan estimate` with `args` and expects exit 2 with `want` in the one error line.
fn refused(args: &[&str], want: &str) {
    let out = ftplan().arg("estimate").args(args).assert().code(2);
    let err = crate::stderr_of(&out);
    assert!(err.contains(want), "{args:?}: `{want}` not in: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    crate::assert_message_policy(&err);
    assert!(
        out.get_output().stdout.is_empty(),
        "{args:?} printed a result"
    );
}

#[test]
fn every_number_has_a_range() {
    let gpt2 = ["--model", "gpt2", "--gpu", "h100"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        gpt2.iter().copied().chain(extra.iter().copied()).collect()
    };
    for (args, field) in [
        (
            with(&[
                "--method",
                "adapter",
                "--adapter-size",
                "18446744073709551615",
            ]),
            "`adapter-size`",
        ),
        (
            with(&["--method", "prompt", "--virtual-tokens", "99999999999"]),
            "`virtual-tokens`",
        ),
        (with(&["--gpus", "18446744073709551615"]), "`gpus`"),
        (with(&["--price", "nan"]), "`price`"),
        (with(&["--price", "-1"]), "`price`"),
        (
            with(&["--method", "lora", "--lora-alpha", "inf"]),
            "`lora-alpha`",
        ),
        (
            with(&["--method", "lora", "--lora-alpha", "-2"]),
            "`lora-alpha`",
        ),
        (
            with(&["--epochs", "-1", "--dataset-tokens", "5"]),
            "`epochs`",
        ),
        (
            with(&["--epochs", "2", "--dataset-tokens", "-5"]),
            "`dataset-tokens`",
        ),
        (with(&["--tokens", "1e300"]), "`tokens`"),
        (with(&["--headroom", "-5"]), "`headroom`"),
        // A huge value is named as written, not as 309 digits.
        (with(&["--headroom", "1e308"]), "found 1e308"),
        (with(&["--seq", "100000000"]), "`seq`"),
        (
            vec![
                "--model",
                "tests/fixtures/invalid/huge-model.json",
                "--gpu",
                "h100",
            ],
            "parameters",
        ),
        (
            vec![
                "--model",
                "tests/fixtures/invalid/rotary-negative.json",
                "--gpu",
                "h100",
            ],
            "`partial_rotary_factor`",
        ),
        (
            vec![
                "--model",
                "tests/fixtures/invalid/inf-size.toml",
                "--gpu",
                "h100",
            ],
            "`hidden_size` must be a finite number",
        ),
        (
            vec![
                "--model",
                "tests/fixtures/invalid/nan-dropout.toml",
                "--gpu",
                "h100",
            ],
            "`attention_dropout` must be a finite number",
        ),
        (
            vec![
                "--model",
                "gpt2",
                "--gpu",
                "tests/fixtures/invalid/tiny-rate-gpu.toml",
            ],
            "`bf16_tflops`",
        ),
        (
            vec![
                "--model",
                "gpt2",
                "--gpu",
                "tests/fixtures/invalid/inf-rate-gpu.toml",
            ],
            "`hbm_gbps`",
        ),
    ] {
        refused(&args, field);
    }
}

#[test]
fn a_file_named_like_a_shipped_model_does_not_shadow_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("gpt2"), "not a model").expect("write decoy");
    let out = ftplan()
        .current_dir(dir.path())
        .args(["estimate", "--model", "gpt2", "--gpu", "h100"])
        .assert()
        .code(0);
    let text = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(text.starts_with("gpt2 on h100"), "{text}");
}

#[test]
fn fit_caps_its_search_instead_of_rejecting_a_valid_plan() {
    // gpt2 at batch 1 fits everywhere; the batch probe walks past the token limit.
    ftplan()
        .args([
            "fit",
            "--model",
            "gpt2",
            "--gpu",
            "h200",
            "--seq",
            "8",
            "--max-gpus",
            "1",
        ])
        .assert()
        .code(0);
}

#[test]
fn usage_errors_follow_the_message_policy_and_version_names_the_commit() {
    let out = ftplan().args(["estimate", "--bogus"]).assert().code(2);
    crate::assert_message_policy(&crate::stderr_of(&out));
    let out = ftplan().arg("--version").assert().code(0);
    let v = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(v.starts_with("ftplan 0.") && v.contains('('), "{v}");
}

#[test]
fn answers_that_used_to_mislead_are_refused_or_named() {
    // A LoRA target set that matches nothing (peft raises); a sequence past GPT-2's learned
    // position table (transformers raises).
    refused(
        &[
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--lora-targets",
            "gate",
        ],
        "finds nothing to train",
    );
    // peft's `q_proj` finds no `q_a_proj` behind DeepSeek-V3's query bottleneck; the hint names
    // the latent projections.
    refused(
        &[
            "--model",
            "deepseek-v3",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--lora-targets",
            "q_proj,v_proj",
        ],
        "`q_a_proj`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`",
    );
    // peft fuses Qwen3-MoE's expert gate and up projections and raises on one alone.
    refused(
        &[
            "--model",
            "qwen3-30b-a3b",
            "--gpu",
            "h100",
            "--method",
            "lora",
            "--lora-targets",
            "q_proj,gate_proj",
        ],
        "raises when only one is named",
    );
    refused(
        &["--model", "gpt2", "--gpu", "h100", "--seq", "4096"],
        "1024 learned positions",
    );
    // An unknown model inside a plan file names the file and the field.
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, "model = \"llama2-7bb\"\ngpu = \"a100\"\n").expect("write plan");
    let out = ftplan().arg("check").arg(&plan).assert().code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("plan.toml") && err.contains("`model`"),
        "{err}"
    );
    // Control characters from input reach the terminal escaped.
    let out = ftplan()
        .args(["estimate", "--gpu", "h100", "--model", "x\u{1b}[2J"])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        !err.contains('\u{1b}') && err.contains("\\u{1b}"),
        "{err:?}"
    );
}

#[test]
fn list_json_has_numbers_and_validate_works_anywhere() {
    let out = ftplan()
        .args(["list", "gpus", "--format", "json"])
        .assert()
        .code(0);
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert!(
        v[0]["memory"].is_u64() && v[0]["bf16_tflops"].is_f64(),
        "{v}"
    );
    let out = ftplan()
        .args(["list", "models", "--format", "json"])
        .assert()
        .code(0);
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert!(v[0]["hidden_size"].is_u64(), "{v}");
    // An installed binary outside the repository still has its measured runs.
    let dir = tempfile::tempdir().expect("temp dir");
    ftplan()
        .current_dir(dir.path())
        .arg("validate")
        .assert()
        .code(0);
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").expect("write empty");
    ftplan()
        .arg("validate")
        .arg("--file")
        .arg(&empty)
        .assert()
        .code(2);
}

#[test]
fn flags_that_would_be_dropped_are_said_or_refused() {
    // A flag the method does not read is said on stderr.
    let out = ftplan()
        .args([
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--lora-rank",
            "8",
        ])
        .assert()
        .code(0);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("--lora-rank is ignored by --method full"),
        "{err}"
    );
    // So is a plan file's key, named as the file spells it, and a kernel the model has no
    // layers for (GPT-2 has no linear attention for flash-linear-attention).
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        "model = \"gpt2\"\ngpu = \"h100\"\nlinear_kernel = \"fla\"\n[lora]\nrank = 8\n",
    )
    .expect("write");
    let out = ftplan().arg("fit").arg(&plan).assert().code(0);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("note: `lora.rank` is ignored by `method` full"),
        "{err}"
    );
    assert!(
        err.contains("note: `linear_kernel` fla is ignored: `gpt2` has no linear-attention"),
        "{err}"
    );
    // Plan flags beside a plan file would not apply: refused.
    let out = ftplan()
        .args(["check", "examples/llama2-7b-lora-a100.toml", "--batch", "4"])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("--batch") && err.contains("would not apply"),
        "{err}"
    );
    crate::assert_message_policy(&err);
    // compare reads --methods, not --method.
    let dir = tempfile::tempdir().expect("temp dir");
    let out = ftplan()
        .args([
            "compare", "--model", "gpt2", "--gpu", "h100", "--method", "lora", "--out",
        ])
        .arg(dir.path())
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(err.contains("--methods"), "{err}");
    // The fit matrix answers in JSON when asked.
    let out = ftplan()
        .args([
            "sweep",
            "--over",
            "matrix",
            "--method",
            "lora",
            "--models",
            "gpt2",
            "--gpus-list",
            "t4,a100",
            "--format",
            "json",
            "--out",
        ])
        .arg(dir.path())
        .assert()
        .code(0);
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert_eq!(v["gpus"].as_array().map(Vec::len), Some(2), "{v}");
}

#[test]
fn calibration_copies_beyond_the_cache_and_writes_the_memory_rate() {
    use ftplan::calibrate::{mock::MockGpu, run_within};
    // The H200 as `ftplan calibrate` saw it (2026-12-04): copies whose two buffers fit its 60 MB
    // L2 ran at up to 4,945 GB/s, above the HBM's 4,800 GB/s datasheet rate; the rate written
    // was that cache's, since the sizes stopped when the rate first stopped rising (at 32 MiB).
    // A mock with a 64 MiB cache at 8 TB/s and 4 TB/s memory: copies of 1 to 32 MiB (source
    // and destination up to 64 MiB) run from the cache, 64 MiB and up from memory; the sizes go
    // on to 256 MiB per buffer and stop where two sizes agree, and the file has 4,000 GB/s.
    // (Matmul rates flatten at once, `knee` 4, so the CPU reference products stay small.)
    let mut gpu = MockGpu {
        knee: 4.0,
        bandwidth: 4e12,
        cache_bytes: 64 << 20,
        cache_bandwidth: 8e12,
        ..MockGpu::default()
    };
    let cal = run_within(&mut gpu, 30.0, &mut |_| {}).expect("calibrates");
    assert!((cal.copy_gbps - 4000.0).abs() < 1e-6, "{}", cal.copy_gbps);
    assert!(
        cal.limits
            .iter()
            .any(|l| l == "copy: rate steady at 256 MiB"),
        "{:?}",
        cal.limits
    );
}

#[test]
fn calibration_fits_its_budget_and_says_why_it_stopped() {
    use ftplan::calibrate::{mock::MockGpu, run_within};
    // A device whose rate flattens early: sizes stop growing where the rate does, well inside
    // the budget, and the file says so.
    let mut gpu = MockGpu {
        knee: 4.0,
        ..MockGpu::default()
    };
    let start = std::time::Instant::now();
    let cal = run_within(&mut gpu, 30.0, &mut |_| {}).expect("calibrates");
    assert!(start.elapsed().as_secs_f64() < 30.0);
    assert!(
        cal.limits
            .iter()
            .any(|l| l.contains("F32 matmul: rate plateaued")),
        "{:?}",
        cal.limits
    );
    assert_eq!(cal.budget_seconds, Some(30.0));
    // Through the command: a short budget is kept, progress goes to stderr, the file records it.
    let dir = tempfile::tempdir().expect("temp dir");
    let out_file = dir.path().join("cal.toml");
    let out = ftplan()
        .args(["calibrate", "--mock", "--budget", "1", "--out"])
        .arg(&out_file)
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(0);
    let err = crate::stderr_of(&out);
    assert!(err.contains("checked") && err.contains("stopped:"), "{err}");
    let text = std::fs::read_to_string(&out_file).expect("calibration written");
    assert!(
        text.contains("budget_seconds = 1.0") && text.contains("limits"),
        "{text}"
    );
    ftplan()
        .args(["calibrate", "--mock", "--budget", "0"])
        .assert()
        .code(2);
}

#[test]
fn every_flag_is_described_and_completions_exist() {
    for cmd in [
        "estimate",
        "check",
        "fit",
        "compare",
        "sweep",
        "export",
        "list",
        "validate",
        "calibrate",
        "completions",
    ] {
        let out = ftplan().args([cmd, "-h"]).assert().code(0);
        let help = String::from_utf8_lossy(&out.get_output().stdout).to_string();
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let flag = line.trim();
            // A flag alone on its line takes its description from the next line.
            if line.starts_with("  ") && flag.starts_with('-') && !flag.contains("  ") {
                let next = lines.get(i + 1).map_or("", |l| l.trim());
                assert!(
                    !next.is_empty() && !next.starts_with('[') && !next.starts_with('-'),
                    "`ftplan {cmd}`: {flag} has no description"
                );
            }
        }
        // No colour codes anywhere (so NO_COLOR holds whatever the terminal).
        assert!(!help.contains('\u{1b}'), "{cmd}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = ftplan().args(["completions", shell]).assert().code(0);
        assert!(String::from_utf8_lossy(&out.get_output().stdout).contains("ftplan"));
    }
    let out = ftplan()
        .args(["estimate", "--model", "gpt2", "--gpu", "h100"])
        .env("NO_COLOR", "1")
        .assert()
        .code(0);
    assert!(!out.get_output().stdout.contains(&0x1b));
}

#[test]
fn a_measured_run_with_an_unknown_attention_or_precision_name_is_refused_by_field() {
    // Records name the kernel as the harnesses do (`sdpa`, `flash2`, `eager`) and the precision
    // as `ftplan measure` does (`fp32`, `mixed_fp16`); another name is an error naming the
    // field and the known names, not silently SDPA or mixed bf16.
    let first = ftplan::validate::MEASURED
        .lines()
        .next()
        .expect("a measured run");
    for (line, field, bad, known) in [
        (
            first.replacen("\"attn\": \"sdpa\"", "\"attn\": \"flash_attention_2\"", 1),
            "attn",
            "flash_attention_2",
            "sdpa",
        ),
        (
            first.replacen(
                "\"grad_ckpt\":",
                "\"precision\": \"fp16\", \"grad_ckpt\":",
                1,
            ),
            "precision",
            "fp16",
            "mixed_fp16",
        ),
    ] {
        assert!(line.contains(bad));
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("runs.jsonl");
        std::fs::write(&file, format!("{line}\n")).expect("write");
        let out = ftplan()
            .arg("validate")
            .arg("--file")
            .arg(&file)
            .assert()
            .code(2);
        let err = String::from_utf8_lossy(&out.get_output().stderr).to_string();
        assert!(err.contains(field) && err.contains(bad), "{err}");
        assert!(err.contains(known), "the hint names the known names: {err}");
    }
}

#[test]
fn a_flag_refused_after_the_plan_resolves_prints_no_notes() {
    // Each plan below resolves with notes (`a100` is an alias, --lora-rank is ignored by full
    // fine-tuning); the flag each command reads after resolving it is refused, and the refusal
    // is its error and hint alone.
    let cases: [&[&str]; 4] = [
        &["estimate", "--epochs", "2"],
        &["estimate", "--tokens", "1e9", "--price", "-2"],
        &["fit", "--host-memory", "0"],
        &[
            "export",
            "--engine",
            "fsdp",
            "--gpus",
            "2",
            "--deepspeed",
            "never-written.json",
        ],
    ];
    for args in cases {
        let out = ftplan()
            .args(args)
            .args(["--model", "gpt2", "--gpu", "a100", "--lora-rank", "8"])
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        assert!(!err.contains("note:"), "{args:?}: {err}");
        crate::assert_message_policy(&err);
    }
    assert!(!std::path::Path::new("never-written.json").exists());
}

#[test]
fn a_config_json_piped_to_standard_input_is_read_as_the_model() {
    // `curl .../config.json | ftplan estimate --model - ...`: the same estimate as its path,
    // named as `_name_or_path` says.
    let path = repo("examples/configs/mistral-7b-config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["_name_or_path"] = serde_json::json!("mistralai/Mistral-7B-v0.1");
    let json = |out: &assert_cmd::assert::Assert| -> serde_json::Value {
        serde_json::from_slice(&out.get_output().stdout).expect("estimate JSON")
    };
    let args = [
        "estimate", "--gpu", "h100-sxm", "--format", "json", "--model",
    ];
    let piped = ftplan()
        .args(args)
        .arg("-")
        .write_stdin(value.to_string())
        .assert()
        .code(1);
    let from_file = ftplan().args(args).arg(&path).assert().code(1);
    let (piped, from_file) = (json(&piped), json(&from_file));
    assert_eq!(piped["memory"], from_file["memory"]);
    assert_eq!(
        piped["model"]["name"], "Mistral-7B-v0.1",
        "{}",
        piped["model"]
    );
    // Nothing, or not JSON, on standard input: one error naming it.
    for input in ["", "{"] {
        let out = ftplan()
            .args(args)
            .arg("-")
            .write_stdin(input)
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        assert!(err.contains("`standard input`: invalid JSON"), "{err}");
        crate::assert_message_policy(&err);
    }
}

#[test]
fn a_model_folder_or_a_hub_id_is_read_as_a_user_means_it() {
    // A model folder, as `from_pretrained` takes it, is its config.json, named after the folder
    // (also as `.` from inside it); a Hub id that is not a path here names its shipped copy, or
    // says how to fetch the config; a folder without a config.json is one error naming it.
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path().join("my-mistral");
    std::fs::create_dir(&folder).expect("model folder");
    std::fs::copy(
        repo("examples/configs/mistral-7b-config.json"),
        folder.join("config.json"),
    )
    .expect("copy config");
    let json = |out: &assert_cmd::assert::Assert| -> serde_json::Value {
        serde_json::from_slice(&out.get_output().stdout).expect("estimate JSON")
    };
    let args = [
        "estimate", "--gpu", "h100-sxm", "--format", "json", "--model",
    ];
    let by_file = json(
        &ftplan()
            .args(args)
            .arg(folder.join("config.json"))
            .assert()
            .code(1),
    );
    for (cwd, arg) in [(dir.path(), "./my-mistral"), (folder.as_path(), ".")] {
        let by_folder = json(
            &ftplan()
                .current_dir(cwd)
                .args(args)
                .arg(arg)
                .assert()
                .code(1),
        );
        assert_eq!(by_folder["memory"], by_file["memory"], "{arg}");
        assert_eq!(by_folder["model"]["name"], "my-mistral", "{arg}");
    }
    // A refusal from inside the temporary folder: one error line, exit 2.
    let refusal = |arg: &str| {
        let out = ftplan()
            .current_dir(dir.path())
            .args(args)
            .arg(arg)
            .assert()
            .code(2);
        let err = crate::stderr_of(&out);
        crate::assert_message_policy(&err);
        err
    };
    // A bare name stays a shipped model's; the folder of that name gets a hint.
    let err = refusal("my-mistral");
    assert!(err.contains("pass it as `./my-mistral`"), "{err}");

    // `meta-llama/Llama-3.1-8B` is no path here: the shipped llama3.1-8b, said in a note.
    let out = ftplan()
        .current_dir(dir.path())
        .args(args)
        .arg("meta-llama/Llama-3.1-8B")
        .assert()
        .code(1);
    assert_eq!(json(&out)["model"]["name"], "llama3.1-8b");
    let err = crate::stderr_of(&out);
    assert!(
        err.contains(
            "`meta-llama/Llama-3.1-8B` is not a file here: using the shipped `llama3.1-8b`"
        ),
        "{err}"
    );
    // One that does not ship: how to fetch it, exit 2.
    let err = refusal("someone/Unknown-Model-7B");
    assert!(
        err.contains("does not download from the Hugging Face Hub")
            && err.contains("hf download someone/Unknown-Model-7B config.json"),
        "{err}"
    );
    // In a plan file, a model folder is relative to the file and a Hub id stays one.
    let plans = dir.path().join("plans");
    std::fs::create_dir(&plans).expect("plans");
    std::fs::write(
        plans.join("folder.toml"),
        "model = \"../my-mistral\"\ngpu = \"h100-sxm\"\n",
    )
    .expect("plan");
    std::fs::write(
        plans.join("hub.toml"),
        "model = \"meta-llama/Llama-3.1-8B\"\ngpu = \"h100-sxm\"\nmethod = \"lora\"\n",
    )
    .expect("plan");
    let out = ftplan()
        .args(["check", "--format", "json"])
        .arg(&plans)
        .assert()
        .code(1);
    let rows: serde_json::Value =
        serde_json::from_slice(&out.get_output().stdout).expect("check JSON");
    let lora = json(
        &ftplan()
            .args(["estimate", "--gpu", "h100-sxm", "--format", "json"])
            .args(["--model", "llama3.1-8b", "--method", "lora"])
            .assert()
            .code(0),
    );
    assert_eq!(rows["plans"][0]["plan"], "folder");
    assert_eq!(rows["plans"][0]["peak"], by_file["memory"]["peak"]);
    assert_eq!(rows["plans"][1]["peak"], lora["memory"]["peak"]);
    // A folder without a config.json.
    let err = refusal(dir.path().to_str().expect("utf-8"));
    assert!(err.contains("is a folder without a config.json"), "{err}");
}
