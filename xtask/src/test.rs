//! `cargo xtask test`: everything CI checks, in order, on a fresh machine as on a warm one.

use std::time::Instant;

use anyhow::Result;
use flannel_ebpf_builder::prerequisites::{ensure_debian_packages, Provision};

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
    "protobuf-compiler",
    "iptables",
    "nftables",
    "iperf3",
    "containernetworking-plugins",
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    let root = workspace_root()?;
    ensure_debian_packages(TEST_PACKAGES, Provision::Install)?;

    run_step(
        "rustfmt (workspace)",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    let ebpf_manifest = root.join("flannel-ebpf/Cargo.toml");
    run_step(
        "rustfmt (flannel-ebpf)",
        cargo()
            .args(["fmt", "--check", "--manifest-path"])
            .arg(&ebpf_manifest),
    )?;

    let object = build_ebpf()?;
    eprintln!("[xtask] eBPF object: {}", object.display());

    run_step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The e2e tests run the agent binary; make sure it is current.
    run_step(
        "build agent",
        cargo().args(["build", "--package", "flannel-agent", "--bins"]),
    )?;
    run_step(
        "tests",
        cargo().args(["test", "--workspace", "--no-fail-fast"]),
    )?;
    eprintln!(
        "[xtask] test: all steps passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
