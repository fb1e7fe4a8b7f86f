//! The eBPF datapath: flannel's forwarding done by our programs instead of the vxlan device,
//! the route table and (later) iptables.
//!
//! | program               | hook                       | job                                    |
//! |-----------------------|----------------------------|----------------------------------------|
//! | `fl_host_egress`      | TC egress of `fl_host`       | node and pods → remote subnets: encap / host-gw |
//! | `fl_pod_egress`       | TC ingress of the pod bridge | pods → remote subnets, skipping netfilter (`--netfilter-bypass`) |
//! | `fl_underlay_ingress` | XDP on the external interface | VXLAN from lease holders: decap       |
//! | `fl_underlay_ingress_tc` | TC ingress of the external interface | the same (`--vxlan-decap tc`) |
//! | `fl_snat_egress`      | TC egress of the external interface | pod → outside: masquerade (`--ip-masq`) |
//! | `fl_snat_ingress`     | TC ingress of the external interface | replies: back to the pod         |
//!
//! State lives in pinned maps under `<--bpf-pin-path>/maps` (see [`table`] and `fl_node_v2`),
//! links under `<--bpf-pin-path>/links/<interface>/<program>`. A restarted agent reuses the
//! maps, reconciles them with etcd (mark and sweep) and swaps its programs into the pinned
//! links, so forwarding never stops.

pub mod host;
pub mod snat;
pub mod table;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use flannel_common::{NodeConfig, NODE_MAP};
use rtnetlink::Handle;

use self::{
    host::{HOST_DEVICE, HOST_PEER},
    snat::{SnatOptions, SnatTable},
    table::LeaseTable,
};
use super::{kernel, netlink::DEFAULT_VXLAN_PORT, pod_mtu, Datapath, LeaseEvent, LocalNode};
use crate::{
    cli::DecapHook,
    config::Backend,
    ebpf::{
        bpffs,
        links::{self, Hook},
        object,
    },
    subnet::Lease,
};

pub const POD_EGRESS: &str = "fl_pod_egress";
pub const HOST_EGRESS: &str = "fl_host_egress";
pub const UNDERLAY_INGRESS: &str = "fl_underlay_ingress";
pub const UNDERLAY_INGRESS_TC: &str = "fl_underlay_ingress_tc";
pub const SNAT_EGRESS: &str = "fl_snat_egress";
pub const SNAT_INGRESS: &str = "fl_snat_ingress";

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
    /// `--vxlan-decap`.
    pub decap: DecapHook,
    /// `--netfilter-bypass`: attach `fl_pod_egress` to the pod bridge.
    pub netfilter_bypass: bool,
}

pub struct EbpfDatapath {
    handle: Handle,
    options: EbpfOptions,
    ebpf: Ebpf,
    table: LeaseTable,
    snat: SnatTable,
    node: Array<MapData, NodeConfig>,
    local: Option<LocalNode>,
    /// (interface, program) → the interface index it was attached at by this process.
    attached: BTreeMap<(String, &'static str), u32>,
    classic_removed: bool,
    /// Link notifications (RTMGRP_LINK), to attach to the pod bridge as soon as the CNI
    /// plugin creates it instead of at the next resync.
    link_events: LinkEvents,
}

/// Names of links the kernel announced as new or changed.
type LinkEvents = tokio::sync::mpsc::UnboundedReceiver<String>;

impl EbpfDatapath {
    /// Loads the programs (the verifier runs now, so a kernel that cannot run them fails here,
    /// before anything is changed) with the maps pinned under the pin root.
    pub fn open(options: EbpfOptions) -> Result<EbpfDatapath> {
        check_kernel()?;
        let maps = options.pin_root.join("maps");
        bpffs::ensure_pin_dir(&maps)?;
        let mut ebpf = object::load_pinned(&maps)?;
        links::loaded::<SchedClassifier>(&mut ebpf, POD_EGRESS)?;
        links::loaded::<SchedClassifier>(&mut ebpf, HOST_EGRESS)?;
        links::loaded::<Xdp>(&mut ebpf, UNDERLAY_INGRESS)?;
        links::loaded::<SchedClassifier>(&mut ebpf, UNDERLAY_INGRESS_TC)?;
        links::loaded::<SchedClassifier>(&mut ebpf, SNAT_EGRESS)?;
        links::loaded::<SchedClassifier>(&mut ebpf, SNAT_INGRESS)?;
        let table = LeaseTable::take(&mut ebpf)?;
        let snat = SnatTable::take(&mut ebpf)?;
        let node = ebpf.take_map(NODE_MAP).with_context(|| format!("map {NODE_MAP} is not in the eBPF object"))?;
        let node = Array::try_from(node).with_context(|| format!("{NODE_MAP} is not an array"))?;
        let (connection, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(connection);
        let link_events = subscribe_link_events()?;
        Ok(EbpfDatapath {
            handle,
            options,
            ebpf,
            table,
            snat,
            node,
            local: None,
            attached: BTreeMap::new(),
            classic_removed: false,
            link_events,
        })
    }

    async fn write_node_config(&mut self, local: &LocalNode) -> Result<()> {
        let ext_mac = kernel::link_mac(&self.handle, local.external.index).await?;
        let (vni, vxlan_port) = match &local.backend {
            Backend::Vxlan(v) => (v.vni, if v.port == 0 { DEFAULT_VXLAN_PORT } else { v.port }),
            _ => (0, 0),
        };
        let masquerade = self.options.masquerade;
        let config = NodeConfig {
            public_ip: local.public_ip.octets(),
            vtep_mac: local.vtep_mac.map(|m| m.0).unwrap_or_default(),
            vni,
            vxlan_port,
            ext_ifindex: local.external.index,
            ext_mac: ext_mac.0,
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
                vxlan_port,
                external = local.external.name,
                external_mac = %ext_mac,
                "node settings written to {NODE_MAP}"
            );
        }
        Ok(())
    }

    /// Attaches `program` at `hook` of `interface` unless this process already did so at the
    /// interface's current index (a recreated interface gets a new link).
    fn attach_once(&mut self, program: &'static str, interface: &str, index: u32, hook: Hook) -> Result<()> {
        let key = (interface.to_string(), program);
        if self.attached.get(&key) == Some(&index) {
            return Ok(());
        }
        links::attach(&mut self.ebpf, program, interface, hook, &self.options.pin_root)?;
        self.attached.insert(key, index);
        Ok(())
    }

    /// Attaches the decapsulation program at the hook `--vxlan-decap` names and removes the
    /// other one (after, so VXLAN is never left without a decapsulator).
    fn set_decap(&mut self, local: &LocalNode) -> Result<()> {
        let ext = &local.external;
        let (wanted, other) = match self.options.decap {
            DecapHook::Xdp => ((UNDERLAY_INGRESS, Hook::Xdp), UNDERLAY_INGRESS_TC),
            DecapHook::Tc => ((UNDERLAY_INGRESS_TC, Hook::TcIngress), UNDERLAY_INGRESS),
        };
        self.attach_once(wanted.0, &ext.name, ext.index, wanted.1)?;
        if links::detach(&self.options.pin_root, &ext.name, other)? {
            tracing::info!(interface = ext.name, program = other, "detached the other decapsulation hook");
        }
        Ok(())
    }

    /// Attaches the masquerade programs to the external interface with `--ip-masq`, and
    /// detaches them (translating nothing) without it.
    fn set_masquerade(&mut self, local: &LocalNode) -> Result<()> {
        let ext = &local.external;
        if self.options.masquerade.is_some() {
            self.attach_once(SNAT_EGRESS, &ext.name, ext.index, Hook::TcEgress)?;
            self.attach_once(SNAT_INGRESS, &ext.name, ext.index, Hook::TcIngress)
        } else {
            for program in [SNAT_EGRESS, SNAT_INGRESS] {
                if links::detach(&self.options.pin_root, &ext.name, program)? {
                    tracing::info!(interface = ext.name, program, "masquerade is off (--ip-masq=false): detached");
                }
            }
            Ok(())
        }
    }

    /// Removes idle masquerade translations (run at every resync).
    fn sweep_masquerade(&mut self) -> Result<()> {
        let Some(options) = self.options.masquerade else { return Ok(()) };
        let sweep = self.snat.sweep(&options, snat::monotonic_ns())?;
        if sweep.removed > 0 {
            tracing::debug!(removed = sweep.removed, kept = sweep.kept, "idle masquerade translations removed");
        }
        Ok(())
    }

    /// With `--netfilter-bypass`: the pod bridge exists only once the CNI plugin made the first
    /// pod; it is picked up from the link notification (and at every resync). Without it, pod
    /// traffic is routed by the stack to `fl_host` like the node's own, and a link an earlier
    /// run left on the bridge is removed.
    async fn attach_pod_bridge(&mut self) -> Result<()> {
        let bridge = self.options.pod_bridge.clone();
        if !self.options.netfilter_bypass {
            if links::detach(&self.options.pin_root, &bridge, POD_EGRESS)? {
                tracing::info!(bridge, "netfilter bypass is off: detached the pod bridge's program");
            }
            return Ok(());
        }
        match kernel::link_index(&self.handle, &bridge).await? {
            Some(index) => self.attach_once(POD_EGRESS, &bridge, index, Hook::TcIngress),
            None => {
                if self.attached.remove(&(bridge.clone(), POD_EGRESS)).is_some() {
                    tracing::info!(bridge, "the pod bridge is gone; its program went with it");
                }
                Ok(())
            }
        }
    }
}

impl EbpfDatapath {
    /// A packet that `bpf_redirect_neigh` sends from `fl_host`'s egress towards an unresolved
    /// neighbour is lost (measured on 6.18; from the bridge's ingress it is queued), so the
    /// underlay neighbours of on-link peers are resolved ahead of traffic: on every lease
    /// event, and at each resync for those the kernel has no entry for.
    async fn resolve_missing_neighbours(&self) -> Result<()> {
        let Some(local) = &self.local else { return Ok(()) };
        let known: std::collections::BTreeSet<_> = kernel::neighbours(&self.handle, local.external.index, false)
            .await?
            .iter()
            .filter(|n| kernel::neighbour_mac(n).is_some())
            .filter_map(kernel::neighbour_ip)
            .collect();
        for ip in self.table.on_link_peers().difference(&known) {
            self.resolve_neighbour(*ip).await;
        }
        Ok(())
    }

    async fn resolve_neighbour(&self, ip: std::net::Ipv4Addr) {
        let Some(local) = &self.local else { return };
        if let Err(error) = kernel::resolve_neighbour(&self.handle, local.external.index, ip).await {
            tracing::debug!(%ip, error = format!("{error:#}"), "could not start neighbour resolution");
        }
    }
}

/// A second rtnetlink socket bound to the link multicast group.
fn subscribe_link_events() -> Result<LinkEvents> {
    use rtnetlink::sys::{AsyncSocket, SocketAddr};
    let (mut connection, _, messages) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .context("subscribing to link notifications")?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = messages;
        while let Some((message, _)) = futures_util::StreamExt::next(&mut messages).await {
            if let Some(name) = new_link_name(&message) {
                if tx.send(name.to_string()).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

/// The name of a new (or changed) link in a link notification.
fn new_link_name(
    message: &rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
) -> Option<&str> {
    use rtnetlink::packet_route::{link::LinkAttribute, RouteNetlinkMessage};
    let rtnetlink::packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = &message.payload
    else {
        return None;
    };
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
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

/// Detaches the eBPF datapath's programs (removing their link pins) and removes the host
/// device: what switching a node to `--datapath netlink` needs. Maps stay pinned (harmless,
/// and `inspect` can still read the last state).
pub async fn remove(pin_root: &Path, external: &str, pod_bridge: &str) -> Result<()> {
    let mut detached = 0;
    for (interface, program) in [
        (pod_bridge, POD_EGRESS),
        (HOST_DEVICE, HOST_EGRESS),
        (external, UNDERLAY_INGRESS),
        (external, UNDERLAY_INGRESS_TC),
        (external, SNAT_EGRESS),
        (external, SNAT_INGRESS),
    ] {
        if links::detach(pin_root, interface, program)? {
            detached += 1;
        }
    }
    let (connection, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(connection);
    let device = host::remove_host_device(&handle).await?;
    if detached > 0 || device {
        tracing::info!(detached, host_device = device, "removed the eBPF datapath left by an earlier run");
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
        self.write_node_config(local).await?;
        self.table.set_on_link(host::connected_networks(&self.handle, ext.index).await?);
        self.table.set_local(local)?;

        let host_index = host::ensure_host_device(&self.handle, local, pod_mtu(local)).await?;
        self.attach_once(HOST_EGRESS, HOST_DEVICE, host_index, Hook::TcEgress)?;
        let vni = match &local.backend {
            Backend::Vxlan(v) => {
                self.set_decap(local)?;
                Some(v.vni)
            }
            _ => None,
        };
        self.set_masquerade(local)?;
        self.attach_pod_bridge().await?;
        if !self.classic_removed {
            host::remove_classic_leftovers(&self.handle, local, vni).await?;
            if host::effective_rp_filter(&ext.name) == Some(1) {
                tracing::warn!(
                    interface = ext.name,
                    "strict reverse-path filtering (rp_filter=1) on the external interface drops decapsulated and \
                     host-gw pod traffic, which arrives there but is routed back through {HOST_DEVICE}; set \
                     net.ipv4.conf.all.rp_filter and net.ipv4.conf.{}.rp_filter to 2 (loose)",
                    ext.name
                );
            }
            self.classic_removed = true;
        }
        if self.local.as_ref() != Some(local) {
            tracing::info!(
                subnet = %local.subnet,
                external = ext.name,
                host_device = HOST_DEVICE,
                peer = HOST_PEER,
                pod_bridge = self.options.pod_bridge,
                "eBPF datapath programmed for this node"
            );
        }
        self.local = Some(local.clone());
        Ok(())
    }

    fn masquerades(&self) -> bool {
        self.options.masquerade.is_some()
    }

    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        self.table.reconcile(leases)?;
        self.sweep_masquerade()?;
        self.attach_pod_bridge().await?;
        self.resolve_missing_neighbours().await
    }

    async fn kernel_changed(&mut self) {
        loop {
            match self.link_events.recv().await {
                Some(name) if self.options.netfilter_bypass && name == self.options.pod_bridge => return,
                Some(_) => {}
                // The notification socket is gone; the periodic resync still attaches.
                None => std::future::pending::<()>().await,
            }
        }
    }

    async fn refresh(&mut self) -> Result<()> {
        self.attach_pod_bridge().await
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        self.table.apply(event)?;
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Replaced { new: lease, .. } => {
                if self.table.is_on_link(lease.attrs.public_ip) {
                    self.resolve_neighbour(lease.attrs.public_ip).await;
                }
                Ok(())
            }
            LeaseEvent::Removed(_) => Ok(()),
        }
    }
}
