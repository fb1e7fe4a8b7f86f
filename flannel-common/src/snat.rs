//! Masquerade state (`fl_snat_v1`): one LRU hash holding both halves of every translation.
//!
//! A pod → outside connection gets an *egress* entry keyed by its original tuple (value: the
//! node address and port it is rewritten to) and an *ingress* entry keyed by the reply's tuple
//! as it arrives (value: the pod address and port to restore). The ingress half is inserted
//! first with `BPF_NOEXIST`, which is what reserves the port. Ports are host byte order, so
//! `bpftool map dump` shows them as numbers people recognise. For ICMP echo the identifier
//! takes the place of the pod-side port and the other port is 0.
//!
//! Every other IP protocol (GRE, ESP, SCTP, …: [`address_only`]) is translated like
//! conntrack's generic L3 tracking does under MASQUERADE: the address only, keyed by the
//! 3-tuple {pod, remote, proto} with both ports 0 (and `to_port` 0). Such a key cannot collide
//! with a TCP, UDP or ICMP one — not even an ICMP echo whose identifier is 0 — because `proto`
//! is part of the key and these keys never carry 1, 6 or 17. One pod at a time may talk a
//! given protocol to a given remote: the reply key {remote, node, proto} is the whole
//! reservation, so a second pod gets `drop-snat-no-port` until the first one's pair is swept
//! (`--snat-idle-timeout`), as conntrack refuses a clashing generic entry.

pub const SNAT_MAP: &str = "fl_snat_v1";
/// Identity entries for flows outside hosts open to local pods (UDP, TCP SYN): keyed like an
/// egress half (the pod's reply tuple), value: the pod's own address and port. A separate LRU
/// so that a flood of inbound tuples can only evict other identity entries, never a
/// translation in [`SNAT_MAP`].
pub const SNAT_INBOUND_MAP: &str = "fl_snat_inbound_v1";
pub const SNAT_INBOUND_MAX_ENTRIES: u32 = 16384;
/// Per-CPU budget of new identity entries ([`InboundBudget`], one slot).
pub const SNAT_BUDGET_MAP: &str = "fl_snat_budget_v1";
/// New identity entries a CPU may create per [`SNAT_INBOUND_WINDOW_NS`]; beyond it the flow
/// is not recorded (its replies are masqueraded, as for a flow the LRU evicted) and counted
/// as `snat-inbound-over-budget`. At this rate a flood needs several seconds to cycle
/// [`SNAT_INBOUND_MAP`], while recently used entries survive its LRU.
pub const SNAT_INBOUND_BUDGET: u32 = 1024;
pub const SNAT_INBOUND_WINDOW_NS: u64 = 1_000_000_000;
/// Both halves count: this many entries hold half as many connections.
pub const SNAT_MAX_ENTRIES: u32 = 131072;

/// A TCP FIN or RST was seen: the agent expires the pair after a short TIME_WAIT-like delay.
pub const SNAT_FLAG_CLOSING: u16 = 1;

pub const SNAT_EGRESS: u8 = 0;
pub const SNAT_INGRESS: u8 = 1;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Whether masquerade translates `proto` by address only (no ports, no L4 checksum): every
/// protocol but TCP, UDP and ICMP.
#[inline(always)]
pub const fn address_only(proto: u8) -> bool {
    !matches!(proto, IPPROTO_ICMP | IPPROTO_TCP | IPPROTO_UDP)
}

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

/// One CPU's use of [`SNAT_INBOUND_BUDGET`] in the current window. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundBudget {
    /// `bpf_ktime_get_ns()` at which the current window began.
    pub window_start_ns: u64,
    /// Identity entries created in it.
    pub used: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding fields, every bit pattern valid.
    unsafe impl aya::Pod for super::SnatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SnatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundBudget {}
}
