//! The tunnel device `flannel.<VNI>` (collect-metadata vxlan): its programs turn the one
//! device into flannel.1 without per-lease state in the kernel — the lease map says where
//! every subnet lives.
//!
//! - `fl_tunnel_egress` (TC egress): what the stack routes into the device (the one route
//!   `<Network> dev flannel.<VNI>`: node traffic, and all pod traffic unless the bypass took
//!   it) gets the remote lease's inner MACs and tunnel key; the device encapsulates. No lease:
//!   dropped and counted. Frames the bypass already keyed (marked) pass untouched; with the bypass on,
//!   the stack's flows are recorded so their replies come back through the stack.
//! - `fl_tunnel_ingress` (TC ingress): the device accepts every VNI from every sender, so
//!   this is where flannel's membership is enforced: our VNI, a source holding a vxlan lease,
//!   our VtepMAC as the inner destination, inner IPv4 — everything else is dropped and
//!   counted. Accepted frames go to the stack (it routes them to the pod bridge), or, with
//!   the bypass, straight into a known local pod.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_skb_get_tunnel_key,
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use flannel_common::{leases::LeaseKind, stats::Stat};

use crate::{
    forward::{bypass_to_pod, record_stack_flow, set_tunnel, take_bypass_mark, TunnelKey, TUNNEL_KEY_SIZE},
    maps::{count, LEASES, NODE, PEERS},
    parse::{ipv4_flow, is_ipv4},
};

#[classifier]
pub fn fl_tunnel_egress(ctx: TcContext) -> i32 {
    verdict(tunnel_egress(&ctx))
}

#[classifier]
pub fn fl_tunnel_ingress(ctx: TcContext) -> i32 {
    verdict(tunnel_ingress(&ctx))
}

/// Ok: the verdict; Err: drop, counted under the reason.
#[inline(always)]
pub fn verdict(result: Result<i32, Stat>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn tunnel_egress(ctx: &TcContext) -> Result<i32, Stat> {
    // Not IPv4 (the device's own IPv6 chatter): the device drops it, having no key for it.
    let Some(flow) = ipv4_flow(ctx) else { return Ok(TC_ACT_UNSPEC) };
    let Some(node) = NODE.get(0) else { return Ok(TC_ACT_UNSPEC) };
    let node = *node;
    if take_bypass_mark(ctx) {
        // fl_pod_egress keyed it and redirected it here.
        return Ok(TC_ACT_UNSPEC);
    }
    let lease = match LEASES.get(&Key::new(32, flow.dst)) {
        Some(lease) if lease.kind == LeaseKind::Vxlan as u8 => *lease,
        _ => return Err(Stat::DropNoLease),
    };
    set_tunnel(ctx, &node, &lease)?;
    if node.bypass != 0 {
        record_stack_flow(&flow);
    }
    count(Stat::Encapsulated);
    Ok(TC_ACT_UNSPEC)
}

#[inline(always)]
fn tunnel_ingress(ctx: &TcContext) -> Result<i32, Stat> {
    let Some(node) = NODE.get(0) else { return Err(Stat::DropNoTunnelKey) };
    let node = *node;
    let mut key = TunnelKey::uninit();
    // SAFETY: key lives for the call; the kernel fills (or, failing, zeroes) TUNNEL_KEY_SIZE
    // bytes of it, all there are.
    if unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, key.as_mut_ptr().cast(), TUNNEL_KEY_SIZE, 0) } != 0 {
        return Err(Stat::DropNoTunnelKey);
    }
    // SAFETY: written by the helper just above.
    let key = unsafe { key.assume_init() };
    if key.id() != node.vni {
        return Err(Stat::DropWrongVni);
    }
    let source = key.remote_ipv4();
    // SAFETY: the value is not kept past this lookup.
    if unsafe { PEERS.get(&source) }.is_none() {
        return Err(Stat::DropSpoofedSource);
    }
    let Ok(inner_dst) = ctx.load::<[u8; 6]>(0) else { return Err(Stat::DropWrongVtepMac) };
    if inner_dst != node.vtep_mac {
        return Err(Stat::DropWrongVtepMac);
    }
    if !is_ipv4(ctx) {
        return Err(Stat::DropInnerNotIpv4);
    }
    count(Stat::Decapsulated);
    if node.bypass == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(flow) = ipv4_flow(ctx) else { return Ok(TC_ACT_UNSPEC) };
    bypass_to_pod(ctx, &node, &flow)
}
