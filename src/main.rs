//! The `ftplan` binary: parse flags, run, map the outcome to an exit code
//! (0 fits, 1 does not fit, 2 error) and print the whole error chain on one line.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::args::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
