//! Control-plane benchmark (`cargo xtask bench control-plane`): how long the agent takes to
//! learn N pre-existing leases and deliver them to the datapath interface, event-to-datapath
//! latency of one lease change, and the agent's peak RSS with N leases. Real etcd, real
//! agent binary, real eBPF map; prints a markdown table.
//!
//! The agent binary is measured per datapath (eBPF map updates vs netlink routes + FDB +
//! neighbours) with 1,000 and 10,000 leases: start → READY=1, which the agent only reports
//! once the datapath holds every lease.
//!
//! Arguments (`flannel_tests::bench`): `--leases N` (default 10000), `--quick` (1000 leases,
//! one round), `--smoke` (100 leases: the harness end to end for `cargo xtask test`; numbers
//! meaningless), `--rounds N` (in-process rounds, default 3).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use etcd_client::{Client, Txn, TxnOp};
use flannel_agent::{
    config,
    control::{ControlPlane, Settings},
    daemon::derived_vtep_mac,
    datapath::{
        ebpf::table::LeaseTable,
        forwarding::{self, needs_routes, Forwarding},
        Datapath, LeaseEvent, LocalNode,
    },
    ebpf::object,
    etcd::{EtcdOptions, Registry},
    iface::ExternalInterface,
    subnet::{BackendData, Lease, LeaseAttrs, VxlanBackendData},
};
use flannel_tests::{
    agent_node::{peak_rss_kib, AgentNode, CONFIG_KEY},
    bench::{machine, median, BenchArgs, Mode},
    etcd::EtcdServer,
    PrivateBpffs,
};
use ipnet::Ipv4Net;

const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
const PREFIX: &str = "/coreos.com/network";

struct Args {
    leases: usize,
    /// Lease counts the agent binary is measured with, per datapath.
    agent_sizes: Vec<usize>,
    rounds: usize,
    events: usize,
}

fn parse_args(argv: &BenchArgs) -> Result<Args> {
    let mode = argv.mode();
    let explicit: Option<usize> = argv.value("--leases")?;
    let leases = explicit.unwrap_or(mode.pick(10_000, 1000, 100));
    // A full run measures the agent at both sizes; a short run or an explicit count, once.
    let agent_sizes = if explicit.is_some() || mode != Mode::Full { vec![leases] } else { vec![1000, 10_000] };
    Ok(Args { leases, agent_sizes, rounds: argv.rounds(3)?, events: mode.pick(300, 50, 10) })
}

/// The i-th synthetic peer: subnet 10.x.y.0/24 from 10.0.1.0 up, PublicIP in the
/// documentation ranges (repeating; the control plane does not care).
fn peer(i: usize) -> (String, String) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + ((i as u32 + 1) << 8)), 24).unwrap();
    let ranges = [[198, 51, 100], [203, 0, 113]];
    let r = ranges[i % 2];
    let public_ip = Ipv4Addr::new(r[0], r[1], r[2], (i / 2 % 250) as u8 + 2);
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: BackendData::Vxlan(VxlanBackendData { vni: 1, vtep_mac: derived_vtep_mac(public_ip, i as u32) }),
    };
    (format!("{PREFIX}/subnets/{}-24", subnet.network()), attrs.to_json())
}

/// Writes the config and `count` leases, 100 puts per transaction.
async fn bulk_load(endpoint: &str, count: usize) -> Result<()> {
    let mut client = Client::connect([endpoint], None).await?;
    client.put(CONFIG_KEY, CONFIG, None).await?;
    let mut i = 0;
    while i < count {
        let ops: Vec<TxnOp> = (i..(i + 100).min(count)).map(peer).map(|(k, v)| TxnOp::put(k, v, None)).collect();
        i += ops.len();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

fn local_node(public_ip: Ipv4Addr) -> LocalNode {
    let cfg = config::parse(CONFIG).unwrap();
    let network = cfg.network.unwrap();
    LocalNode {
        subnet: network,
        network,
        public_ip,
        external: ExternalInterface { name: "eth0".into(), index: 2, address: public_ip, mtu: 1500 },
        backend: cfg.backend,
        vtep_mac: Some(derived_vtep_mac(public_ip, 1)),
    }
}

fn settings(public_ip: Ipv4Addr) -> Settings {
    let vxlan = VxlanBackendData { vni: 1, vtep_mac: derived_vtep_mac(public_ip, 1) };
    Settings {
        config: config::parse(CONFIG).unwrap(),
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: BackendData::Vxlan(vxlan),
        },
        ttl_secs: 86400,
        renew_margin: Duration::from_secs(3600),
    }
}

async fn registry(endpoint: &str) -> Result<Registry> {
    Registry::connect(&EtcdOptions { endpoints: vec![endpoint.into()], prefix: PREFIX.into(), ..Default::default() })
        .await
}

/// Counts what it is given and reports each applied event's arrival time.
struct CountingDatapath {
    delivered: usize,
    applied: Option<mpsc::Sender<(Ipv4Net, Instant)>>,
}

impl Datapath for CountingDatapath {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        local.external.mtu
    }
    async fn set_local(&mut self, _: &LocalNode) -> Result<()> {
        Ok(())
    }
    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        self.delivered = leases.len();
        Ok(())
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        if let Some(tx) = &self.applied {
            let _ = tx.send((event.subnet(), Instant::now()));
        }
        Ok(())
    }
}

/// The eBPF datapath's per-lease work alone: each lease through the forwarding decision
/// into the pinned lease and peers maps, as `EbpfDatapath` does it.
struct LeaseMaps {
    table: LeaseTable,
    local: Option<LocalNode>,
}

impl LeaseMaps {
    fn open(pin_root: &std::path::Path) -> Result<LeaseMaps> {
        let maps = pin_root.join("maps");
        std::fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
        Ok(LeaseMaps { table: LeaseTable::take(&mut object::load_pinned(&maps)?)?, local: None })
    }

    /// How to reach `lease`. The bench's network is vxlan without DirectRouting, whose
    /// decision reads no routes (the datapath dumps them only when `needs_routes`).
    fn decide(&self, lease: &Lease) -> Result<Option<Forwarding>> {
        let local = self.local.as_ref().context("lease maps used before set_local")?;
        anyhow::ensure!(!needs_routes(local), "the bench's backend must not need the route table");
        Ok(forwarding::decide(local, lease, &[]))
    }
}

impl Datapath for LeaseMaps {
    fn name(&self) -> &'static str {
        "ebpf-maps"
    }
    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        local.external.mtu
    }
    async fn set_local(&mut self, local: &LocalNode) -> Result<()> {
        self.table.set_local(local)?;
        self.local = Some(local.clone());
        Ok(())
    }
    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let mut desired = BTreeMap::new();
        for lease in leases {
            desired.extend(self.decide(lease)?.map(|f| (lease.subnet, f)));
        }
        self.table.reconcile(&desired)
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        let wanted = match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => self.decide(lease)?,
            LeaseEvent::Removed(_) => None,
        };
        self.table.set(event.subnet(), wanted)
    }
}

/// A fresh node with `leases` leases in etcd: the agent's start → READY=1, its restart →
/// READY=1 (state already in the kernel), and its peak RSS (KiB).
fn agent_start(leases: usize, datapath: &'static str) -> Result<(Duration, Duration, u64)> {
    let mut node = AgentNode::new()?;
    node.datapath = datapath;
    let url = node.etcd.client_url();
    node.ns.run_in(move || -> Result<()> {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(bulk_load(&url, leases))
    })??;
    let started = Instant::now();
    let pid = node.start_agent(&[])?;
    node.wait_ready(Duration::from_secs(300))?;
    let cold = started.elapsed();
    let rss = peak_rss_kib(pid)?;
    node.stop_agent()?;
    let started = Instant::now();
    node.start_agent(&[])?;
    node.wait_ready(Duration::from_secs(300))?;
    let warm = started.elapsed();
    node.stop_agent()?;
    Ok((cold, warm, rss))
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let argv = BenchArgs::from_env();
    let args = parse_args(&argv)?;
    flannel_tests::require_root()?;
    let n = args.leases;
    let mut rows: Vec<(String, String)> = Vec::new();

    // In-process: etcd on loopback with N leases; a fresh node identity per round.
    let etcd = EtcdServer::start()?;
    let endpoint = etcd.client_url();
    let load = Instant::now();
    bulk_load(&endpoint, n).await?;
    eprintln!("[bench] loaded {n} leases in {:?}", load.elapsed());

    let mut to_interface = Vec::new();
    let mut to_map = Vec::new();
    for round in 0..args.rounds {
        let ip = Ipv4Addr::new(192, 0, 2, 10 + round as u8);
        let started = Instant::now();
        let datapath = CountingDatapath { delivered: 0, applied: None };
        let plane =
            ControlPlane::start(registry(&endpoint).await?, settings(ip), local_node(ip), None, datapath).await?;
        to_interface.push(started.elapsed());
        // Every lease but our own: the N loaded plus the earlier rounds' nodes.
        let expected = n + 2 * round;
        anyhow::ensure!(
            plane.datapath().delivered == expected,
            "delivered {} of {expected}",
            plane.datapath().delivered
        );

        let bpffs = PrivateBpffs::mount()?;
        let ip = Ipv4Addr::new(192, 0, 2, 100 + round as u8);
        let started = Instant::now();
        let datapath = LeaseMaps::open(&bpffs.path().join("flannel"))?;
        let plane =
            ControlPlane::start(registry(&endpoint).await?, settings(ip), local_node(ip), None, datapath).await?;
        to_map.push(started.elapsed());
        let entries = plane.datapath().table.entries()?.len();
        let in_etcd = registry(&endpoint).await?.list_leases().await?.kvs.len();
        anyhow::ensure!(entries == in_etcd, "lease map holds {entries} entries, etcd {in_etcd} leases");
    }
    rows.push((
        format!("{n} leases: etcd → datapath interface (in-process, median of {})", args.rounds),
        ms(median(&mut to_interface)),
    ));
    rows.push((
        format!("{n} leases: etcd → eBPF lease map programmed (in-process, median of {})", args.rounds),
        ms(median(&mut to_map)),
    ));

    // Event-to-datapath latency with N leases present.
    let (tx, rx) = mpsc::channel();
    let ip = Ipv4Addr::new(192, 0, 2, 200);
    let datapath = CountingDatapath { delivered: 0, applied: Some(tx) };
    let mut plane =
        ControlPlane::start(registry(&endpoint).await?, settings(ip), local_node(ip), None, datapath).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        plane
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut client = Client::connect([endpoint.as_str()], None).await?;
    let mut latencies = Vec::with_capacity(args.events);
    for i in 0..args.events {
        let (key, value) = peer(n + 1000 + i);
        let subnet: Ipv4Net = format!("{}/24", key.rsplit('/').next().unwrap().trim_end_matches("-24")).parse()?;
        let sent = Instant::now();
        client.put(key, value, None).await?;
        loop {
            let (got, at) = rx.recv_timeout(Duration::from_secs(5)).context("event never reached the datapath")?;
            if got == subnet {
                latencies.push(at - sent);
                break;
            }
        }
    }
    let _ = stop_tx.send(());
    runner.await??;
    rows.push((
        format!("one lease change: etcd put → datapath apply, p50 / p99 of {}", args.events),
        format!("{} / {}", ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99))),
    ));
    drop(etcd);

    // The agent binary: N leases in etcd, start → READY=1 per datapath, peak RSS.
    for &size in &args.agent_sizes {
        let mut ready = Vec::new();
        for datapath in ["ebpf", "netlink"] {
            let (cold, warm, rss) = agent_start(size, datapath)?;
            rows.push((
                format!("agent binary, {datapath} datapath: start → READY=1 (datapath programmed), {size} leases"),
                ms(cold),
            ));
            rows.push((
                format!("agent binary, {datapath} datapath: restart → READY=1, {size} leases already programmed"),
                ms(warm),
            ));
            rows.push((
                format!("agent binary, {datapath} datapath: peak RSS (VmHWM), {size} leases"),
                format!("{:.1} MiB", rss as f64 / 1024.0),
            ));
            ready.push(cold);
        }
        rows.push((
            format!("{size} leases programmed: netlink time / eBPF time"),
            format!("{:.1}×", ready[1].as_secs_f64() / ready[0].as_secs_f64()),
        ));
    }

    println!("\n## Control plane\n");
    println!("Machine: {}", machine());
    println!("{}\n", argv.command_line("control-plane"));
    println!("| measurement | result |\n|---|---|");
    for (what, result) in rows {
        println!("| {what} | {result} |");
    }
    Ok(())
}
