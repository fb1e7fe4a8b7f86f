//! Pod egress: VXLAN encapsulation done by the program instead of a vxlan device.
//!
//! For an IPv4 packet whose destination lies in a remote vxlan lease, the program grows the
//! packet by 50 bytes after the MAC header with `bpf_skb_adjust_room` (the ENCAP flags tell
//! the kernel where the inner headers are, so GSO packets are segmented and checksummed
//! correctly), writes the outer Ethernet/IPv4/UDP/VXLAN headers and the inner Ethernet header
//! exactly as flannel's kernel vxlan device would (inner src = our VtepMAC, dst = the peer's;
//! UDP source port from the flow hash; outer UDP checksum 0), and hands the packet to
//! `bpf_redirect_neigh` on the underlay interface, which routes the outer header and fills in
//! the outer MACs. Everything else continues through the stack untouched.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::Array,
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh},
    macros::{btf_map, classifier},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use flannel_common::{leases::LEASE_KIND_VXLAN, node::NodeConfig};

use crate::leases::LEASES;

#[btf_map(name = "fl_node_v1")]
pub static NODE: Array<NodeConfig, 1> = Array::new();

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// Outer Ethernet is reused from the original frame; what is inserted after it.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const ETH_P_IP: u16 = 0x0800;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header length, for GSO.
const ENCAP_L2_ETH: u64 = (ETH_HLEN as u64) << 56;
/// The kernel's default ephemeral range, which vxlan's `udp_flow_src_port` maps hashes into.
const SRC_PORT_MIN: u32 = 32768;
const SRC_PORT_MAX: u32 = 61000;

#[classifier]
pub fn fl_pod_egress(ctx: TcContext) -> i32 {
    match encapsulate(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => TC_ACT_SHOT,
    }
}

fn encapsulate(ctx: &TcContext) -> Result<i32, ()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if ethertype != ETH_P_IP {
        return Ok(TC_ACT_OK);
    }
    let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    let Some(lease) = LEASES.get(&Key::new(32, dst)) else { return Ok(TC_ACT_OK) };
    if lease.kind != LEASE_KIND_VXLAN {
        // Local subnet, host-gw peers: the stack delivers or routes them.
        return Ok(TC_ACT_OK);
    }
    let lease = *lease;
    let Some(node) = NODE.get(0) else { return Ok(TC_ACT_OK) };
    let node = *node;

    // As the kernel's vxlan (ip_tunnel_ecn_encap): the outer header carries the inner ECN bits.
    let inner_tos: u8 = ctx.load(ETH_HLEN + 1).map_err(|_| ())?;
    // The flow hash must come from the inner packet, before the headers change.
    // SAFETY: skb is the program's context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64 | ENCAP_L2_ETH;
    ctx.adjust_room(ENCAP_LEN as i32, aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| ())?;

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
    ctx.store(0, &h, 0).map_err(|_| ())?;
    crate::decap::count(flannel_common::stats::Stat::Encapsulated);

    // SAFETY: plain helper call; null params = look the next hop up from the outer header.
    let verdict = unsafe { bpf_redirect_neigh(node.ext_ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(verdict as i32)
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
