use std::process::ExitCode;

use clap::Parser;
use wasmfilter::cli::{Cli, Command, Incompatible, Unreadable};

/// Threads the operator's blocking work (hashing, file I/O, validating and pre-flighting
/// modules) may use at once; more such work waits its turn. Tokio's default, 512, let a cold
/// start with thousands of filters run some 50 at once: no faster on a few cores, and each
/// thread came with its own stack and malloc arena (measured: the RSS at 2,000 filters).
const MAX_BLOCKING_THREADS: usize = 8;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The operator serves many things at once; a CLI command is one request after another,
    // so it runs on the calling thread (no worker threads to start, wake and join), with
    // blocking work (hashing, writing, validating) still off it.
    let runtime = match cli.command {
        Command::Operator(_) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
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
