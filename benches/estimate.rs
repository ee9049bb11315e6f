//! Speed targets (issues #2 and #4), reported rather than asserted:
//! one estimate in well under a millisecond, a 10,000-plan sweep in under a second on one core,
//! and `ftplan estimate` as a whole process in under 50 ms.
//!
//! Run with `cargo bench`.

use ftplan::estimate::estimate;
use ftplan::spec::plan::{AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision};
use ftplan::spec::registry::{resolve_hardware, resolve_model};
use ftplan::time::Rates;
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let model = resolve_model("llama2-7b").expect("shipped").value;
    let hw = resolve_hardware("a100-80gb").expect("shipped").value;
    let rates = Rates::from_datasheet(&hw);
    let plan = Plan {
        method: Method::Lora(Lora {
            rank: 16,
            alpha: 32.0,
            targets: LoraTargets::QueryValue,
            dora: false,
        }),
        precision: Precision::Bf16,
        optimizer: Optimizer::Adamw,
        batch: 4,
        seq: 2048,
        target_seq: 0,
        grad_ckpt: false,
        attention: AttentionKernel::Sdpa,
        expert_load: 1.0,
        linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
        parallel: ftplan::spec::parallel::Parallel::single(),
    };

    // One estimate.
    for _ in 0..50 {
        black_box(estimate(&model, &plan, &hw, &rates).expect("estimates"));
    }
    let n = 2000;
    let mut per = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..n {
            black_box(estimate(&model, black_box(&plan), &hw, &rates).expect("estimates"));
        }
        per = per.min(start.elapsed().as_secs_f64() / f64::from(n));
    }
    println!(
        "estimate (llama2-7b, lora, 32 layers): {:.1} us per estimate",
        per * 1e6
    );

    // Every shipped model (issue #8: MoE, alternating and recurrent layers stay fast), LoRA on
    // every linear, batch 4 x 2048: the slowest and a few named.
    let mut slowest = (String::new(), 0.0f64);
    let mut named = Vec::new();
    for (stem, text) in ftplan::spec::registry::model_files() {
        let name = stem.to_string();
        let m = ftplan::spec::registry::parse_model_toml(stem, stem, text).expect("ships");
        // peft refuses `all-linear` on Mamba (its mixer's out_proj): the three that work; on
        // PhiMoE it fails on the router: the attention projections, all LoRA reaches there.
        let targets = if !m.has_attention() {
            LoraTargets::parse(["in_proj", "x_proj", "dt_proj"]).expect("known names")
        } else if m.family == ftplan::spec::model::Family::Phimoe {
            LoraTargets::parse(["q_proj", "k_proj", "v_proj", "o_proj"]).expect("known names")
        } else {
            LoraTargets::AllLinear
        };
        let p = Plan {
            method: Method::Lora(Lora {
                rank: 16,
                alpha: 32.0,
                targets,
                dora: false,
            }),
            seq: if m.is_encoder_decoder() { 512 } else { 2048 },
            target_seq: if m.is_encoder_decoder() { 128 } else { 0 },
            ..plan.clone()
        };
        // A plan the model refuses (GPT-2's learned positions stop at 1,024) is not timed.
        if estimate(&m, &p, &hw, &rates).is_err() {
            continue;
        }
        let reps = 200;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            for _ in 0..reps {
                black_box(estimate(&m, black_box(&p), &hw, &rates).ok());
            }
            best = best.min(start.elapsed().as_secs_f64() / f64::from(reps));
        }
        if best > slowest.1 {
            slowest = (name.clone(), best);
        }
        if [
            "mixtral-8x7b",
            "gemma-2-9b",
            "deepseek-v3",
            "qwen3-30b-a3b",
            "mamba-1.4b",
        ]
        .contains(&name.as_str())
        {
            named.push(format!("{name} {:.0} us", best * 1e6));
        }
    }
    println!(
        "every shipped model: slowest {} at {:.0} us per estimate; {}",
        slowest.0,
        slowest.1 * 1e6,
        named.join(", ")
    );

    // Where the time goes.
    let start = Instant::now();
    for _ in 0..n {
        black_box(ftplan::graph::build(&model, black_box(&plan)));
    }
    let build = start.elapsed().as_secs_f64() / f64::from(n);
    let g = ftplan::graph::build(&model, &plan);
    let start = Instant::now();
    for _ in 0..n {
        black_box(ftplan::memory::estimate(&g, black_box(&plan), &hw));
    }
    let mem = start.elapsed().as_secs_f64() / f64::from(n);
    let start = Instant::now();
    for _ in 0..n {
        black_box(ftplan::time::estimate(&g, black_box(&plan), &hw, &rates));
    }
    let time = start.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "  of which graph build {:.1} us, memory walk {:.1} us, time model {:.1} us ({} ops)",
        build * 1e6,
        mem * 1e6,
        time * 1e6,
        g.len()
    );

    // A 10,000-plan sweep (methods x batch x seq x checkpointing) on one core.
    let methods = [
        Method::Full,
        plan.method.clone(),
        Method::Qlora(Lora {
            rank: 16,
            alpha: 32.0,
            targets: LoraTargets::AllLinear,
            dora: false,
        }),
        Method::Adapter { size: 64 },
        Method::Ia3,
    ];
    let small = resolve_model("tinyllama-1.1b").expect("shipped").value;
    // Best of three rounds: this shared machine's other load only ever adds time.
    let mut sweep = f64::INFINITY;
    let mut count = 0u32;
    let mut fits = 0u32;
    for _ in 0..3 {
        let start = Instant::now();
        count = 0;
        fits = 0;
        'outer: for m in &methods {
            for batch in 1..=25u64 {
                for seq in (1..=40u64).map(|s| s * 128) {
                    for ckpt in [false, true] {
                        let p = Plan {
                            method: m.clone(),
                            batch,
                            seq,
                            grad_ckpt: ckpt,
                            ..plan.clone()
                        };
                        let e = estimate(&small, &p, &hw, &rates).expect("estimates");
                        fits += u32::from(e.fits);
                        count += 1;
                        if count == 10_000 {
                            break 'outer;
                        }
                    }
                }
            }
        }
        sweep = sweep.min(start.elapsed().as_secs_f64());
    }
    println!(
        "sweep of {count} plans (tinyllama-1.1b, 22 layers): {sweep:.3} s on one core ({fits} fit)"
    );

    // The whole process, as a user runs it.
    let exe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/ftplan");
    if exe.exists() {
        let runs = 20;
        let start = Instant::now();
        for _ in 0..runs {
            let out = std::process::Command::new(&exe)
                .args([
                    "estimate", "--model", "llama7b", "--method", "lora", "--gpu", "a100",
                ])
                .output()
                .expect("runs");
            assert!(out.status.success());
        }
        println!(
            "`ftplan estimate` process: {:.1} ms per run",
            start.elapsed().as_secs_f64() / f64::from(runs) * 1e3
        );
    } else {
        println!(
            "`ftplan estimate` process: build target/release/ftplan (cargo build --release) to time it"
        );
    }

    // The layout search for a 175 B model over up to 1,024 A100s (issue: the cluster planner;
    // target under 1 s on this 2-core machine).
    let big = resolve_model("gpt3-175b").expect("shipped").value;
    let target = ftplan::search::Target {
        model: &big,
        hardware: &hw,
        rates: &rates,
        budget: hw.memory,
    };
    let full = Plan {
        method: Method::Full,
        precision: Precision::MixedBf16,
        batch: 1,
        ..plan.clone()
    };
    let bounds = ftplan::layouts::Bounds {
        max_gpus: 1024,
        host_memory: hw.host_memory,
        price_per_gpu_hour: hw.price_per_hour_usd,
    };
    let mut best = f64::INFINITY;
    let mut runs = 0;
    let mut top = String::new();
    for _ in 0..3 {
        let start = Instant::now();
        let (found, n) = ftplan::layouts::search(
            &target,
            &full,
            ftplan::layouts::Fixed::default(),
            bounds,
            ftplan::layouts::Objective::Gpus,
            5,
        )
        .expect("search runs");
        best = best.min(start.elapsed().as_secs_f64());
        runs = n;
        top = found
            .first()
            .map(|l| format!("{} GPUs, {}", l.parallel.gpus, l.parallel.label()))
            .unwrap_or_default();
    }
    println!(
        "layout search (gpt3-175b full, up to 1024 x a100-80gb): {:.0} ms, {runs} estimates; best: {top}",
        best * 1e3
    );
}
