//! `ftplan measure` (issue #11): the embedded harness run for real on CPU at toy size, and the
//! messages for what can go wrong around it (missing packages, no device, out of memory).

use crate::ftplan;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The Python the harness runs with: `FTPLAN_PYTHON`, else `python3`; None (and a visible skip)
/// when it lacks torch, transformers or peft, unless `FTPLAN_REQUIRE_PYTHON=1` (`.ci/run`).
fn python() -> Option<PathBuf> {
    let py = PathBuf::from(std::env::var("FTPLAN_PYTHON").unwrap_or_else(|_| "python3".into()));
    let ok = std::process::Command::new(&py)
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("FTPLAN_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "FTPLAN_REQUIRE_PYTHON=1 but `{}` cannot import torch, transformers and peft",
        py.display()
    );
    eprintln!(
        "SKIPPED: `{}` has no torch/transformers/peft (pip install torch transformers peft, or set FTPLAN_PYTHON)",
        py.display()
    );
    None
}

fn measure(py: &Path, extra: &[&str], save: &Path) -> Value {
    let mut args = vec![
        "measure", "--gpu", "h200", "--device", "cpu", "--tiny", "--format", "json", "--save",
    ];
    args.push(save.to_str().expect("utf-8"));
    args.push("--python");
    args.push(py.to_str().expect("utf-8"));
    args.extend_from_slice(extra);
    if !extra.contains(&"--batch") {
        args.extend(["--batch", "2", "--seq", "64"]);
    }
    let out = ftplan().args(&args).assert().code(0);
    serde_json::from_slice(&out.get_output().stdout).expect("JSON")
}

#[test]
fn the_harness_measures_tiny_plans_on_cpu_and_saves_them() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let saved = dir.path().join("runs.jsonl");
    // Llama's structure at toy size, LoRA on q and v: the dispatcher's count of live tensor bytes
    // against the estimate (no cuBLAS on a CPU), and peft's trainable count exactly:
    // 2 layers x (q: 16 x (64 + 64) + v: 16 x (64 + 32)) = 7,168.
    let v = measure(&py, &["--model", "llama3.2-1b", "--method", "lora"], &saved);
    assert_eq!(v["measured"]["params_trainable"], 7168);
    assert_eq!(v["estimate"]["trainable_params"], 7168);
    let err = v["errors"]["peak"].as_f64().expect("error");
    assert!(err.abs() < 0.05, "peak error {err}");
    assert!(v["measured"]["step_seconds"].as_f64().expect("s") > 0.0);
    assert!(v["environment"]["torch"].is_string());
    // An MoE family and the partial methods run too, trainable counts exact: LN tuning on
    // Qwen2 (peft's table: `post_attention_layernorm` only), and `freeze` with its side and
    // embeddings passed to the harness (T5's decoder side: its blocks, final norm, not the
    // shared embeddings; BART's top block with the embeddings, positions and head), and IA3 on
    // StableLM, which peft's table lacks (the harness passes Llama's entry, as ftplan models it),
    // and prefix tuning on MPT, whose config names its heads `n_heads` (peft asks for the count).
    for extra in [
        &["--model", "mpt-7b", "--method", "prefix"][..],
        &["--model", "stablelm-2-1.6b", "--method", "ia3"][..],
        &["--model", "qwen3-30b-a3b", "--method", "lora"][..],
        &["--model", "gpt2", "--method", "bitfit"][..],
        // fp16 autocast with a GradScaler (the recipe for GPUs without bf16), read back as such.
        &[
            "--model",
            "llama3.2-1b",
            "--method",
            "lora",
            "--precision",
            "mixed-fp16",
        ][..],
        &["--model", "qwen2.5-0.5b", "--method", "ln-tuning"][..],
        &[
            "--model",
            "t5-small",
            "--method",
            "freeze",
            "--train-side",
            "decoder",
        ][..],
        &[
            "--model",
            "bart-base",
            "--method",
            "freeze",
            "--train-layers",
            "1",
            "--train-embeddings",
        ][..],
    ] {
        let v = measure(&py, extra, &saved);
        assert_eq!(
            v["measured"]["params_trainable"], v["estimate"]["trainable_params"],
            "{extra:?}"
        );
    }
    // --save appended nine lines that `ftplan validate --file` reads back, the freeze runs'
    // side and embeddings and the fp16 run's precision included (their counts match again).
    let text = std::fs::read_to_string(&saved).expect("saved");
    assert_eq!(text.lines().count(), 9);
    assert!(text.contains(r#""precision":"mixed_fp16""#), "{text}");
    let v = validate_json(&saved);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 9, "{v}");
    for r in rows {
        assert_eq!(r["measured_trainable"], r["estimated_trainable"], "{r}");
    }
}

/// `ftplan validate --file FILE --format json`.
fn validate_json(file: &Path) -> Value {
    let out = ftplan()
        .args(["validate", "--file"])
        .arg(file)
        .args(["--format", "json"])
        .assert();
    serde_json::from_slice(&out.get_output().stdout).expect("JSON")
}

/// A stand-in for Python that answers as the harness does in one situation.
fn fake_python(dir: &Path, reply: &str, code: i32) -> PathBuf {
    let path = dir.join("python");
    std::fs::write(
        &path,
        format!("#!/bin/sh\ncat > /dev/null\necho '{reply}'\nexit {code}\n"),
    )
    .expect("writes");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    path
}

#[test]
fn the_cpu_tracker_counts_gradient_sums_and_the_optimizer_as_plain_tensors_run_them() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    // Tiny Llama-3.2-1B (tied embeddings), full fine-tuning at 1 x 8 tokens: the peak is the
    // embedding's backward, where the tied weight's two fp32 gradients meet. Under the
    // tracker's dispatch mode autograd sums them out of place, as it does for any
    // subclass-like tensor; on plain tensors it adds into the first (`can_accumulate_inplace`),
    // one 512 x 64 x 4 B = 131,072 B tensor fewer. And the harness ran foreach AdamW on CPU,
    // whose `_foreach_sqrt` copies the states, where the plan's fused AdamW (which runs on
    // CPU since torch 2.4) keeps none. The tracker read 13.8 % above the estimate before.
    let v = measure(
        &py,
        &["--model", "llama3.2-1b", "--batch", "1", "--seq", "8"],
        &dir.path().join("runs.jsonl"),
    );
    let err = v["errors"]["peak"].as_f64().expect("error");
    assert!(err.abs() < 0.005, "peak error {err}");
}

#[test]
fn a_cpu_run_of_t5_runs_cudas_math_path_dropout_and_cross_entropy() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    // T5's strided position bias sends SDPA to its math path on CUDA, and T5-small drops its
    // probabilities (0.1) there. The harness writes that path out with CUDA's fused dropout,
    // which keeps a byte mask where the CPU's `at::dropout` keeps a full-width fp32 noise
    // tensor, and runs cross entropy as CUDA autocast does. Tiny T5-small at 1 x (1,024, 128)
    // read 22.7 % above the estimate before (one (1, 4, 1,024, 1,024) fp32 noise tensor a
    // layer and more); now within 1 %.
    let v = measure(
        &py,
        &[
            "--model",
            "t5-small",
            "--batch",
            "1",
            "--seq",
            "1024",
            "--target-seq",
            "128",
        ],
        &dir.path().join("runs.jsonl"),
    );
    let err = v["errors"]["peak"].as_f64().expect("error");
    assert!(err.abs() < 0.01, "peak error {err}");
}

#[test]
fn missing_packages_devices_and_out_of_memory_are_said() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |py: &Path| {
        ftplan()
            .args([
                "measure",
                "--model",
                "gpt2",
                "--gpu",
                "h200",
                "--seq",
                "512",
                "--python",
                py.to_str().expect("utf-8"),
            ])
            .assert()
    };
    // A missing package: exit 2, the pip line that fixes it.
    let out = run(&fake_python(dir.path(), r#"{"missing": "peft"}"#, 3)).code(2);
    let err = crate::stderr_of(&out);
    crate::assert_message_policy(&err);
    assert!(
        err.contains("no Python package `peft`")
            && err.contains("pip install torch transformers peft"),
        "{err}"
    );
    // No CUDA device: exit 2, and the way round it.
    let out = run(&fake_python(
        dir.path(),
        r#"{"unavailable": "no CUDA device is visible to PyTorch"}"#,
        4,
    ))
    .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("no CUDA device") && err.contains("--device cpu"),
        "{err}"
    );
    // Out of memory is a result: the plan does not fit (exit 1), with the estimate beside it.
    let out = run(&fake_python(
        dir.path(),
        r#"{"oom": true, "message": "CUDA out of memory"}"#,
        5,
    ))
    .code(1);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("out of memory") && err.contains("estimated peak"),
        "{err}"
    );
    // No Python at all.
    let out = run(Path::new("/nonexistent/python3")).code(2);
    let err = crate::stderr_of(&out);
    crate::assert_message_policy(&err);
    assert!(
        err.contains("cannot run") && err.contains("--python"),
        "{err}"
    );
}

#[test]
fn host_costs_are_learned_into_the_calibration_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cal = dir.path().join("cal.toml");
    std::fs::write(
        &cal,
        "date = \"2026-12-02\"\ntiming = \"wall-clock\"\ncopy_gbps = 3000.0\n\
         [adapter]\nname = \"NVIDIA H200\"\nbackend = \"vulkan\"\ndevice_type = \"discrete\"\n\
         [[fp32_matmul]]\nn = 4096\nflops = 5.0e13\n",
    )
    .expect("writes");
    // Out-of-range host costs are refused where the file is read.
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&cal).expect("reads");
    for (host, field) in [
        ("dispatch_us = 0.0\nmodule_us = 1.0\n", "dispatch_us"),
        (
            "dispatch_us = 5.0\nmodule_us = 1.0\ncheckpoint_tensor_us = -1.0\n",
            "checkpoint_tensor_us",
        ),
    ] {
        std::fs::write(&bad, format!("{text}[host]\n{host}")).expect("writes");
        let err = ftplan::calibrate::Calibration::load(&bad).expect_err("out of range");
        assert!(err.to_string().contains(field), "{err}");
    }
    let Some(py) = python() else { return };
    ftplan()
        .args([
            "measure",
            "--calibrate-host",
            "--device",
            "cpu",
            "--calibration",
        ])
        .arg(&cal)
        .arg("--python")
        .arg(&py)
        .assert()
        .code(0);
    let c = ftplan::calibrate::Calibration::load(&cal).expect("still loads");
    let host = c.host.expect("host costs written");
    // The module cost is a transformers module's Python beyond its ops (a Llama block's
    // attention and MLP forward: argument handling, shapes, masks), several dispatches' worth;
    // an empty `nn.Identity` call, which it used to time, is under one dispatch (2.0 us against
    // 15.7 on the H200's host).
    assert!(host.dispatch_us > 0.01, "{host:?}");
    assert!(host.module_us > 2.0 * host.dispatch_us, "{host:?}");
    // Checkpointing's Python is timed too: a block costs more than one op, a saved tensor's
    // hooks more than nothing.
    let block = host.checkpoint_block_us.expect("checkpoint block timed");
    let tensor = host.checkpoint_tensor_us.expect("checkpoint tensor timed");
    assert!(block > host.dispatch_us && tensor > 0.0, "{host:?}");
    let hw = ftplan::spec::registry::resolve_hardware("h200")
        .expect("ships")
        .value;
    let rates = c.rates(&hw);
    assert!((rates.launch_overhead - host.dispatch_us * 1e-6).abs() < 1e-12);
    assert!((rates.module_overhead - host.module_us * 1e-6).abs() < 1e-12);
    assert!((rates.checkpoint_tensor - tensor * 1e-6).abs() < 1e-12);
}

#[test]
fn a_multi_gpu_plan_runs_under_torchrun_with_fsdp2() {
    // Two gloo ranks on CPU, each FSDP2-sharding Llama's structure at toy size (every block and
    // the root `fully_shard`ed, bf16 parameters gathered, fp32 gradients reduced): both ranks
    // report a peak, the largest is compared with the per-GPU estimate, and the trainable count
    // is the whole model's: embeddings 2 x 512 x 64 + per layer (q 64x64 + k, v 64x32 + o 64x64
    // + 3 x 64x128 + 2 norms of 64) x 2 + the final norm = 65,536 + 2 x 45,184 + 64 = 155,968.
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let saved = dir.path().join("runs.jsonl");
    let v = measure(
        &py,
        &["--model", "llama3.2-1b", "--gpus", "2", "--engine", "fsdp"],
        &saved,
    );
    let ranks = v["measured"]["peak_by_rank"].as_array().expect("per rank");
    assert_eq!(ranks.len(), 2);
    assert_eq!(v["environment"]["world_size"], 2);
    assert_eq!(
        v["measured"]["params_trainable"],
        v["estimate"]["trainable_params"]
    );
    let err = v["errors"]["peak"].as_f64().expect("error");
    assert!(err.abs() < 0.10, "peak error {err}");
    let line = std::fs::read_to_string(&saved).expect("saved");
    assert!(line.contains("\"engine\":\"fsdp\""), "{line}");
    // `validate --file` plans the saved run as the 2-rank FSDP2 layout it was, not one GPU.
    let v = validate_json(&saved);
    let parallel = &v["rows"][0]["plan"]["parallel"];
    assert_eq!(parallel["gpus"], 2, "{v}");
    assert_eq!(parallel["engine"], "fsdp", "{v}");
}

#[test]
fn layouts_one_torchrun_cannot_run_are_refused_by_name() {
    // ZeRO needs DeepSpeed's launcher, tensor parallelism Megatron's: exit 2, the field named.
    for (flags, field) in [
        (&["--gpus", "2", "--engine", "zero2"][..], "engine"),
        (&["--gpus", "2", "--tp", "2"][..], "tp"),
        (&["--gpus", "2", "--pp", "2"][..], "pp"),
        (&["--gpus", "16", "--gpus-per-node", "8"][..], "gpus"),
    ] {
        let mut args = vec![
            "measure", "--model", "gpt2", "--gpu", "h200", "--device", "cpu",
        ];
        args.extend_from_slice(flags);
        let out = ftplan().args(&args).assert().code(2);
        let err = crate::stderr_of(&out);
        assert!(err.contains(&format!("field `{field}` asks for")), "{err}");
        if field == "engine" {
            assert!(err.contains("ftplan export --deepspeed"), "{err}");
        }
        crate::assert_message_policy(&err);
    }
}

#[test]
fn a_model_without_a_transformers_class_is_refused_before_any_python_runs() {
    // PaLM is built from its paper; the harness would fail deep in `AutoConfig`. One line, exit
    // 2, naming the field, with no Python needed to say so.
    let out = ftplan()
        .args([
            "measure",
            "--model",
            "palm-62b",
            "--gpu",
            "h200",
            "--device",
            "cpu",
            "--tiny",
            "--python",
            "/nonexistent/python",
        ])
        .assert()
        .code(2);
    let err = crate::stderr_of(&out);
    assert!(
        err.contains("`model`") && err.contains("transformers class"),
        "{err}"
    );
}

#[test]
fn tiny_configs_keep_gpt_neo_layer_patterns_and_gpt_j_rotary_share() {
    // GPT-Neo's config validates `attention_types` against `num_layers`: two tiny layers need
    // [[["global"], 1], [["local"], 1]]. GPT-J's rotary_dim 64 of a 256-wide head (4,096 / 16)
    // is a quarter; the tiny head is 16 wide, so 4.
    let neo = serde_json::json!({"model_type": "gpt_neo", "hidden_size": 768, "num_layers": 12,
        "num_heads": 12, "attention_types": [[["global", "local"], 6]],
        "attention_layers": ["global", "local", "global", "local", "global", "local",
                             "global", "local", "global", "local", "global", "local"]});
    let t = ftplan::measure::tiny_config(&neo);
    assert_eq!(t["num_layers"], 2);
    assert_eq!(
        t["attention_types"],
        serde_json::json!([[["global"], 1], [["local"], 1]])
    );
    assert_eq!(
        t["attention_layers"],
        serde_json::json!(["global", "local"])
    );
    let gptj = serde_json::json!({"model_type": "gptj", "n_embd": 4096, "n_head": 16,
        "n_layer": 28, "rotary_dim": 64});
    assert_eq!(ftplan::measure::tiny_config(&gptj)["rotary_dim"], 4);
}

#[test]
fn every_shipped_model_s_tiny_config_keeps_its_kinds_of_layer() {
    // `--tiny` must build every family ftplan ships (PaLM has no transformers class), with each
    // kind of layer the full model has: a hybrid without its attention layer fails in
    // transformers' cache (Jamba, LFM2, Qwen3.5 did), and a top-k past the few tiny experts,
    // Gemma 4's shared-KV layers or ERNIE's sparse range past two layers were refused.
    use ftplan::spec::model::Mixer;
    use ftplan::spec::registry::{model_config, model_files, resolve_model};
    let kinds = |m: &ftplan::spec::model::ModelSpec| {
        let attention = m.mixers.is_empty()
            || m.mixers
                .iter()
                .any(|x| matches!(x, Mixer::Attention | Mixer::SlidingWindow { .. }));
        (
            attention,
            m.has_linear_attention(),
            m.has_short_conv(),
            m.has_state_space_layers(),
            m.moe.is_some(),
        )
    };
    let mut checked = 0;
    for (name, _) in model_files() {
        let full = resolve_model(name).expect("shipped").value;
        if full.family == ftplan::spec::model::Family::Palm {
            continue;
        }
        let tiny = ftplan::measure::tiny_config(&model_config(name).expect("config"));
        let t = ftplan::spec::hf::parse_config(name, &tiny, "tiny", false)
            .unwrap_or_else(|e| panic!("{name}: the tiny config is refused: {e}"));
        assert_eq!(kinds(&t), kinds(&full), "{name}");
        // Special tokens stay inside the 512-row vocabulary, set or left to class defaults
        // (Marian's pad and decoder start default to row 58100).
        if full.is_encoder_decoder() {
            for k in ["pad_token_id", "decoder_start_token_id"] {
                assert!(tiny[k].as_u64().is_some_and(|t| t < 512), "{name} {k}");
            }
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn role_names_reach_peft_as_the_model_names_them_and_a_gemma3_checkpoint_runs_text_only() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let saved = dir.path().join("runs.jsonl");
    // `--lora-targets q,v` are ftplan's roles: peft gets each model's own names for them
    // (TinyLlama's q_proj and v_proj, T5's q and v), not the letters, which match no module.
    // TinyLlama at toy size: 2 layers x (q: 16 x (64 + 64) + v: 16 x (64 + 32)) = 7,168;
    // T5: 2 encoder and 2 decoder layers, q and v of self- and cross-attention, each
    // 16 x (64 + 64): 12 x 2,048 = 24,576.
    for (model, trainable) in [("tinyllama-1.1b", 7168), ("t5-base", 24_576)] {
        let v = measure(
            &py,
            &[
                "--model",
                model,
                "--method",
                "lora",
                "--lora-targets",
                "q,v",
            ],
            &saved,
        );
        assert_eq!(v["measured"]["params_trainable"], trainable, "{model}");
        assert_eq!(v["estimate"]["trainable_params"], trainable, "{model}");
    }
    // A Gemma 3 checkpoint, its language model and SigLIP tower both shrunk: the tower loads
    // and never runs. LoRA's q_proj and v_proj reach the tower's too, the adapters go on the
    // language model's blocks only; the peaks and counts agree.
    let config = crate::repo("examples/configs/gemma-3-4b-it-config.json");
    let config = config.to_str().expect("utf-8");
    for method in [
        &["--method", "lora", "--lora-targets", "q,v"][..],
        &["--method", "adapter"],
    ] {
        let mut args = vec!["--model", config];
        args.extend_from_slice(method);
        let v = measure(&py, &args, &saved);
        assert_eq!(
            v["measured"]["params_trainable"], v["estimate"]["trainable_params"],
            "{method:?}"
        );
        let err = v["errors"]["peak"].as_f64().expect("error");
        assert!(err.abs() < 0.01, "{method:?}: peak error {err}");
    }
}
