//! The node's own way into the eBPF datapath, and the removal of flannel-classic leftovers.
//!
//! Pods reach the egress program on the bridge, but traffic the node itself sends to the
//! cluster needs a route. The agent owns a veth pair `fl_host` ⇄ `fl_net`: `fl_host` carries
//! the subnet's base address (/32, as flanneld gives `flannel.<VNI>`; the external address
//! with host-gw), ARP off, and the one route `<Network> dev fl_host src <that address>`; its
//! TC egress program forwards what the route sends it. A destination in the network without a lease ends at `fl_net`, which has
//! no address (as in flannel, where no route exists for it). One route instead of one per
//! node: the lease map, not the route table, says where each subnet lives.

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use rtnetlink::Handle;

use crate::{
    config::Backend,
    datapath::{
        kernel::{self, ROUTE_PROTOCOL},
        netlink::NetlinkDatapath,
        LocalNode,
    },
};

pub const HOST_DEVICE: &str = "fl_host";
pub const HOST_PEER: &str = "fl_net";

/// Creates (or adopts) the host device pair and its address and route; returns the index of
/// `fl_host`.
pub async fn ensure_host_device(handle: &Handle, local: &LocalNode, mtu: u32) -> Result<u32> {
    if !kernel::is_veth(handle, HOST_DEVICE).await? {
        if let Some(index) = kernel::link_index(handle, HOST_DEVICE).await? {
            tracing::warn!(device = HOST_DEVICE, "a non-veth link has our host device's name; replacing it");
            kernel::delete_link(handle, index).await?;
        }
        kernel::create_veth(handle, HOST_DEVICE, HOST_PEER).await?;
        tracing::info!(device = HOST_DEVICE, peer = HOST_PEER, mtu, "created the host device pair");
    }
    let index = kernel::link_index(handle, HOST_DEVICE).await?.context("fl_host vanished after creation")?;
    let peer = kernel::link_index(handle, HOST_PEER)
        .await?
        .with_context(|| format!("{HOST_DEVICE} exists without its peer {HOST_PEER}"))?;
    kernel::set_link_up(handle, peer, mtu, true).await?;
    kernel::set_link_up(handle, index, mtu, false).await?;
    // The node's own cluster traffic leaves with the source flanneld gives it: flannel.<VNI>'s
    // address (the subnet base) for vxlan, the external address for host-gw, whose routes go
    // via eth0. fl_host carries that address too, because flannel's masquerade rule
    // (`! -s <Network> -d <Network> -j MASQUERADE`) rewrites host traffic to the address of
    // the device it leaves through.
    let source = match local.backend {
        Backend::Vxlan(_) => local.subnet.network(),
        _ => local.external.address,
    };
    kernel::set_only_address(handle, index, Ipv4Net::new(source, 32).expect("/32")).await?;
    kernel::replace_device_route(handle, local.network, index, source).await?;
    Ok(index)
}

/// Removes what the classic datapath (ours in netlink mode, or flanneld) left: the
/// `flannel.<VNI>` device (its routes, neighbours and FDB go with it) and host-gw routes into
/// the cluster network through the external interface with our route protocol — they would
/// otherwise be more specific than `fl_host`'s route and keep host traffic on the old path.
pub async fn remove_classic_leftovers(handle: &Handle, local: &LocalNode, vni: Option<u32>) -> Result<()> {
    if let Some(vni) = vni {
        let name = NetlinkDatapath::device_name(vni);
        if let Some(link) = kernel::vxlan_link(handle, &name).await? {
            kernel::delete_link(handle, link.index).await?;
            tracing::info!(device = name, "removed the flannel-classic vxlan device (the eBPF datapath replaces it)");
        }
    }
    let mut removed = 0;
    for route in kernel::routes(handle).await? {
        let stale = route.protocol == ROUTE_PROTOCOL
            && route.oif == Some(local.external.index)
            && local.network.contains(&route.dst)
            && route.gateway.is_some();
        if stale {
            kernel::delete_route(handle, route.dst, local.external.index, route.protocol).await?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed flannel-classic host-gw routes (the eBPF datapath replaces them)");
    }
    Ok(())
}

/// Removes the host device pair (the route goes with it); for switching to the classic
/// datapath.
pub async fn remove_host_device(handle: &Handle) -> Result<bool> {
    match kernel::link_index(handle, HOST_DEVICE).await? {
        Some(index) => {
            kernel::delete_link(handle, index).await?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The networks directly connected to link `index` (routes through it without a gateway):
/// the peers a host-gw next hop can be.
pub async fn connected_networks(handle: &Handle, index: u32) -> Result<Vec<Ipv4Net>> {
    Ok(kernel::routes(handle)
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(index) && r.gateway.is_none() && r.dst.prefix_len() > 0)
        .map(|r| r.dst)
        .collect())
}

/// The effective `rp_filter` for packets arriving on `interface` (the kernel uses the larger
/// of `all` and the interface's own), read from /proc.
pub fn effective_rp_filter(interface: &str) -> Option<u32> {
    let read = |name: &str| -> Option<u32> {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter")).ok()?.trim().parse().ok()
    };
    Some(read("all")?.max(read(interface)?))
}
