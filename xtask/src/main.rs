//! `cargo xtask <command>`: the project's developer commands.

mod bench;
mod demo;
mod test;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use flannel_ebpf_builder::{build, BuildOptions, Provision};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "flannel-rs developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installing the toolchain when missing and running as root);
    /// the last line printed is the object's path.
    BuildEbpf,
    /// The one test command: install prerequisites, fmt, clippy, eBPF build, unit and
    /// root-only integration tests.
    Test,
    /// Run the product on a local 3-node cluster and show it working.
    Demo(demo::DemoArgs),
    /// Benchmarks (root): prints markdown tables for BENCHMARKS.md. Without a suite, runs
    /// both (control-plane, then datapath).
    Bench(bench::BenchCli),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => {
            let object = build_ebpf()?;
            println!("{}", object.display());
            Ok(())
        }
        Command::Test => test::run(),
        Command::Demo(args) => demo::run(args),
        Command::Bench(cli) => bench::run(cli),
    }
}

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).context("xtask has no parent directory")
}

pub fn build_ebpf() -> Result<PathBuf> {
    build(&BuildOptions::for_workspace(&workspace_root()?, Provision::Install))
}

/// The cargo that runs this xtask (rustup's, for the host crates).
pub fn cargo() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    if let Ok(root) = workspace_root() {
        command.current_dir(root);
    }
    command
}

/// Runs `command`, echoing it, and fails unless it succeeds.
pub fn run_step(what: &str, command: &mut std::process::Command) -> Result<()> {
    eprintln!("[xtask] {what}: {command:?}");
    let status = command.status().with_context(|| format!("spawning {command:?}"))?;
    anyhow::ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}
