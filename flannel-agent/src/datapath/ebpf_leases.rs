//! The eBPF datapath's view of the cluster: the pinned LPM trie `fl_leases_v1`
//! (subnet → node address, VtepMAC, kind). The agent keeps it equal to etcd incrementally;
//! on start it adopts whatever an earlier agent left pinned (mark and sweep, never a flush),
//! so forwarding never sees an empty table.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    MapData,
};
use flannel_common::{LeaseEntry, LeaseKind, LEASES_MAP};
use ipnet::Ipv4Net;

use super::{Datapath, LeaseEvent, LocalNode};
use crate::{
    config::Backend,
    ebpf::{bpffs, object},
    subnet::Lease,
};

/// VXLAN's outer headers: 14 Ethernet + 20 IPv4 + 8 UDP + 8 VXLAN.
pub const VXLAN_OVERHEAD: u32 = 50;

pub struct EbpfLeaseMap {
    map: LpmTrie<MapData, [u8; 4], LeaseEntry>,
    local: Option<LocalNode>,
}

impl EbpfLeaseMap {
    /// Opens (creating if needed) the pinned lease map under `<pin_root>/maps`.
    pub fn open(pin_root: &Path) -> Result<EbpfLeaseMap> {
        let maps = pin_root.join("maps");
        bpffs::ensure_pin_dir(&maps)?;
        let mut ebpf = object::load_pinned(&maps)?;
        let map = ebpf.take_map(LEASES_MAP).with_context(|| format!("map {LEASES_MAP} is not in the eBPF object"))?;
        let map = LpmTrie::try_from(map).with_context(|| format!("{LEASES_MAP} is not an LPM trie"))?;
        Ok(EbpfLeaseMap { map, local: None })
    }

    /// Every entry currently in the map.
    pub fn entries(&self) -> Result<BTreeMap<Ipv4Net, LeaseEntry>> {
        let mut out = BTreeMap::new();
        for item in self.map.iter() {
            let (key, entry) = item.context("iterating the lease map")?;
            out.insert(subnet_of(&key)?, entry);
        }
        Ok(out)
    }

    fn upsert(&mut self, subnet: Ipv4Net, entry: LeaseEntry) -> Result<()> {
        let key = key_of(subnet);
        if self.map.get(&key, 0).ok() == Some(entry) {
            return Ok(());
        }
        self.map.insert(&key, entry, 0).with_context(|| format!("writing {subnet} to {LEASES_MAP}"))
    }

    fn remove(&mut self, subnet: Ipv4Net) -> Result<()> {
        match self.map.remove(&key_of(subnet)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing {subnet} from {LEASES_MAP}")),
        }
    }

    fn entry_for(&self, lease: &Lease) -> Option<LeaseEntry> {
        let kind = match (lease.attrs.backend_type.as_str(), lease.attrs.vxlan()) {
            ("vxlan", Some(vxlan)) => {
                return Some(entry(lease.attrs.public_ip, LeaseKind::Vxlan, vxlan.vtep_mac.0, vxlan.vni))
            }
            ("host-gw", _) => LeaseKind::HostGw,
            (other, _) => {
                tracing::warn!(subnet = %lease.subnet, backend = other, "lease of a backend this datapath cannot reach; skipped");
                return None;
            }
        };
        Some(entry(lease.attrs.public_ip, kind, [0; 6], 0))
    }
}

/// FLANNEL_MTU as flanneld computes it: for vxlan, the underlay MTU (the backend's `MTU`
/// option, else the external interface's) minus the 50 bytes of outer headers; otherwise
/// the external interface's MTU.
pub fn pod_mtu(local: &LocalNode) -> u32 {
    match &local.backend {
        Backend::Vxlan(v) => if v.mtu > 0 { v.mtu } else { local.external.mtu }.saturating_sub(VXLAN_OVERHEAD),
        _ => local.external.mtu,
    }
}

fn entry(public_ip: Ipv4Addr, kind: LeaseKind, vtep_mac: [u8; 6], vni: u32) -> LeaseEntry {
    LeaseEntry { public_ip: public_ip.octets(), vtep_mac, kind: kind as u8, _pad: 0, vni }
}

fn key_of(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

fn subnet_of(key: &Key<[u8; 4]>) -> Result<Ipv4Net> {
    Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
        .with_context(|| format!("lease map key with prefix length {}", key.prefix_len()))
}

impl Datapath for EbpfLeaseMap {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        pod_mtu(local)
    }

    async fn set_local(&mut self, local: &LocalNode) -> Result<()> {
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

    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let mut desired: BTreeMap<Ipv4Net, LeaseEntry> =
            leases.iter().filter_map(|l| self.entry_for(l).map(|e| (l.subnet, e))).collect();
        if let Some(local) = &self.local {
            let existing = self.map.get(&key_of(local.subnet), 0).ok();
            desired.extend(existing.map(|e| (local.subnet, e)));
        }
        let present = self.entries()?;
        let mut swept = 0;
        for subnet in present.keys().filter(|s| !desired.contains_key(s)) {
            self.remove(*subnet)?;
            swept += 1;
        }
        let mut written = 0;
        for (subnet, entry) in desired {
            if present.get(&subnet) != Some(&entry) {
                self.map
                    .insert(&key_of(subnet), entry, 0)
                    .with_context(|| format!("writing {subnet} to {LEASES_MAP}"))?;
                written += 1;
            }
        }
        if written > 0 || swept > 0 {
            tracing::info!(kept = present.len() - swept, written, swept, "lease map reconciled");
        } else {
            tracing::debug!(entries = present.len(), "lease map already as it should be");
        }
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => match self.entry_for(lease) {
                Some(entry) => self.upsert(lease.subnet, entry),
                None => self.remove(lease.subnet),
            },
            LeaseEvent::Removed(lease) => self.remove(lease.subnet),
        }
    }
}
