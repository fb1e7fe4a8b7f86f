//! Packet counters per interface and direction: the first programs of the chain
//! (build → embed → load → attach → pin → read back).

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST, TC_ACT_UNSPEC},
    btf_maps::PerCpuHashMap,
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use flannel_common::counters::{Direction, IfaceCounterKey, PacketCounter, COUNTERS_MAX_ENTRIES};

#[btf_map(name = "fl_counters_v1")]
static COUNTERS: PerCpuHashMap<IfaceCounterKey, PacketCounter, COUNTERS_MAX_ENTRIES> = PerCpuHashMap::new();

/// Adds one packet of `bytes` to this CPU's counter for (`ifindex`, `direction`).
#[inline(always)]
fn count(ifindex: u32, direction: Direction, bytes: u64) {
    let key = IfaceCounterKey { ifindex, direction: direction as u32 };
    let slot = match COUNTERS.get_ptr_mut(&key) {
        Some(slot) => slot,
        None => {
            // First packet on this key: create it. A concurrent creator on another CPU makes
            // BPF_NOEXIST fail, which is fine: the entry exists either way.
            let _ = COUNTERS.insert(&key, &PacketCounter::default(), BPF_NOEXIST as u64);
            match COUNTERS.get_ptr_mut(&key) {
                Some(slot) => slot,
                None => return, // map full: nothing to count into
            }
        }
    };
    // SAFETY: a per-CPU slot is only written by this CPU, and programs are not preempted.
    unsafe {
        (*slot).packets += 1;
        (*slot).bytes += bytes;
    }
}

/// Counts every frame received on the interface, then lets it continue.
#[xdp]
pub fn fl_count_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(ctx.ingress_ifindex() as u32, Direction::XdpIngress, bytes);
    xdp_action::XDP_PASS
}

/// Counts every packet sent on the interface. Returns TC_ACT_UNSPEC (TCX_NEXT) so programs
/// attached after this one still run.
#[classifier]
pub fn fl_count_tc(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count(ifindex, Direction::TcEgress, ctx.len() as u64);
    TC_ACT_UNSPEC
}
