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
    datapath::{forwarding::Forwarding, LocalNode},
    ebpf::decode::subnet_of,
};

pub struct LeaseTable {
    leases: LpmTrie<MapData, [u8; 4], LeaseEntry>,
    peers: HashMap<MapData, [u8; 4], u32>,
    /// How many vxlan leases each PublicIP holds: its peers entry goes with the last one.
    peer_refs: StdHashMap<Ipv4Addr, usize>,
    /// Entries as written, to know what an event replaces without reading the map back.
    written: BTreeMap<Ipv4Net, LeaseEntry>,
    local: Option<LocalNode>,
}

impl LeaseTable {
    /// Takes the lease and peers maps out of the loaded object (pinned or not).
    pub fn take(ebpf: &mut Ebpf) -> Result<LeaseTable> {
        let leases =
            ebpf.take_map(LEASES_MAP).with_context(|| format!("map {LEASES_MAP} is not in the eBPF object"))?;
        let leases = LpmTrie::try_from(leases).with_context(|| format!("{LEASES_MAP} is not an LPM trie"))?;
        let peers = ebpf.take_map(PEERS_MAP).with_context(|| format!("map {PEERS_MAP} is not in the eBPF object"))?;
        let peers = HashMap::try_from(peers).with_context(|| format!("{PEERS_MAP} is not a hash map"))?;
        Ok(LeaseTable { leases, peers, peer_refs: StdHashMap::new(), written: BTreeMap::new(), local: None })
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

    /// Makes both maps hold exactly `forwarding` (other nodes' subnets as
    /// [`super::super::forwarding::decide`] decided them) plus our own subnet.
    pub fn reconcile(&mut self, forwarding: &BTreeMap<Ipv4Net, Forwarding>) -> Result<()> {
        let mut desired: BTreeMap<Ipv4Net, LeaseEntry> =
            forwarding.iter().map(|(subnet, f)| (*subnet, self.entry_of(f))).collect();
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

    /// Sets `subnet`'s entry from the decision, or removes it (None).
    pub fn set(&mut self, subnet: Ipv4Net, forwarding: Option<Forwarding>) -> Result<()> {
        match forwarding {
            Some(f) => {
                let entry = self.entry_of(&f);
                self.upsert(subnet, entry)
            }
            None => self.remove(subnet),
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

    /// The map entry for a decision. The VNI is ours: flannel.1 sends with its own.
    fn entry_of(&self, forwarding: &Forwarding) -> LeaseEntry {
        let vni = match self.local.as_ref().map(|l| &l.backend) {
            Some(Backend::Vxlan(v)) => v.vni,
            _ => 0,
        };
        match *forwarding {
            Forwarding::Vxlan { vtep_mac, public_ip } => entry(public_ip, LeaseKind::Vxlan, vtep_mac.0, vni),
            Forwarding::Direct { public_ip } => entry(public_ip, LeaseKind::HostGw, [0; 6], 0),
        }
    }
}

fn entry(public_ip: Ipv4Addr, kind: LeaseKind, vtep_mac: [u8; 6], vni: u32) -> LeaseEntry {
    LeaseEntry { public_ip: public_ip.octets(), vtep_mac, kind: kind as u8, _pad: 0, vni }
}

fn key_of(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}
