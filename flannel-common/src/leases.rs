//! The lease map (`fl_leases_v1`): an LPM trie from a node's subnet to how to reach it. The
//! agent keeps it equal to etcd's leases; the datapath programs look destinations up in it.

/// Name of the LPM trie keyed by `Key<[u8; 4]>` (prefix length + IPv4 network, network
/// byte order) with [`LeaseEntry`] values.
pub const LEASES_MAP: &str = "fl_leases_v1";

/// Capacity: flannel clusters top out well below this many nodes.
pub const LEASES_MAX_ENTRIES: usize = 65536;

/// What kind of subnet an entry is; stored in [`LeaseEntry::kind`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKind {
    /// This node's own subnet: deliver locally.
    Local = 1,
    /// A remote node reached through VXLAN (outer dst = public_ip, inner dst MAC = vtep_mac).
    Vxlan = 2,
    /// A remote node on the same L2 segment: route via public_ip (host-gw, or vxlan's
    /// DirectRouting).
    HostGw = 3,
}

/// [`LeaseKind::Vxlan`] as stored in [`LeaseEntry::kind`].
pub const LEASE_KIND_VXLAN: u8 = LeaseKind::Vxlan as u8;

impl LeaseKind {
    pub const fn from_u8(raw: u8) -> Option<LeaseKind> {
        match raw {
            1 => Some(LeaseKind::Local),
            2 => Some(LeaseKind::Vxlan),
            3 => Some(LeaseKind::HostGw),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            LeaseKind::Local => "local",
            LeaseKind::Vxlan => "vxlan",
            LeaseKind::HostGw => "host-gw",
        }
    }
}

/// How to reach one subnet. 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseEntry {
    /// The node's PublicIP, network byte order.
    pub public_ip: [u8; 4],
    /// The node's VtepMAC (VXLAN inner destination MAC); zero for host-gw.
    pub vtep_mac: [u8; 6],
    /// A [`LeaseKind`] as `u8`.
    pub kind: u8,
    pub _pad: u8,
    /// VXLAN network identifier; zero for host-gw.
    pub vni: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding field, every bit pattern valid.
    unsafe impl aya::Pod for super::LeaseEntry {}
}
