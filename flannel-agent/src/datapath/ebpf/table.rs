//! The eBPF datapath's view of the cluster, in two pinned maps kept equal to etcd:
//! `fl_leases_v1`, an LPM trie subnet → (PublicIP, VtepMAC, kind), and `fl_peers_v1`, the
//! PublicIPs holding a vxlan lease (the only accepted VXLAN sources). Changes are applied
//! incrementally; on start whatever an earlier agent left pinned is adopted (mark and
//! sweep, never a flush), so forwarding never sees an empty table.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData,
    },
    Ebpf,
};
use flannel_common::{LeaseEntry, LeaseKind, LEASES_MAP, PEERS_MAP};
use ipnet::Ipv4Net;

use crate::{
    config::Backend,
    datapath::{LeaseEvent, LocalNode},
    subnet::Lease,
};

pub struct LeaseTable {
    leases: LpmTrie<MapData, [u8; 4], LeaseEntry>,
    peers: HashMap<MapData, [u8; 4], u32>,
    /// How many vxlan leases each PublicIP holds: its peers entry goes with the last one.
    peer_refs: StdHashMap<Ipv4Addr, usize>,
    /// Entries as written, to know what an event replaces without reading the map back.
    written: BTreeMap<Ipv4Net, LeaseEntry>,
    local: Option<LocalNode>,
    /// Networks directly connected to the external interface: host-gw (and vxlan
    /// DirectRouting) peers must be in one of them.
    on_link: Vec<Ipv4Net>,
}

impl LeaseTable {
    /// Takes the lease and peers maps out of the loaded object (pinned or not).
    pub fn take(ebpf: &mut Ebpf) -> Result<LeaseTable> {
        let leases =
            ebpf.take_map(LEASES_MAP).with_context(|| format!("map {LEASES_MAP} is not in the eBPF object"))?;
        let leases = LpmTrie::try_from(leases).with_context(|| format!("{LEASES_MAP} is not an LPM trie"))?;
        let peers = ebpf.take_map(PEERS_MAP).with_context(|| format!("map {PEERS_MAP} is not in the eBPF object"))?;
        let peers = HashMap::try_from(peers).with_context(|| format!("{PEERS_MAP} is not a hash map"))?;
        Ok(LeaseTable {
            leases,
            peers,
            peer_refs: StdHashMap::new(),
            written: BTreeMap::new(),
            local: None,
            on_link: Vec::new(),
        })
    }

    /// Every entry currently in the lease map.
    pub fn entries(&self) -> Result<BTreeMap<Ipv4Net, LeaseEntry>> {
        let mut out = BTreeMap::new();
        for item in self.leases.iter() {
            let (key, entry) = item.context("iterating the lease map")?;
            out.insert(subnet_of(&key)?, entry);
        }
        Ok(out)
    }

    /// Every PublicIP currently in the peers map.
    pub fn peers(&self) -> Result<BTreeSet<Ipv4Addr>> {
        self.peers.keys().map(|k| k.map(Ipv4Addr::from).context("iterating the peers map")).collect()
    }

    /// The networks on the external interface's segment (refreshed by the datapath).
    pub fn set_on_link(&mut self, networks: Vec<Ipv4Net>) {
        self.on_link = networks;
    }

    pub fn set_local(&mut self, local: &LocalNode) -> Result<()> {
        if let Some(old) = self.local.take().filter(|old| old.subnet != local.subnet) {
            self.remove(old.subnet)?;
        }
        let mac = local.vtep_mac.map(|m| m.0).unwrap_or_default();
        let vni = match &local.backend {
            Backend::Vxlan(v) => v.vni,
            _ => 0,
        };
        self.upsert(local.subnet, entry(local.public_ip, LeaseKind::Local, mac, vni))?;
        self.local = Some(local.clone());
        Ok(())
    }

    /// Makes both maps hold exactly `leases` (plus our own subnet).
    pub fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let mut desired: BTreeMap<Ipv4Net, LeaseEntry> =
            leases.iter().filter_map(|l| self.entry_for(l).map(|e| (l.subnet, e))).collect();
        if let Some(local) = &self.local {
            let existing = self.leases.get(&key_of(local.subnet), 0).ok();
            desired.extend(existing.map(|e| (local.subnet, e)));
        }
        // Peers first, so a source is accepted before traffic to its subnet is sent.
        let mut refs: StdHashMap<Ipv4Addr, usize> = StdHashMap::new();
        for e in desired.values().filter(|e| e.kind == LeaseKind::Vxlan as u8) {
            *refs.entry(Ipv4Addr::from(e.public_ip)).or_default() += 1;
        }
        let present_peers = self.peers()?;
        for ip in refs.keys().filter(|ip| !present_peers.contains(ip)) {
            self.peers.insert(ip.octets(), 1, 0).with_context(|| format!("adding {ip} to {PEERS_MAP}"))?;
        }

        let present = self.entries()?;
        let mut swept = 0;
        for subnet in present.keys().filter(|s| !desired.contains_key(s)) {
            self.remove_key(*subnet)?;
            swept += 1;
        }
        let mut written = 0;
        for (subnet, entry) in &desired {
            if present.get(subnet) != Some(entry) {
                self.leases
                    .insert(&key_of(*subnet), *entry, 0)
                    .with_context(|| format!("writing {subnet} to {LEASES_MAP}"))?;
                written += 1;
            }
        }
        let mut peers_swept = 0;
        for ip in present_peers.iter().filter(|ip| !refs.contains_key(ip)) {
            self.remove_peer_key(*ip)?;
            peers_swept += 1;
        }
        self.peer_refs = refs;
        self.written = desired;
        if written > 0 || swept > 0 || peers_swept > 0 {
            tracing::info!(
                kept = present.len() - swept,
                written,
                swept,
                peers = self.peer_refs.len(),
                peers_swept,
                "lease maps reconciled"
            );
        } else {
            tracing::debug!(entries = present.len(), "lease maps already as they should be");
        }
        Ok(())
    }

    pub fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => match self.entry_for(lease) {
                Some(entry) => self.upsert(lease.subnet, entry),
                None => self.remove(lease.subnet),
            },
            LeaseEvent::Removed(lease) => self.remove(lease.subnet),
        }
    }

    fn upsert(&mut self, subnet: Ipv4Net, entry: LeaseEntry) -> Result<()> {
        let old = self.written.get(&subnet).copied();
        if old == Some(entry) {
            if self.leases.get(&key_of(subnet), 0).ok() != Some(entry) {
                // Removed behind our back (bpftool?): put it back; the peer refs are unchanged.
                self.leases.insert(&key_of(subnet), entry, 0).with_context(|| format!("rewriting {subnet}"))?;
            }
            return Ok(());
        }
        if entry.kind == LeaseKind::Vxlan as u8 {
            self.add_peer_ref(Ipv4Addr::from(entry.public_ip))?;
        }
        self.leases.insert(&key_of(subnet), entry, 0).with_context(|| format!("writing {subnet} to {LEASES_MAP}"))?;
        self.written.insert(subnet, entry);
        if let Some(old) = old.filter(|old| old.kind == LeaseKind::Vxlan as u8) {
            self.drop_peer_ref(Ipv4Addr::from(old.public_ip))?;
        }
        Ok(())
    }

    fn remove(&mut self, subnet: Ipv4Net) -> Result<()> {
        self.remove_key(subnet)?;
        if let Some(old) = self.written.remove(&subnet).filter(|old| old.kind == LeaseKind::Vxlan as u8) {
            self.drop_peer_ref(Ipv4Addr::from(old.public_ip))?;
        }
        Ok(())
    }

    fn remove_key(&mut self, subnet: Ipv4Net) -> Result<()> {
        match self.leases.remove(&key_of(subnet)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing {subnet} from {LEASES_MAP}")),
        }
    }

    fn add_peer_ref(&mut self, ip: Ipv4Addr) -> Result<()> {
        let refs = self.peer_refs.entry(ip).or_default();
        *refs += 1;
        if *refs == 1 {
            self.peers.insert(ip.octets(), 1, 0).with_context(|| format!("adding {ip} to {PEERS_MAP}"))?;
        }
        Ok(())
    }

    fn drop_peer_ref(&mut self, ip: Ipv4Addr) -> Result<()> {
        let Some(refs) = self.peer_refs.get_mut(&ip) else { return Ok(()) };
        *refs -= 1;
        if *refs == 0 {
            self.peer_refs.remove(&ip);
            self.remove_peer_key(ip)?;
        }
        Ok(())
    }

    fn remove_peer_key(&mut self, ip: Ipv4Addr) -> Result<()> {
        match self.peers.remove(&ip.octets()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing {ip} from {PEERS_MAP}")),
        }
    }

    /// PublicIPs of remote nodes reached on our L2 segment (their neighbour entries are what
    /// `bpf_redirect_neigh` uses).
    pub fn on_link_peers(&self) -> BTreeSet<Ipv4Addr> {
        self.written
            .values()
            .filter(|e| e.kind == LeaseKind::Vxlan as u8 || e.kind == LeaseKind::HostGw as u8)
            .map(|e| Ipv4Addr::from(e.public_ip))
            .filter(|ip| self.is_on_link(*ip))
            .collect()
    }

    pub fn is_on_link(&self, ip: Ipv4Addr) -> bool {
        self.on_link.iter().any(|n| n.contains(&ip))
    }

    /// The entry for another node's lease, or None when this node cannot reach it.
    fn entry_for(&self, lease: &Lease) -> Option<LeaseEntry> {
        let public_ip = lease.attrs.public_ip;
        let direct_routing =
            matches!(self.local.as_ref().map(|l| &l.backend), Some(Backend::Vxlan(v)) if v.direct_routing);
        match (lease.attrs.backend_type.as_str(), lease.attrs.vxlan()) {
            ("vxlan", Some(_)) if direct_routing && self.is_on_link(public_ip) => {
                Some(entry(public_ip, LeaseKind::HostGw, [0; 6], 0))
            }
            ("vxlan", Some(vxlan)) => Some(entry(public_ip, LeaseKind::Vxlan, vxlan.vtep_mac.0, vxlan.vni)),
            ("host-gw", _) if self.is_on_link(public_ip) => Some(entry(public_ip, LeaseKind::HostGw, [0; 6], 0)),
            ("host-gw", _) => {
                tracing::warn!(
                    subnet = %lease.subnet,
                    %public_ip,
                    "host-gw needs every node on the local L2 segment: this peer is reached through a gateway; not \
                     forwarding to it"
                );
                None
            }
            (other, _) => {
                tracing::warn!(subnet = %lease.subnet, backend = other, "lease of a backend this datapath cannot reach; skipped");
                None
            }
        }
    }
}

fn entry(public_ip: Ipv4Addr, kind: LeaseKind, vtep_mac: [u8; 6], vni: u32) -> LeaseEntry {
    LeaseEntry { public_ip: public_ip.octets(), vtep_mac, kind: kind as u8, _pad: 0, vni }
}

fn key_of(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

pub fn subnet_of(key: &Key<[u8; 4]>) -> Result<Ipv4Net> {
    Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
        .with_context(|| format!("lease map key with prefix length {}", key.prefix_len()))
}
