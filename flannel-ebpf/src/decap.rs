//! Underlay ingress: VXLAN on our port and VNI, addressed to us, from the PublicIP of a
//! current lease is decapsulated — the outer 50 bytes go and the inner packet continues as if
//! it had arrived on the external interface, so the stack routes it to the pod with no vxlan
//! device involved. VXLAN from any other source is dropped and counted. Everything else
//! passes after a few bounds-checked reads.
//!
//! Two front ends share the decision ([`classify`]):
//! - `fl_underlay_ingress` (XDP, the default): the cheapest hook on a NIC, before any skb
//!   exists; the frame is readdressed to the external MAC and passed up.
//! - `fl_underlay_ingress_tc` (TCX ingress, `--vxlan-decap tc`): works on the skb, so a GSO
//!   packet (a veth or a NIC with UDP-tunnel GRO delivers 64 KiB of VXLAN at once) is
//!   decapsulated once, not per segment, and the sending side keeps its segmentation offload.
//!   The outer Ethernet header is kept: it is already addressed to us.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::bpf_xdp_adjust_head,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
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
/// Everything the decision reads: outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet.
const HEADERS: usize = INNER_ETH_OFF + ETH_HLEN;

/// What to do with a frame arriving from the underlay.
enum Decision {
    /// Not VXLAN for us: let it through untouched.
    Pass,
    /// Our VXLAN from a lease holder: remove the outer headers.
    Decapsulate,
    /// Our port and VNI, but not from a lease holder or not for our VTEP.
    Drop(Stat),
}

/// The decision from the frame's first [`HEADERS`] bytes.
#[inline(always)]
fn classify(h: &[u8; HEADERS]) -> Decision {
    if h[12] != 0x08 || h[13] != 0x00 {
        return Decision::Pass;
    }
    let ip = &h[ETH_HLEN..UDP_OFF];
    // IPv4 without options, UDP, not a fragment.
    if ip[0] != 0x45 || ip[9] != 17 || (u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff) != 0 {
        return Decision::Pass;
    }
    let Some(node) = NODE.get(0) else { return Decision::Pass };
    let port = u16::from_be_bytes([h[UDP_OFF + 2], h[UDP_OFF + 3]]);
    if port != node.vxlan_port || ip[16..20] != node.public_ip {
        return Decision::Pass;
    }
    let vxlan = &h[VXLAN_OFF..INNER_ETH_OFF];
    let vni = u32::from_be_bytes([vxlan[4], vxlan[5], vxlan[6], vxlan[7]]) >> 8;
    if vxlan[0] & 0x08 == 0 || vni != node.vni {
        return Decision::Pass;
    }
    let source: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    // SAFETY: the value is not kept past this lookup.
    if unsafe { PEERS.get(&source) }.is_none() {
        return Decision::Drop(Stat::DropSpoofedSource);
    }
    if h[INNER_ETH_OFF..INNER_ETH_OFF + 6] != node.vtep_mac {
        return Decision::Drop(Stat::DropWrongVtepMac);
    }
    Decision::Decapsulate
}

#[xdp(frags)]
pub fn fl_underlay_ingress(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + HEADERS > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: the range was checked to lie inside the packet.
    let headers = unsafe { core::ptr::read_unaligned(start as *const [u8; HEADERS]) };
    match classify(&headers) {
        Decision::Pass => XDP_PASS,
        Decision::Drop(reason) => {
            count(reason);
            XDP_DROP
        }
        Decision::Decapsulate => xdp_decapsulate(&ctx),
    }
}

fn xdp_decapsulate(ctx: &XdpContext) -> u32 {
    let Some(node) = NODE.get(0) else { return XDP_PASS };
    let ext_mac = node.ext_mac;
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return XDP_ABORTED;
    }
    // The inner frame now starts the packet: address it to our external interface so the
    // stack takes it as its own and routes the inner packet to the pod.
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return XDP_ABORTED;
    }
    // SAFETY: bounds checked just above.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; 6], ext_mac) };
    count(Stat::Decapsulated);
    XDP_PASS
}

#[classifier]
pub fn fl_underlay_ingress_tc(ctx: TcContext) -> i32 {
    let Ok(headers) = ctx.load::<[u8; HEADERS]>(0) else { return TC_ACT_UNSPEC };
    match classify(&headers) {
        Decision::Pass => TC_ACT_UNSPEC,
        Decision::Drop(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
        // Removes the 50 bytes after the outer MAC header (outer IPv4, UDP, VXLAN and the
        // inner Ethernet header). FIXED_GSO: a GSO packet's segment size is the inner MSS,
        // which decapsulation does not change.
        Decision::Decapsulate => {
            match ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64) {
                Ok(()) => {
                    count(Stat::Decapsulated);
                    TC_ACT_UNSPEC
                }
                Err(_) => {
                    count(Stat::DropRewriteFailed);
                    TC_ACT_SHOT
                }
            }
        }
    }
}
