//! `flannel-agent inspect`: the eBPF datapath's state read straight from the pinned maps and
//! link pins under `--bpf-pin-path` — the same whether the agent runs or not.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, PerCpuArray};
use flannel_common::{
    snat::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, SNAT_EGRESS, SNAT_FLAG_CLOSING},
    EndpointEntry, FlowKey, LeaseEntry, LeaseKind, NodeConfig, SnatEntry, SnatKey, Stat, ENDPOINTS_MAP, LEASES_MAP,
    NODE_MAP, PEERS_MAP, SNAT_MAP, STACK_FLOWS_MAP, STATS_MAP,
};
use serde::Serialize;

use super::decode::{monotonic_ns, subnet_of};
use crate::subnet::lease::Mac;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub pin_root: PathBuf,
    pub node: Option<NodeRow>,
    pub leases: Vec<LeaseRow>,
    pub peers: Vec<Ipv4Addr>,
    /// Local pods the bypass delivers into.
    pub endpoints: Vec<EndpointRow>,
    /// Flows the stack carried whose replies the bypass hands back to it.
    pub stack_flows: usize,
    pub counters: BTreeMap<&'static str, u64>,
    /// Masquerade translations, one row per connection (the egress half).
    pub masquerade: Vec<SnatRow>,
    /// `<interface>/<program>` for every pinned link.
    pub links: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct NodeRow {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub vni: u32,
    pub tunnel_ifindex: u32,
    pub external_ifindex: u32,
    pub bridge_ifindex: u32,
    pub bridge_mac: String,
    pub netfilter_bypass: bool,
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub mac: String,
}

#[derive(Debug, Serialize)]
pub struct LeaseRow {
    pub subnet: String,
    pub kind: &'static str,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub vni: u32,
}

#[derive(Debug, Serialize)]
pub struct SnatRow {
    /// "tcp", "udp", "icmp", or "proto N" for the address-only translations of other
    /// protocols (GRE is "proto 47").
    pub protocol: String,
    /// `pod:port → destination:port`
    pub flow: String,
    /// The node address and port it leaves with (the pod's own for replies of inbound flows).
    pub translated: String,
    pub idle_seconds: u64,
    pub closing: bool,
}

fn open(maps: &Path, name: &str) -> Result<Map> {
    let pin = maps.join(name);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening pinned map {}", pin.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading pinned map {}", pin.display()))
}

/// Reads everything under `pin_root`. Fails when the lease map is not pinned there (no eBPF
/// datapath has run with this pin path).
pub fn snapshot(pin_root: &Path) -> Result<Snapshot> {
    let maps = pin_root.join("maps");
    let leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(open(&maps, LEASES_MAP)?)?;
    let mut lease_rows = Vec::new();
    for item in leases.iter() {
        let (key, entry) = item.context("iterating the lease map")?;
        lease_rows.push(LeaseRow {
            subnet: subnet_of(&key)?.to_string(),
            kind: LeaseKind::from_u8(entry.kind).map_or("unknown", LeaseKind::name),
            public_ip: Ipv4Addr::from(entry.public_ip),
            vtep_mac: Mac(entry.vtep_mac).to_string(),
            vni: entry.vni,
        });
    }
    lease_rows.sort_by_key(|r| r.subnet.parse::<ipnet::Ipv4Net>().ok());

    let node: Array<_, NodeConfig> = Array::try_from(open(&maps, NODE_MAP)?)?;
    let node = node.get(&0, 0).ok().filter(|n| n.ext_ifindex != 0).map(|n| NodeRow {
        public_ip: Ipv4Addr::from(n.public_ip),
        vtep_mac: Mac(n.vtep_mac).to_string(),
        vni: n.vni,
        tunnel_ifindex: n.tunnel_ifindex,
        external_ifindex: n.ext_ifindex,
        bridge_ifindex: n.bridge_ifindex,
        bridge_mac: Mac(n.bridge_mac).to_string(),
        netfilter_bypass: n.bypass != 0,
    });

    let endpoints: HashMap<_, [u8; 4], EndpointEntry> = HashMap::try_from(open(&maps, ENDPOINTS_MAP)?)?;
    let mut endpoint_rows = Vec::new();
    for item in endpoints.iter() {
        let (ip, e) = item.with_context(|| format!("iterating {ENDPOINTS_MAP}"))?;
        endpoint_rows.push(EndpointRow { ip: Ipv4Addr::from(ip), ifindex: e.ifindex, mac: Mac(e.mac).to_string() });
    }
    endpoint_rows.sort_by_key(|r| r.ip);
    let stack_flows: HashMap<_, FlowKey, u64> = HashMap::try_from(open(&maps, STACK_FLOWS_MAP)?)?;
    let stack_flows = stack_flows.keys().count();

    let peers: HashMap<_, [u8; 4], u32> = HashMap::try_from(open(&maps, PEERS_MAP)?)?;
    let mut peer_rows = peers.keys().map(|k| k.map(Ipv4Addr::from)).collect::<Result<Vec<_>, _>>()?;
    peer_rows.sort();

    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(open(&maps, STATS_MAP)?)?;
    let mut counters = BTreeMap::new();
    for stat in Stat::ALL {
        let per_cpu = stats.get(&(stat as u32), 0).with_context(|| format!("reading counter {}", stat.name()))?;
        counters.insert(stat.name(), per_cpu.iter().sum());
    }

    let snat: HashMap<_, SnatKey, SnatEntry> = HashMap::try_from(open(&maps, SNAT_MAP)?)?;
    let now = monotonic_ns();
    let mut masquerade = Vec::new();
    for item in snat.iter() {
        let (key, entry) = item.with_context(|| format!("iterating {SNAT_MAP}"))?;
        if key.direction != SNAT_EGRESS {
            continue;
        }
        masquerade.push(SnatRow {
            protocol: match key.proto {
                IPPROTO_TCP => "tcp".into(),
                IPPROTO_UDP => "udp".into(),
                IPPROTO_ICMP => "icmp".into(),
                proto => format!("proto {proto}"),
            },
            flow: format!(
                "{}:{} → {}:{}",
                Ipv4Addr::from(key.src_ip),
                key.src_port,
                Ipv4Addr::from(key.dst_ip),
                key.dst_port
            ),
            translated: format!("{}:{}", Ipv4Addr::from(entry.to_ip), entry.to_port),
            idle_seconds: now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
            closing: entry.flags & SNAT_FLAG_CLOSING != 0,
        });
    }
    masquerade.sort_by_key(|r| r.idle_seconds);

    Ok(Snapshot {
        pin_root: pin_root.to_path_buf(),
        node,
        leases: lease_rows,
        peers: peer_rows,
        endpoints: endpoint_rows,
        stack_flows,
        counters,
        masquerade,
        links: pinned_links(pin_root),
    })
}

fn pinned_links(pin_root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for interface in super::links::pinned_interfaces(pin_root) {
        let Ok(programs) = std::fs::read_dir(super::links::links_dir(pin_root, &interface)) else { continue };
        for program in programs.flatten() {
            out.push(format!("{interface}/{}", program.file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

/// The snapshot as readable tables.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Pinned under {}", s.pin_root.display());
    match &s.node {
        Some(n) => {
            let _ = writeln!(
                out,
                "\nNode: public IP {}  VtepMAC {}  VNI {}  tunnel ifindex {}  external ifindex {}  pod bridge \
                 ifindex {} ({})  netfilter bypass {}",
                n.public_ip,
                n.vtep_mac,
                n.vni,
                n.tunnel_ifindex,
                n.external_ifindex,
                n.bridge_ifindex,
                n.bridge_mac,
                if n.netfilter_bypass { "on" } else { "off" }
            );
        }
        None => {
            let _ = writeln!(out, "\nNode: not configured yet");
        }
    }
    let _ = writeln!(out, "\nLeases ({}):", s.leases.len());
    let _ = writeln!(out, "  {:<20} {:<8} {:<16} {:<18} {:>8}", "SUBNET", "KIND", "PUBLIC IP", "VTEP MAC", "VNI");
    for l in &s.leases {
        let _ = writeln!(out, "  {:<20} {:<8} {:<16} {:<18} {:>8}", l.subnet, l.kind, l.public_ip, l.vtep_mac, l.vni);
    }
    let peers: Vec<String> = s.peers.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "\nAccepted VXLAN sources ({}): {}", s.peers.len(), peers.join(" "));
    let _ = writeln!(out, "\nLocal pods (bypass endpoints, {}):", s.endpoints.len());
    for e in &s.endpoints {
        let _ = writeln!(out, "  {:<16} veth ifindex {:<6} {}", e.ip, e.ifindex, e.mac);
    }
    let _ = writeln!(out, "\nFlows the stack carried (replies go back to it): {}", s.stack_flows);
    let _ = writeln!(out, "\nCounters (all CPUs):");
    for (name, value) in &s.counters {
        let _ = writeln!(out, "  {name:<28} {value:>14}");
    }
    let _ = writeln!(
        out,
        "\nAttached (pinned links): {}",
        if s.links.is_empty() { "none".into() } else { s.links.join("  ") }
    );
    out
}
