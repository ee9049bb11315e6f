//! Inputs: model architectures, GPU profiles, training plans, and where to find them.

pub mod hardware;
pub mod hf;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod registry;
