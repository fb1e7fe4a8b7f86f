//! Traffic towards the cluster: VXLAN encapsulation and host-gw forwarding done by the
//! program instead of a vxlan device and the route table.
//!
//! Two entry points share one body:
//! - `fl_pod_egress`, TC ingress of the pod bridge (cni0): what pods send to the node. It is
//!   routed here, so it only handles frames addressed to the bridge and decrements the TTL as
//!   the stack's forwarding would.
//! - `fl_host_egress`, TC egress of the agent's `fl_host` device, which carries the route to
//!   the cluster network: traffic the node itself originates (and pod traffic until the
//!   bridge exists), already routed by the stack.
//!
//! The destination is looked up in the lease map. A remote vxlan lease: the packet grows by
//! 50 bytes after the MAC header with `bpf_skb_adjust_room` (the ENCAP flags tell the kernel
//! where the inner headers are, so GSO packets are segmented and checksummed correctly), the
//! outer Ethernet/IPv4/UDP/VXLAN headers and the inner Ethernet header are written exactly as
//! flannel's kernel vxlan device would (inner src = our VtepMAC, dst = the peer's; UDP source
//! port from the flow hash; outer UDP checksum 0), and `bpf_redirect_neigh` on the underlay
//! routes the outer header and fills in the outer MACs. A host-gw lease: `bpf_redirect_neigh`
//! with the peer's PublicIP as next hop. Everything else continues untouched, with
//! `TC_ACT_UNSPEC` (TCX_NEXT) so other programs on the same hook still see it — as do all our
//! TC programs.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use flannel_common::{
    leases::{LeaseEntry, LeaseKind},
    node::NodeConfig,
    stats::Stat,
};

use crate::maps::{count, LEASES, NODE};

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// Outer Ethernet is reused from the original frame; what is inserted after it.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const ETH_P_IP: u16 = 0x0800;
const AF_INET: u32 = 2;
/// `skb->pkt_type` of a frame addressed to this host's MAC.
const PACKET_HOST: u32 = 0;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header length, for GSO.
const ENCAP_L2_ETH: u64 = (ETH_HLEN as u64) << 56;
/// The kernel's default ephemeral range, which vxlan's `udp_flow_src_port` maps hashes into.
const SRC_PORT_MIN: u32 = 32768;
const SRC_PORT_MAX: u32 = 61000;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;

/// Where the packet entered the program, which decides whether we are forwarding it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Received from a pod on the bridge: we route it, so the TTL drops by one.
    Pod,
    /// Sent by the stack through `fl_host`: already routed (or locally generated).
    Stack,
}

#[classifier]
pub fn fl_pod_egress(ctx: TcContext) -> i32 {
    verdict(forward(&ctx, Origin::Pod))
}

#[classifier]
pub fn fl_host_egress(ctx: TcContext) -> i32 {
    verdict(forward(&ctx, Origin::Stack))
}

#[inline(always)]
fn verdict(result: Result<i32, Stat>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn forward(ctx: &TcContext, origin: Origin) -> Result<i32, Stat> {
    let Ok(ethertype) = ctx.load::<u16>(12) else { return Ok(TC_ACT_UNSPEC) };
    if u16::from_be(ethertype) != ETH_P_IP {
        return Ok(TC_ACT_UNSPEC);
    }
    // SAFETY: skb is the program's context.
    if origin == Origin::Pod && unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        // Bridged between pods (or seen in promiscuous mode): not ours to route.
        return Ok(TC_ACT_UNSPEC);
    }
    let Ok(dst) = ctx.load::<[u8; 4]>(ETH_HLEN + 16) else { return Ok(TC_ACT_UNSPEC) };
    let Some(lease) = LEASES.get(&Key::new(32, dst)) else { return Ok(TC_ACT_UNSPEC) };
    let lease = *lease;
    let kind = LeaseKind::from_u8(lease.kind);
    if !matches!(kind, Some(LeaseKind::Vxlan | LeaseKind::HostGw)) {
        // Our own subnet: the bridge delivers it.
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(node) = NODE.get(0) else { return Ok(TC_ACT_UNSPEC) };
    let node = *node;
    if origin == Origin::Pod {
        decrement_ttl(ctx)?;
    }
    if kind == Some(LeaseKind::HostGw) {
        count(Stat::HostGwForwarded);
        return Ok(redirect_via(node.ext_ifindex, lease.public_ip));
    }
    encapsulate(ctx, &node, &lease)?;
    count(Stat::Encapsulated);
    // SAFETY: plain helper call; null params = look the next hop up from the outer header.
    Ok(unsafe { bpf_redirect_neigh(node.ext_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// As `ip_forward` does: drop at TTL ≤ 1, else decrement with an incremental checksum fix.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), Stat> {
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| Stat::DropRewriteFailed)?;
    if ttl <= 1 {
        return Err(Stat::DropTtlExceeded);
    }
    // TTL is the high byte of the checksummed 16-bit word it shares with the protocol.
    let old = u32::from(u16::from_be_bytes([ttl, 0]).to_be());
    let new = u32::from(u16::from_be_bytes([ttl - 1, 0]).to_be());
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 2).map_err(|_| Stat::DropRewriteFailed)?;
    ctx.store(IP_TTL_OFF, &(ttl - 1), 0).map_err(|_| Stat::DropRewriteFailed)
}

/// `bpf_redirect_neigh` out of `ifindex` with `next_hop` (network order) as the neighbour.
#[inline(always)]
fn redirect_via(ifindex: u32, next_hop: [u8; 4]) -> i32 {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: u32::from_ne_bytes(next_hop) },
    };
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    // SAFETY: nh lives for the call; its size is passed along.
    unsafe { bpf_redirect_neigh(ifindex, &mut nh, size, 0) as i32 }
}

/// Pushes the outer headers for `lease` in front of the inner IPv4 packet.
#[inline(always)]
fn encapsulate(ctx: &TcContext, node: &NodeConfig, lease: &LeaseEntry) -> Result<(), Stat> {
    // As the kernel's vxlan (ip_tunnel_ecn_encap): the outer header carries the inner ECN bits.
    let inner_tos: u8 = ctx.load(ETH_HLEN + 1).map_err(|_| Stat::DropRewriteFailed)?;
    // The flow hash must come from the inner packet, before the headers change.
    // SAFETY: skb is the program's context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64 | ENCAP_L2_ETH;
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags).map_err(|_| Stat::DropRewriteFailed)?;

    let mut h = [0u8; ETH_HLEN + ENCAP_LEN];
    // Outer Ethernet: bpf_redirect_neigh fills in the MACs; the type stays IPv4.
    h[12] = 0x08;
    // Outer IPv4.
    let total = (IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + inner_len) as u16;
    let ip = ETH_HLEN;
    h[ip] = 0x45;
    h[ip + 1] = inner_tos & 0x03;
    h[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    h[ip + 8] = 64; // TTL
    h[ip + 9] = 17; // UDP
    h[ip + 12..ip + 16].copy_from_slice(&node.public_ip);
    h[ip + 16..ip + 20].copy_from_slice(&lease.public_ip);
    let checksum = ipv4_checksum(&h[ip..ip + IPV4_HLEN]);
    h[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
    // UDP: source port from the flow hash, as the kernel's vxlan does; checksum 0.
    let udp = ip + IPV4_HLEN;
    let sport = (((hash as u64) * (SRC_PORT_MAX - SRC_PORT_MIN) as u64) >> 32) as u32 + SRC_PORT_MIN;
    h[udp..udp + 2].copy_from_slice(&(sport as u16).to_be_bytes());
    h[udp + 2..udp + 4].copy_from_slice(&node.vxlan_port.to_be_bytes());
    let udp_len = (UDP_HLEN + VXLAN_HLEN + ETH_HLEN + inner_len) as u16;
    h[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
    // VXLAN: flags "VNI present", VNI in the top 24 bits of the second word.
    let vx = udp + UDP_HLEN;
    h[vx] = 0x08;
    h[vx + 4..vx + 8].copy_from_slice(&(node.vni << 8).to_be_bytes());
    // Inner Ethernet: peer's VtepMAC ← our VtepMAC, IPv4.
    let inner = vx + VXLAN_HLEN;
    h[inner..inner + 6].copy_from_slice(&lease.vtep_mac);
    h[inner + 6..inner + 12].copy_from_slice(&node.vtep_mac);
    h[inner + 12] = 0x08;
    ctx.store(0, &h, 0).map_err(|_| Stat::DropRewriteFailed)
}

#[inline(always)]
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < IPV4_HLEN {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
