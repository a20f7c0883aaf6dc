//! `pgtwig`: a database branch for every git branch.
//!
//! A thin command-line layer: parse arguments (clap), find the project, call
//! the library crates, print. All behaviour lives in `pgtwig-core` and the
//! backends.

mod commands;
mod output;
mod project;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pgtwig", version, about = "A database branch for every git branch", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up pgtwig in this git repository: write .pgtwig.toml, create the root branch.
    Init(commands::init::InitArgs),
    /// Create, list, delete, reset, start and stop database branches.
    #[command(subcommand)]
    Branch(commands::branch::BranchCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGTWIG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => commands::init::run(args),
        Command::Branch(cmd) => commands::branch::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
