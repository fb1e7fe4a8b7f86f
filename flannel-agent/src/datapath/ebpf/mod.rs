//! The eBPF datapath: flannel's forwarding done by the kernel's tunnel machinery steered by
//! our programs and maps instead of per-lease FDB/neighbour/route entries, and masquerade
//! without iptables.
//!
//! | program               | hook                                   | when                          | job |
//! |-----------------------|----------------------------------------|-------------------------------|-----|
//! | `fl_tunnel_egress`    | TC egress of `flannel.<VNI>`           | vxlan                         | stack-routed traffic → inner MACs + tunnel key of the lease |
//! | `fl_tunnel_ingress`   | TC ingress of `flannel.<VNI>`          | vxlan                         | only our VNI, lease holders, our VtepMAC, inner IPv4; bypass: into the pod |
//! | `fl_pod_egress`       | TC ingress of each known pod's veth    | `--netfilter-bypass`          | pod → remote pod without bridge/routing/netfilter |
//! | `fl_bridge_egress`    | TC egress of the pod bridge            | `--netfilter-bypass`          | records flows the stack delivers to pods |
//! | `fl_underlay_ingress` | TC ingress of the external interface   | host-gw + `--netfilter-bypass`| host-gw peer → known pod: into the pod |
//! | `fl_underlay_egress`  | TC egress of the external interface    | host-gw + `--netfilter-bypass`| records flows the stack sends to host-gw peers |
//! | `fl_snat_egress`      | TC egress of the external interface    | `--ip-masq`                   | pod → outside: masquerade |
//! | `fl_snat_ingress`     | TC ingress of the external interface   | `--ip-masq`                   | replies: back to the pod |
//!
//! Direct peers (host-gw, vxlan DirectRouting) get flanneld's kernel route
//! `<subnet> via <PublicIP> dev <external>`: the kernel's own forwarding is the fastest
//! path through netfilter, and the lease map entry serves the bypass.
//!
//! State lives in pinned maps under `<--bpf-pin-path>/maps`, links under
//! `<--bpf-pin-path>/links/<interface>/<program>`. A restarted agent reuses the maps,
//! reconciles them with etcd (mark and sweep) and swaps its programs into the pinned links,
//! so forwarding never stops.

pub mod endpoints;
pub mod snat;
pub mod table;
pub mod tunnel;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    Ebpf,
};
use flannel_common::{NodeConfig, NODE_MAP};
use ipnet::Ipv4Net;
use rtnetlink::Handle;

use self::{endpoints::EndpointTable, snat::SnatOptions, snat::SnatTable, table::LeaseTable};
use super::{
    forwarding::{decide, needs_routes, Forwarding},
    kernel, pod_mtu, Datapath, LeaseEvent, LocalNode,
};
use crate::{
    config::Backend,
    ebpf::{
        bpffs,
        links::{self, Hook},
        object,
    },
    subnet::{lease::Mac, Lease},
};

pub const TUNNEL_EGRESS: &str = "fl_tunnel_egress";
pub const TUNNEL_INGRESS: &str = "fl_tunnel_ingress";
pub const POD_EGRESS: &str = "fl_pod_egress";
pub const BRIDGE_EGRESS: &str = "fl_bridge_egress";
pub const UNDERLAY_INGRESS: &str = "fl_underlay_ingress";
pub const UNDERLAY_EGRESS: &str = "fl_underlay_egress";
pub const SNAT_EGRESS: &str = "fl_snat_egress";
pub const SNAT_INGRESS: &str = "fl_snat_ingress";

/// Every program of the object, all TC classifiers.
pub const PROGRAMS: [&str; 8] = [
    TUNNEL_EGRESS,
    TUNNEL_INGRESS,
    POD_EGRESS,
    BRIDGE_EGRESS,
    UNDERLAY_INGRESS,
    UNDERLAY_EGRESS,
    SNAT_EGRESS,
    SNAT_INGRESS,
];

/// Program pins of earlier versions, removed at start: (interface or None for the external
/// one, program).
const LEGACY_LINKS: [(Option<&str>, &str); 3] =
    [(Some("fl_host"), "fl_host_egress"), (None, "fl_underlay_ingress_tc"), (None, "fl_underlay_ingress")];

/// Where two of our programs share a hook (the external interface's), (first, second) in
/// TCX order; every other program has its hook to itself (among ours) and goes last.
/// - ingress: a masqueraded reply is translated back to the pod address by `fl_snat_ingress`
///   before `fl_underlay_ingress` looks the destination up as a local pod.
/// - egress: the recorder before the masquerade, the mirror image of ingress: SNAT is the
///   outermost stage both ways (as MASQUERADE in POSTROUTING is the last thing before the
///   wire), so the bypass programs always see pod-side addresses. The two never act on the
///   same packet (the recorder only looks at destinations in host-gw peer subnets, which lie
///   inside the cluster network the masquerade leaves alone), so links an earlier version made
///   in the other order are left where they are: moving one would take detach + attach.
const HOOK_ORDER: [(&str, &str); 2] = [(SNAT_INGRESS, UNDERLAY_INGRESS), (UNDERLAY_EGRESS, SNAT_EGRESS)];

/// Where a new link of `program` goes among the programs at its hook (see `HOOK_ORDER`).
pub fn order_of(program: &str) -> links::Order<'static> {
    for (first, second) in HOOK_ORDER {
        if program == first {
            return links::Order::Before(second);
        }
        if program == second {
            return links::Order::After(first);
        }
    }
    links::Order::Last
}

/// TCX links, which make TC programs pinnable and atomically replaceable, came in 6.6.
const MIN_KERNEL: (u32, u32) = (6, 6);

#[derive(Clone, Debug)]
pub struct EbpfOptions {
    /// `--bpf-pin-path`: maps and links are pinned below it.
    pub pin_root: PathBuf,
    /// The bridge pods are attached to (the CNI bridge, `cni0` by default).
    pub pod_bridge: String,
    /// `--ip-masq`: masquerade pod → outside traffic in eBPF with these settings.
    pub masquerade: Option<SnatOptions>,
    /// `--netfilter-bypass`: pod ↔ remote pod traffic skips routing and netfilter both ways.
    pub netfilter_bypass: bool,
}

pub struct EbpfDatapath {
    handle: Handle,
    options: EbpfOptions,
    ebpf: Ebpf,
    table: LeaseTable,
    endpoints: EndpointTable,
    snat: SnatTable,
    node: Array<MapData, NodeConfig>,
    local: Option<LocalNode>,
    /// The tunnel device's index (vxlan).
    tunnel_index: Option<u32>,
    /// The pod bridge's index and MAC once it exists.
    bridge: Option<(u32, Mac)>,
    /// Other nodes' subnets as decided, and the direct routes installed for them.
    forwarding: BTreeMap<Ipv4Net, Forwarding>,
    /// (interface, program) → the interface index it was attached at by this process: a link
    /// found missing, dead or running another program at the same index later was removed
    /// behind our back, and its re-attachment is a repair.
    attached: BTreeMap<(String, &'static str), u32>,
    /// Links repaired so (see `attached`).
    link_repairs: u64,
    legacy_removed: bool,
    /// Link and neighbour notifications: the pod bridge appearing, pods coming and going.
    kernel_events: KernelEvents,
}

/// Notifications the kernel sent: a link appeared or changed (its name), or a neighbour or
/// forwarding-database entry changed.
type KernelEvents = tokio::sync::mpsc::UnboundedReceiver<KernelEvent>;

#[derive(Debug)]
enum KernelEvent {
    Link(String),
    Neighbour,
}

impl EbpfDatapath {
    /// Loads the programs (the verifier runs now, so a kernel that cannot run them fails here,
    /// before anything is changed) with the maps pinned under the pin root.
    pub fn open(options: EbpfOptions) -> Result<EbpfDatapath> {
        check_kernel()?;
        let maps = options.pin_root.join("maps");
        bpffs::ensure_pin_dir(&maps)?;
        let mut ebpf = object::load_pinned(&maps)?;
        for program in PROGRAMS {
            links::loaded(&mut ebpf, program)?;
        }
        let table = LeaseTable::take(&mut ebpf)?;
        let endpoints = EndpointTable::take(&mut ebpf)?;
        let snat = SnatTable::take(&mut ebpf)?;
        let node = ebpf.take_map(NODE_MAP).with_context(|| format!("map {NODE_MAP} is not in the eBPF object"))?;
        let node = Array::try_from(node).with_context(|| format!("{NODE_MAP} is not an array"))?;
        let (connection, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(connection);
        let kernel_events = subscribe_kernel_events()?;
        Ok(EbpfDatapath {
            handle,
            options,
            ebpf,
            table,
            endpoints,
            snat,
            node,
            local: None,
            tunnel_index: None,
            bridge: None,
            forwarding: BTreeMap::new(),
            attached: BTreeMap::new(),
            link_repairs: 0,
            legacy_removed: false,
            kernel_events,
        })
    }

    fn write_node_config(&mut self, local: &LocalNode) -> Result<()> {
        let vni = match &local.backend {
            Backend::Vxlan(v) => v.vni,
            _ => 0,
        };
        let masquerade = self.options.masquerade;
        let (bridge_ifindex, bridge_mac) = self.bridge.map_or((0, [0; 6]), |(index, mac)| (index, mac.0));
        let config = NodeConfig {
            public_ip: local.public_ip.octets(),
            vtep_mac: local.vtep_mac.map(|m| m.0).unwrap_or_default(),
            bypass: u8::from(self.options.netfilter_bypass),
            vni,
            tunnel_ifindex: self.tunnel_index.unwrap_or(0),
            ext_ifindex: local.external.index,
            bridge_ifindex,
            bridge_mac,
            network: local.network.network().octets(),
            network_prefix: local.network.prefix_len(),
            snat: u8::from(masquerade.is_some()),
            // MASQUERADE's choice: the address of the interface the packet leaves through.
            snat_ip: local.external.address.octets(),
            snat_port_min: masquerade.map_or(0, |m| m.port_min),
            snat_port_max: masquerade.map_or(0, |m| m.port_max),
            ..Default::default()
        };
        if self.node.get(&0, 0).ok() != Some(config) {
            self.node.set(0, config, 0).with_context(|| format!("writing {NODE_MAP}"))?;
            tracing::info!(
                public_ip = %local.public_ip,
                vni,
                tunnel = config.tunnel_ifindex,
                external = local.external.name,
                bridge = bridge_ifindex,
                bypass = self.options.netfilter_bypass,
                "node settings written to {NODE_MAP}"
            );
        }
        Ok(())
    }

    /// Makes `program` run at `hook` of `interface` (index `index`) through its pinned link.
    /// Called at start, on kernel changes and at every resync, so each call checks the pin:
    /// one that is missing, holds a dead link or one on another interface, or runs another
    /// program is put right (see `links::attach`); for a link this process attached at the
    /// same index, that is a repair, counted and logged.
    fn attach_once(&mut self, program: &'static str, interface: &str, index: u32, hook: Hook) -> Result<()> {
        let key = (interface.to_string(), program);
        let ours = self.attached.get(&key) == Some(&index);
        let done = links::attach(&mut self.ebpf, program, interface, hook, &self.options.pin_root, order_of(program))?;
        if ours && done != links::Attached::Unchanged {
            self.link_repairs += 1;
            tracing::warn!(
                interface,
                program,
                ?done,
                repairs = self.link_repairs,
                "a program link was removed or changed behind our back: repaired"
            );
        }
        self.attached.insert(key, index);
        Ok(())
    }

    /// Links found missing, dead or changed and repaired since start.
    pub fn link_repairs(&self) -> u64 {
        self.link_repairs
    }

    /// Attaches `programs` when `on`, else removes their links (an earlier run's).
    fn attach_if(&mut self, on: bool, interface: &str, index: u32, programs: &[(&'static str, Hook)]) -> Result<()> {
        for (program, hook) in programs {
            if on {
                self.attach_once(program, interface, index, *hook)?;
            } else {
                self.attached.remove(&(interface.to_string(), *program));
                if links::detach(&self.options.pin_root, interface, program)? {
                    tracing::info!(interface, program, "not needed with this configuration: detached");
                }
            }
        }
        Ok(())
    }

    /// The external interface's programs: masquerade with `--ip-masq`, the host-gw bypass.
    fn attach_external(&mut self, local: &LocalNode) -> Result<()> {
        let ext = &local.external;
        let masquerade = self.options.masquerade.is_some();
        self.attach_if(
            masquerade,
            &ext.name,
            ext.index,
            &[(SNAT_EGRESS, Hook::TcEgress), (SNAT_INGRESS, Hook::TcIngress)],
        )?;
        let host_gw_bypass = self.options.netfilter_bypass && matches!(local.backend, Backend::HostGw);
        self.attach_if(
            host_gw_bypass,
            &ext.name,
            ext.index,
            &[(UNDERLAY_INGRESS, Hook::TcIngress), (UNDERLAY_EGRESS, Hook::TcEgress)],
        )
    }

    /// Removes idle masquerade translations (run at every resync).
    fn sweep_masquerade(&mut self) -> Result<()> {
        let Some(options) = self.options.masquerade else { return Ok(()) };
        let sweep = self.snat.sweep(&options, crate::ebpf::decode::monotonic_ns())?;
        if sweep.removed > 0 {
            tracing::debug!(removed = sweep.removed, kept = sweep.kept, "idle masquerade translations removed");
        }
        Ok(())
    }

    /// With `--netfilter-bypass`: the pod bridge exists only once the CNI plugin made the
    /// first pod; it is picked up from the link notification (and at every resync), its
    /// program attached, its MAC written to the node settings, its pods to the endpoint map
    /// and `fl_pod_egress` to each pod's veth. Without the bypass, links an earlier run left
    /// are removed.
    async fn attach_pod_bridge(&mut self) -> Result<()> {
        let name = self.options.pod_bridge.clone();
        let Some(local) = self.local.clone() else { return Ok(()) };
        let bridge = match kernel::link_index(&self.handle, &name).await? {
            Some(index) => Some((index, kernel::link_mac(&self.handle, index).await?)),
            None => None,
        };
        if !self.options.netfilter_bypass {
            self.attach_if(false, &name, 0, &[(BRIDGE_EGRESS, Hook::TcEgress)])?;
            return self.attach_pod_veths(&BTreeMap::new()).await;
        }
        if bridge != self.bridge {
            if bridge.is_none() {
                tracing::info!(bridge = name, "the pod bridge is gone; its programs went with it");
            }
            self.bridge = bridge;
            self.write_node_config(&local)?;
        }
        if let Some((index, _)) = bridge {
            self.attach_once(BRIDGE_EGRESS, &name, index, Hook::TcEgress)?;
        }
        let pods = self.endpoints.sync(&self.handle, bridge.map(|(index, _)| index), local.subnet).await?;
        self.attach_pod_veths(&pods).await
    }

    /// `fl_pod_egress` on the veth of every pod in `pods`, and on no other interface: the
    /// pins of pods that went are removed (their links died with their veths).
    async fn attach_pod_veths(
        &mut self,
        pods: &BTreeMap<std::net::Ipv4Addr, flannel_common::EndpointEntry>,
    ) -> Result<()> {
        let mut wanted = BTreeMap::new();
        for entry in pods.values() {
            if let Some(name) = kernel::link_name(&self.handle, entry.ifindex).await? {
                wanted.insert(name, entry.ifindex);
            }
        }
        for (veth, index) in &wanted {
            self.attach_once(POD_EGRESS, veth, *index, Hook::TcIngress)?;
        }
        for interface in links::pinned_interfaces(&self.options.pin_root) {
            if !wanted.contains_key(&interface) && links::detach(&self.options.pin_root, &interface, POD_EGRESS)? {
                self.attached.remove(&(interface.clone(), POD_EGRESS));
                tracing::info!(veth = interface, "pod gone: its program link removed");
            }
        }
        Ok(())
    }

    /// Removes the datapath of earlier versions: their host device and program pins.
    async fn remove_legacy(&mut self, local: &LocalNode) -> Result<()> {
        if self.legacy_removed {
            return Ok(());
        }
        tunnel::remove_legacy_host_device(&self.handle).await?;
        for (interface, program) in LEGACY_LINKS {
            let interface = interface.unwrap_or(&local.external.name);
            // An old XDP link under a name a TC program reuses is replaced when that is attached.
            if program == UNDERLAY_INGRESS && self.options.netfilter_bypass && matches!(local.backend, Backend::HostGw)
            {
                continue;
            }
            if links::detach(&self.options.pin_root, interface, program)? {
                tracing::info!(interface, program, "removed a program link of an earlier version");
            }
        }
        self.legacy_removed = true;
        Ok(())
    }

    /// Installs or removes the direct route of `subnet` so it matches `wanted`.
    async fn set_direct_route(
        &self,
        subnet: Ipv4Net,
        old: Option<Forwarding>,
        wanted: Option<Forwarding>,
    ) -> Result<()> {
        let local = self.local.as_ref().context("datapath used before set_local")?;
        let ext = local.external.index;
        match (old, wanted) {
            (_, Some(Forwarding::Direct { public_ip })) => {
                kernel::replace_route(&self.handle, subnet, public_ip, ext, false).await
            }
            (Some(Forwarding::Direct { .. }), _) => {
                kernel::delete_route(&self.handle, subnet, ext, kernel::ROUTE_PROTOCOL).await
            }
            _ => Ok(()),
        }
    }

    async fn decide_all(&self, leases: &[Lease]) -> Result<BTreeMap<Ipv4Net, Forwarding>> {
        let local = self.local.as_ref().context("datapath used before set_local")?;
        let routes = if needs_routes(local) { kernel::routes(&self.handle).await? } else { Vec::new() };
        Ok(leases.iter().filter_map(|l| Some((l.subnet, decide(local, l, &routes)?))).collect())
    }
}

/// A second rtnetlink socket bound to the link and neighbour multicast groups.
fn subscribe_kernel_events() -> Result<KernelEvents> {
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut connection, _, messages) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK | rtnetlink::constants::RTMGRP_NEIGH))
        .context("subscribing to link and neighbour notifications")?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = messages;
        while let Some((message, _)) = futures_util::StreamExt::next(&mut messages).await {
            if let Some(event) = kernel_event(&message) {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

fn kernel_event(
    message: &rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
) -> Option<KernelEvent> {
    use rtnetlink::packet_route::{link::LinkAttribute, RouteNetlinkMessage};
    let rtnetlink::packet_core::NetlinkPayload::InnerMessage(inner) = &message.payload else { return None };
    match inner {
        RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(KernelEvent::Link(name.clone())),
                _ => None,
            })
        }
        RouteNetlinkMessage::NewNeighbour(_) | RouteNetlinkMessage::DelNeighbour(_) => Some(KernelEvent::Neighbour),
        _ => None,
    }
}

fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MIN_KERNEL {
        bail!(
            "Linux {} is too old for the eBPF datapath: it needs {}.{} or later (TCX links)",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

/// Detaches the eBPF datapath's programs (removing their link pins) and the host device of
/// earlier versions: what switching a node to `--datapath netlink` needs. The netlink
/// datapath replaces the tunnel device by a classic one itself; maps stay pinned (harmless,
/// and `inspect` can still read the last state).
pub async fn remove(pin_root: &Path, external: &str, pod_bridge: &str) -> Result<()> {
    let mut detached = 0;
    for interface in links::pinned_interfaces(pin_root) {
        for program in PROGRAMS.iter().chain(LEGACY_LINKS.iter().map(|(_, p)| p)) {
            if links::detach(pin_root, &interface, program)? {
                detached += 1;
            }
        }
    }
    let (connection, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(connection);
    let device = tunnel::remove_legacy_host_device(&handle).await?;
    if detached > 0 || device {
        tracing::info!(detached, external, pod_bridge, "removed the eBPF datapath left by an earlier run");
    }
    Ok(())
}

impl Datapath for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        pod_mtu(local)
    }

    async fn set_local(&mut self, local: &LocalNode) -> Result<()> {
        let ext = &local.external;
        let changed = self.local.as_ref() != Some(local);
        self.local = Some(local.clone());
        self.remove_legacy(local).await?;
        if let Backend::Vxlan(vxlan) = &local.backend {
            let name = super::netlink::NetlinkDatapath::device_name(vxlan.vni);
            let index = tunnel::ensure_tunnel_device(&self.handle, local, vxlan).await?;
            self.tunnel_index = Some(index);
            self.write_node_config(local)?;
            // Ingress first: what the peers send is checked before we send anything.
            self.attach_once(TUNNEL_INGRESS, &name, index, Hook::TcIngress)?;
            self.attach_once(TUNNEL_EGRESS, &name, index, Hook::TcEgress)?;
            kernel::set_link_up(&self.handle, index, pod_mtu(local), false).await?;
        } else {
            self.write_node_config(local)?;
        }
        self.table.set_local(local)?;
        self.attach_external(local)?;
        self.attach_pod_bridge().await?;
        if !changed {
            return Ok(());
        }
        tracing::info!(
            subnet = %local.subnet,
            external = ext.name,
            tunnel = ?self.tunnel_index,
            pod_bridge = self.options.pod_bridge,
            bypass = self.options.netfilter_bypass,
            "eBPF datapath programmed for this node"
        );
        Ok(())
    }

    fn masquerades(&self) -> bool {
        self.options.masquerade.is_some()
    }

    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let desired = self.decide_all(leases).await?;
        self.table.reconcile(&desired)?;
        let local = self.local.clone().context("datapath used before set_local")?;
        // Direct routes: sweep ours that are not wanted, write the missing ones.
        let present = tunnel::direct_routes(&kernel::routes(&self.handle).await?, &local);
        for (subnet, gateway) in &present {
            if desired.get(subnet) != Some(&Forwarding::Direct { public_ip: *gateway }) {
                kernel::delete_route(&self.handle, *subnet, local.external.index, kernel::ROUTE_PROTOCOL).await?;
            }
        }
        for (subnet, forwarding) in &desired {
            if let Forwarding::Direct { public_ip } = forwarding {
                if !present.contains(&(*subnet, *public_ip)) {
                    self.set_direct_route(*subnet, None, Some(*forwarding)).await?;
                }
            }
        }
        self.forwarding = desired;
        // Up to two map syscalls per translation: off the async worker's other tasks.
        crate::blocking::blocking(|| self.sweep_masquerade())?;
        self.attach_pod_bridge().await
    }

    async fn kernel_changed(&mut self) {
        loop {
            match self.kernel_events.recv().await {
                Some(KernelEvent::Link(name)) if self.options.netfilter_bypass && name == self.options.pod_bridge => {
                    return
                }
                // A pod's veth came or went, or a neighbour / FDB entry changed: the endpoint
                // map may need to follow.
                Some(KernelEvent::Link(_) | KernelEvent::Neighbour) if self.options.netfilter_bypass => {
                    // Bursts (a pod's creation sends several) are handled once.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    while self.kernel_events.try_recv().is_ok() {}
                    return;
                }
                Some(_) => {}
                // The notification socket is gone; the periodic resync still follows.
                None => std::future::pending::<()>().await,
            }
        }
    }

    async fn refresh(&mut self) -> Result<()> {
        self.attach_pod_bridge().await
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        let local = self.local.clone().context("datapath used before set_local")?;
        let (subnet, wanted) = match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => {
                let routes = if needs_routes(&local) { kernel::routes(&self.handle).await? } else { Vec::new() };
                (lease.subnet, decide(&local, lease, &routes))
            }
            LeaseEvent::Removed(lease) => (lease.subnet, None),
        };
        let old = self.forwarding.get(&subnet).copied();
        // Route before map on the way in, map before route on the way out: the bypass never
        // sends where the stack could not.
        if wanted.is_some() {
            self.set_direct_route(subnet, old, wanted).await?;
            self.table.set(subnet, wanted)?;
        } else {
            self.table.set(subnet, None)?;
            self.set_direct_route(subnet, old, None).await?;
        }
        match wanted {
            Some(f) => self.forwarding.insert(subnet, f),
            None => self.forwarding.remove(&subnet),
        };
        Ok(())
    }
}
