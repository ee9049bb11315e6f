//! Inputs: model architectures, GPU profiles, training plans, and where to find them.

pub mod hardware;
pub mod hf;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod registry;

/// The name a `(name, value)` table gives `value` (the first, where a value has aliases).
pub fn name_in<T: Copy + PartialEq>(table: &[(&'static str, T)], value: T) -> Option<&'static str> {
    table.iter().find(|(_, v)| *v == value).map(|(n, _)| *n)
}

/// The value a `(name, value)` table gives `name`.
pub fn value_in<T: Copy>(table: &[(&'static str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}
