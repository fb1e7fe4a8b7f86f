//! `fl_pod_egress` (TC ingress of each known pod's host-side veth, `--netfilter-bypass` only):
//! what the pod sends to its gateway (the bridge's MAC) for a remote pod is forwarded here,
//! without the node's bridge, routing and netfilter: into the tunnel device with the lease's
//! key (vxlan), or out of the external interface to the peer (host-gw). The receiving side
//! delivers the other direction the same way, so conntrack sees neither direction and
//! nothing it would call INVALID.
//!
//! The veth, not the bridge: with `br_netfilter` (every Kubernetes node) iptables PREROUTING
//! — kube-proxy's DNAT — already ran on a frame by the time the bridge passes it up, and a
//! ClusterIP flow forwarded from there would never be un-DNATed on the way back.
//!
//! Handed to the stack unchanged: frames for other pods on the bridge, traffic for anything
//! but a remote lease (the node, ClusterIPs, outside), a source that is not this veth's pod
//! (IP, MAC and veth must match its endpoint entry), and flows whose other direction the
//! stack carried (see `flannel_common::flows`), and what `forward::bypass_fits` refuses: a
//! VLAN tag in the metadata, an IPv4 length beyond the frame, a packet over the MTU of the
//! device it would leave through (so the stack fragments it or answers frag-needed).

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_redirect, macros::classifier, maps::lpm_trie::Key, programs::TcContext,
};
use flannel_common::{leases::LeaseKind, stats::Stat};

use crate::{
    forward::{bypass_fits, decrement_ttl, redirect_via, set_tunnel, stack_carries_reverse, BYPASS_MARK},
    maps::{count, ENDPOINTS, LEASES, NODE},
    parse::ipv4_flow,
    tunnel::verdict,
};

#[classifier]
pub fn fl_pod_egress(ctx: TcContext) -> i32 {
    verdict(pod_egress(&ctx))
}

#[inline(always)]
fn pod_egress(ctx: &TcContext) -> Result<i32, Stat> {
    let Some(flow) = ipv4_flow(ctx) else { return Ok(TC_ACT_UNSPEC) };
    let Some(lease) = LEASES.get(&Key::new(32, flow.dst)) else { return Ok(TC_ACT_UNSPEC) };
    let lease = *lease;
    let kind = LeaseKind::from_u8(lease.kind);
    if !matches!(kind, Some(LeaseKind::Vxlan | LeaseKind::HostGw)) {
        return Ok(TC_ACT_UNSPEC);
    }
    let Some(node) = NODE.get(0) else { return Ok(TC_ACT_UNSPEC) };
    let node = *node;
    if node.bypass == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    // Routed by the pod (sent to its gateway, the bridge), not bridged to a neighbour.
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else { return Ok(TC_ACT_UNSPEC) };
    if macs[..6] != node.bridge_mac {
        return Ok(TC_ACT_UNSPEC);
    }
    // Only this veth's own pod, from its own address and MAC: anything else (a spoofed
    // source) takes the stack, where the node's rules apply.
    // SAFETY: the value is copied out at once.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&flow.src) }).copied() else { return Ok(TC_ACT_UNSPEC) };
    // SAFETY: skb is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if macs[6..] != endpoint.mac || ifindex != endpoint.ifindex {
        return Ok(TC_ACT_UNSPEC);
    }
    if stack_carries_reverse(&flow) {
        count(Stat::BypassToStack);
        return Ok(TC_ACT_UNSPEC);
    }
    // Nothing is rewritten before this: what it refuses reaches the stack as the pod sent it.
    let target = if kind == Some(LeaseKind::HostGw) { node.ext_ifindex } else { node.tunnel_ifindex };
    if !bypass_fits(ctx, &flow, target) {
        return Ok(TC_ACT_UNSPEC);
    }
    decrement_ttl(ctx)?;
    count(Stat::BypassForwarded);
    // The egress program of the device it is redirected to must not take it for the stack's.
    // SAFETY: skb is the program's context.
    unsafe { (*ctx.skb.skb).mark |= BYPASS_MARK };
    if kind == Some(LeaseKind::HostGw) {
        count(Stat::HostGwForwarded);
        return Ok(redirect_via(node.ext_ifindex, lease.public_ip));
    }
    set_tunnel(ctx, &node, &lease)?;
    count(Stat::Encapsulated);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(node.tunnel_ifindex, 0) } as i32)
}
