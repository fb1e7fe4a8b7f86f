//! The classic flannel datapath, programmed through rtnetlink exactly as flanneld programs
//! it — the degraded mode when eBPF cannot be used, and the reference the eBPF datapath is
//! measured against.
//!
//! vxlan: device `flannel.<VNI>` (local = public IP, dev = external interface, nolearning,
//! dstport from config or 8472, MTU = underlay MTU − 50, our VtepMAC, the subnet's base address
//! /32); per remote lease a permanent neighbour `<subnet>.0 → VtepMAC`, an FDB entry
//! `VtepMAC → PublicIP` and a route `<subnet> via <subnet>.0 dev flannel.<VNI> onlink`; with
//! DirectRouting, peers on our L2 segment get `<subnet> via <PublicIP>` instead.
//! host-gw: `<subnet> via <PublicIP> dev <external>`; peers not on our L2 segment are refused.
//!
//! Everything is a replace, and reconcile only removes entries it recognises as its own (our
//! route protocol, our device), so an agent restart changes nothing in the kernel.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use rtnetlink::Handle;

use super::{
    forwarding::{decide, needs_routes, Forwarding},
    kernel::{self, Route, VxlanSpec, ROUTE_PROTOCOL},
    pod_mtu, Datapath, LeaseEvent, LocalNode,
};
use crate::{
    config::{Backend, VxlanConfig},
    subnet::{lease::Mac, Lease},
};

/// The kernel's default VXLAN port, which flannel uses when the config says 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

pub struct NetlinkDatapath {
    handle: Handle,
    local: Option<LocalNode>,
    /// The vxlan device's index once set up.
    vxlan_index: Option<u32>,
    installed: BTreeMap<Ipv4Net, Forwarding>,
}

impl NetlinkDatapath {
    /// Opens an rtnetlink connection in the current network namespace.
    pub fn new() -> Result<NetlinkDatapath> {
        let (connection, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(connection);
        Ok(NetlinkDatapath { handle, local: None, vxlan_index: None, installed: BTreeMap::new() })
    }

    fn local(&self) -> Result<&LocalNode> {
        self.local.as_ref().context("datapath used before set_local")
    }

    pub fn device_name(vni: u32) -> String {
        format!("flannel.{vni}")
    }

    /// Creates `flannel.<VNI>`, or adopts it when it matches, or recreates it when it does not.
    async fn ensure_vxlan_device(&mut self, local: &LocalNode, vxlan: &VxlanConfig) -> Result<u32> {
        let name = Self::device_name(vxlan.vni);
        let mac = local.vtep_mac.context("vxlan backend without a VtepMAC")?;
        let spec = VxlanSpec {
            name: &name,
            vni: vxlan.vni,
            local: local.public_ip,
            underlay: local.external.index,
            port: if vxlan.port == 0 { DEFAULT_VXLAN_PORT } else { vxlan.port },
            mtu: pod_mtu(local),
            mac,
        };
        let existing = kernel::vxlan_link(&self.handle, &name).await?;
        let index = match existing {
            Some(link)
                if !link.external
                    && link.vni == Some(spec.vni)
                    && link.local == Some(spec.local)
                    && link.port == Some(spec.port)
                    && link.learning != Some(true)
                    && link.underlay == Some(spec.underlay) =>
            {
                if link.mtu != Some(spec.mtu) || link.mac != Some(mac) || !link.up {
                    kernel::set_link(&self.handle, link.index, spec.mtu, mac).await?;
                }
                tracing::info!(device = name, "adopted the existing vxlan device");
                link.index
            }
            other => {
                if let Some(link) = other {
                    tracing::warn!(device = name, existing = ?link, "existing vxlan device is incompatible; recreating it");
                    kernel::delete_link(&self.handle, link.index).await?;
                } else if let Some(index) = kernel::link_index(&self.handle, &name).await? {
                    tracing::warn!(device = name, "a non-vxlan link has our device's name; replacing it");
                    kernel::delete_link(&self.handle, index).await?;
                }
                kernel::create_vxlan(&self.handle, &spec).await?;
                tracing::info!(device = name, vni = spec.vni, port = spec.port, mtu = spec.mtu, %mac, "created the vxlan device");
                kernel::link_index(&self.handle, &name).await?.context("vxlan device vanished after creation")?
            }
        };
        // flanneld gives the device the subnet's base address as /32.
        let address = Ipv4Net::new(local.subnet.network(), 32).expect("/32");
        kernel::set_only_address(&self.handle, index, address).await?;
        Ok(index)
    }

    async fn install(&mut self, subnet: Ipv4Net, what: &Forwarding) -> Result<()> {
        let local = self.local()?.clone();
        match what {
            Forwarding::Vxlan { vtep_mac, public_ip } => {
                let index = self.vxlan_index.context("vxlan device not set up")?;
                let gateway = subnet.network();
                kernel::replace_neighbour(&self.handle, index, gateway, *vtep_mac).await?;
                kernel::replace_fdb(&self.handle, index, *vtep_mac, *public_ip).await?;
                kernel::replace_route(&self.handle, subnet, gateway, index, true).await?;
            }
            Forwarding::Direct { public_ip } => {
                kernel::replace_route(&self.handle, subnet, *public_ip, local.external.index, false).await?;
            }
        }
        self.installed.insert(subnet, *what);
        Ok(())
    }

    async fn uninstall(&mut self, subnet: Ipv4Net) -> Result<()> {
        let Some(what) = self.installed.remove(&subnet) else { return Ok(()) };
        let local = self.local()?.clone();
        match what {
            Forwarding::Vxlan { vtep_mac, .. } => {
                let index = self.vxlan_index.context("vxlan device not set up")?;
                kernel::delete_route(&self.handle, subnet, index, ROUTE_PROTOCOL).await?;
                self.delete_vxlan_neighbours(index, |ip, mac| ip == Some(subnet.network()) || mac == Some(vtep_mac))
                    .await?;
            }
            Forwarding::Direct { .. } => {
                kernel::delete_route(&self.handle, subnet, local.external.index, ROUTE_PROTOCOL).await?
            }
        }
        Ok(())
    }

    /// The (subnet, entry) pairs the kernel holds completely: for vxlan the onlink route via
    /// `<subnet>.0` on our device plus the neighbour and the FDB entry; for a direct route the
    /// route via the PublicIP on the external interface.
    async fn present_entries(&self, routes: &[Route]) -> Result<HashSet<(Ipv4Net, Forwarding)>> {
        let local = self.local()?;
        // Indexed, because this runs on every resync over every lease.
        let mut neighbours: HashMap<Ipv4Addr, Mac> = HashMap::new();
        let mut fdb: HashMap<Mac, Vec<Ipv4Addr>> = HashMap::new();
        if let Some(index) = self.vxlan_index {
            for entry in kernel::neighbours(&self.handle, index, false).await? {
                neighbours.extend(kernel::neighbour_ip(&entry).zip(kernel::neighbour_mac(&entry)));
            }
            for entry in kernel::neighbours(&self.handle, index, true).await? {
                if let (Some(mac), Some(dst)) = (kernel::neighbour_mac(&entry), kernel::neighbour_ip(&entry)) {
                    fdb.entry(mac).or_default().push(dst);
                }
            }
        }
        let mut present = HashSet::new();
        for route in routes.iter().filter(|r| r.protocol == ROUTE_PROTOCOL) {
            let Some(gateway) = route.gateway else { continue };
            if route.oif == Some(local.external.index) {
                present.insert((route.dst, Forwarding::Direct { public_ip: gateway }));
            } else if route.oif.is_some() && route.oif == self.vxlan_index && gateway == route.dst.network() {
                if let Some(mac) = neighbours.get(&gateway) {
                    for dst in fdb.get(mac).into_iter().flatten() {
                        present.insert((route.dst, Forwarding::Vxlan { vtep_mac: *mac, public_ip: *dst }));
                    }
                }
            }
        }
        Ok(present)
    }

    /// Deletes neighbour and FDB entries on the vxlan device for which `stale(ip, mac)` holds.
    async fn delete_vxlan_neighbours(
        &self,
        index: u32,
        stale: impl Fn(Option<Ipv4Addr>, Option<Mac>) -> bool,
    ) -> Result<usize> {
        let mut removed = 0;
        for bridge in [false, true] {
            for entry in kernel::neighbours(&self.handle, index, bridge).await? {
                let (ip, mac) = (kernel::neighbour_ip(&entry), kernel::neighbour_mac(&entry));
                // FDB entries are keyed by MAC (their IP is the remote VTEP); neighbours by IP.
                let decisive_ip = if bridge { None } else { ip };
                if stale(decisive_ip, mac) {
                    kernel::delete_neighbour(&self.handle, entry).await?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

impl Datapath for NetlinkDatapath {
    fn name(&self) -> &'static str {
        "netlink"
    }

    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        pod_mtu(local)
    }

    async fn set_local(&mut self, local: &LocalNode) -> Result<()> {
        self.local = Some(local.clone());
        if let Backend::Vxlan(vxlan) = &local.backend {
            if vxlan.gbp {
                tracing::warn!("vxlan GBP is not supported by this agent; ignored");
            }
            let index = self.ensure_vxlan_device(local, vxlan).await?;
            self.vxlan_index = Some(index);
        }
        Ok(())
    }

    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let local = self.local()?.clone();
        let routes = kernel::routes(&self.handle).await?;
        let mut desired = BTreeMap::new();
        for lease in leases {
            if let Some(what) = decide(&local, lease, &routes) {
                desired.insert(lease.subnet, what);
            }
        }
        // Sweep our own routes to subnets that are gone (ours: our protocol, or through our
        // vxlan device, inside the cluster network, never our own subnet).
        let mut swept = 0;
        for route in &routes {
            let ours = route.protocol == ROUTE_PROTOCOL || (route.oif.is_some() && route.oif == self.vxlan_index);
            if ours
                && local.network.contains(&route.dst)
                && route.dst != local.subnet
                && route.dst.prefix_len() > local.network.prefix_len()
                && !desired.contains_key(&route.dst)
            {
                if let Some(oif) = route.oif {
                    kernel::delete_route(&self.handle, route.dst, oif, route.protocol).await?;
                    swept += 1;
                }
            }
        }
        if let Some(index) = self.vxlan_index {
            let gateways: Vec<Ipv4Addr> = desired.keys().map(|s| s.network()).collect();
            let macs: Vec<Mac> = desired
                .values()
                .filter_map(|w| match w {
                    Forwarding::Vxlan { vtep_mac, .. } => Some(*vtep_mac),
                    Forwarding::Direct { .. } => None,
                })
                .collect();
            swept += self
                .delete_vxlan_neighbours(index, |ip, mac| match ip {
                    Some(ip) => !gateways.contains(&ip),
                    None => mac.is_some_and(|m| !macs.contains(&m)),
                })
                .await?;
        }
        // Write only what is missing or different: this also runs every resync interval.
        let present = self.present_entries(&routes).await?;
        self.installed.clear();
        let mut written = 0;
        for (subnet, what) in &desired {
            if !present.contains(&(*subnet, *what)) {
                self.install(*subnet, what).await?;
                written += 1;
            } else {
                self.installed.insert(*subnet, *what);
            }
        }
        if written > 0 || swept > 0 {
            tracing::info!(leases = desired.len(), written, swept, "kernel routes, neighbours and FDB reconciled");
        } else {
            tracing::debug!(leases = desired.len(), "kernel routes, neighbours and FDB already as they should be");
        }
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => {
                // The route table is only consulted for on-link checks; don't dump it per event
                // when the backend needs none.
                let local = self.local()?;
                let routes = if needs_routes(local) { kernel::routes(&self.handle).await? } else { Vec::new() };
                let planned = decide(local, lease, &routes);
                if self.installed.get(&lease.subnet) != planned.as_ref() {
                    self.uninstall(lease.subnet).await?;
                }
                if let Some(what) = planned {
                    self.install(lease.subnet, &what).await?;
                }
                Ok(())
            }
            LeaseEvent::Removed(lease) => self.uninstall(lease.subnet).await,
        }
    }
}
