//! `check`, `fit`, `compare` and `sweep`: planning answers built on the same estimate.

use super::args::{CheckArgs, CompareArgs, FitArgs, SweepArgs};
use std::process::ExitCode;

pub fn check(_a: &CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub fn fit(_a: &FitArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub fn compare(_a: &CompareArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub fn sweep(_a: &SweepArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
