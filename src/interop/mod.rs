//! The engines' own configuration files, in and out: a DeepSpeed `ds_config.json` and an
//! Accelerate `default_config.yaml` set the parallel layout (and the batch, accumulation and
//! precision they name); `ftplan export` writes a plan back in their key names.

pub mod accelerate;
pub mod deepspeed;

use crate::spec::parallel::{Engine, Offload};
use crate::spec::plan::Precision;

/// What a configuration file says about a plan. `None`: the file leaves it to the plan
/// (absent, or DeepSpeed's `"auto"`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imported {
    pub gpus: Option<u64>,
    pub nodes: Option<u64>,
    pub engine: Option<Engine>,
    pub offload: Option<Offload>,
    pub batch: Option<u64>,
    pub grad_accum: Option<u64>,
    pub precision: Option<Precision>,
    pub grad_ckpt: Option<bool>,
    /// Settings read but modelled by their defaults, for the user to see.
    pub notes: Vec<String>,
}
