//! The per-layer op graph of one training step.

pub mod arch;
pub mod attention;
pub mod build;
mod conv;
mod delta;
pub mod head;
pub mod layers;
pub mod linear;
pub mod op;
mod ssd;

pub use arch::build;
pub use op::OpGraph;
