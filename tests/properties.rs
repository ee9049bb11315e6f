//! Properties of the memory model that hold for every plan.

use ftplan::estimate::estimate;
use ftplan::spec::hardware::Hardware;
use ftplan::spec::model::ModelSpec;
use ftplan::spec::plan::{AttentionKernel, Lora, LoraTargets, Method, Optimizer, Plan, Precision};
use ftplan::spec::registry::{resolve_hardware, resolve_model};
use ftplan::time::Rates;
use proptest::prelude::*;

fn fixtures() -> (Vec<ModelSpec>, Hardware, Rates) {
    let models = [
        "gpt2",
        "tinyllama-1.1b",
        "t5-small",
        "bart-base",
        "phi-2",
        "falcon-7b",
        "gemma-2b",
        "opt-1.3b",
    ]
    .iter()
    .map(|m| resolve_model(m).expect("shipped").value)
    .collect();
    let hw = resolve_hardware("h100").expect("shipped").value;
    let rates = Rates::from_datasheet(&hw);
    (models, hw, rates)
}

fn method(i: usize) -> Method {
    match i % 7 {
        0 => Method::Full,
        1 => Method::Lora(Lora {
            rank: 16,
            alpha: 32.0,
            targets: LoraTargets::QueryValue,
            dora: false,
        }),
        2 => Method::Qlora(Lora {
            rank: 8,
            alpha: 16.0,
            targets: LoraTargets::AllLinear,
            dora: false,
        }),
        3 => Method::Adapter { size: 64 },
        4 => Method::Prefix { virtual_tokens: 16 },
        5 => Method::Prompt { virtual_tokens: 16 },
        _ => Method::Ia3,
    }
}

fn optimizer(i: usize) -> Optimizer {
    [
        Optimizer::Adamw,
        Optimizer::AdamwForeach,
        Optimizer::Adamw8bit,
        Optimizer::Sgd,
        Optimizer::Adafactor,
    ][i % 5]
}

prop_compose! {
    fn plans()(m in 0usize..7, o in 0usize..5, p in 0usize..3, batch in 1u64..16, seq in 16u64..900, target in 8u64..256, ckpt in any::<bool>(), eager in any::<bool>()) -> Plan {
        Plan {
            method: method(m),
            precision: [Precision::MixedBf16, Precision::Bf16, Precision::Fp32][p],
            optimizer: optimizer(o),
            // Prefix tuning cannot be checkpointed (peft refuses it; so does ftplan).
            grad_ckpt: ckpt && m != 4,
            batch, seq, target_seq: target,
            attention: if eager { AttentionKernel::Eager } else { AttentionKernel::Sdpa },
            expert_load: 1.0,
            linear_kernel: ftplan::spec::plan::LinearKernel::Torch,
            parallel: ftplan::spec::parallel::Parallel::single(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn memory_never_decreases_with_batch_or_sequence(plan in plans(), which in 0usize..8, extra in 1u64..64) {
        let (models, hw, rates) = fixtures();
        let m = &models[which];
        let base = estimate(m, &plan, &hw, &rates).expect("estimates").memory.peak;
        let more_batch = Plan { batch: plan.batch + extra, ..plan.clone() };
        let more_seq = Plan { seq: plan.seq + extra, ..plan.clone() };
        prop_assert!(estimate(m, &more_batch, &hw, &rates).expect("estimates").memory.peak >= base);
        prop_assert!(estimate(m, &more_seq, &hw, &rates).expect("estimates").memory.peak >= base);
    }

    #[test]
    fn checkpointing_never_adds_memory(plan in plans(), which in 0usize..8) {
        let (models, hw, rates) = fixtures();
        let m = &models[which];
        prop_assume!(!matches!(plan.method, Method::Prefix { .. }));
        let off = estimate(m, &Plan { grad_ckpt: false, ..plan.clone() }, &hw, &rates).expect("estimates").memory.peak;
        let on = estimate(m, &Plan { grad_ckpt: true, ..plan }, &hw, &rates).expect("estimates").memory.peak;
        prop_assert!(on <= off, "checkpointing {on:?} > {off:?}");
    }

    /// For per-element optimizers. Adafactor's factored state (a row and a column per matrix) is
    /// the exception: LoRA's two thin matrices per linear carry more rows and columns than the
    /// linear itself, so LoRA + Adafactor can hold more state than full + Adafactor.
    #[test]
    fn peft_never_needs_more_optimizer_state_than_full(plan in plans(), which in 0usize..8) {
        prop_assume!(plan.optimizer != Optimizer::Adafactor);
        let (models, hw, rates) = fixtures();
        let m = &models[which];
        let full = estimate(m, &Plan { method: Method::Full, ..plan.clone() }, &hw, &rates).expect("estimates").memory.at_peak.optimizer;
        let peft = estimate(m, &plan, &hw, &rates).expect("estimates").memory.at_peak.optimizer;
        prop_assert!(peft <= full);
    }

    #[test]
    fn the_breakdown_sums_to_the_peak(plan in plans(), which in 0usize..8) {
        let (models, hw, rates) = fixtures();
        let e = estimate(&models[which], &plan, &hw, &rates).expect("estimates");
        prop_assert_eq!(e.memory.at_peak.total(), e.memory.peak);
        prop_assert_eq!(e.memory.peak + e.memory.overhead, e.memory.required);
    }
}
