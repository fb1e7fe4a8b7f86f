//! `cargo xtask demo`: builds the agent, then on a throwaway lab (two network namespaces
//! joined by a veth pair, a private bpffs) attaches the counter programs, sends pings and
//! prints the counters read back from the pinned map. Everything is removed on exit.

use std::process::Command;

use anyhow::{Context, Result};
use flannel_ebpf_builder::prerequisites::{ensure_debian_packages, Prerequisites, Provision, HOST_BUILD_PACKAGES};
use flannel_tests::{netns::run as run_checked, require_root, veth_pair, NetNs, PrivateBpffs};

use crate::{cargo, run_step, workspace_root};

const PINGS: u32 = 10;

pub fn run() -> Result<()> {
    require_root()?;
    ensure_debian_packages(&["iproute2", "iputils-ping", "procps", "bpftool"], Provision::Install)?;
    ensure_debian_packages(HOST_BUILD_PACKAGES, Provision::Install)?;
    Prerequisites::ensure(Provision::Install)?;
    run_step("build agent", cargo().args(["build", "--package", "flannel-agent", "--bins"]))?;
    let agent = workspace_root()?.join("target/debug/flannel-agent");

    let bpffs = PrivateBpffs::mount()?;
    let pin_root = bpffs.path().join("flannel");
    let client = NetNs::create("demo-client")?;
    let node = NetNs::create("demo-node")?;
    veth_pair(&client, "eth0", &node, "eth0")?;
    client.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
    node.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
    println!(
        "lab: {} (192.0.2.1) <-veth-> {} (192.0.2.2), pins under {}",
        client.name(),
        node.name(),
        pin_root.display()
    );

    let agent_in_node = |args: &[&str]| -> Result<String> {
        let mut command = node.command(&agent);
        command.arg("--bpf-pin-path").arg(&pin_root).args(args);
        let output = run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    agent_in_node(&["counters", "attach", "--iface", "eth0"])?;
    println!("attached fl_count_xdp (ingress) and fl_count_tc (egress) to eth0 in {}", node.name());

    let ping = run_checked(client.command("ping").args(["-c", &PINGS.to_string(), "-i", "0.05", "-q", "192.0.2.2"]))?;
    println!("{}", String::from_utf8_lossy(&ping.stdout).trim());

    println!("\nflannel-agent counters show (from the pinned map):");
    print!("{}", agent_in_node(&["counters", "show"])?);

    let map = pin_root.join("maps").join(flannel_common_map_name());
    let dump = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(&map).output().context("running bpftool")?;
    println!("\nbpftool map dump pinned {} (BTF field names):", map.display());
    print!("{}", String::from_utf8_lossy(&dump.stdout));

    agent_in_node(&["counters", "detach", "--iface", "eth0"])?;
    println!("\ndetached; removing the lab");
    Ok(())
}

/// The counters map's pinned name (flannel-common is not a dependency of xtask, which must
/// build before the eBPF toolchain exists; the name is checked by the e2e tests).
fn flannel_common_map_name() -> &'static str {
    "fl_counters_v1"
}
