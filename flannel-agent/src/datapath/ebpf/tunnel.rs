//! The eBPF datapath's kernel objects outside the maps: the tunnel device for vxlan, the
//! direct routes for host-gw and DirectRouting peers, and the removal of what flanneld (or an
//! earlier version of this agent) left.
//!
//! The tunnel device is `flannel.<VNI>`, the name flanneld gives its device, but in
//! collect-metadata mode (`ip link add flannel.1 type vxlan external dstport 8472 nolearning`):
//! MAC = our VtepMAC, MTU = underlay − 50, ARP off, the subnet's base address /32 (as
//! flannel.1), and ONE route `<Network> dev flannel.<VNI> src <subnet base>` — no neighbour,
//! FDB entry or route per lease: the programs on the device look every destination up in the
//! lease map. Only one vxlan device per UDP port can be up, so a classic flannel.<VNI>
//! (flanneld's, or our netlink datapath's) is replaced by it, and flanneld (or
//! `--datapath netlink`) replaces it back the same way.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use rtnetlink::Handle;

use crate::{
    config::VxlanConfig,
    datapath::{
        kernel::{self, ROUTE_PROTOCOL},
        netlink::{NetlinkDatapath, DEFAULT_VXLAN_PORT},
        pod_mtu, LocalNode,
    },
};

/// The host device pair earlier versions of this agent routed the cluster network into.
const LEGACY_HOST_DEVICE: &str = "fl_host";

/// Creates, adopts or takes over `flannel.<VNI>` as a metadata device and gives it its
/// address and route; returns its index.
pub async fn ensure_tunnel_device(handle: &Handle, local: &LocalNode, vxlan: &VxlanConfig) -> Result<u32> {
    let name = NetlinkDatapath::device_name(vxlan.vni);
    let mac = local.vtep_mac.context("vxlan backend without a VtepMAC")?;
    let port = if vxlan.port == 0 { DEFAULT_VXLAN_PORT } else { vxlan.port };
    let mtu = pod_mtu(local);
    let index = match kernel::vxlan_link(handle, &name).await? {
        Some(link) if link.external && link.port == Some(port) => {
            if link.mtu != Some(mtu) || link.mac != Some(mac) || !link.up {
                kernel::set_link(handle, link.index, mtu, mac).await?;
            }
            tracing::debug!(device = name, "adopted the tunnel device");
            link.index
        }
        existing => {
            // Made down first, so that the classic device's port is taken over only once the
            // new device is complete: traffic pauses for the few milliseconds in between.
            let temporary = format!("fl_new.{}", vxlan.vni);
            if let Some(index) = kernel::link_index(handle, &temporary).await? {
                kernel::delete_link(handle, index).await?;
            }
            kernel::create_metadata_vxlan(handle, &temporary, port, mtu, mac).await?;
            let index = kernel::link_index(handle, &temporary)
                .await?
                .with_context(|| format!("{temporary} vanished after creation"))?;
            match existing {
                Some(link) => {
                    kernel::delete_link(handle, link.index).await?;
                    tracing::info!(device = name, previous = ?link, "replaced the classic vxlan device by the tunnel device");
                }
                None => {
                    if let Some(other) = kernel::link_index(handle, &name).await? {
                        tracing::warn!(device = name, "a non-vxlan link has our device's name; replacing it");
                        kernel::delete_link(handle, other).await?;
                    }
                }
            }
            kernel::rename_link(handle, index, &name).await?;
            kernel::set_link(handle, index, mtu, mac).await?;
            tracing::info!(device = name, port, mtu, %mac, "created the tunnel device (collect-metadata vxlan)");
            index
        }
    };
    let source = local.subnet.network();
    kernel::set_only_address(handle, index, Ipv4Net::new(source, 32).expect("/32")).await?;
    kernel::replace_device_route(handle, local.network, index, source).await?;
    Ok(index)
}

/// Removes the host device pair of earlier versions (its route goes with it).
pub async fn remove_legacy_host_device(handle: &Handle) -> Result<bool> {
    match kernel::link_index(handle, LEGACY_HOST_DEVICE).await? {
        Some(index) => {
            kernel::delete_link(handle, index).await?;
            tracing::info!(device = LEGACY_HOST_DEVICE, "removed the host device of an earlier version");
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Our direct routes (`<subnet> via <PublicIP> dev <external> proto 200`) as the kernel holds
/// them: subnet → gateway.
pub fn direct_routes(routes: &[kernel::Route], local: &LocalNode) -> Vec<(Ipv4Net, Ipv4Addr)> {
    routes
        .iter()
        .filter(|r| {
            r.protocol == ROUTE_PROTOCOL && r.oif == Some(local.external.index) && local.network.contains(&r.dst)
        })
        .filter_map(|r| Some((r.dst, r.gateway?)))
        .collect()
}
