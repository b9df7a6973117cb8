use std::process::ExitCode;

use clap::Parser;
use wasmfilter::cli::{Incompatible, Unreadable};

#[tokio::main]
async fn main() -> ExitCode {
    match wasmfilter::cli::run(wasmfilter::cli::Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        // `check`: the report already said why.
        Err(e) if e.is::<Incompatible>() => ExitCode::from(1),
        Err(e) if e.is::<Unreadable>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
