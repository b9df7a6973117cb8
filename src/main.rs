use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wasmfilter::cli::run(wasmfilter::cli::Cli::parse()).await
}
