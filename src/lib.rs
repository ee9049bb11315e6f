//! ftplan: will fine-tuning this model with this method fit on this GPU, and how fast will it run?
//!
//! The pipeline is one-way: `spec` (model, hardware, plan) -> `graph` (ops of one training step)
//! -> `memory` and `time` (walks over the ops) -> `report` (tables, JSON, charts). The CLI sits on
//! top and is the only part that reads files given on the command line or prints.

pub mod calibrate;
pub mod comm;
pub mod error;
pub mod estimate;
pub mod explore;
pub mod graph;
pub mod interop;
pub mod io;
pub mod layouts;
pub mod measure;
pub mod memory;
pub mod optimizer;
pub mod report;
pub mod search;
pub mod shard;
pub mod spec;
pub mod time;
pub mod units;
pub mod validate;

pub use error::{Error, Result};
