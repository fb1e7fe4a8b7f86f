//! Datapath benchmark (`cargo xtask bench datapath`): side by side in one run, interleaved
//! over rounds (A B C … A B C …), medians and ratios:
//! - node-to-node on the bare underlay (the limit); pod-to-pod across nodes over flannel's
//!   kernel vxlan (our netlink datapath), kernel host-gw routes, our eBPF vxlan and our eBPF
//!   host-gw: TCP stream throughput (iperf3), TCP and UDP request/response latency, and the
//!   rate of 64-byte UDP datagrams received;
//! - masquerade, pod → external host: new TCP connections per second and stream throughput,
//!   eBPF SNAT against iptables MASQUERADE with conntrack;
//! - per-packet cost of the eBPF programs from BPF_PROG_TEST_RUN.
//!
//! Arguments: `--quick` (one round, 1 s streams), `--smoke` (the harness end to end in a few
//! seconds, for `cargo xtask test`; numbers meaningless), `--rounds N` (default 3).

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
    /// How long each connection-rate run lasts.
    conn_window: Duration,
    /// BPF_PROG_TEST_RUN repeats per program.
    repeat: u32,
}

#[path = "../tests/support/ebpf_node.rs"]
mod ebpf_node;
use ebpf_node::{node_object, snat_object};

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let quick = argv.iter().any(|a| a == "--quick");
    let smoke = argv.iter().any(|a| a == "--smoke");
    let rounds = argv.iter().position(|a| a == "--rounds").and_then(|i| argv.get(i + 1)?.parse().ok());
    Args {
        rounds: rounds.unwrap_or(if quick || smoke { 1 } else { 3 }),
        seconds: if quick || smoke { 1 } else { 5 },
        rr_iterations: if smoke {
            100
        } else if quick {
            2_000
        } else {
            20_000
        },
        conn_window: Duration::from_millis(if smoke {
            200
        } else if quick {
            1000
        } else {
            3000
        }),
        repeat: if smoke { 1_000 } else { 1_000_000 },
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
    udp_rr_us: Vec<f64>,
    small_kpps: Vec<f64>,
}

/// Masquerade measurements of one lab's pod → external host path.
#[derive(Default)]
struct MasqSamples {
    conns_per_s: Vec<f64>,
    gbps: Vec<f64>,
}

/// One iperf3 run from the path's client to a one-off server; its JSON report.
fn iperf3_report(path: &Path, seconds: u32, options: &[&str]) -> Result<serde_json::Value> {
    let mut server = path
        .server
        .command("iperf3")
        .args(["-s", "-1", "-B", &path.server_ip.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let report = lab::output(
        path.client
            .command("iperf3")
            .args(["-c", &path.server_ip.to_string(), "-t", &seconds.to_string(), "-J"])
            .args(options),
    );
    let _ = server.kill();
    let _ = server.wait();
    Ok(serde_json::from_str(&report?)?)
}

fn iperf3(path: &Path, seconds: u32) -> Result<f64> {
    let json = iperf3_report(path, seconds, &[])?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 JSON")?;
    Ok(bps / 1e9)
}

/// 64-byte UDP datagrams sent as fast as iperf3 can for `seconds`: thousands received per
/// second at the server.
fn small_udp_rate(path: &Path, seconds: u32) -> Result<f64> {
    let json = iperf3_report(path, seconds, &["-u", "-b", "0", "-l", "64"])?;
    let sum = &json["end"]["sum"];
    let packets = sum["packets"].as_f64().context("iperf3 UDP JSON: packets")?;
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
                s.recv(&mut b).context("UDP echo reply")?;
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
                let mut s = TcpStream::connect_timeout(&(server_ip, port).into(), Duration::from_secs(2))?;
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
fn program_costs(repeat: u32) -> Result<Vec<(String, f64)>> {
    let me = Ipv4Addr::new(192, 0, 2, 11);
    let peer = Ipv4Addr::new(192, 0, 2, 12);
    let (my_vtep, peer_vtep) = ([2, 0, 0, 0, 0, 0x11], [2, 0, 0, 0, 0, 0x12]);
    let ebpf = node_object(me, my_vtep, peer, peer_vtep)?;
    let pod_mac = [0xa, 0, 0, 0, 0, 2];
    let (pod, remote_pod) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 3));
    let to_remote = packet::udp4(pod_mac, [0; 6], pod, remote_pod, 40000, 5201, &[0u8; 64]);
    let to_host_gw = packet::udp4(pod_mac, [0; 6], pod, Ipv4Addr::new(10, 244, 3, 3), 40000, 5201, &[0u8; 64]);
    let inner = packet::udp4(peer_vtep, my_vtep, remote_pod, pod, 5201, 40000, &[0u8; 64]);
    let vxlan = packet::vxlan4(peer, me, 45678, 8472, 1, &inner);
    let other = packet::udp4([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], peer, me, 1234, 53, &[0u8; 64]);
    let per_packet =
        |run: &dyn Fn(TestRunOptions) -> Result<aya::programs::TestRunResult>, data: &[u8]| -> Result<f64> {
            let opts = TestRunOptions { data_in: Some(data), repeat, ..Default::default() };
            Ok(run(opts)?.duration.as_nanos() as f64)
        };
    let egress: &SchedClassifier = ebpf.program("fl_pod_egress").context("program")?.try_into()?;
    let ingress: &Xdp = ebpf.program("fl_underlay_ingress").context("program")?.try_into()?;
    let tc = |o: TestRunOptions| egress.test_run(o).map_err(anyhow::Error::from);
    let xdp = |o: TestRunOptions| ingress.test_run(o).map_err(anyhow::Error::from);

    // Masquerade: the first run creates the translation, every repeat after it reuses it.
    let nat = snat_object(1024, 32767)?;
    let snat: &SchedClassifier = nat.program("fl_snat_egress").context("program")?.try_into()?;
    let snat_run = |o: TestRunOptions| snat.test_run(o).map_err(anyhow::Error::from);
    let outside = Ipv4Addr::new(203, 0, 113, 10);
    let to_outside = packet::tcp4_flags(pod, outside, 40000, 443, packet::TCP_SYN, &[0u8; 52]);
    let snat_ns = per_packet(&snat_run, &to_outside)?;
    let not_natted = packet::tcp4(pod, Ipv4Addr::new(10, 244, 9, 9), 40000, 443, &[0u8; 52]);
    Ok(vec![
        ("TC fl_pod_egress: VXLAN encap (pod → remote pod)".into(), per_packet(&tc, &to_remote)?),
        ("TC fl_pod_egress: host-gw redirect (pod → remote pod)".into(), per_packet(&tc, &to_host_gw)?),
        ("XDP fl_underlay_ingress: VXLAN decap (peer → local pod)".into(), per_packet(&xdp, &vxlan)?),
        ("XDP fl_underlay_ingress: pass-through (not VXLAN)".into(), per_packet(&xdp, &other)?),
        ("TC fl_snat_egress: translate (pod → outside, existing translation)".into(), snat_ns),
        ("TC fl_snat_egress: skip (pod → cluster)".into(), per_packet(&snat_run, &not_natted)?),
    ])
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} cores, Linux {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel.trim())
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}", value / base)
    } else {
        "-".into()
    }
}

fn main() -> Result<()> {
    let args = parse_args();
    flannel_tests::require_root()?;
    // Two pods per lab are enough: one on node 0, one on node 1.
    let small = |backend: &str, datapath: &str| LabConfig {
        nodes: 2,
        pods_per_node: 1,
        backend: backend.into(),
        datapath: datapath.into(),
        ..LabConfig::default()
    };
    let classic = Lab::start(small("vxlan", "netlink"))?;
    let host_gw = Lab::start(small("host-gw", "netlink"))?;
    let ebpf = Lab::start(small("vxlan", "ebpf"))?;
    let ebpf_host_gw = Lab::start(small("host-gw", "ebpf"))?;
    let with_args = |backend: &str, args: &[&str]| LabConfig {
        agent_args: args.iter().map(|a| a.to_string()).collect(),
        ..small(backend, "ebpf")
    };
    let ebpf_tc_decap = Lab::start(with_args("vxlan", &["--vxlan-decap", "tc"]))?;
    let ebpf_bypass = Lab::start(with_args("vxlan", &["--netfilter-bypass"]))?;
    let ebpf_host_gw_bypass = Lab::start(with_args("host-gw", &["--netfilter-bypass"]))?;
    let labs = [classic, host_gw, ebpf, ebpf_host_gw, ebpf_tc_decap, ebpf_bypass, ebpf_host_gw_bypass];
    for lab in labs.iter() {
        for node in &lab.nodes {
            for pod in &node.pods {
                // Connection-rate runs reuse client ports quickly.
                pod.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            }
        }
    }
    let paths = [
        Path {
            name: "bare underlay, node → node",
            client: &labs[0].nodes[0].ns,
            server: &labs[0].nodes[1].ns,
            server_ip: labs[0].nodes[1].ip,
        },
        pod_path("flannel-classic vxlan (kernel vxlan device), pod → pod", &labs[0]),
        pod_path("kernel host-gw routes, pod → pod", &labs[1]),
        pod_path("our eBPF vxlan (XDP decap), pod → pod", &labs[2]),
        pod_path("our eBPF vxlan (--vxlan-decap tc), pod → pod", &labs[4]),
        pod_path("our eBPF host-gw, pod → pod", &labs[3]),
        pod_path("our eBPF vxlan (XDP decap) --netfilter-bypass, pod → pod", &labs[5]),
        pod_path("our eBPF host-gw --netfilter-bypass, pod → pod", &labs[6]),
    ];
    let masq_paths = [("iptables MASQUERADE + conntrack (netlink datapath)", &labs[0]), ("our eBPF SNAT", &labs[2])];
    let mut samples: Vec<Samples> = paths.iter().map(|_| Samples::default()).collect();
    let mut masq: Vec<MasqSamples> = masq_paths.iter().map(|_| MasqSamples::default()).collect();
    let mut port = 40000;
    for round in 0..args.rounds {
        for (path, s) in paths.iter().zip(samples.iter_mut()) {
            eprintln!("[bench] round {} {}", round + 1, path.name);
            s.gbps.push(iperf3(path, args.seconds)?);
            port += 1;
            s.rr_us.push(tcp_rr(path, args.rr_iterations, port)?);
            port += 1;
            s.udp_rr_us.push(udp_rr(path, args.rr_iterations, port)?);
            s.small_kpps.push(small_udp_rate(path, args.seconds)?);
        }
        for ((name, lab), m) in masq_paths.iter().zip(masq.iter_mut()) {
            eprintln!("[bench] round {} masquerade: {name}", round + 1);
            let pod = &lab.nodes[0].pods[0];
            port += 1;
            m.conns_per_s.push(connection_rate(&lab.external, lab::EXTERNAL_IP, &pod.ns, port, args.conn_window)?);
            let to_external = Path { name, client: &pod.ns, server: &lab.external, server_ip: lab::EXTERNAL_IP };
            m.gbps.push(iperf3(&to_external, args.seconds)?);
        }
    }
    let rows: Vec<(&str, [f64; 4])> = paths
        .iter()
        .zip(samples.iter_mut())
        .map(|(p, s)| {
            (p.name, [median(&mut s.gbps), median(&mut s.rr_us), median(&mut s.udp_rr_us), median(&mut s.small_kpps)])
        })
        .collect();
    let (base, classic) = (rows[0].1, rows[1].1);

    println!("\n## Datapath\n");
    println!("Machine: {}", machine());
    let flags: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    println!(
        "Command: `{}`",
        std::iter::once("cargo xtask bench datapath".to_string()).chain(flags).collect::<Vec<_>>().join(" ")
    );
    println!(
        "Rounds: {} interleaved; iperf3 {} s per stream; TCP/UDP RR: {} 1-byte round trips; 64-byte UDP: \
         iperf3 -u -b 0 -l 64, received; medians. Ratios: × underlay / × flannel-classic.\n",
        args.rounds, args.seconds, args.rr_iterations
    );
    println!("| path | TCP stream | ratios | TCP RR | ratios | UDP RR | ratios | 64 B UDP received | ratios |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, [gbps, rr, udp_rr, kpps]) in &rows {
        println!(
            "| {name} | {gbps:.2} Gbit/s | {} / {} | {rr:.1} µs | {} / {} | {udp_rr:.1} µs | {} / {} | {kpps:.0} kpps | {} / {} |",
            ratio(*gbps, base[0]),
            ratio(*gbps, classic[0]),
            ratio(*rr, base[1]),
            ratio(*rr, classic[1]),
            ratio(*udp_rr, base[2]),
            ratio(*udp_rr, classic[2]),
            ratio(*kpps, base[3]),
            ratio(*kpps, classic[3]),
        );
    }
    let masq_rows: Vec<(&str, f64, f64)> = masq_paths
        .iter()
        .zip(masq.iter_mut())
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
    println!(
        "\n| eBPF program (BPF_PROG_TEST_RUN, {} repeats; 106-byte frames, 156-byte VXLAN frame) | ns per packet |\n|---|---|",
        args.repeat
    );
    for (name, ns) in program_costs(args.repeat)? {
        println!("| {name} | {ns:.1} |");
    }
    Ok(())
}

/// Pod on node 0 → pod on node 1 of `lab`.
fn pod_path<'a>(name: &'static str, lab: &'a Lab) -> Path<'a> {
    Path {
        name,
        client: &lab.nodes[0].pods[0].ns,
        server: &lab.nodes[1].pods[0].ns,
        server_ip: lab.nodes[1].pods[0].ip,
    }
}
