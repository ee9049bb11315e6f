//! The `ftplan` binary: parse flags, run, map the outcome to an exit code
//! (0 fits, 1 does not fit, 2 error) and print the whole error chain on one line.

mod cli;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
use std::process::ExitCode;

fn main() -> ExitCode {
    let matches = match cli::args::Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(&e),
    };
    let args = match cli::args::Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => return usage_error(&e),
    };
    cli::record_given(&matches);
    match cli::run(args) {
        Ok(code) => code,
        // A closed stdout (`ftplan ... | head -1`) is a normal end, not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", escape_controls(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// clap's errors under the tool's message policy: one `error:` line, then one `hint:` line
/// (clap's own tip where it has one). Help and version print as they are.
fn usage_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.render().to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("error: invalid arguments");
            let tip = lines.find_map(|l| l.strip_prefix("tip: ")).unwrap_or(
                "`ftplan --help` lists the commands, `ftplan COMMAND --help` their flags",
            );
            eprintln!("{first}");
            eprintln!("hint: {tip}");
            ExitCode::from(2)
        }
    }
}

/// Control characters from input files (names, values) shown as escapes, so a crafted file
/// cannot move the terminal's cursor or recolour it; the newline before a `hint:` stays.
fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
