//! `fl_bridge_egress` (TC egress of the pod bridge, `--netfilter-bypass` only): what the stack
//! delivers to local pods (node traffic, translated flows, pods the endpoint map does not
//! know yet) is recorded, so that the pods' replies go back through the stack too. The
//! bypass delivers with `bpf_redirect_peer`, which never passes here.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

use crate::{forward::record_stack_flow, maps::NODE, parse::ipv4_flow};

#[classifier]
pub fn fl_bridge_egress(ctx: TcContext) -> i32 {
    if matches!(NODE.get(0), Some(node) if node.bypass != 0) {
        if let Some(flow) = ipv4_flow(&ctx) {
            record_stack_flow(&flow);
        }
    }
    TC_ACT_UNSPEC
}
