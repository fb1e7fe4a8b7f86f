//! The external interface with host-gw and `--netfilter-bypass` (the tunnel device plays this
//! part for vxlan):
//! - `fl_underlay_ingress` (TC ingress): IPv4 from a remote host-gw subnet to a known local
//!   pod goes straight into the pod, unless the stack carried the flow's other direction or
//!   `forward::bypass_fits` refuses it (a VLAN tag the NIC stripped into the metadata, an
//!   IPv4 length beyond the frame, over the pod veth's MTU: counted, see there).
//!   Everything else continues to the stack (or to `fl_snat_ingress`) untouched.
//! - `fl_underlay_egress` (TC egress): records the flows the stack sends to host-gw peers
//!   (their replies must come back through the stack); the bypass's own frames carry
//!   the bypass mark, which is cleared here.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, maps::lpm_trie::Key, programs::TcContext};
use flannel_common::{leases::LeaseKind, stats::Stat};

use crate::{
    forward::{bypass_to_pod, record_stack_flow, take_bypass_mark},
    maps::{LEASES, NODE},
    parse::ipv4_flow,
    tunnel::verdict,
};

#[classifier]
pub fn fl_underlay_ingress(ctx: TcContext) -> i32 {
    verdict(underlay_ingress(&ctx))
}

#[classifier]
pub fn fl_underlay_egress(ctx: TcContext) -> i32 {
    if take_bypass_mark(&ctx) {
        return TC_ACT_UNSPEC;
    }
    if let Some(flow) = ipv4_flow(&ctx) {
        if is_host_gw_peer(flow.dst) {
            record_stack_flow(&flow);
        }
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn is_host_gw_peer(ip: [u8; 4]) -> bool {
    matches!(LEASES.get(&Key::new(32, ip)), Some(lease) if lease.kind == LeaseKind::HostGw as u8)
}

#[inline(always)]
fn underlay_ingress(ctx: &TcContext) -> Result<i32, Stat> {
    let Some(flow) = ipv4_flow(ctx) else { return Ok(TC_ACT_UNSPEC) };
    let Some(node) = NODE.get(0) else { return Ok(TC_ACT_UNSPEC) };
    let node = *node;
    if node.bypass == 0 || !is_host_gw_peer(flow.src) {
        return Ok(TC_ACT_UNSPEC);
    }
    bypass_to_pod(ctx, &node, &flow)
}
