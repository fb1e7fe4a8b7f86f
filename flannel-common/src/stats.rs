//! Per-CPU datapath counters (`fl_stats_v1`): one slot per path and per drop reason.

pub const STATS_MAP: &str = "fl_stats_v1";

/// Slots of the per-CPU array; the agent names them in `inspect`. New counters take the
/// next free number, so the map's layout (and name) survive additions.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// VXLAN from a current lease's PublicIP on our VNI for our VtepMAC: accepted.
    Decapsulated = 0,
    /// VXLAN on our port and VNI from an address that holds no lease: dropped.
    DropSpoofedSource = 1,
    /// VXLAN from a peer whose inner destination MAC is not our VtepMAC: dropped.
    DropWrongVtepMac = 2,
    /// Pod or host traffic given the tunnel key of a remote vxlan lease.
    Encapsulated = 3,
    /// Pod or host traffic sent straight to a host-gw peer's PublicIP.
    HostGwForwarded = 4,
    /// Pod traffic to a remote lease with TTL ≤ 1: dropped (the stack answers nothing).
    DropTtlExceeded = 5,
    /// The packet could not be rewritten (tunnel key, MACs, TTL, masquerade): dropped.
    DropRewriteFailed = 6,
    /// Pod → outside connections given a new masquerade mapping.
    SnatNewMapping = 7,
    /// Pod → outside packets translated to the node address.
    SnatTranslated = 8,
    /// Replies translated back to the pod.
    SnatReplyTranslated = 9,
    /// No free port in the masquerade range after the retries: dropped.
    DropSnatNoPort = 10,
    /// A mapping found with its reverse half evicted by the LRU, and restored.
    SnatRestored = 11,
    /// VXLAN on our port from a lease holder but with another VNI: dropped.
    DropWrongVni = 12,
    /// Decapsulated frame that is not IPv4 (ARP, IPv6, …): dropped, never handed to the stack.
    DropInnerNotIpv4 = 13,
    /// Traffic routed into the tunnel device for an address no lease covers: dropped.
    DropNoLease = 14,
    /// Bypass: delivered straight into a local pod (`bpf_redirect_peer`).
    BypassDeliveredToPod = 15,
    /// Bypass: a packet of a flow the stack carried the other way, handed to the stack.
    BypassToStack = 16,
    /// Bypass: pod traffic forwarded from the pod bridge without the stack.
    BypassForwarded = 17,
    /// A received tunnel frame without tunnel metadata: dropped.
    DropNoTunnelKey = 18,
    /// Pod → outside TCP that is not a SYN and has no translation (evicted, swept): dropped,
    /// never sent with the pod's address.
    DropSnatNoMapping = 19,
    /// A pod → outside IPv4 fragment that cannot be translated (no ports): dropped.
    DropSnatFragment = 20,
    /// An IPv4 header the programs cannot read safely (IHL < 5, lengths beyond the packet).
    DropMalformed = 21,
    /// ICMP errors about masqueraded flows translated back to the pod (outer and embedded).
    SnatIcmpErrorTranslated = 22,
    /// An inbound flow from outside (UDP, or a TCP SYN) to a pod not given an identity entry:
    /// over the per-CPU budget for new ones (its replies are then dropped, not masqueraded).
    SnatInboundOverBudget = 23,
    /// Bypass: a packet larger than the path's MTU, handed to the stack (which answers with
    /// ICMP frag-needed or fragments it).
    BypassTooBigToStack = 24,
    /// Bypass: a packet with metadata the bypass does not carry (a VLAN tag), handed to the
    /// stack.
    BypassUnsupportedToStack = 25,
}

/// Capacity of the counters array (more than [`Stat::ALL`], so counters can be added without
/// changing the map).
pub const STAT_SLOTS: u32 = 32;

impl Stat {
    pub const ALL: [Stat; 26] = [
        Stat::Encapsulated,
        Stat::HostGwForwarded,
        Stat::Decapsulated,
        Stat::DropSpoofedSource,
        Stat::DropWrongVtepMac,
        Stat::DropTtlExceeded,
        Stat::DropRewriteFailed,
        Stat::SnatNewMapping,
        Stat::SnatTranslated,
        Stat::SnatReplyTranslated,
        Stat::DropSnatNoPort,
        Stat::SnatRestored,
        Stat::DropWrongVni,
        Stat::DropInnerNotIpv4,
        Stat::DropNoLease,
        Stat::DropNoTunnelKey,
        Stat::BypassForwarded,
        Stat::BypassDeliveredToPod,
        Stat::BypassToStack,
        Stat::BypassTooBigToStack,
        Stat::BypassUnsupportedToStack,
        Stat::DropSnatNoMapping,
        Stat::DropSnatFragment,
        Stat::DropMalformed,
        Stat::SnatIcmpErrorTranslated,
        Stat::SnatInboundOverBudget,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Decapsulated => "vxlan-decapsulated",
            Stat::DropSpoofedSource => "drop-vxlan-unknown-source",
            Stat::DropWrongVtepMac => "drop-vxlan-wrong-vtep-mac",
            Stat::Encapsulated => "vxlan-encapsulated",
            Stat::HostGwForwarded => "host-gw-forwarded",
            Stat::DropTtlExceeded => "drop-ttl-exceeded",
            Stat::DropRewriteFailed => "drop-rewrite-failed",
            Stat::SnatNewMapping => "snat-new-mapping",
            Stat::SnatTranslated => "snat-translated",
            Stat::SnatReplyTranslated => "snat-reply-translated",
            Stat::DropSnatNoPort => "drop-snat-no-free-port",
            Stat::SnatRestored => "snat-mapping-restored",
            Stat::DropWrongVni => "drop-vxlan-wrong-vni",
            Stat::DropInnerNotIpv4 => "drop-vxlan-inner-not-ipv4",
            Stat::DropNoLease => "drop-no-lease",
            Stat::DropNoTunnelKey => "drop-no-tunnel-key",
            Stat::BypassForwarded => "bypass-forwarded",
            Stat::BypassDeliveredToPod => "bypass-delivered-to-pod",
            Stat::BypassToStack => "bypass-to-stack",
            Stat::DropSnatNoMapping => "drop-snat-no-mapping",
            Stat::DropSnatFragment => "drop-snat-fragment",
            Stat::DropMalformed => "drop-malformed",
            Stat::SnatIcmpErrorTranslated => "snat-icmp-error-translated",
            Stat::SnatInboundOverBudget => "snat-inbound-over-budget",
            Stat::BypassTooBigToStack => "bypass-too-big-to-stack",
            Stat::BypassUnsupportedToStack => "bypass-unsupported-to-stack",
        }
    }
}
