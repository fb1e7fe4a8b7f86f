//! `cargo xtask bench <suite>`: benchmarks, built in release mode, run as root on the lab;
//! each prints a markdown table to paste into BENCHMARKS.md.

use anyhow::Result;
use clap::{Args, Subcommand};
use flannel_ebpf_builder::prerequisites::{ensure_debian_packages, Prerequisites, Provision, HOST_BUILD_PACKAGES};
use flannel_tests::require_root;

use crate::{cargo, run_step, test::TEST_PACKAGES};

#[derive(Args)]
pub struct BenchCli {
    #[command(subcommand)]
    suite: Option<Suite>,
    /// Without a suite: both suites' short runs (about two minutes together).
    #[arg(long)]
    quick: bool,
}

#[derive(Subcommand)]
pub enum Suite {
    /// etcd → datapath: learning N pre-existing leases, one change's latency, agent peak RSS.
    ControlPlane(BenchArgs),
    /// Pod → pod and pod → ClusterIP throughput and latency per datapath vs the bare underlay,
    /// interleaved; masquerade; eBPF per-packet program cost; an SVG chart of the ratios.
    Datapath(DatapathArgs),
}

#[derive(Args)]
pub struct DatapathArgs {
    /// One round with 1 s streams (about a minute).
    #[arg(long)]
    quick: bool,
    /// The harness end to end in a few seconds (numbers meaningless).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Interleaved rounds (default 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Where the SVG chart of the ratios goes, relative to the repository root (default
    /// target/bench/datapath-ratios.svg).
    #[arg(long, value_name = "PATH")]
    svg: Option<String>,
}

#[derive(Args)]
pub struct BenchArgs {
    /// A short run (1,000 leases, one round).
    #[arg(long)]
    quick: bool,
    /// Number of pre-existing leases (default 10,000; 1,000 with --quick).
    #[arg(long)]
    leases: Option<usize>,
}

pub fn run(cli: BenchCli) -> Result<()> {
    match cli.suite {
        Some(suite) => run_suite(suite),
        None => {
            run_suite(Suite::ControlPlane(BenchArgs { quick: cli.quick, leases: None }))?;
            run_suite(Suite::Datapath(DatapathArgs { quick: cli.quick, smoke: false, rounds: None, svg: None }))
        }
    }
}

fn run_suite(suite: Suite) -> Result<()> {
    require_root()?;
    ensure_debian_packages(HOST_BUILD_PACKAGES, Provision::Install)?;
    ensure_debian_packages(TEST_PACKAGES, Provision::Install)?;
    Prerequisites::ensure(Provision::Install)?;
    // The benchmarks drive the release binaries (agent, CNI plugin), found next to them.
    run_step("build agent (release)", cargo().args(["build", "--release", "--package", "flannel-agent", "--bins"]))?;
    let (bench, args) = match suite {
        Suite::ControlPlane(a) => {
            ("control_plane", [switch("--quick", a.quick), option("--leases", a.leases)].concat())
        }
        Suite::Datapath(a) => (
            "datapath",
            [
                switch("--quick", a.quick),
                switch("--smoke", a.smoke),
                option("--rounds", a.rounds),
                option("--svg", a.svg),
            ]
            .concat(),
        ),
    };
    let mut command = cargo();
    command.args(["bench", "--package", "flannel-tests", "--bench", bench, "--"]).args(args);
    run_step(&format!("{bench} benchmark"), &mut command)
}

/// `name` as a bench argument when `on`.
fn switch(name: &str, on: bool) -> Vec<String> {
    if on {
        vec![name.into()]
    } else {
        Vec::new()
    }
}

/// `name value` as bench arguments when there is a value.
fn option(name: &str, value: Option<impl ToString>) -> Vec<String> {
    value.map(|v| vec![name.into(), v.to_string()]).unwrap_or_default()
}
