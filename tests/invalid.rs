//! One fixture per validation rule: an error line naming file and field (and a hint line where
//! one exists), exit 2, no panic.

use crate::ftplan;

fn rejects(args: &[&str], want: &[&str]) {
    let out = ftplan().args(args).assert().code(2);
    let err = crate::stderr_of(&out);
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    crate::assert_message_policy(&err);
    for w in want {
        assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
    }
    // `check` prints its table (with the plan marked INVALID); the others print nothing.
    assert!(
        args[0] == "check" || out.get_output().stdout.is_empty(),
        "{args:?} printed to stdout"
    );
}

fn model(fixture: &str, want: &[&str]) {
    let path = format!("tests/fixtures/invalid/{fixture}");
    let mut all = vec![fixture];
    all.extend_from_slice(want);
    rejects(&["estimate", "--gpu", "h100", "--model", &path], &all);
}

#[test]
fn malformed_toml() {
    model("malformed.toml", &["line 2"]);
}

#[test]
fn malformed_json() {
    model("malformed.json", &["invalid JSON"]);
}

#[test]
fn missing_field() {
    model("missing-field.json", &["`hidden_size`", "is missing"]);
}

#[test]
fn zero_size() {
    model("zero-layers.json", &["`num_hidden_layers`", "positive"]);
}

#[test]
fn negative_size() {
    model(
        "negative-heads.json",
        &["`num_attention_heads`", "positive"],
    );
}

#[test]
fn wrong_type() {
    model("wrong-type.json", &["`hidden_size`", "must be a number"]);
}

#[test]
fn heads_must_divide_the_hidden_size_without_head_dim() {
    model(
        "heads-not-dividing.json",
        &["`num_attention_heads`", "does not divide", "head_dim"],
    );
}

#[test]
fn kv_heads_must_divide_heads() {
    model(
        "kv-heads-not-dividing.json",
        &["`num_key_value_heads`", "does not divide"],
    );
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    model(
        "unsupported-type.json",
        &["`bert`", "llama, mistral, qwen2"],
    );
}

#[test]
fn a_multimodal_wrapper_points_at_its_text_config() {
    model(
        "multimodal-wrapper.json",
        &["`mistral3` is not supported", "`mistral`", "text_config"],
    );
}

#[test]
fn a_gemma3_checkpoint_names_the_nested_field() {
    // Gemma 3's checkpoints are read whole (the language model and its SigLIP tower); a fault
    // in either nested config names it by its path.
    model(
        "gemma3-foreign-tower.json",
        &[
            "`vision_config.model_type`",
            "`clip_vision_model`",
            "siglip_vision_model",
        ],
    );
    model(
        "gemma3-bad-patch.json",
        &["`vision_config.patch_size`", "positive whole number"],
    );
    model(
        "gemma3-bad-text.json",
        &["`text_config.num_key_value_heads`", "does not divide"],
    );
}

#[test]
fn absurd_sizes_are_refused_before_they_overflow() {
    model("absurd-size.json", &["`hidden_size`", "absurdly large"]);
}

#[test]
fn probabilities_must_be_probabilities() {
    model("bad-dropout.json", &["`attn_pdrop`", "[0, 1)"]);
}

#[test]
fn unknown_toml_fields_get_a_suggestion() {
    model(
        "typo-field.toml",
        &["`hiden_size`", "did you mean `hidden_size`"],
    );
}

#[test]
fn another_family_s_field_is_unknown_in_a_model_file() {
    // Llama 4's `attention_chunk_size` means nothing to a Llama model: refused, not ignored.
    model(
        "foreign-field.toml",
        &["`attention_chunk_size`", "is not a known field"],
    );
}

#[test]
fn a_model_file_is_named_after_its_stem() {
    model("name-mismatch.toml", &["`name`", "name-mismatch.toml"]);
}

#[test]
fn missing_file() {
    model("does-not-exist.json", &["cannot read"]);
}

#[test]
fn hardware_values_must_be_positive() {
    rejects(
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "tests/fixtures/invalid/bad-gpu.toml",
        ],
        &[
            "bad-gpu.toml",
            "`memory_gib`",
            "must be a number from 0.001",
        ],
    );
}

#[test]
fn host_costs_in_a_hardware_profile_must_be_positive() {
    rejects(
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "tests/fixtures/invalid/bad-checkpoint-gpu.toml",
        ],
        &[
            "bad-checkpoint-gpu.toml",
            "`checkpoint_tensor_us`",
            "must be a number from 0.001",
        ],
    );
}

#[test]
fn unknown_hardware_fields_get_a_suggestion() {
    rejects(
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "tests/fixtures/invalid/gpu-unknown-field.toml",
        ],
        &["`memory_gb`", "did you mean `memory_gib`"],
    );
}

#[test]
fn a_missing_field_in_a_toml_file_is_named() {
    rejects(
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "tests/fixtures/invalid/gpu-missing-field.toml",
        ],
        &["gpu-missing-field.toml`: field `memory_gib` is missing"],
    );
    rejects(
        &["check", "tests/fixtures/plans/missing-model.toml"],
        &["missing-model.toml`: field `model` is missing"],
    );
}

#[test]
fn unknown_model_gpu_and_method() {
    rejects(
        &["estimate", "--model", "lama2-7b", "--gpu", "h100"],
        &["unknown model", "did you mean `llama2-7b`"],
    );
    rejects(
        &["estimate", "--model", "gpt2", "--gpu", "a1000"],
        &["unknown GPU", "did you mean"],
    );
    rejects(
        &["check", "tests/fixtures/plans/invalid-method.toml"],
        &["`method`", "did you mean `lora`"],
    );
    rejects(
        &[
            "compare",
            "--model",
            "gpt2",
            "--gpu",
            "t4",
            "--methods",
            "full,lorra",
        ],
        &["`methods`", "did you mean `lora`"],
    );
}

#[test]
fn missing_model_or_gpu_flags() {
    rejects(&["estimate", "--gpu", "h100"], &["`model`", "is missing"]);
    rejects(&["estimate", "--model", "gpt2"], &["`gpu`", "is missing"]);
}

#[test]
fn layer_patterns_and_experts() {
    model(
        "layer-types-length.json",
        &["`layer_types`", "lists 2 layers; the model has 4"],
    );
    model(
        "bad-layer-type.json",
        &[
            "`layer_types`",
            "`\"linear_attention\"` is not a known layer type",
            "full_attention or sliding_attention",
        ],
    );
    model(
        "too-many-active-experts.json",
        &["`num_experts_per_tok`", "at most the experts (4)"],
    );
    model(
        "stablelm-qk-layernorm.json",
        &["`qk_layernorm`", "is not modelled", "qk_layernorm = false"],
    );
    model(
        "gptj-rotary-too-wide.json",
        &[
            "`rotary_dim`",
            "(96) must be even and at most the head size (64)",
        ],
    );
    model(
        "marian-separate-vocabularies.json",
        &[
            "`share_encoder_decoder_embeddings`",
            "not modelled",
            "shared-vocabulary",
        ],
    );
    // A nested config object's field is named with its parent's.
    model(
        "mpt-clip-qkv.json",
        &[
            "`attn_config.clip_qkv`",
            "is 8: clamping q, k and v is not modelled",
            "null",
        ],
    );
    model(
        "mpt-attn-config-not-object.json",
        &["`attn_config`", "must be an object, found `0.1`"],
    );
    model(
        "mpt-expansion-ratio.json",
        &["`expansion_ratio`", "always 4 x d_model", "remote code"],
    );
}

#[test]
fn architecture_plan_rules() {
    fn est<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["estimate", "--gpu", "h100"];
        v.extend_from_slice(extra);
        v
    }
    rejects(
        &est(&[
            "--model",
            "gpt2",
            "--method",
            "freeze",
            "--train-side",
            "decoder",
        ]),
        &["`train-side`", "encoder-decoder", "--train-layers"],
    );
    rejects(
        &est(&[
            "--model",
            "t5-small",
            "--method",
            "freeze",
            "--train-side",
            "middle",
        ]),
        &["`train-side`", "`middle`"],
    );
    rejects(
        &est(&["--model", "mixtral", "--expert-load", "0.5"]),
        &["`expert-load`", "[1, 1000]"],
    );
    rejects(
        &est(&["--model", "t5-small", "--attention", "flash2"]),
        &["`attention`", "flash_attention_2", "sdpa or eager"],
    );
    // flash-attn runs on Ampere and newer, on fp16 or bf16 inputs: not on a T4, and not on an
    // fp32 model without autocast; QLoRA computes in bf16 under autocast, so it takes it.
    let flash = |gpu: &'static str, extra: &[&'static str], code: i32| {
        let mut args = vec!["estimate", "--model", "gpt2", "--attention", "flash2"];
        args.extend_from_slice(&["--gpu", gpu]);
        args.extend_from_slice(extra);
        ftplan().args(&args).assert().code(code);
        args
    };
    rejects(
        &flash("t4", &[], 2),
        &["`attention`", "Ampere-class GPUs", "`t4`"],
    );
    rejects(
        &flash("h100", &["--method", "lora", "--precision", "fp32"], 2),
        &["`attention`", "fp16 or bf16 inputs"],
    );
    flash("h100", &["--method", "qlora", "--precision", "fp32"], 0);
    flash("h100", &["--precision", "fp32"], 2);
    flash("a10g", &["--precision", "mixed-bf16"], 0);
    rejects(
        &est(&["--model", "mamba-130m", "--method", "prefix"]),
        &["`method`", "does not apply", "prompt tuning"],
    );
}

#[test]
fn linear_value_heads_not_a_multiple_of_key_heads() {
    model(
        "linear-heads-not-dividing.json",
        &["`linear_num_value_heads`", "linear_num_key_heads"],
    );
}

#[test]
fn a_python_nan_where_a_size_belongs() {
    // Python's JSON `NaN` is read (as transformers writes it) and refused where a number must be.
    model(
        "python-nan-size.json",
        &["`hidden_size`", "must be a number"],
    );
}

#[test]
fn tensor_parallelism_on_a_model_without_attention() {
    rejects(
        &[
            "estimate",
            "--gpu",
            "h100",
            "--model",
            "mamba2-2.7b",
            "--gpus",
            "2",
            "--tp",
            "2",
        ],
        &["`tp`", "no attention layers", "--pp"],
    );
}

#[test]
fn mamba2_heads_that_do_not_tile_the_inner_width() {
    model(
        "mamba2-heads-not-tiling.json",
        &["`num_heads`", "expand x hidden_size"],
    );
}

#[test]
fn granite_hybrid_mamba_heads_that_do_not_tile_the_inner_width() {
    model(
        "granite-mamba-heads-not-tiling.json",
        &["`mamba_n_heads`", "expand x hidden_size"],
    );
}

#[test]
fn nemotron_h_layer_pattern_with_an_unknown_layer() {
    model(
        "nemotron-h-bad-pattern.json",
        &["`hybrid_override_pattern`", "`X` is not a layer"],
    );
}

#[test]
fn nemotron_h_mamba_groups_that_do_not_divide_the_heads() {
    model(
        "nemotron-h-groups-not-dividing.json",
        &["`n_groups`", "must divide the heads (6)"],
    );
}

#[test]
fn nemotron_h_latent_expert_width_of_zero() {
    model(
        "nemotron-h-latent-zero.json",
        &["`moe_latent_size`", "positive whole number", "`0`"],
    );
}

#[test]
fn bamba_attention_index_past_the_layers() {
    model(
        "bamba-attention-past-the-layers.json",
        &["`attn_layer_indices`", "`4` is not a layer index below 4"],
    );
}

#[test]
fn bamba_z_loss_is_refused_as_not_modelled() {
    model(
        "bamba-z-loss.json",
        &["`z_loss_coefficient`", "z-loss is not modelled", "hint"],
    );
}

#[test]
fn jamba_attention_offset_not_below_its_period() {
    model(
        "jamba-attention-offset-past-period.json",
        &[
            "`attn_layer_offset`",
            "must be smaller than `attn_layer_period` (2)",
        ],
    );
}

#[test]
fn falcon_h1_mamba_heads_that_do_not_tile_its_d_ssm() {
    model(
        "falcon-h1-heads-not-tiling.json",
        &["`mamba_n_heads`", "mamba_d_ssm (96)"],
    );
}

#[test]
fn flash_linear_attention_refuses_fp32() {
    rejects(
        &[
            "estimate",
            "--gpu",
            "h100",
            "--model",
            "tests/fixtures/models/qwen3_5-toy.json",
            "--precision",
            "fp32",
            "--linear-kernel",
            "fla",
        ],
        &["`linear-kernel`", "float32", "hint:"],
    );
}

#[test]
fn gemma4_bidirectional_text_attention_is_refused_with_what_is_supported() {
    model(
        "gemma4-bidirectional-text.json",
        &[
            "`use_bidirectional_attention`",
            "bidirectional",
            "\"vision\"",
        ],
    );
}

#[test]
fn a_plan_file_s_refused_field_is_named_as_the_file_spells_it() {
    // Flags and plan-file keys share their rules; a file's error names its own key.
    for (fixture, key) in [
        ("micro-batches-without-pp.toml", "field `micro_batches`"),
        ("lora-rank-zero.toml", "field `lora.rank`"),
        ("headroom-100.toml", "field `headroom_percent`"),
    ] {
        let path = format!("tests/fixtures/plans/{fixture}");
        rejects(&["fit", &path], &[fixture, key]);
    }
    // So do the other fields its problem names; on the command line they stay flags.
    let path = "tests/fixtures/plans/micro-batches-without-pp.toml";
    rejects(
        &["check", path],
        &["needs `pp` 2 or more (use `grad_accum` without a pipeline)"],
    );
    rejects(
        &[
            "estimate",
            "--model",
            "gpt2",
            "--gpu",
            "h100",
            "--gpus",
            "2",
            "--micro-batches",
            "4",
        ],
        &["needs --pp 2 or more (use --grad-accum without a pipeline)"],
    );
}

#[test]
fn an_engine_config_s_refused_layout_says_which_file_set_it() {
    let estimate = |file: &str, flags: &[&str], want: &[&str]| {
        let path = format!("tests/fixtures/invalid/{file}");
        let mut args = vec!["estimate", "--model", "gpt2", "--gpu", "h100"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--deepspeed", &path]);
        rejects(&args, want);
    };
    // --engine zero2 overrides the file's stage 3, and the file's parameter offload needs it.
    estimate(
        "ds-offload-params.json",
        &["--gpus", "8", "--engine", "zero2"],
        &[
            "field `offload`",
            "ds-offload-params.json` sets the offload; --offload overrides it",
        ],
    );
    // Stage 0 with an offloaded optimizer: the file set both.
    estimate(
        "ds-stage0-offload.json",
        &["--gpus", "2"],
        &["sets the engine and offload; --engine and --offload override them"],
    );
    // A bucket size is named under its section.
    estimate(
        "ds-bad-bucket.json",
        &[],
        &["field `zero_optimization.stage3_prefetch_bucket_size`"],
    );
}
