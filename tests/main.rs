//! Integration tests in one binary (faster to link than one per file).

mod accuracy;
mod cli;
mod cluster;
mod gpu;
mod hardening;
mod invalid;
mod models;
mod properties;

use std::path::PathBuf;

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `ftplan` binary, run from the repository root.
pub fn ftplan() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("ftplan").expect("the ftplan binary is built");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}
