//! DeepSpeed's JSON configuration (<https://www.deepspeed.ai/docs/config-json/>): ZeRO stage,
//! offload devices, micro-batch, accumulation and precision in; the same keys out.

use super::Imported;
use crate::error::{Error, Result};
use crate::shard::ZERO_REDUCE_BUCKET;
use crate::spec::parallel::{Engine, Offload, Parallel};
use crate::spec::plan::{Plan, Precision};
use serde_json::{Value, json};

/// A count field: a positive integer, or `"auto"` (Hugging Face's integration fills it).
fn count(path: &str, v: &Value, field: &str) -> Result<Option<u64>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(x) => match x.as_u64().or_else(|| {
            // DeepSpeed accepts 5e8 written as a float.
            x.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= 1e15)
                .map(|f| f as u64)
        }) {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Error::field(
                path,
                field,
                format!("must be a positive integer or \"auto\", found {x}"),
            )),
        },
    }
}

fn enabled(v: &Value, key: &str) -> bool {
    match v.get(key).and_then(|b| b.get("enabled")) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "auto" || s == "true",
        _ => false,
    }
}

/// The offload device of `zero_optimization.<key>`: cpu, none, or an error for NVMe.
fn device(path: &str, zero: &Value, key: &str) -> Result<bool> {
    let dev = zero
        .get(key)
        .and_then(|o| o.get("device"))
        .and_then(Value::as_str)
        .unwrap_or("none");
    match dev {
        "none" => Ok(false),
        "cpu" => Ok(true),
        "nvme" => Err(Error::field(
            path,
            format!("zero_optimization.{key}.device"),
            "NVMe offload (ZeRO-Infinity) is not modelled",
        )
        .with_hint("use \"cpu\"; ftplan models offload to host memory")),
        other => Err(Error::field(
            path,
            format!("zero_optimization.{key}.device"),
            format!("`{other}` is not one of none, cpu, nvme"),
        )),
    }
}

/// Reads a `ds_config.json`.
pub fn read(path: &str, text: &str) -> Result<Imported> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    if !v.is_object() {
        return Err(Error::Parse {
            path: path.to_string(),
            message: "a DeepSpeed configuration is a JSON object".into(),
        });
    }
    let mut out = Imported::default();
    let zero = v.get("zero_optimization").cloned().unwrap_or(Value::Null);
    let stage = match zero.get("stage") {
        None | Some(Value::Null) => 0,
        Some(s) => s.as_u64().filter(|s| *s <= 3).ok_or_else(|| {
            Error::field(
                path,
                "zero_optimization.stage",
                format!("must be 0 to 3, found {s}"),
            )
        })?,
    };
    out.engine = Some(match stage {
        0 => Engine::Ddp,
        1 => Engine::Zero1,
        2 => Engine::Zero2,
        _ => Engine::Zero3,
    });
    let (opt, param) = (
        device(path, &zero, "offload_optimizer")?,
        device(path, &zero, "offload_param")?,
    );
    out.offload = Some(match (opt, param) {
        (_, true) => Offload::Params,
        (true, false) => Offload::Optimizer,
        (false, false) => Offload::None,
    });
    out.batch = count(path, &v, "train_micro_batch_size_per_gpu")?;
    out.grad_accum = count(path, &v, "gradient_accumulation_steps")?;
    if enabled(&v, "fp16") {
        // DeepSpeed's fp16 mode: fp16 compute, fp32 masters, a dynamic loss scale.
        out.precision = Some(Precision::MixedFp16);
    }
    if enabled(&v, "bf16") {
        // DeepSpeed's bf16 mode: a bf16 module with fp32 master weights in the optimizer.
        out.precision = Some(Precision::MixedBf16);
    }
    for key in [
        "reduce_bucket_size",
        "allgather_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_max_live_parameters",
        "stage3_param_persistence_threshold",
    ] {
        let n = count(path, &zero, key)
            .map_err(|e| e.map_field(|field| format!("zero_optimization.{field}")))?;
        if let Some(n) = n {
            out.notes.push(format!(
                "{path}: zero_optimization.{key} = {n} is read; ftplan models each unit's buffers (a block at a time)"
            ));
        }
    }
    Ok(out)
}

/// A `ds_config.json` for the plan, in DeepSpeed's key names.
pub fn write(plan: &Plan) -> Result<Value> {
    let p: &Parallel = &plan.parallel;
    let stage = match p.engine {
        Engine::Ddp => 0,
        Engine::Zero1 => 1,
        Engine::Zero2 => 2,
        Engine::Zero3 => 3,
        Engine::Fsdp | Engine::FsdpGradOp | Engine::FsdpHybrid => {
            return Err(Error::field(
                "command line",
                "engine",
                format!(
                    "`{}` is PyTorch FSDP, which DeepSpeed does not run",
                    p.engine.name()
                ),
            )
            .with_hint("export it with --accelerate FILE, or choose --engine zero1/zero2/zero3"));
        }
    };
    if p.tp > 1 || p.pp > 1 {
        return Err(Error::field(
            "command line",
            "tp",
            "tensor and pipeline parallelism are not set in a DeepSpeed JSON file",
        )
        .with_hint(
            "they come from the training script (Megatron-DeepSpeed); export with --tp 1 --pp 1",
        ));
    }
    let offload = |on: bool| {
        if on {
            json!({ "device": "cpu", "pin_memory": true })
        } else {
            json!({ "device": "none" })
        }
    };
    let mut zero = json!({
        "stage": stage,
        "overlap_comm": true,
        "contiguous_gradients": true,
        "reduce_bucket_size": ZERO_REDUCE_BUCKET,
    });
    if stage >= 1 {
        zero["offload_optimizer"] = offload(p.offload != Offload::None);
    }
    if stage == 3 {
        zero["offload_param"] = offload(p.offload == Offload::Params);
        zero["stage3_prefetch_bucket_size"] = json!(ZERO_REDUCE_BUCKET);
        zero["stage3_max_live_parameters"] = json!(1_000_000_000u64);
    } else if stage >= 1 {
        zero["allgather_bucket_size"] = json!(ZERO_REDUCE_BUCKET);
    }
    let bf16 = matches!(plan.precision, Precision::MixedBf16 | Precision::Bf16);
    let fp16 = plan.precision == Precision::MixedFp16;
    Ok(json!({
        "train_micro_batch_size_per_gpu": plan.batch,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": plan.batch * p.grad_accum * p.dp(),
        "bf16": { "enabled": bf16 },
        "fp16": { "enabled": fp16, "loss_scale": 0 },
        "zero_optimization": zero,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_offload_map_to_engines() {
        let i = read(
            "ds.json",
            r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
                "bf16": {"enabled": true},
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                      "offload_param": {"device": "none"}, "reduce_bucket_size": 5e8}}"#,
        )
        .expect("valid");
        assert_eq!(i.engine, Some(Engine::Zero3));
        assert_eq!(i.offload, Some(Offload::Optimizer));
        assert_eq!((i.batch, i.grad_accum), (Some(4), None));
        assert_eq!(i.precision, Some(Precision::MixedBf16));
        assert_eq!(i.notes.len(), 1);
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = read("ds.json", r#"{"zero_optimization": {"stage": 4}}"#).expect_err("stage 4");
        assert!(e.to_string().contains("zero_optimization.stage"), "{e}");
        let e = read(
            "ds.json",
            r#"{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}"#,
        )
        .expect_err("nvme");
        assert!(e.to_string().contains("offload_param.device"), "{e}");
    }
}
