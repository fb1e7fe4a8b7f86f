//! Local pods (`fl_endpoints_v1`): pod IPv4 → its host-side veth and MAC, kept by the agent
//! from the pod bridge's neighbours and forwarding database. With `--netfilter-bypass` the
//! programs deliver traffic for these pods straight into them (`bpf_redirect_peer`), and only
//! forward what a pod sends when its source IP and MAC match its entry.

pub const ENDPOINTS_MAP: &str = "fl_endpoints_v1";
pub const ENDPOINTS_MAX_ENTRIES: usize = 4096;

/// 12 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointEntry {
    /// The pod's host-side veth (a port of the pod bridge).
    pub ifindex: u32,
    /// The pod's own MAC (its eth0).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::EndpointEntry {}
}
