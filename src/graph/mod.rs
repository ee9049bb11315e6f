//! The per-layer op graph of one training step.

pub mod arch;
pub mod build;
pub mod op;

pub use arch::build;
pub use op::OpGraph;
