//! The one forwarding decision both datapaths program: how this node reaches another node's
//! subnet. flannel's rules (backend/vxlan and backend/hostgw): a node handles only leases
//! of its own backend type; vxlan with DirectRouting routes directly to peers on its L2
//! segment; host-gw refuses peers behind a gateway.

use std::net::Ipv4Addr;

use crate::{
    config::Backend,
    datapath::{kernel, LocalNode},
    subnet::{lease::Mac, Lease},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forwarding {
    /// VXLAN to the peer's PublicIP, inner destination MAC = its VtepMAC.
    Vxlan { vtep_mac: Mac, public_ip: Ipv4Addr },
    /// A direct route via the peer's PublicIP (host-gw; vxlan DirectRouting).
    Direct { public_ip: Ipv4Addr },
}

/// How to reach `lease` from `local`, given the main table's routes (for the on-link checks);
/// None when it cannot or must not be reached, with the reason logged naming the lease.
pub fn decide(local: &LocalNode, lease: &Lease, routes: &[kernel::Route]) -> Option<Forwarding> {
    let public_ip = lease.attrs.public_ip;
    let backend_type = lease.attrs.backend_type.as_str();
    match &local.backend {
        Backend::Vxlan(vxlan) => {
            if backend_type != "vxlan" {
                tracing::warn!(subnet = %lease.subnet, backend = backend_type, "ignoring a non-vxlan lease");
                return None;
            }
            let Some(data) = lease.attrs.vxlan() else {
                tracing::warn!(subnet = %lease.subnet, "vxlan lease without VtepMAC in its BackendData; skipped");
                return None;
            };
            if vxlan.direct_routing && kernel::on_link(routes, public_ip) {
                return Some(Forwarding::Direct { public_ip });
            }
            Some(Forwarding::Vxlan { vtep_mac: data.vtep_mac, public_ip })
        }
        Backend::HostGw => {
            if backend_type != "host-gw" {
                tracing::warn!(subnet = %lease.subnet, backend = backend_type, "ignoring a non-host-gw lease");
                return None;
            }
            if !kernel::on_link(routes, public_ip) {
                tracing::error!(
                    subnet = %lease.subnet,
                    %public_ip,
                    interface = local.external.name,
                    "host-gw needs every node on the local L2 segment: this peer is reached through a gateway; not \
                     forwarding to it"
                );
                return None;
            }
            Some(Forwarding::Direct { public_ip })
        }
        other => {
            tracing::error!(subnet = %lease.subnet, backend = other.type_name(), "no datapath forwards this backend");
            None
        }
    }
}

/// True when the decision depends on the route table (on-link checks), so callers dump it
/// only then.
pub fn needs_routes(local: &LocalNode) -> bool {
    match &local.backend {
        Backend::HostGw => true,
        Backend::Vxlan(vxlan) => vxlan.direct_routing,
        _ => false,
    }
}
