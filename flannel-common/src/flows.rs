//! Flows the stack carried (`fl_stack_flows_v1`, LRU), recorded with `--netfilter-bypass` where
//! the stack's traffic leaves towards pods or peers (the tunnel device's egress, the pod
//! bridge's egress, the external interface's egress with host-gw). A bypass entry point that
//! sees a packet whose reverse tuple is recorded hands it to the stack instead: conntrack
//! saw the other direction, and may have to undo a translation (kube-proxy's DNAT, a
//! masquerade), so both directions of every flow take the same path.

pub const STACK_FLOWS_MAP: &str = "fl_stack_flows_v1";
pub const STACK_FLOWS_MAX_ENTRIES: u32 = 65536;

/// A packet's tuple as the stack sent it. 16 bytes, no implicit padding. ICMP echo: the
/// identifier is the requester's port (`src_port` of a request, `dst_port` of a reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// Padding as a byte and a word (a 3-byte array is zeroed with a `memset` call in BPF).
    pub _pad: u8,
    pub _pad2: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
}
