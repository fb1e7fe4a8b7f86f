//! Masquerade state (`fl_snat_v1`): one LRU hash holding both halves of every translation.
//!
//! A pod → outside connection gets an *egress* entry keyed by its original tuple (value: the
//! node address and port it is rewritten to) and an *ingress* entry keyed by the reply's tuple
//! as it arrives (value: the pod address and port to restore). The ingress half is inserted
//! first with `BPF_NOEXIST`, which is what reserves the port. Ports are host byte order, so
//! `bpftool map dump` shows them as numbers people recognise. For ICMP echo the identifier
//! takes the place of the pod-side port and the other port is 0.

pub const SNAT_MAP: &str = "fl_snat_v1";
/// Both halves count: this many entries hold half as many connections.
pub const SNAT_MAX_ENTRIES: u32 = 131072;

/// A TCP FIN or RST was seen: the agent expires the pair after a short TIME_WAIT-like delay.
pub const SNAT_FLAG_CLOSING: u16 = 1;

pub const SNAT_EGRESS: u8 = 0;
pub const SNAT_INGRESS: u8 = 1;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A packet's tuple as seen at the external interface. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatKey {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`SNAT_EGRESS`] or [`SNAT_INGRESS`].
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// What the matching packet is rewritten to. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatEntry {
    /// Egress: the new source address; ingress: the pod's address (new destination).
    pub to_ip: [u8; 4],
    /// Egress: the new source port; ingress: the pod's port.
    pub to_port: u16,
    /// [`SNAT_FLAG_CLOSING`] once a TCP FIN or RST went through this half.
    pub flags: u16,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet, refreshed at most once a
    /// second; the agent sweeps pairs idle longer than `--snat-idle-timeout`.
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding fields, every bit pattern valid.
    unsafe impl aya::Pod for super::SnatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SnatEntry {}
}
