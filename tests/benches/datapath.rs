//! Datapath benchmark (`cargo xtask bench datapath`): side by side in one run, interleaved
//! over rounds (A B C … A B C …), medians and ratios:
//! - node → node on the bare underlay (the limit), then pod → pod across nodes in six labs:
//!   flannel's kernel vxlan and kernel host-gw routes (our netlink datapath, flannel-classic),
//!   and our eBPF vxlan and host-gw, each by default and with `--netfilter-bypass`: TCP
//!   stream throughput with 1 and 4 streams (iperf3), TCP and UDP request/response latency,
//!   and the rate of 64-byte UDP datagrams received;
//! - pod → ClusterIP: node 0 of every lab carries kube-proxy's iptables rules
//!   (`flannel_tests::kube_proxy`) for two Services backed by the pod on node 1, so the
//!   connection is DNATed on the client's node and its replies must come back through that
//!   node's conntrack; TCP stream and TCP RR. The rules stay for the whole run, so every row
//!   is measured on a node with kube-proxy's rules, as a Kubernetes node has them;
//! - masquerade, pod → external host: new TCP connections per second and stream throughput,
//!   eBPF SNAT against iptables MASQUERADE with conntrack;
//! - per-run cost of the eBPF programs from BPF_PROG_TEST_RUN.
//!
//! It also writes an SVG bar chart of the pod → pod ratios × flannel-classic.
//!
//! Arguments (`flannel_tests::bench`): `--quick` (one round, 1 s streams), `--smoke` (the
//! harness end to end in a few seconds, for `cargo xtask test`; numbers meaningless),
//! `--rounds N` (default 3), `--svg PATH` (the chart; default
//! `target/bench/datapath-ratios.svg`; a relative path is taken from the repository root).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path as FsPath, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use flannel_common::{stats::STAT_SLOTS, Stat, STATS_MAP};
use flannel_tests::{
    bench::{machine, median, ratio, BenchArgs},
    kube_proxy::{self, ClusterIp},
    lab::{self, Lab, LabConfig},
    packet,
    traffic::accept_within,
    NetNs,
};
use plotters::{
    backend::SVGBackend,
    chart::{ChartBuilder, SeriesLabelPosition},
    coord::combinators::{BuildNestedCoord, NestedValue},
    drawing::IntoDrawingArea,
    element::{EmptyElement, PathElement, Rectangle, Text},
    style::{
        text_anchor::{HPos, Pos, VPos},
        Color, IntoFont, RGBColor, TextStyle, BLACK, WHITE,
    },
};

#[path = "../tests/support/ebpf_node.rs"]
mod ebpf_node;
use ebpf_node::{bypass_node_object, node_object, snat_object};

/// This bench's own parameters, by mode.
struct Params {
    rounds: usize,
    /// Seconds per iperf3 run.
    seconds: u32,
    /// Round trips per TCP/UDP RR measurement.
    rr_iterations: usize,
    /// How long each connection-rate run lasts.
    conn_window: Duration,
    /// BPF_PROG_TEST_RUN calls per program row.
    test_runs: u32,
    /// Where the chart goes.
    svg: PathBuf,
}

impl Params {
    fn new(args: &BenchArgs) -> Result<Params> {
        let mode = args.mode();
        let svg: PathBuf = args.value("--svg")?.unwrap_or_else(|| "target/bench/datapath-ratios.svg".into());
        // Relative to the repository root, not to the bench's working directory (cargo runs
        // benches in the package directory, tests/).
        let root = FsPath::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lies in the repository");
        Ok(Params {
            rounds: args.rounds(3)?,
            seconds: mode.pick(5, 1, 1),
            rr_iterations: mode.pick(20_000, 2_000, 100),
            conn_window: Duration::from_millis(mode.pick(3000, 1000, 200)),
            test_runs: mode.pick(1_000_000, 100_000, 1_000),
            svg: root.join(svg),
        })
    }
}

/// One lab of the comparison (2 nodes × 1 pod).
struct LabSpec {
    /// Its rows' names.
    name: &'static str,
    /// Its group's label in the chart.
    label: &'static str,
    backend: &'static str,
    datapath: &'static str,
    agent_args: &'static [&'static str],
}

const LABS: [LabSpec; 6] = [
    LabSpec {
        name: "flannel-classic vxlan (kernel vxlan device)",
        label: "classic vxlan",
        backend: "vxlan",
        datapath: "netlink",
        agent_args: &[],
    },
    LabSpec {
        name: "kernel host-gw routes",
        label: "host-gw routes",
        backend: "host-gw",
        datapath: "netlink",
        agent_args: &[],
    },
    LabSpec { name: "our eBPF vxlan", label: "eBPF vxlan", backend: "vxlan", datapath: "ebpf", agent_args: &[] },
    LabSpec {
        name: "our eBPF vxlan --netfilter-bypass",
        label: "eBPF vxlan bypass",
        backend: "vxlan",
        datapath: "ebpf",
        agent_args: &["--netfilter-bypass"],
    },
    LabSpec { name: "our eBPF host-gw", label: "eBPF host-gw", backend: "host-gw", datapath: "ebpf", agent_args: &[] },
    LabSpec {
        name: "our eBPF host-gw --netfilter-bypass",
        label: "eBPF host-gw bypass",
        backend: "host-gw",
        datapath: "ebpf",
        agent_args: &["--netfilter-bypass"],
    },
];
/// The lab every ratio "× flannel-classic" compares with, and the masquerade table's
/// iptables row.
const CLASSIC: usize = 0;
/// The masquerade table's eBPF row.
const EBPF_VXLAN: usize = 2;

/// iperf3's default port, which the stream Service forwards to.
const IPERF3_PORT: u16 = 5201;
/// The TCP RR Service's port (and its backend's): fixed, because the rules name it.
const SERVICE_RR_PORT: u16 = 5300;
/// The Services' virtual IPs, in Kubernetes' default service range.
const STREAM_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const RR_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// iperf3 `-P` of the parallel-streams column.
const PARALLEL_STREAMS: u32 = 4;

/// A pair of endpoints to measure between.
struct Path<'a> {
    name: String,
    client: &'a NetNs,
    server: &'a NetNs,
    /// The address the servers bind to.
    server_ip: Ipv4Addr,
    /// Where the client connects for streams (iperf3) and for TCP RR: `server_ip`, or
    /// ClusterIPs that the client's node DNATs to it (the destination is rewritten to
    /// `server_ip`, so the servers still see their own address).
    stream_ip: Ipv4Addr,
    rr_ip: Ipv4Addr,
}

impl<'a> Path<'a> {
    fn direct(name: String, client: &'a NetNs, server: &'a NetNs, server_ip: Ipv4Addr) -> Path<'a> {
        Path { name, client, server, server_ip, stream_ip: server_ip, rr_ip: server_ip }
    }

    /// Pod on node 0 → pod on node 1 of `lab`.
    fn pod_to_pod(spec: &LabSpec, lab: &'a Lab) -> Path<'a> {
        let server = &lab.nodes[1].pods[0];
        Path::direct(format!("{}, pod → pod", spec.name), &lab.nodes[0].pods[0].ns, &server.ns, server.ip)
    }

    /// Pod on node 0 → the Services of [`install_services`], backed by the pod on node 1.
    fn pod_to_cluster_ip(spec: &LabSpec, lab: &'a Lab) -> Path<'a> {
        let server = &lab.nodes[1].pods[0];
        Path {
            stream_ip: STREAM_VIP,
            rr_ip: RR_VIP,
            ..Path::direct(format!("{}, pod → ClusterIP", spec.name), &lab.nodes[0].pods[0].ns, &server.ns, server.ip)
        }
    }
}

/// kube-proxy's rules on node 0 of `lab`: the stream and RR Services, both backed by the pod
/// on node 1.
fn install_services(lab: &Lab) -> Result<()> {
    let backend = lab.nodes[1].pods[0].ip;
    kube_proxy::install(
        &lab.nodes[0].ns,
        lab::NETWORK,
        &[
            ClusterIp { vip: STREAM_VIP, port: IPERF3_PORT, backend, backend_port: IPERF3_PORT },
            ClusterIp { vip: RR_VIP, port: SERVICE_RR_PORT, backend, backend_port: SERVICE_RR_PORT },
        ],
    )
}

/// Pod → pod (and node → node) measurements of one path.
#[derive(Default)]
struct Samples {
    gbps: Vec<f64>,
    gbps_parallel: Vec<f64>,
    rr_us: Vec<f64>,
    udp_rr_us: Vec<f64>,
    small_kpps: Vec<f64>,
}

/// Pod → ClusterIP measurements of one lab.
#[derive(Default)]
struct ServiceSamples {
    gbps: Vec<f64>,
    rr_us: Vec<f64>,
}

/// Masquerade measurements of one lab's pod → external host path.
#[derive(Default)]
struct MasqSamples {
    conns_per_s: Vec<f64>,
    gbps: Vec<f64>,
}

/// One iperf3 run from the path's client to a one-off server; its JSON report.
fn iperf3_report(path: &Path, seconds: u32, options: &[&str]) -> Result<serde_json::Value> {
    let bind = path.server_ip.to_string();
    let mut server = path
        .server
        .command("iperf3")
        .args(["-s", "-1", "-B", &bind])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting iperf3 -s -B {bind} in {}", path.server.name()))?;
    // iperf3 has no readiness signal; it listens well within this.
    std::thread::sleep(Duration::from_millis(200));
    let report = lab::output(
        path.client
            .command("iperf3")
            .args(["-c", &path.stream_ip.to_string(), "-t", &seconds.to_string(), "-J"])
            .args(options),
    );
    let _ = server.kill();
    let _ = server.wait();
    let report = report.with_context(|| format!("iperf3 {options:?} for {}", path.name))?;
    serde_json::from_str(&report).with_context(|| format!("iperf3 JSON for {}", path.name))
}

/// TCP throughput with `streams` parallel streams, summed, as received, in Gbit/s.
fn iperf3(path: &Path, seconds: u32, streams: u32) -> Result<f64> {
    let json = iperf3_report(path, seconds, &["-P", &streams.to_string()])?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 JSON for {}: no end.sum_received.bits_per_second", path.name))?;
    Ok(bps / 1e9)
}

/// 64-byte UDP datagrams sent as fast as iperf3 can for `seconds`: thousands received per
/// second at the server.
fn small_udp_rate(path: &Path, seconds: u32) -> Result<f64> {
    let json = iperf3_report(path, seconds, &["-u", "-b", "0", "-l", "64"])?;
    let sum = &json["end"]["sum"];
    let packets =
        sum["packets"].as_f64().with_context(|| format!("iperf3 UDP JSON for {}: no end.sum.packets", path.name))?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).unwrap_or(f64::from(seconds));
    Ok((packets - lost) / secs / 1e3)
}

/// Median round trip of 1-byte UDP request/response, in microseconds.
fn udp_rr(path: &Path, iterations: usize, port: u16) -> Result<f64> {
    let ip = path.server_ip;
    let server = path.server.run_in(move || std::net::UdpSocket::bind((ip, port)))??;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    std::thread::scope(|scope| {
        let echo = scope.spawn(move || {
            let mut b = [0u8; 1];
            while let Ok((_, from)) = server.recv_from(&mut b) {
                if server.send_to(&b, from).is_err() {
                    break;
                }
            }
        });
        let result = path.client.run_in(move || -> Result<f64> {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect((ip, port))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut b = [0u8; 1];
            let mut rtts = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                s.send(&b)?;
                s.recv(&mut b).with_context(|| format!("UDP echo reply from {ip}:{port}"))?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(median(&mut rtts))
        })?;
        let _ = echo.join();
        result
    })
}

/// New TCP connections per second from `client` to `server_ip:port` (connect, 1 byte each
/// way, close) during `window`; every one is a new masquerade translation.
fn connection_rate(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs, port: u16, window: Duration) -> Result<f64> {
    let listener = server.run_in(move || TcpListener::bind((server_ip, port)))??;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let done = &done;
        scope.spawn(move || {
            listener.set_nonblocking(true).ok();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let mut b = [0u8; 1];
                        s.set_nonblocking(false).ok();
                        if s.read_exact(&mut b).is_ok() {
                            let _ = s.write_all(&b);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(50)),
                }
            }
        });
        let result = client.run_in(move || -> Result<f64> {
            let started = Instant::now();
            let mut count = 0u64;
            while started.elapsed() < window {
                let mut s = TcpStream::connect_timeout(&(server_ip, port).into(), Duration::from_secs(2))
                    .with_context(|| format!("TCP connect to {server_ip}:{port}"))?;
                let mut b = [1u8; 1];
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                count += 1;
            }
            Ok(count as f64 / started.elapsed().as_secs_f64())
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result?
    })
}

/// Median round trip of 1-byte TCP request/response over one connection to
/// `path.rr_ip:port` (served at `path.server_ip:port`), in microseconds.
fn tcp_rr(path: &Path, iterations: usize, port: u16) -> Result<f64> {
    let (ip, target) = (path.server_ip, SocketAddr::from((path.rr_ip, port)));
    let listener = path.server.run_in(move || TcpListener::bind((ip, port)))??;
    std::thread::scope(|scope| {
        scope.spawn(move || -> Result<()> {
            let (mut s, _) = accept_within(&listener, Duration::from_secs(10))
                .with_context(|| format!("no connection to {ip}:{port}"))?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b)?;
            }
            Ok(())
        });
        path.client.run_in(move || -> Result<f64> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .with_context(|| format!("TCP connect to {target}"))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 1];
            let mut rtts = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                s.write_all(&b)?;
                s.read_exact(&mut b).with_context(|| format!("TCP RR reply from {target}"))?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(median(&mut rtts))
        })?
    })
}

// ---- Per-program cost (BPF_PROG_TEST_RUN) ------------------------------------------------

/// TC_ACT_UNSPEC (-1) as BPF_PROG_TEST_RUN reports it: TCX runs the next program, then the
/// stack takes the packet.
const TC_ACT_NEXT: u32 = u32::MAX;

/// Sum over CPUs of every slot of `fl_stats_v1`.
fn stat_counts(stats: &PerCpuArray<MapData, u64>) -> Result<Vec<u64>> {
    (0..STAT_SLOTS)
        .map(|slot| Ok(stats.get(&slot, 0).with_context(|| format!("reading {STATS_MAP}[{slot}]"))?.iter().sum()))
        .collect()
}

fn stat_name(slot: u32) -> &'static str {
    Stat::ALL.iter().find(|s| **s as u32 == slot).map_or("unnamed", |s| s.name())
}

/// Mean kernel-reported duration, in ns, of `runs` BPF_PROG_TEST_RUN calls of `program` on
/// `data` with `repeat: 1`: every run starts from a fresh copy of the crafted packet, so
/// every run takes the same path (with `repeat` > 1 the kernel reruns the program on the
/// packet the previous repeat rewrote, which is another path after an encapsulation or a
/// translation). Fails unless every run returned `expect_retval` and the runs took the path
/// they are meant to measure: `stat_slot`'s counter (summed over CPUs) rose by exactly
/// `runs`; with `None` (a path no counter records, such as a pass-through) no counter moved.
fn cost(
    program: &SchedClassifier,
    data: &[u8],
    runs: u32,
    expect_retval: u32,
    stats: &PerCpuArray<MapData, u64>,
    stat_slot: Option<u32>,
) -> Result<f64> {
    let before = stat_counts(stats)?;
    let mut total_ns = 0u128;
    for run in 0..runs {
        let result = program
            .test_run(TestRunOptions { data_in: Some(data), repeat: 1, ..Default::default() })
            .with_context(|| format!("BPF_PROG_TEST_RUN {run} of {runs}"))?;
        ensure!(
            result.return_value == expect_retval,
            "run {run} of {runs} returned {:#x}, expected {expect_retval:#x}",
            result.return_value
        );
        total_ns += result.duration.as_nanos();
    }
    let after = stat_counts(stats)?;
    for (slot, (b, a)) in (0..STAT_SLOTS).zip(before.iter().zip(&after)) {
        let rose = a - b;
        match stat_slot {
            Some(expected) if expected == slot => ensure!(
                rose == u64::from(runs),
                "{STATS_MAP} slot {slot} ({}) rose by {rose} over {runs} runs, expected {runs}",
                stat_name(slot)
            ),
            None => ensure!(
                rose == 0,
                "{STATS_MAP} slot {slot} ({}) rose by {rose} over {runs} runs of a path no counter records",
                stat_name(slot)
            ),
            Some(_) => {}
        }
    }
    Ok(total_ns as f64 / f64::from(runs))
}

/// `fl_stats_v1` taken out of `ebpf` (the loaded programs keep using it).
fn stats_map(ebpf: &mut Ebpf) -> Result<PerCpuArray<MapData, u64>> {
    let map = ebpf.take_map(STATS_MAP).with_context(|| format!("no {STATS_MAP} in the object"))?;
    PerCpuArray::try_from(map).with_context(|| format!("{STATS_MAP} as a per-CPU array of u64"))
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SchedClassifier> {
    let program = ebpf.program(name).with_context(|| format!("no program {name} in the object"))?;
    program.try_into().with_context(|| format!("{name} is not a TC program"))
}

/// One row of the program-cost table: a crafted packet through one program, and what every
/// run must show to have taken the path the row names (see [`cost`]).
struct Case<'a> {
    name: &'static str,
    program: &'a SchedClassifier,
    /// The `fl_stats_v1` of the program's object.
    stats: &'a PerCpuArray<MapData, u64>,
    frame: Vec<u8>,
    retval: u32,
    stat_slot: Option<u32>,
}

/// (row name, frame length, ns per run) of each eBPF program on a crafted packet, with
/// [`cost`].
fn program_costs(runs: u32) -> Result<Vec<(&'static str, usize, f64)>> {
    // Forwarding: node 192.0.2.11 (10.244.1.0/24) with a vxlan peer 192.0.2.12 holding
    // 10.244.2.0/24 (`ebpf_node::node_object`), once as default and once with the bypass.
    let me = Ipv4Addr::new(192, 0, 2, 11);
    let (my_vtep, peer_vtep) = ([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x12]);
    let peer = Ipv4Addr::new(192, 0, 2, 12);
    let mut default = node_object(me, my_vtep, peer, peer_vtep)?;
    let default_stats = stats_map(&mut default)?;
    let mut bypass = bypass_node_object(me, my_vtep, peer, peer_vtep)?;
    let bypass_stats = stats_map(&mut bypass)?;
    let (pod, remote_pod) = (ebpf_node::POD, Ipv4Addr::new(10, 244, 2, 3));
    let routed = packet::udp4(ebpf_node::POD_MAC, ebpf_node::BRIDGE_MAC, pod, remote_pod, 40000, 5201, &[0; 64]);
    let delivered = packet::udp4(ebpf_node::BRIDGE_MAC, ebpf_node::POD_MAC, remote_pod, pod, 5201, 40000, &[0; 64]);
    let mut cases = vec![
        Case {
            name: "TC fl_tunnel_egress: inner MACs + tunnel key (stack → remote pod)",
            program: classifier(&default, "fl_tunnel_egress")?,
            stats: &default_stats,
            frame: routed.clone(),
            retval: TC_ACT_NEXT,
            stat_slot: Some(Stat::Encapsulated as u32),
        },
        Case {
            name: "TC fl_tunnel_egress, --netfilter-bypass: the same + stack-flow record",
            program: classifier(&bypass, "fl_tunnel_egress")?,
            stats: &bypass_stats,
            frame: routed,
            retval: TC_ACT_NEXT,
            stat_slot: Some(Stat::Encapsulated as u32),
        },
        Case {
            name: "TC fl_bridge_egress, --netfilter-bypass: stack-flow record (stack → local pod)",
            program: classifier(&bypass, "fl_bridge_egress")?,
            stats: &bypass_stats,
            frame: delivered,
            retval: TC_ACT_NEXT,
            stat_slot: None,
        },
    ];

    // Masquerade: node 192.0.2.10, cluster network 10.244.0.0/16 (`ebpf_node::snat_object`).
    let mut nat = snat_object(1024, 32767)?;
    let nat_stats = stats_map(&mut nat)?;
    let snat = classifier(&nat, "fl_snat_egress")?;
    let pod = Ipv4Addr::new(10, 244, 1, 2);
    let to_outside = packet::tcp4_flags(pod, Ipv4Addr::new(203, 0, 113, 10), 40000, 443, packet::TCP_SYN, &[0; 52]);
    // Warm-up: the first packet creates the translation (proven by the new-mapping counter),
    // so that every measured run finds it.
    cost(snat, &to_outside, 1, TC_ACT_NEXT, &nat_stats, Some(Stat::SnatNewMapping as u32))
        .context("fl_snat_egress: creating the masquerade translation")?;
    // And one whose port the reply row knows: the pod's own 20000 is in range and free, so
    // the translation keeps it.
    let (node, server) = (Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(203, 0, 113, 10));
    let kept_port = packet::tcp4_flags(pod, server, 20000, 443, packet::TCP_SYN, &[0; 52]);
    cost(snat, &kept_port, 1, TC_ACT_NEXT, &nat_stats, Some(Stat::SnatNewMapping as u32))
        .context("fl_snat_egress: creating the translation the reply row uses")?;
    let snat_in = classifier(&nat, "fl_snat_ingress")?;
    // What the node sends to a vxlan peer also leaves through the external interface.
    let inner = packet::udp4(ebpf_node::POD_MAC, ebpf_node::BRIDGE_MAC, pod, remote_pod, 40000, 5201, &[0; 64]);
    let vxlan_peer = Ipv4Addr::new(192, 0, 2, 12);
    cases.extend([
        Case {
            name: "TC fl_snat_egress: translate (pod → outside, existing translation)",
            program: snat,
            stats: &nat_stats,
            frame: to_outside,
            retval: TC_ACT_NEXT,
            stat_slot: Some(Stat::SnatTranslated as u32),
        },
        // Nothing counts a skip; that no counter moves (no translation, no new mapping, no
        // drop) is what tells it from a translation, which returns the same verdict.
        Case {
            name: "TC fl_snat_egress: skip (pod → cluster)",
            program: snat,
            stats: &nat_stats,
            frame: packet::tcp4(pod, Ipv4Addr::new(10, 244, 9, 9), 40000, 443, &[0; 52]),
            retval: TC_ACT_NEXT,
            stat_slot: None,
        },
        Case {
            name: "TC fl_snat_egress: skip (node → vxlan peer, decided from the IPv4 header)",
            program: snat,
            stats: &nat_stats,
            frame: packet::vxlan4(node, vxlan_peer, 40000, 8472, ebpf_node::VNI, &inner),
            retval: TC_ACT_NEXT,
            stat_slot: None,
        },
        Case {
            name: "TC fl_snat_ingress: translate back (reply → pod)",
            program: snat_in,
            stats: &nat_stats,
            frame: packet::tcp4(server, node, 443, 20000, &[0; 52]),
            retval: TC_ACT_NEXT,
            stat_slot: Some(Stat::SnatReplyTranslated as u32),
        },
        Case {
            name: "TC fl_snat_ingress: skip (vxlan from a peer: no translation owns it)",
            program: snat_in,
            stats: &nat_stats,
            frame: packet::vxlan4(vxlan_peer, node, 40000, 8472, ebpf_node::VNI, &inner),
            retval: TC_ACT_NEXT,
            stat_slot: None,
        },
    ]);
    cases
        .iter()
        .map(|case| {
            let ns = cost(case.program, &case.frame, runs, case.retval, case.stats, case.stat_slot)
                .with_context(|| format!("program cost: {}", case.name))?;
            Ok((case.name, case.frame.len(), ns))
        })
        .collect()
}

// ---- The chart ----------------------------------------------------------------------------

/// The chart's bars per path group (legend, colour): ratios × flannel-classic, each oriented
/// so that higher is better.
fn chart_metrics() -> [(String, RGBColor); 4] {
    [
        ("TCP stream".into(), RGBColor(31, 119, 180)),
        (format!("TCP stream -P {PARALLEL_STREAMS}"), RGBColor(255, 127, 14)),
        ("TCP RR (classic latency / ours)".into(), RGBColor(44, 160, 44)),
        ("64 B UDP received".into(), RGBColor(214, 39, 40)),
    ]
}

/// A grouped bar chart (one group per path in `labels`, one bar per [`chart_metrics`]) with
/// a line at 1.0 (flannel-classic), as SVG at `path`. Non-finite ratios (no base) get no bar.
fn write_chart(path: &FsPath, title: &str, labels: &[&str], ratios: &[[f64; 4]]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let root = SVGBackend::new(path, (1280, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    // Headroom above the tallest bar for the legend in the upper right corner.
    let top = ratios.iter().flatten().copied().filter(|r| r.is_finite()).fold(1.0, f64::max) * 1.35;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        // One category per path, each spanning 0..1 for its bars.
        .build_cartesian_2d(labels.nested_coord(|_| 0.0..1.0), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Fewer labels than twice the categories: one label per category, none inside.
        .x_labels(labels.len())
        .x_label_formatter(&|value| match value {
            NestedValue::Category(label) => label.to_string(),
            NestedValue::Value(..) => String::new(),
        })
        .y_desc("× flannel-classic vxlan")
        .draw()?;
    let metrics = chart_metrics();
    let width = 0.8 / metrics.len() as f64;
    let value_style = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, (metric, color)) in metrics.into_iter().enumerate() {
        let left = 0.1 + width * k as f64;
        let bars: Vec<(&&str, f64)> =
            labels.iter().zip(ratios).map(|(label, r)| (label, r[k])).filter(|(_, r)| r.is_finite()).collect();
        chart
            .draw_series(bars.iter().map(|&(label, r)| {
                Rectangle::new(
                    [(NestedValue::Value(label, left), 0.0), (NestedValue::Value(label, left + width), r)],
                    color.filled(),
                )
            }))?
            .label(metric)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        // Anchored through an EmptyElement: plotters' Text in chart coordinates wants them
        // 'static, and ours borrow the labels.
        chart.draw_series(bars.iter().map(|&(label, r)| {
            EmptyElement::at((NestedValue::Value(label, left + width / 2.0), r))
                + Text::new(format!("{r:.2}"), (0, 0), value_style.clone())
        }))?;
    }
    let (first, last) = (&labels[0], &labels[labels.len() - 1]);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(NestedValue::Value(first, 0.0), 1.0), (NestedValue::Value(last, 1.0), 1.0)],
            BLACK.stroke_width(1),
        )))?
        .label("1.0 = flannel-classic")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = BenchArgs::from_env();
    let params = Params::new(&args)?;
    flannel_tests::require_root()?;
    let labs = LABS
        .iter()
        .map(|spec| {
            let config = LabConfig {
                nodes: 2,
                pods_per_node: 1,
                backend: spec.backend.into(),
                datapath: spec.datapath.into(),
                agent_args: spec.agent_args.iter().map(|a| a.to_string()).collect(),
                ..LabConfig::default()
            };
            Lab::start(config).with_context(|| format!("starting the lab {}", spec.name))
        })
        .collect::<Result<Vec<_>>>()?;
    for (spec, lab) in LABS.iter().zip(&labs) {
        install_services(lab).with_context(|| format!("kube-proxy's rules in the lab {}", spec.name))?;
        for node in &lab.nodes {
            for pod in &node.pods {
                // Connection-rate runs reuse client ports quickly.
                pod.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            }
        }
    }
    let classic = &labs[CLASSIC];
    let underlay = Path::direct(
        "bare underlay, node → node".into(),
        &classic.nodes[0].ns,
        &classic.nodes[1].ns,
        classic.nodes[1].ip,
    );
    let paths: Vec<Path> =
        std::iter::once(underlay).chain(LABS.iter().zip(&labs).map(|(s, l)| Path::pod_to_pod(s, l))).collect();
    let services: Vec<Path> = LABS.iter().zip(&labs).map(|(s, l)| Path::pod_to_cluster_ip(s, l)).collect();
    let masq_labs = [("iptables MASQUERADE + conntrack (netlink datapath)", CLASSIC), ("our eBPF SNAT", EBPF_VXLAN)];
    let mut samples: Vec<Samples> = paths.iter().map(|_| Samples::default()).collect();
    let mut service_samples: Vec<ServiceSamples> = services.iter().map(|_| ServiceSamples::default()).collect();
    let mut masq: Vec<MasqSamples> = masq_labs.iter().map(|_| MasqSamples::default()).collect();
    let mut port = 40000;
    for round in 1..=params.rounds {
        let progress = |what: &str| eprintln!("[bench] round {round}/{}: {what}", params.rounds);
        for (path, s) in paths.iter().zip(&mut samples) {
            progress(&path.name);
            s.gbps.push(iperf3(path, params.seconds, 1)?);
            s.gbps_parallel.push(iperf3(path, params.seconds, PARALLEL_STREAMS)?);
            port += 1;
            s.rr_us.push(tcp_rr(path, params.rr_iterations, port)?);
            port += 1;
            s.udp_rr_us.push(udp_rr(path, params.rr_iterations, port)?);
            s.small_kpps.push(small_udp_rate(path, params.seconds)?);
        }
        for (path, s) in services.iter().zip(&mut service_samples) {
            progress(&path.name);
            s.gbps.push(iperf3(path, params.seconds, 1)?);
            s.rr_us.push(tcp_rr(path, params.rr_iterations, SERVICE_RR_PORT)?);
        }
        for ((name, index), m) in masq_labs.iter().zip(&mut masq) {
            progress(&format!("masquerade: {name}"));
            let (lab, pod) = (&labs[*index], &labs[*index].nodes[0].pods[0]);
            port += 1;
            m.conns_per_s.push(connection_rate(&lab.external, lab::EXTERNAL_IP, &pod.ns, port, params.conn_window)?);
            let to_external = Path::direct(name.to_string(), &pod.ns, &lab.external, lab::EXTERNAL_IP);
            m.gbps.push(iperf3(&to_external, params.seconds, 1)?);
        }
    }

    let rows: Vec<(&str, [f64; 5])> = paths
        .iter()
        .zip(&mut samples)
        .map(|(p, s)| {
            let columns = [&mut s.gbps, &mut s.gbps_parallel, &mut s.rr_us, &mut s.udp_rr_us, &mut s.small_kpps];
            (p.name.as_str(), columns.map(|c| median(c)))
        })
        .collect();
    // Row 0 is the underlay, row 1 + CLASSIC flannel-classic's pod → pod.
    let (base, classic) = (rows[0].1, rows[1 + CLASSIC].1);

    println!("\n## Datapath\n");
    println!("Machine: {}", machine());
    println!("{}", args.command_line("datapath"));
    println!(
        "Rounds: {} interleaved; iperf3 {} s per run (1 stream, and -P {PARALLEL_STREAMS} summed); TCP/UDP RR: {} \
         1-byte round trips; 64-byte UDP: iperf3 -u -b 0 -l 64, received; medians. Ratios: × underlay / × \
         flannel-classic.\n",
        params.rounds, params.seconds, params.rr_iterations
    );
    println!(
        "| path | TCP stream | ratios | TCP stream -P {PARALLEL_STREAMS} | ratios | TCP RR | ratios | UDP RR | ratios \
         | 64 B UDP received | ratios |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ratios =
        |values: &[f64; 5], i: usize| format!("{} / {}", ratio(values[i], base[i]), ratio(values[i], classic[i]));
    for (name, v) in &rows {
        println!(
            "| {name} | {:.2} Gbit/s | {} | {:.2} Gbit/s | {} | {:.1} µs | {} | {:.1} µs | {} | {:.0} kpps | {} |",
            v[0],
            ratios(v, 0),
            v[1],
            ratios(v, 1),
            v[2],
            ratios(v, 2),
            v[3],
            ratios(v, 3),
            v[4],
            ratios(v, 4),
        );
    }

    let service_rows: Vec<(&str, f64, f64)> = services
        .iter()
        .zip(&mut service_samples)
        .map(|(p, s)| (p.name.as_str(), median(&mut s.gbps), median(&mut s.rr_us)))
        .collect();
    let (_, classic_gbps, classic_rr) = service_rows[CLASSIC];
    println!(
        "\n| ClusterIP (kube-proxy iptables DNAT on the client's node) | TCP stream | × flannel-classic | TCP RR | × \
         flannel-classic |"
    );
    println!("|---|---|---|---|---|");
    for (name, gbps, rr) in &service_rows {
        println!(
            "| {name} | {gbps:.2} Gbit/s | {} | {rr:.1} µs | {} |",
            ratio(*gbps, classic_gbps),
            ratio(*rr, classic_rr)
        );
    }

    let masq_rows: Vec<(&str, f64, f64)> = masq_labs
        .iter()
        .zip(&mut masq)
        .map(|((name, _), m)| (*name, median(&mut m.conns_per_s), median(&mut m.gbps)))
        .collect();
    println!("\n| masquerade, pod → external host | new TCP connections/s | × iptables | TCP stream | × iptables |");
    println!("|---|---|---|---|---|");
    for (name, conns, gbps) in &masq_rows {
        println!(
            "| {name} | {conns:.0} | {} | {gbps:.2} Gbit/s | {} |",
            ratio(*conns, masq_rows[0].1),
            ratio(*gbps, masq_rows[0].2)
        );
    }

    // The chart before the program costs, so that it is written even if they fail.
    let labels: Vec<&str> = std::iter::once("underlay").chain(LABS.iter().map(|l| l.label)).collect();
    let over = |value: f64, base: f64| if base > 0.0 { value / base } else { f64::NAN };
    let chart_ratios: Vec<[f64; 4]> = rows
        .iter()
        .map(|(_, v)| [over(v[0], classic[0]), over(v[1], classic[1]), over(classic[2], v[2]), over(v[4], classic[4])])
        .collect();
    let title = format!(
        "Pod → pod ratios × flannel-classic vxlan, higher is better (TCP RR inverted: classic latency / ours); \
         medians of {} round(s)",
        params.rounds
    );
    write_chart(&params.svg, &title, &labels, &chart_ratios)?;

    println!(
        "\n| eBPF program (BPF_PROG_TEST_RUN, {} runs of 1 repeat each, fresh packet per run) | frame | ns per run \
         |\n|---|---|---|",
        params.test_runs
    );
    for (name, frame_bytes, ns) in program_costs(params.test_runs)? {
        println!("| {name} | {frame_bytes} bytes | {ns:.1} |");
    }
    println!("\nChart of the ratios: {}", params.svg.display());
    Ok(())
}
