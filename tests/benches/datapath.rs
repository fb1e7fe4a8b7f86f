//! Datapath benchmark (`cargo xtask bench datapath`): side by side in one run, interleaved
//! over rounds (A B C … A B C …), medians and ratios:
//! - node-to-node on the bare underlay (the limit), pod-to-pod across nodes over flannel's
//!   kernel vxlan (our netlink datapath) and over kernel host-gw routes: TCP stream
//!   throughput (iperf3) and TCP request/response latency;
//! - per-packet cost of the eBPF programs from BPF_PROG_TEST_RUN (encap, decap, pass-through).
//!
//! The eBPF forwarding datapath joins the table once the agent attaches its programs.
//!
//! Arguments: `--quick` (one round, 1 s streams), `--rounds N` (default 3).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use flannel_tests::{
    lab::{self, Lab, LabConfig},
    packet, NetNs,
};

struct Args {
    rounds: usize,
    seconds: u32,
    rr_iterations: usize,
}

#[path = "../tests/support/ebpf_node.rs"]
mod ebpf_node;
use ebpf_node::node_object;

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let quick = argv.iter().any(|a| a == "--quick");
    let rounds = argv.iter().position(|a| a == "--rounds").and_then(|i| argv.get(i + 1)?.parse().ok());
    Args {
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        seconds: if quick { 1 } else { 5 },
        rr_iterations: if quick { 2_000 } else { 20_000 },
    }
}

/// A pair of endpoints to measure between.
struct Path<'a> {
    name: &'static str,
    client: &'a NetNs,
    server: &'a NetNs,
    server_ip: Ipv4Addr,
}

#[derive(Default)]
struct Samples {
    gbps: Vec<f64>,
    rr_us: Vec<f64>,
}

fn iperf3(path: &Path, seconds: u32) -> Result<f64> {
    let mut server = path
        .server
        .command("iperf3")
        .args(["-s", "-1", "-B", &path.server_ip.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let report = lab::output(path.client.command("iperf3").args([
        "-c",
        &path.server_ip.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]));
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&report?)?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON")?;
    Ok(bps / 1e9)
}

/// Median round trip of 1-byte TCP request/response over one connection, in microseconds.
fn tcp_rr(path: &Path, iterations: usize, port: u16) -> Result<f64> {
    let ip = path.server_ip;
    let listener = path.server.run_in(move || TcpListener::bind((ip, port)))??;
    std::thread::scope(|scope| {
        scope.spawn(move || -> Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b)?;
            }
            Ok(())
        });
        path.client.run_in(move || -> Result<f64> {
            let mut s = TcpStream::connect((ip, port))?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            let mut rtts = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(median(&mut rtts))
        })?
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// ns per packet of each eBPF program on a crafted packet (BPF_PROG_TEST_RUN, many repeats).
fn program_costs() -> Result<Vec<(String, f64)>> {
    let me = Ipv4Addr::new(192, 0, 2, 11);
    let peer = Ipv4Addr::new(192, 0, 2, 12);
    let (my_vtep, peer_vtep) = ([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x12]);
    let ebpf = node_object(me, my_vtep, peer, peer_vtep)?;
    let pod = packet::udp4(
        [0xa, 0, 0, 0, 0, 2],
        [0xa, 0, 0, 0, 0, 1],
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 2, 3),
        40000,
        5201,
        &[0u8; 64],
    );
    let inner = packet::udp4(
        peer_vtep,
        my_vtep,
        Ipv4Addr::new(10, 244, 2, 3),
        Ipv4Addr::new(10, 244, 1, 2),
        5201,
        40000,
        &[0u8; 64],
    );
    let vxlan = packet::vxlan4(peer, me, 45678, 8472, 1, &inner);
    let other = packet::udp4([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], peer, me, 1234, 53, &[0u8; 64]);
    const REPEAT: u32 = 1_000_000;
    let per_packet =
        |run: &dyn Fn(TestRunOptions) -> Result<aya::programs::TestRunResult>, data: &[u8]| -> Result<f64> {
            let opts = TestRunOptions { data_in: Some(data), repeat: REPEAT, ..Default::default() };
            Ok(run(opts)?.duration.as_nanos() as f64)
        };
    let egress: &SchedClassifier = ebpf.program("fl_pod_egress").context("program")?.try_into()?;
    let ingress: &Xdp = ebpf.program("fl_underlay_ingress").context("program")?.try_into()?;
    let tc = |o: TestRunOptions| egress.test_run(o).map_err(anyhow::Error::from);
    let xdp = |o: TestRunOptions| ingress.test_run(o).map_err(anyhow::Error::from);
    Ok(vec![
        ("TC fl_pod_egress: VXLAN encap (pod → remote pod)".into(), per_packet(&tc, &pod)?),
        ("XDP fl_underlay_ingress: VXLAN decap (peer → local pod)".into(), per_packet(&xdp, &vxlan)?),
        ("XDP fl_underlay_ingress: pass-through (not VXLAN)".into(), per_packet(&xdp, &other)?),
    ])
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} cores, Linux {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel.trim())
}

fn main() -> Result<()> {
    let args = parse_args();
    flannel_tests::require_root()?;
    // Two pods per lab are enough: one on node 0, one on node 1.
    let small =
        |backend: &str| LabConfig { nodes: 2, pods_per_node: 1, backend: backend.into(), ..LabConfig::default() };
    let vxlan = Lab::start(small("vxlan"))?;
    let host_gw = Lab::start(small("host-gw"))?;
    let paths = [
        Path {
            name: "bare underlay, node → node",
            client: &vxlan.nodes[0].ns,
            server: &vxlan.nodes[1].ns,
            server_ip: vxlan.nodes[1].ip,
        },
        Path {
            name: "flannel-classic vxlan (kernel vxlan device), pod → pod",
            client: &vxlan.nodes[0].pods[0].ns,
            server: &vxlan.nodes[1].pods[0].ns,
            server_ip: vxlan.nodes[1].pods[0].ip,
        },
        Path {
            name: "kernel host-gw routes, pod → pod",
            client: &host_gw.nodes[0].pods[0].ns,
            server: &host_gw.nodes[1].pods[0].ns,
            server_ip: host_gw.nodes[1].pods[0].ip,
        },
    ];
    let mut samples: Vec<Samples> = paths.iter().map(|_| Samples::default()).collect();
    let mut port = 40000;
    for round in 0..args.rounds {
        for (path, s) in paths.iter().zip(samples.iter_mut()) {
            eprintln!("[bench] round {} {}", round + 1, path.name);
            s.gbps.push(iperf3(path, args.seconds)?);
            port += 1;
            s.rr_us.push(tcp_rr(path, args.rr_iterations, port)?);
        }
    }
    let mut rows = Vec::new();
    for (path, s) in paths.iter().zip(samples.iter_mut()) {
        rows.push((path.name, median(&mut s.gbps), median(&mut s.rr_us)));
    }
    let (base_gbps, base_rr) = (rows[0].1, rows[0].2);
    let (classic_gbps, classic_rr) = (rows[1].1, rows[1].2);

    println!("\n## Datapath\n");
    println!("Machine: {}", machine());
    let flags: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    println!(
        "Command: `{}`",
        std::iter::once("cargo xtask bench datapath".to_string()).chain(flags).collect::<Vec<_>>().join(" ")
    );
    println!(
        "Rounds: {} interleaved; iperf3 {} s per stream; TCP RR: {} 1-byte round trips; medians.\n",
        args.rounds, args.seconds, args.rr_iterations
    );
    println!(
        "| path | TCP stream | × underlay | × flannel-classic | TCP RR latency | × underlay | × flannel-classic |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, gbps, rr) in &rows {
        println!(
            "| {name} | {gbps:.2} Gbit/s | {:.2} | {:.2} | {rr:.1} µs | {:.2} | {:.2} |",
            gbps / base_gbps,
            gbps / classic_gbps,
            rr / base_rr,
            rr / classic_rr
        );
    }
    println!(
        "| our eBPF vxlan / eBPF host-gw, pod → pod | not yet: the agent does not attach its programs yet | | | | | |"
    );
    println!("\n| eBPF program (BPF_PROG_TEST_RUN, 1,000,000 repeats; 106-byte pod frame, 156-byte VXLAN frame) | ns per packet |\n|---|---|");
    for (name, ns) in program_costs()? {
        println!("| {name} | {ns:.1} |");
    }
    Ok(())
}
