//! The one interface between the control plane and a datapath. The control plane owns the
//! truth (etcd); a datapath makes the kernel match it. Implementations: the eBPF datapath
//! ([`ebpf`]: programs on the interfaces, state in pinned maps) and the netlink
//! (flannel-classic) datapath ([`netlink`]: vxlan device, FDB, neighbours, routes).

pub mod ebpf;
pub mod forwarding;
pub mod kernel;
pub mod netlink;

use std::{future::Future, net::Ipv4Addr};

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::{config::Backend, iface::ExternalInterface, subnet::lease::Mac, subnet::Lease};

/// This node, as the datapath needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNode {
    /// Our lease's subnet.
    pub subnet: Ipv4Net,
    /// The cluster network (config `Network`).
    pub network: Ipv4Net,
    /// The address published in our lease (`--public-ip`, else the external interface's).
    pub public_ip: Ipv4Addr,
    pub external: ExternalInterface,
    pub backend: Backend,
    /// Our VTEP MAC when the backend is vxlan.
    pub vtep_mac: Option<Mac>,
}

/// VXLAN's outer headers: 14 Ethernet + 20 IPv4 + 8 UDP + 8 VXLAN.
pub const VXLAN_OVERHEAD: u32 = 50;

/// FLANNEL_MTU as flanneld computes it: for vxlan, the underlay MTU (the backend's `MTU`
/// option, else the external interface's) minus the 50 bytes of outer headers; otherwise
/// the external interface's MTU.
pub fn pod_mtu(local: &LocalNode) -> u32 {
    match &local.backend {
        Backend::Vxlan(v) => if v.mtu > 0 { v.mtu } else { local.external.mtu }.saturating_sub(VXLAN_OVERHEAD),
        _ => local.external.mtu,
    }
}

/// A change to another node's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    /// The lease's value changed (new PublicIP, VtepMAC, …); carries the new lease.
    Replaced {
        old: Lease,
        new: Lease,
    },
    /// Carries the lease as it was, so the datapath can remove exactly what it installed.
    Removed(Lease),
}

impl LeaseEvent {
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            LeaseEvent::Added(l) | LeaseEvent::Removed(l) | LeaseEvent::Replaced { new: l, .. } => l.subnet,
        }
    }
}

pub trait Datapath: Send {
    /// For logs: "ebpf" or "netlink".
    fn name(&self) -> &'static str;

    /// True when the datapath masquerades pod → outside traffic itself (then flannel's
    /// iptables rule for it is left out).
    fn masquerades(&self) -> bool {
        false
    }

    /// MTU for pods (FLANNEL_MTU) given the external interface.
    fn pod_mtu(&self, local: &LocalNode) -> u32;

    /// Sets up this node's own part (called before any lease, and again if our subnet changes).
    fn set_local(&mut self, local: &LocalNode) -> impl Future<Output = Result<()>> + Send;

    /// Makes the datapath hold exactly `leases` (all other nodes' leases) without a flush:
    /// adds what is missing, updates what differs, removes what is no longer there. Called
    /// after the initial list, so state left by a previous agent run is adopted, not rebuilt.
    fn reconcile(&mut self, leases: &[Lease]) -> impl Future<Output = Result<()>> + Send;

    /// Applies one change.
    fn apply(&mut self, event: &LeaseEvent) -> impl Future<Output = Result<()>> + Send;

    /// Resolves when something in the kernel this datapath depends on has changed (the eBPF
    /// datapath: the pod bridge appeared); the control plane then calls [`Datapath::refresh`].
    /// Must be cancel-safe. Default: never.
    fn kernel_changed(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Re-checks the datapath's kernel side after [`Datapath::kernel_changed`].
    fn refresh(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}
