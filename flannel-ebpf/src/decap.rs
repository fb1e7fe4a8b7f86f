//! Underlay ingress (XDP): VXLAN on our port and VNI, addressed to us, from the PublicIP of a
//! current lease is decapsulated — the outer 50 bytes are removed and the inner frame is
//! readdressed to our external interface, so the stack routes it to the pod with no vxlan
//! device involved. VXLAN from any other source is dropped and counted. Everything else
//! passes after a few bounds-checked reads.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
};
use flannel_common::stats::Stat;

use crate::{
    egress::ENCAP_LEN,
    maps::{count, NODE, PEERS},
};

const ETH_HLEN: usize = 14;
const UDP_OFF: usize = ETH_HLEN + 20;
const VXLAN_OFF: usize = UDP_OFF + 8;
const INNER_ETH_OFF: usize = VXLAN_OFF + 8;

/// `len` bytes at `offset`, bounds-checked against the packet.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range was checked to lie inside the packet.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

#[xdp(frags)]
pub fn fl_underlay_ingress(ctx: XdpContext) -> u32 {
    match decapsulate(&ctx) {
        Some(action) => action,
        None => XDP_PASS,
    }
}

/// None: not our VXLAN, let it pass.
fn decapsulate(ctx: &XdpContext) -> Option<u32> {
    let eth: [u8; ETH_HLEN] = bytes(ctx, 0)?;
    if eth[12] != 0x08 || eth[13] != 0x00 {
        return None;
    }
    let ip: [u8; 20] = bytes(ctx, ETH_HLEN)?;
    // IPv4 without options, UDP, not a fragment.
    if ip[0] != 0x45 || ip[9] != 17 || (u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff) != 0 {
        return None;
    }
    let node = NODE.get(0)?;
    let udp: [u8; 8] = bytes(ctx, UDP_OFF)?;
    if u16::from_be_bytes([udp[2], udp[3]]) != node.vxlan_port || ip[16..20] != node.public_ip {
        return None;
    }
    let vxlan: [u8; 8] = bytes(ctx, VXLAN_OFF)?;
    let vni = u32::from_be_bytes([vxlan[4], vxlan[5], vxlan[6], vxlan[7]]) >> 8;
    if vxlan[0] & 0x08 == 0 || vni != node.vni {
        return None;
    }
    let source: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    // SAFETY: the value is not kept past this lookup.
    if unsafe { PEERS.get(&source) }.is_none() {
        count(Stat::DropSpoofedSource);
        return Some(XDP_DROP);
    }
    let inner: [u8; ETH_HLEN] = bytes(ctx, INNER_ETH_OFF)?;
    if inner[0..6] != node.vtep_mac {
        count(Stat::DropWrongVtepMac);
        return Some(XDP_DROP);
    }
    let ext_mac = node.ext_mac;
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return Some(XDP_ABORTED);
    }
    // The inner frame now starts the packet: address it to our external interface so the
    // stack takes it as its own and routes the inner packet to the pod.
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return Some(XDP_ABORTED);
    }
    // SAFETY: bounds checked just above.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 6], ext_mac) };
    count(Stat::Decapsulated);
    Some(XDP_PASS)
}
