//! A fuzz target per parser, over a generated corpus of mutated valid inputs (a seeded
//! generator, so every run tries the same inputs): model TOML, config.json, hardware TOML,
//! calibration TOML and JSON, DeepSpeed JSON, Accelerate YAML, and plan TOML (through the
//! binary's `check`). Each input is refused (an error) or accepted; nothing panics, and an
//! accepted input's estimate shows no NaN, infinity, negative or saturated figure.

use crate::{ftplan, repo};
use ftplan::estimate::{Estimate, estimate};
use ftplan::spec::plan::{AttentionKernel, Method, Optimizer, Plan, Precision};
use ftplan::spec::registry::resolve_hardware;
use ftplan::time::Rates;
use std::panic::{AssertUnwindSafe, catch_unwind};

const INPUTS: usize = 10_000;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break parsers and arithmetic.
const EXTREMES: [&str; 16] = [
    "0",
    "-1",
    "1e300",
    "-1e300",
    "nan",
    "inf",
    "-inf",
    "18446744073709551615",
    "1e-300",
    "0.5",
    "4294967296",
    "65536",
    "\"text\"",
    "true",
    "[]",
    "{}",
];

/// One to three mutations of `seed`: a value replaced by an extreme, a line deleted, doubled or
/// garbled, a cut, a stray key.
fn mutate(seed: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.below(3) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let i = rng.below(lines.len());
        match rng.below(7) {
            0..=2 => {
                // Replace the value after the first `=` or `:` with an extreme.
                let line = &lines[i];
                if let Some(at) = line.find(['=', ':']) {
                    let extreme = EXTREMES[rng.below(EXTREMES.len())];
                    let tail = if line.trim_end().ends_with(',') {
                        ","
                    } else {
                        ""
                    };
                    lines[i] = format!("{} {extreme}{tail}", &line[..=at]);
                }
            }
            3 => {
                lines.remove(i);
            }
            4 => {
                let copy = lines[i].clone();
                lines.insert(i, copy);
            }
            5 => {
                let mut bytes = lines[i].clone().into_bytes();
                if !bytes.is_empty() {
                    let j = rng.below(bytes.len());
                    bytes[j] = b"x0=9.-\"[{}]:,\t\\"[rng.below(15)];
                }
                lines[i] = String::from_utf8_lossy(&bytes).to_string();
            }
            _ => {
                let cut = rng.below(lines[i].len() + 1);
                lines[i].truncate(cut);
                lines.truncate(i + 1);
            }
        }
    }
    lines.join("\n")
}

fn small_plan() -> Plan {
    Plan {
        method: Method::Full,
        precision: Precision::MixedBf16,
        optimizer: Optimizer::Adamw,
        batch: 1,
        seq: 128,
        target_seq: 32,
        grad_ckpt: false,
        attention: AttentionKernel::Sdpa,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    }
}

/// Every figure an accepted input produces is a real measurement.
fn sane(e: &Estimate) -> bool {
    let m = &e.memory;
    let t = &e.time;
    let bytes = [m.peak, m.required, m.persistent, m.model_states, m.overhead];
    bytes.iter().all(|b| b.0 > 0 && b.0 < 1 << 60)
        && [t.step_seconds, t.tokens_per_second]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
        && t.mfu.is_finite()
        && t.mfu >= 0.0
        && m.total_params > 0
        && m.total_params < 1 << 50
}

/// Runs `parse` over `INPUTS` mutations of the seeds; returns (accepted, refused).
fn fuzz(name: &str, seeds: &[String], seed: u64, mut parse: impl FnMut(&str) -> bool) {
    let mut rng = Rng(seed);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for _ in 0..INPUTS {
        let text = mutate(&seeds[rng.below(seeds.len())], &mut rng);
        match catch_unwind(AssertUnwindSafe(|| parse(&text))) {
            Ok(true) => accepted += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("{name}: panicked on input:\n{text}"),
        }
    }
    println!("fuzz: {name}: {INPUTS} inputs, {accepted} accepted, {refused} refused, 0 panics");
    assert_eq!(accepted + refused, INPUTS);
}

fn files(dir: &str, ext: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo(dir))
        .expect("folder ships")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| std::fs::read_to_string(p).expect("readable"))
        .collect();
    out.sort();
    out
}

#[test]
fn fuzz_model_toml_and_config_json() {
    let hw = resolve_hardware("h100").expect("ships").value;
    let rates = Rates::from_datasheet(&hw);
    let check = |m: ftplan::Result<ftplan::spec::model::ModelSpec>| -> bool {
        let Ok(model) = m else { return false };
        match estimate(&model, &small_plan(), &hw, &rates) {
            Ok(e) => {
                assert!(
                    sane(&e),
                    "accepted model gives absurd figures: {:?}",
                    e.memory
                );
                true
            }
            Err(_) => false,
        }
    };
    let tomls: Vec<String> = files("models", "toml")
        .into_iter()
        .map(|t| {
            // Keep `name` equal to the stem the parser is told.
            t.lines()
                .filter(|l| !l.starts_with("name"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    fuzz("model TOML", &tomls, 1, |text| {
        check(ftplan::spec::registry::parse_model_toml(
            "fuzz.toml",
            "fuzz",
            text,
        ))
    });
    // The measured and replayed runs' real config.json files, one per model type (every family
    // reader, not only the shipped models'), one key per line so line mutations hit values.
    let mut types = std::collections::BTreeSet::new();
    let mut jsons: Vec<String> = Vec::new();
    for file in [
        "validation/measured.jsonl",
        "validation/families.jsonl",
        "validation/multimodal.jsonl",
    ] {
        let text = std::fs::read_to_string(repo(file)).expect("ships");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let config = &v["config"];
            if config.is_object() && types.insert(config["model_type"].to_string()) {
                jsons.push(serde_json::to_string_pretty(config).expect("JSON"));
            }
        }
    }
    jsons.extend(files("examples/configs", "json"));
    assert!(types.len() > 80, "{} model types", types.len());
    assert!(!jsons.is_empty(), "config.json seeds");
    fuzz("config.json", &jsons, 2, |text| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return false;
        };
        check(ftplan::spec::hf::parse_config(
            "fuzz.json",
            &v,
            "fuzz",
            false,
        ))
    });
}

#[test]
fn fuzz_hardware_and_calibration() {
    let model = ftplan::spec::registry::resolve_model("gpt2")
        .expect("ships")
        .value;
    let seeds: Vec<String> = files("hardware", "toml")
        .into_iter()
        .map(|t| {
            t.lines()
                .map(|l| {
                    if l.starts_with("name ") {
                        "name = \"fuzz\""
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    fuzz("hardware TOML", &seeds, 3, |text| {
        let Ok((hw, _)) = ftplan::spec::registry::parse_hardware_toml("fuzz.toml", "fuzz", text)
        else {
            return false;
        };
        match estimate(&model, &small_plan(), &hw, &Rates::from_datasheet(&hw)) {
            Ok(e) => {
                assert!(sane(&e), "accepted GPU gives absurd figures: {:?}", e.time);
                true
            }
            Err(_) => false,
        }
    });
    let hw = resolve_hardware("h200").expect("ships").value;
    let toml_seed = {
        let mut gpu = ftplan::calibrate::mock::MockGpu::default();
        let cal =
            ftplan::calibrate::run(&mut gpu, &ftplan::calibrate::Settings::quick(), &mut |_| {})
                .expect("mock calibrates");
        toml::to_string(&cal).expect("TOML")
    };
    let json_seed = std::fs::read_to_string(repo("validation/calib-h200.json")).expect("ships");
    let json_seed = serde_json::to_string_pretty(
        &serde_json::from_str::<serde_json::Value>(&json_seed).expect("JSON"),
    )
    .expect("JSON");
    for (name, shown, seed, n) in [
        ("calibration TOML", "fuzz.toml", toml_seed, 4),
        ("calibration JSON", "fuzz.json", json_seed, 5),
    ] {
        fuzz(name, &[seed], n, |text| {
            let Ok(cal) = ftplan::calibrate::Calibration::parse(shown, text) else {
                return false;
            };
            match estimate(&model, &small_plan(), &hw, &cal.rates(&hw)) {
                Ok(e) => {
                    assert!(
                        sane(&e),
                        "accepted calibration gives absurd figures: {:?}",
                        e.time
                    );
                    true
                }
                Err(_) => false,
            }
        });
    }
}

#[test]
fn fuzz_engine_configs() {
    let ds = r#"{
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 8,
  "bf16": {
    "enabled": true
  },
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": {
      "device": "cpu"
    },
    "offload_param": {
      "device": "none"
    },
    "reduce_bucket_size": 500000000
  }
}"#
    .to_string();
    fuzz("DeepSpeed JSON", &[ds], 6, |text| {
        ftplan::interop::deepspeed::read("fuzz.json", text).is_ok()
    });
    let acc = "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 16\n\
               num_machines: 2\nmixed_precision: bf16\nfsdp_config:\n  fsdp_version: 2\n  \
               fsdp_reshard_after_forward: true\n  fsdp_offload_params: false\n"
        .to_string();
    let acc_ds =
        "distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n  zero_stage: 2\n  \
                  offload_optimizer_device: cpu\n  gradient_accumulation_steps: 4\n"
            .to_string();
    fuzz("Accelerate YAML", &[acc, acc_ds], 7, |text| {
        ftplan::interop::accelerate::read("fuzz.yaml", text).is_ok()
    });
}

#[test]
fn fuzz_plan_files_through_check() {
    // One `ftplan check` over a folder of mutated plan files: no panic, every file reported,
    // exit 2 (some are invalid), and every figure in the JSON finite.
    let dir = tempfile::tempdir().expect("temp dir");
    let seeds = files("examples", "toml");
    let mut rng = Rng(8);
    for i in 0..INPUTS {
        let text = mutate(&seeds[rng.below(seeds.len())], &mut rng);
        std::fs::write(dir.path().join(format!("p{i:05}.toml")), text).expect("write plan");
    }
    let out = ftplan()
        .args(["check", "--format", "json"])
        .arg(dir.path())
        .timeout(std::time::Duration::from_secs(600))
        .assert();
    let output = out.get_output();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        matches!(output.status.code(), Some(0..=2)),
        "{:?}",
        output.status
    );
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let plans = v["plans"].as_array().expect("plans");
    assert_eq!(plans.len(), INPUTS);
    let accepted = plans.iter().filter(|p| p["error"].is_null()).count();
    for p in plans.iter().filter(|p| p["error"].is_null()) {
        assert!(
            p["required"].as_u64().is_some_and(|r| r > 0 && r < 1 << 60),
            "{p}"
        );
    }
    println!(
        "fuzz: plan TOML: {INPUTS} inputs, {accepted} accepted, {} refused, 0 panics",
        INPUTS - accepted
    );
}
