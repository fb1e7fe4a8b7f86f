//! `cargo xtask demo`: the product on a local 3-node cluster (namespaces, real etcd, real
//! agents, pods made by the CNI chain): shows the lease table, pod-to-pod traffic across
//! nodes with its throughput, and masquerade to a host outside the cluster; then tears it
//! all down (also on Ctrl-C). `--keep` leaves it running until Ctrl-C.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use flannel_ebpf_builder::prerequisites::{ensure_debian_packages, Prerequisites, Provision, HOST_BUILD_PACKAGES};
use flannel_tests::{
    lab::{self, Lab, LabConfig, EXTERNAL_IP, SUBNETS_PREFIX},
    require_root,
    traffic::tcp_source_seen,
};

use crate::{cargo, run_step, test::TEST_PACKAGES};

#[derive(Args)]
pub struct DemoArgs {
    /// Leave the cluster running and print how to use it; Ctrl-C tears it down.
    #[arg(long)]
    keep: bool,
    /// The agents' datapath: ebpf (TC programs and BPF maps) or netlink (flannel-classic kernel
    /// datapath).
    #[arg(long, default_value = "ebpf")]
    datapath: String,
    /// Backend in the network config: vxlan or host-gw.
    #[arg(long, default_value = "vxlan")]
    backend: String,
    /// Run the eBPF agents with --netfilter-bypass (pod ↔ remote pod traffic skips the
    /// nodes' routing and netfilter both ways).
    #[arg(long)]
    netfilter_bypass: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    anyhow::ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

pub fn run(args: DemoArgs) -> Result<()> {
    require_root()?;
    ensure_debian_packages(HOST_BUILD_PACKAGES, Provision::Install)?;
    ensure_debian_packages(TEST_PACKAGES, Provision::Install)?;
    Prerequisites::ensure(Provision::Install)?;
    run_step("build agent and CNI plugin", cargo().args(["build", "--package", "flannel-agent", "--bins"]))?;
    // Ctrl-C sets a flag; the lab is torn down when `run` returns (Drop), whatever happened.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }

    let bypass = if args.netfilter_bypass { ", --netfilter-bypass" } else { "" };
    println!("Starting a 3-node cluster (backend {}, datapath {}{bypass}) …", args.backend, args.datapath);
    let config = LabConfig {
        backend: args.backend.clone(),
        datapath: args.datapath.clone(),
        agent_args: if args.netfilter_bypass { vec!["--netfilter-bypass".into()] } else { Vec::new() },
        ..LabConfig::default()
    };
    let lab = Lab::start(config)?;
    interrupted()?;

    print_leases(&lab)?;
    println!("\nPods (created by the flannel CNI plugin → bridge + host-local):");
    for (node, pod) in lab.pods() {
        println!("  node{node} {:<15} netns {}", pod.ip, pod.ns.name());
    }

    let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    println!("\nPod-to-pod across nodes: {} (node0) → {} (node1)", a.ip, b.ip);
    let ping = lab::output(a.ns.command("ping").args(["-c", "5", "-i", "0.2", "-q", &b.ip.to_string()]))?;
    for line in ping.lines().filter(|l| l.contains("packets") || l.contains("rtt")) {
        println!("  {line}");
    }
    interrupted()?;

    println!("\nTCP transfer (iperf3, 3 s) {} → {}:", a.ip, b.ip);
    println!("  {}", iperf3(&lab, a.ip, b.ip)?);
    interrupted()?;

    for (node, pod) in [(0usize, &lab.nodes[0].pods[1]), (2, &lab.nodes[2].pods[0])] {
        let seen = tcp_source_seen(&lab.external, EXTERNAL_IP, &pod.ns, 18000 + node as u16)?;
        println!(
            "\nPod {} (node{node}) → external host {EXTERNAL_IP}: the external host saw {} — node{node}'s address {} (masqueraded)",
            pod.ip,
            seen.ip(),
            lab.nodes[node].ip
        );
    }

    if args.datapath == "ebpf" {
        println!("\nnode0's eBPF datapath (`flannel-agent inspect`), non-zero counters:");
        let state = lab.inspect(0)?;
        let counters = state["counters"].as_object().cloned().unwrap_or_default();
        for (name, value) in counters.iter().filter(|(_, v)| v.as_u64() != Some(0)) {
            println!("  {name:<28} {value}");
        }
        let links: Vec<String> = state["links"].as_array().into_iter().flatten().map(|l| l.to_string()).collect();
        println!("  attached: {}", links.join(" "));
    }

    if args.keep {
        println!("\nThe cluster keeps running. Enter a pod with, for example:");
        println!("  nsenter --net=/run/netns/{} bash", a.ns.name());
        println!("  ping {}", b.ip);
        println!("Agents' logs and subnet.env files: {}/node*/", lab.dir.path().display());
        println!("Press Ctrl-C to stop and remove everything.");
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\nTearing down the cluster …");
    drop(lab);
    println!("Done: namespaces, etcd, agents and mounts removed.");
    Ok(())
}

fn print_leases(lab: &Lab) -> Result<()> {
    println!("\nLeases in etcd ({SUBNETS_PREFIX}):");
    println!("  {:<18} {:<14} {:<10} {:<18} {:>8}", "SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "TTL");
    for (key, value) in lab.etcdctl().get_prefix(SUBNETS_PREFIX)? {
        let lease: serde_json::Value = serde_json::from_str(&value)?;
        let ttl = lab.etcdctl().key_lease(&key)?.map_or("none".to_string(), |(_, ttl)| format!("{ttl}s"));
        println!(
            "  {:<18} {:<14} {:<10} {:<18} {:>8}",
            key.trim_start_matches(SUBNETS_PREFIX).replace('-', "/"),
            lease["PublicIP"].as_str().unwrap_or("?"),
            lease["BackendType"].as_str().unwrap_or(""),
            lease["BackendData"]["VtepMAC"].as_str().unwrap_or("-"),
            ttl
        );
    }
    Ok(())
}

/// Runs an iperf3 transfer from the pod with `from` to the pod with `to`; returns a summary.
fn iperf3(lab: &Lab, from: Ipv4Addr, to: Ipv4Addr) -> Result<String> {
    let pod = |ip: Ipv4Addr| lab.pods().into_iter().find(|(_, p)| p.ip == ip).map(|(_, p)| p).context("pod");
    let mut server = pod(to)?
        .ns
        .command("iperf3")
        .args(["-s", "-1", "-B", &to.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let report = lab::output(pod(from)?.ns.command("iperf3").args(["-c", &to.to_string(), "-t", "3", "-J"]));
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&report?)?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(format!("{:.2} Gbit/s received", bps / 1e9))
}
