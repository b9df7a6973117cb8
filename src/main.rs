use std::process::ExitCode;

use clap::Parser;
use wasmfilter::cli::{Cli, Command, Incompatible, Unreadable};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The operator serves many things at once; a CLI command is one request after another,
    // so it runs on the calling thread (no worker threads to start, wake and join), with
    // blocking work (hashing, writing, validating) still off it.
    let runtime = match cli.command {
        Command::Operator(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wasmfilter::cli::run(cli)) {
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
