//! Accelerate's YAML configuration (`accelerate config`; keys as `accelerate/commands/config`
//! writes them): distributed type, processes, machines, mixed precision, and the FSDP or
//! DeepSpeed section, in and out.

use super::Imported;
use crate::error::{Error, Result};
use crate::spec::parallel::{Engine, Offload};
use crate::spec::plan::{Plan, Precision};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The keys ftplan reads; others (machine rank, main process address, ...) are ignored.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct AccelerateConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_environment: Option<String>,
    #[serde(default)]
    pub distributed_type: Option<String>,
    #[serde(default)]
    pub num_processes: Option<u64>,
    #[serde(default)]
    pub num_machines: Option<u64>,
    #[serde(default)]
    pub mixed_precision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_rank: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_config: Option<BTreeMap<String, serde_norway::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deepspeed_config: Option<BTreeMap<String, serde_norway::Value>>,
}

fn as_str(v: &serde_norway::Value) -> Option<String> {
    match v {
        serde_norway::Value::String(s) => Some(s.clone()),
        serde_norway::Value::Number(n) => Some(n.to_string()),
        serde_norway::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads an Accelerate `default_config.yaml`.
pub fn read(path: &str, text: &str) -> Result<Imported> {
    let c: AccelerateConfig = serde_norway::from_str(text).map_err(|e| Error::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    let mut out = Imported {
        gpus: c.num_processes,
        nodes: c.num_machines,
        ..Imported::default()
    };
    if c.num_processes == Some(0) || c.num_machines == Some(0) {
        return Err(Error::field(path, "num_processes", "must be at least 1"));
    }
    out.precision = match c.mixed_precision.as_deref() {
        None | Some("no") => None,
        Some("bf16") => Some(Precision::MixedBf16),
        Some("fp16") => Some(Precision::MixedFp16),
        Some(other) => {
            return Err(Error::field(
                path,
                "mixed_precision",
                format!("`{other}` is not modelled (no, bf16, fp16)"),
            ));
        }
    };
    let dtype = c.distributed_type.as_deref().unwrap_or("NO");
    let get = |section: &Option<BTreeMap<String, serde_norway::Value>>, key: &str| {
        section.as_ref().and_then(|s| s.get(key)).and_then(as_str)
    };
    match dtype {
        "NO" => out.engine = Some(Engine::Ddp),
        "MULTI_GPU" => out.engine = Some(Engine::Ddp),
        "FSDP" => {
            let strategy = get(&c.fsdp_config, "fsdp_sharding_strategy");
            let reshard = get(&c.fsdp_config, "fsdp_reshard_after_forward");
            out.engine = Some(match (strategy.as_deref(), reshard.as_deref()) {
                (Some("SHARD_GRAD_OP" | "2"), _) | (_, Some("false" | "SHARD_GRAD_OP")) => {
                    Engine::FsdpGradOp
                }
                (Some("HYBRID_SHARD" | "4" | "HYBRID_SHARD_ZERO2" | "5"), _) => Engine::FsdpHybrid,
                (Some("NO_SHARD" | "3"), _) => Engine::Ddp,
                _ => Engine::Fsdp,
            });
            if get(&c.fsdp_config, "fsdp_offload_params").as_deref() == Some("true") {
                out.offload = Some(Offload::Params);
            }
            if let Some(ck) = get(&c.fsdp_config, "fsdp_activation_checkpointing") {
                out.grad_ckpt = Some(ck == "true");
            }
        }
        "DEEPSPEED" => {
            let stage = get(&c.deepspeed_config, "zero_stage").unwrap_or_else(|| "0".to_string());
            out.engine = Some(match stage.as_str() {
                "0" => Engine::Ddp,
                "1" => Engine::Zero1,
                "2" => Engine::Zero2,
                "3" => Engine::Zero3,
                other => {
                    return Err(Error::field(
                        path,
                        "deepspeed_config.zero_stage",
                        format!("must be 0 to 3, found {other}"),
                    ));
                }
            });
            let opt = get(&c.deepspeed_config, "offload_optimizer_device");
            let param = get(&c.deepspeed_config, "offload_param_device");
            out.offload = Some(match (opt.as_deref(), param.as_deref()) {
                (_, Some("cpu")) => Offload::Params,
                (Some("cpu"), _) => Offload::Optimizer,
                (Some("nvme"), _) | (_, Some("nvme")) => {
                    return Err(Error::field(
                        path,
                        "deepspeed_config.offload_param_device",
                        "NVMe offload is not modelled",
                    ));
                }
                _ => Offload::None,
            });
            if let Some(ga) = get(&c.deepspeed_config, "gradient_accumulation_steps") {
                out.grad_accum = Some(ga.parse().ok().filter(|g| *g >= 1).ok_or_else(|| {
                    Error::field(
                        path,
                        "deepspeed_config.gradient_accumulation_steps",
                        format!("must be a positive integer, found {ga}"),
                    )
                })?);
            }
        }
        other => {
            return Err(Error::field(
                path,
                "distributed_type",
                format!("`{other}` is not one of NO, MULTI_GPU, FSDP, DEEPSPEED"),
            ));
        }
    }
    Ok(out)
}

/// An Accelerate configuration for the plan.
pub fn write(plan: &Plan) -> Result<String> {
    let p = &plan.parallel;
    if p.tp > 1 || p.pp > 1 {
        return Err(Error::field(
            "command line",
            "tp",
            "tensor and pipeline parallelism are not set in an Accelerate config",
        ));
    }
    let value = |s: &str| serde_norway::Value::String(s.to_string());
    let mut c = AccelerateConfig {
        compute_environment: Some("LOCAL_MACHINE".into()),
        distributed_type: None,
        num_processes: Some(p.gpus),
        num_machines: Some(p.nodes()),
        machine_rank: Some(0),
        mixed_precision: Some(
            match plan.precision {
                Precision::Fp32 => "no",
                Precision::MixedFp16 => "fp16",
                Precision::MixedBf16 | Precision::Bf16 => "bf16",
            }
            .into(),
        ),
        fsdp_config: None,
        deepspeed_config: None,
    };
    match p.engine {
        Engine::Ddp => {
            c.distributed_type = Some(if p.gpus > 1 { "MULTI_GPU" } else { "NO" }.into());
        }
        Engine::Fsdp | Engine::FsdpGradOp | Engine::FsdpHybrid => {
            c.distributed_type = Some("FSDP".into());
            let mut f: BTreeMap<String, serde_norway::Value> = BTreeMap::new();
            f.insert(
                "fsdp_auto_wrap_policy".into(),
                value("TRANSFORMER_BASED_WRAP"),
            );
            f.insert("fsdp_state_dict_type".into(), value("SHARDED_STATE_DICT"));
            f.insert(
                "fsdp_offload_params".into(),
                serde_norway::Value::Bool(p.offload == Offload::Params),
            );
            f.insert(
                "fsdp_activation_checkpointing".into(),
                serde_norway::Value::Bool(plan.grad_ckpt),
            );
            if p.engine == Engine::FsdpHybrid {
                // HYBRID_SHARD is FSDP1's sharding strategy.
                f.insert("fsdp_version".into(), serde_norway::Value::Number(1.into()));
                f.insert("fsdp_sharding_strategy".into(), value("HYBRID_SHARD"));
            } else {
                f.insert("fsdp_version".into(), serde_norway::Value::Number(2.into()));
                f.insert(
                    "fsdp_reshard_after_forward".into(),
                    serde_norway::Value::Bool(p.engine == Engine::Fsdp),
                );
            }
            c.fsdp_config = Some(f);
        }
        Engine::Zero1 | Engine::Zero2 | Engine::Zero3 => {
            c.distributed_type = Some("DEEPSPEED".into());
            let stage = match p.engine {
                Engine::Zero1 => 1,
                Engine::Zero2 => 2,
                _ => 3,
            };
            let dev = |on: bool| value(if on { "cpu" } else { "none" });
            let mut d: BTreeMap<String, serde_norway::Value> = BTreeMap::new();
            d.insert(
                "zero_stage".into(),
                serde_norway::Value::Number(stage.into()),
            );
            d.insert(
                "gradient_accumulation_steps".into(),
                serde_norway::Value::Number(p.grad_accum.into()),
            );
            d.insert(
                "offload_optimizer_device".into(),
                dev(p.offload != Offload::None),
            );
            d.insert(
                "offload_param_device".into(),
                dev(p.offload == Offload::Params),
            );
            d.insert(
                "zero3_init_flag".into(),
                serde_norway::Value::Bool(stage == 3),
            );
            c.deepspeed_config = Some(d);
        }
    }
    serde_norway::to_string(&c).map_err(|e| Error::Plan {
        message: format!("internal: accelerate config: {e}"),
        hint: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsdp_sections_map_to_engines() {
        let i = read(
            "a.yaml",
            "distributed_type: FSDP\nnum_processes: 16\nnum_machines: 2\nmixed_precision: bf16\n\
             fsdp_config:\n  fsdp_sharding_strategy: HYBRID_SHARD\n  fsdp_offload_params: false\n",
        )
        .expect("valid");
        assert_eq!(i.engine, Some(Engine::FsdpHybrid));
        assert_eq!((i.gpus, i.nodes), (Some(16), Some(2)));
        let i = read(
            "a.yaml",
            "distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n",
        )
        .expect("valid");
        assert_eq!(i.engine, Some(Engine::Zero2));
        assert_eq!(i.offload, Some(Offload::Optimizer));
    }
}
