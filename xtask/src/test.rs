//! `cargo xtask test`: everything CI checks, in order, on a fresh machine as on a warm one.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result};
use flannel_ebpf_builder::prerequisites::{ensure_debian_packages, Provision, HOST_BUILD_PACKAGES};

use crate::{build_ebpf, cargo, run_step, workspace_root};

/// Debian packages the tests use (besides the eBPF toolchain, which the builder installs):
/// the lab's tools, real etcd, real CNI plugins, packet tools and `protoc` for etcd-client.
pub const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "procps",
    "bpftool",
    "etcd-server",
    "etcd-client",
    "iptables",
    "nftables",
    "iperf3",
    "containernetworking-plugins",
    "openssl",
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    let root = workspace_root()?;
    ensure_debian_packages(HOST_BUILD_PACKAGES, Provision::Install)?;
    ensure_debian_packages(TEST_PACKAGES, Provision::Install)?;

    run_step("rustfmt (workspace)", cargo().args(["fmt", "--all", "--check"]))?;
    let ebpf_manifest = root.join("flannel-ebpf/Cargo.toml");
    run_step("rustfmt (flannel-ebpf)", cargo().args(["fmt", "--check", "--manifest-path"]).arg(&ebpf_manifest))?;

    let object = build_ebpf()?;
    eprintln!("[xtask] eBPF object: {}", object.display());

    run_step("clippy", cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The e2e tests run the agent binary; make sure it is current.
    run_step("build agent", cargo().args(["build", "--package", "flannel-agent", "--bins"]))?;
    // Doc-tests are left out: the crates have none, and their empty summaries would close
    // the log with "0 passed".
    let mut totals =
        run_cargo_test(cargo().args(["test", "--workspace", "--lib", "--bins", "--tests", "--no-fail-fast"]))?;
    smoke_benchmarks(&mut totals);
    eprintln!("[xtask] test: finished in {:.1} s", started.elapsed().as_secs_f64());
    println!("tests: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.ignored);
    anyhow::ensure!(totals.failed == 0 && totals.status_ok, "cargo test failed ({} test(s) failed)", totals.failed);
    anyhow::ensure!(totals.passed > 0, "no test ran");
    Ok(())
}

/// The benchmark harnesses, end to end for a few seconds each (`--smoke`, debug build): they
/// keep working without a full run. Each counts as one test.
fn smoke_benchmarks(totals: &mut Totals) {
    for bench in ["datapath", "control_plane"] {
        let mut command = cargo();
        command.args(["test", "--package", "flannel-tests", "--bench", bench, "--", "--smoke"]);
        match run_step(&format!("{bench} benchmark smoke run"), &mut command) {
            Ok(()) => {
                println!("test bench smoke {bench} ... ok");
                totals.passed += 1;
            }
            Err(error) => {
                println!("test bench smoke {bench} ... FAILED: {error:#}");
                totals.failed += 1;
            }
        }
    }
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    status_ok: bool,
}

/// Runs `cargo test`, passing its output through, and adds up its per-binary summaries
/// ("test result: ok. 4 passed; 0 failed; 1 ignored; ...").
fn run_cargo_test(command: &mut Command) -> Result<Totals> {
    eprintln!("[xtask] tests: {command:?}");
    let mut child = command.stdout(Stdio::piped()).spawn().with_context(|| format!("spawning {command:?}"))?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            for part in summary.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => totals.passed += n,
                        "failed" => totals.failed += n,
                        "ignored" => totals.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    totals.status_ok = child.wait().context("waiting for cargo test")?.success();
    Ok(totals)
}
