//! Thin, typed helpers over rtnetlink for the few kernel objects the datapaths use: links,
//! addresses, routes, neighbours and bridge FDB entries. Every mutation is a
//! replace (idempotent), so re-applying state after an agent restart changes nothing.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        AddressFamily,
    },
    Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder,
};

use crate::subnet::lease::Mac;

/// Routes we install carry this protocol number, so that a restart can tell ours from the
/// administrator's (flanneld uses the default "boot"). 200 is unassigned in iproute2's
/// rt_protos; `ip route` shows "proto 200".
pub const ROUTE_PROTOCOL: u8 = 200;

/// What matters about an existing vxlan link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanLink {
    pub index: u32,
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub underlay: Option<u32>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    pub up: bool,
    /// Collect-metadata ("external") mode: the eBPF datapath's tunnel device.
    pub external: bool,
}

pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_message(handle, name).await?.map(|l| l.header.index))
}

async fn link_message(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(error) => Err(error).with_context(|| format!("looking up link {name}")),
    }
}

/// The name of link `index`, or None when it does not exist.
pub async fn link_name(handle: &Handle, index: u32) -> Result<Option<String>> {
    match handle.link().get().match_index(index).execute().try_next().await {
        Ok(link) => Ok(link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
        })),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(error) => Err(error).with_context(|| format!("looking up link {index}")),
    }
}

/// The MAC address of link `index`.
pub async fn link_mac(handle: &Handle, index: u32) -> Result<Mac> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up link {index}"))?
        .with_context(|| format!("link {index} does not exist"))?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(a) if a.len() == 6 => Some(Mac([a[0], a[1], a[2], a[3], a[4], a[5]])),
            _ => None,
        })
        .with_context(|| format!("link {index} has no Ethernet address"))
}

/// MTU, ARP on/off and up, in one request.
pub async fn set_link_up(handle: &Handle, index: u32, mtu: u32, arp: bool) -> Result<()> {
    let message = LinkUnspec::new_with_index(index).mtu(mtu).arp(arp).up().build();
    handle.link().set(message).execute().await.with_context(|| format!("setting MTU {mtu}/up on link {index}"))
}

/// `ip route replace <dst> dev <index> src <src> scope link proto 200`.
pub async fn replace_device_route(handle: &Handle, dst: Ipv4Net, index: u32, src: Ipv4Addr) -> Result<()> {
    let message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(index)
        .pref_source(src)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build();
    handle.route().add(message).replace().execute().await.with_context(|| format!("route {dst} dev {index} src {src}"))
}

/// The vxlan attributes of link `name`, or None when it does not exist or is not vxlan.
pub async fn vxlan_link(handle: &Handle, name: &str) -> Result<Option<VxlanLink>> {
    let Some(link) = link_message(handle, name).await? else { return Ok(None) };
    let mut v = VxlanLink {
        index: link.header.index,
        vni: None,
        local: None,
        port: None,
        learning: None,
        underlay: None,
        mtu: None,
        mac: None,
        up: link.header.flags.contains(LinkFlags::Up),
        external: false,
    };
    let mut is_vxlan = false;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::Mtu(m) => v.mtu = Some(*m),
            LinkAttribute::Address(a) if a.len() == 6 => v.mac = Some(Mac([a[0], a[1], a[2], a[3], a[4], a[5]])),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(id) => v.vni = Some(*id),
                                    InfoVxlan::Local(ip) => v.local = Some(*ip),
                                    InfoVxlan::Port(p) => v.port = Some(*p),
                                    InfoVxlan::Learning(l) => v.learning = Some(*l),
                                    InfoVxlan::Link(i) => v.underlay = Some(*i),
                                    InfoVxlan::CollectMetadata(on) => v.external = *on,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(is_vxlan.then_some(v))
}

pub struct VxlanSpec<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub underlay: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: Mac,
}

/// `ip link add <name> type vxlan id <vni> local <local> dev <underlay> dstport <port>
/// nolearning` with the given MTU and MAC, up.
pub async fn create_vxlan(handle: &Handle, spec: &VxlanSpec<'_>) -> Result<()> {
    let message = LinkVxlan::new(spec.name, spec.vni)
        .dev(spec.underlay)
        .local(spec.local)
        .port(spec.port)
        .learning(false)
        .mtu(spec.mtu)
        .address(spec.mac.0.to_vec())
        .up()
        .build();
    handle.link().add(message).execute().await.with_context(|| format!("creating vxlan device {}", spec.name))
}

/// `ip link add <name> type vxlan external dstport <port> nolearning` with the given MTU and
/// MAC, ARP off, left down (only one vxlan device per port can be up; the caller brings it
/// up once the port is free). VNI 0: a collect-metadata device receives every VNI under 0.
pub async fn create_metadata_vxlan(handle: &Handle, name: &str, port: u16, mtu: u32, mac: Mac) -> Result<()> {
    let message = LinkVxlan::new(name, 0)
        .collect_metadata(true)
        .port(port)
        .learning(false)
        .mtu(mtu)
        .address(mac.0.to_vec())
        .arp(false)
        .build();
    handle.link().add(message).execute().await.with_context(|| format!("creating metadata vxlan device {name}"))
}

/// Renames link `index` (it must be down).
pub async fn rename_link(handle: &Handle, index: u32, name: &str) -> Result<()> {
    let message = LinkUnspec::new_with_index(index).name(name.to_string()).build();
    handle.link().set(message).execute().await.with_context(|| format!("renaming link {index} to {name}"))
}

/// Sets MTU and MAC and brings the link up.
pub async fn set_link(handle: &Handle, index: u32, mtu: u32, mac: Mac) -> Result<()> {
    let message = LinkUnspec::new_with_index(index).mtu(mtu).address(mac.0.to_vec()).up().build();
    handle.link().set(message).execute().await.with_context(|| format!("setting MTU/MAC/up on link {index}"))
}

pub async fn delete_link(handle: &Handle, index: u32) -> Result<()> {
    handle.link().del(index).execute().await.with_context(|| format!("deleting link {index}"))
}

/// Makes `address` the only IPv4 address of link `index`.
pub async fn set_only_address(handle: &Handle, index: u32, address: Ipv4Net) -> Result<()> {
    let mut present = false;
    let mut addresses = handle.address().get().set_link_index_filter(index).execute();
    let mut stale = Vec::new();
    while let Some(message) = addresses.try_next().await.context("listing addresses")? {
        let ip = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        match ip {
            Some(ip) if ip == address.addr() && message.header.prefix_len == address.prefix_len() => present = true,
            Some(_) => stale.push(message),
            None => {}
        }
    }
    for message in stale {
        handle.address().del(message).execute().await.context("removing a stale address")?;
    }
    if !present {
        handle
            .address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len())
            .execute()
            .await
            .with_context(|| format!("adding {address} to link {index}"))?;
    }
    Ok(())
}

/// `ip route replace <dst> via <gateway> dev <index> [onlink] proto 11`.
pub async fn replace_route(handle: &Handle, dst: Ipv4Net, gateway: Ipv4Addr, index: u32, onlink: bool) -> Result<()> {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(gateway)
        .output_interface(index)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
    if onlink {
        builder = builder.onlink();
    }
    handle.route().add(builder.build()).replace().execute().await.with_context(|| format!("route {dst} via {gateway}"))
}

/// Deletes the route to `dst` via link `index`. The protocol must be the route's own: the
/// kernel only deletes a route whose protocol matches a non-zero one in the request.
pub async fn delete_route(handle: &Handle, dst: Ipv4Net, index: u32, protocol: u8) -> Result<()> {
    let message = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(index)
        .protocol(RouteProtocol::from(protocol))
        .build();
    ignore_missing(handle.route().del(message).execute().await).with_context(|| format!("deleting route {dst}"))
}

/// An IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: u8,
}

pub async fn routes(handle: &Handle) -> Result<Vec<Route>> {
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut stream = handle.route().get(filter).execute();
    let mut out = Vec::new();
    while let Some(message) = stream.try_next().await.context("listing routes")? {
        if message.header.table != 254 {
            continue; // main table only
        }
        out.push(route_of(&message));
    }
    Ok(out)
}

fn route_of(message: &RouteMessage) -> Route {
    let mut route = Route {
        dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, message.header.destination_prefix_length).unwrap_or_default(),
        gateway: None,
        oif: None,
        protocol: u8::from(message.header.protocol),
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                route.dst = Ipv4Net::new(*ip, message.header.destination_prefix_length).unwrap_or_default()
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            _ => {}
        }
    }
    route
}

/// True when `peer` is reached without a gateway (same L2 segment): the most specific route
/// containing it has no gateway.
pub fn on_link(routes: &[Route], peer: Ipv4Addr) -> bool {
    routes
        .iter()
        .filter(|r| r.dst.contains(&peer))
        .max_by_key(|r| r.dst.prefix_len())
        .is_some_and(|r| r.gateway.is_none())
}

/// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
pub async fn replace_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| format!("neighbour {ip} lladdr {mac}"))
}

/// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
pub async fn replace_fdb(handle: &Handle, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
    handle
        .neighbours()
        .add_bridge(index, &mac.0)
        .destination(IpAddr::V4(dst))
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| format!("fdb {mac} dst {dst}"))
}

/// Neighbour (family inet) or FDB (family bridge) entries on link `index`.
pub async fn neighbours(handle: &Handle, index: u32, bridge: bool) -> Result<Vec<NeighbourMessage>> {
    let request = handle.neighbours().get();
    let request = if bridge {
        request.set_address_family(AddressFamily::Bridge)
    } else {
        request.set_address_family(AddressFamily::Inet)
    };
    let all: Vec<NeighbourMessage> = request.execute().try_collect().await.context("listing neighbours")?;
    Ok(all.into_iter().filter(|n| n.header.ifindex == index).collect())
}

pub fn neighbour_ip(message: &NeighbourMessage) -> Option<Ipv4Addr> {
    message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub fn neighbour_mac(message: &NeighbourMessage) -> Option<Mac> {
    message.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => Some(Mac([m[0], m[1], m[2], m[3], m[4], m[5]])),
        _ => None,
    })
}

/// The indexes of the links enslaved to bridge `bridge` (its ports).
pub async fn bridge_ports(handle: &Handle, bridge: u32) -> Result<Vec<u32>> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.context("listing links")?;
    Ok(links
        .iter()
        .filter(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(m) if *m == bridge)))
        .map(|l| l.header.index)
        .collect())
}

/// MAC → port for the addresses bridge `bridge` learned (its forwarding database without the
/// ports' own permanent entries).
pub async fn bridge_learned_macs(handle: &Handle, bridge: u32) -> Result<Vec<(Mac, u32)>> {
    let all: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .context("listing the bridge forwarding database")?;
    Ok(all
        .iter()
        .filter(|n| n.header.state != NeighbourState::Permanent)
        .filter(|n| n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Controller(m) if *m == bridge)))
        .filter_map(|n| Some((neighbour_mac(n)?, n.header.ifindex)))
        .collect())
}

/// True for a neighbour entry whose MAC can be trusted (resolved at some point).
pub fn neighbour_resolved(message: &NeighbourMessage) -> bool {
    !matches!(message.header.state, NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None)
}

pub async fn delete_neighbour(handle: &Handle, message: NeighbourMessage) -> Result<()> {
    ignore_missing(handle.neighbours().del(message).execute().await).context("deleting a neighbour/fdb entry")
}

fn ignore_missing(result: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match result {
        Err(rtnetlink::Error::NetlinkError(e)) if [-libc::ENOENT, -libc::ESRCH].contains(&e.raw_code()) => Ok(()),
        other => other,
    }
}
