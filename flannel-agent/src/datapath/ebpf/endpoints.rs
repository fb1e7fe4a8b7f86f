//! `fl_endpoints_v1`: the local pods `--netfilter-bypass` delivers into, kept equal to what the
//! pod bridge knows. A pod's IP → MAC comes from the bridge's neighbour table (the node
//! learns it from the pod's first ARP for its gateway, before the pod sends anything else),
//! MAC → host-side veth from the bridge's forwarding database (learned from the same frame).
//! An entry stays while its veth is a port of the bridge (bridge ageing and neighbour
//! garbage collection do not remove it) and goes when the veth goes or another MAC claims
//! the IP. A pod the map does not know yet is simply forwarded by the stack, both ways.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};
use flannel_common::{EndpointEntry, ENDPOINTS_MAP};
use ipnet::Ipv4Net;
use rtnetlink::Handle;

use crate::datapath::kernel;

pub struct EndpointTable {
    map: HashMap<MapData, [u8; 4], EndpointEntry>,
}

impl EndpointTable {
    pub fn take(ebpf: &mut Ebpf) -> Result<EndpointTable> {
        let map =
            ebpf.take_map(ENDPOINTS_MAP).with_context(|| format!("map {ENDPOINTS_MAP} is not in the eBPF object"))?;
        let map = HashMap::try_from(map).with_context(|| format!("{ENDPOINTS_MAP} is not a hash map"))?;
        Ok(EndpointTable { map })
    }

    fn entries(&self) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
        self.map
            .iter()
            .map(|item| item.map(|(ip, e)| (Ipv4Addr::from(ip), e)).context("iterating the endpoint map"))
            .collect()
    }

    /// Makes the map hold the pods of `subnet` behind bridge `bridge` (None: no bridge, no
    /// pods); returns them.
    pub async fn sync(
        &mut self,
        handle: &Handle,
        bridge: Option<u32>,
        subnet: Ipv4Net,
    ) -> Result<BTreeMap<Ipv4Addr, EndpointEntry>> {
        let present = self.entries()?;
        let mut desired: BTreeMap<Ipv4Addr, EndpointEntry> = BTreeMap::new();
        if let Some(bridge) = bridge {
            let ports = kernel::bridge_ports(handle, bridge).await?;
            // What an earlier sync (or agent run) learned stays while its veth is a port.
            desired.extend(present.iter().filter(|(_, e)| ports.contains(&e.ifindex)).map(|(ip, e)| (*ip, *e)));
            let macs: BTreeMap<_, _> = kernel::bridge_learned_macs(handle, bridge)
                .await?
                .into_iter()
                .filter(|(_, port)| ports.contains(port))
                .collect();
            for neighbour in kernel::neighbours(handle, bridge, false).await? {
                if !kernel::neighbour_resolved(&neighbour) {
                    continue;
                }
                let (Some(ip), Some(mac)) = (kernel::neighbour_ip(&neighbour), kernel::neighbour_mac(&neighbour))
                else {
                    continue;
                };
                if let (true, Some(port)) = (subnet.contains(&ip), macs.get(&mac)) {
                    desired.insert(ip, EndpointEntry { ifindex: *port, mac: mac.0, _pad: [0; 2] });
                }
            }
        }
        for ip in present.keys().filter(|ip| !desired.contains_key(ip)) {
            match self.map.remove(&ip.octets()) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(error).with_context(|| format!("removing pod {ip} from {ENDPOINTS_MAP}")),
            }
            tracing::info!(pod = %ip, "pod endpoint removed");
        }
        for (ip, entry) in &desired {
            if present.get(ip) != Some(entry) {
                self.map
                    .insert(ip.octets(), *entry, 0)
                    .with_context(|| format!("writing pod {ip} to {ENDPOINTS_MAP}"))?;
                tracing::info!(pod = %ip, veth = entry.ifindex, mac = %crate::subnet::lease::Mac(entry.mac), "pod endpoint learned");
            }
        }
        Ok(desired)
    }
}
