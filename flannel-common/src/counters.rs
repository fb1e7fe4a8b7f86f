//! Per-interface, per-direction packet counters (map `fl_counters_v1`).

/// Name of the per-CPU hash map that holds [`PacketCounter`]s keyed by [`IfaceCounterKey`].
pub const COUNTERS_MAP: &str = "fl_counters_v1";

/// Capacity of the counters map: interfaces × directions on one node.
pub const COUNTERS_MAX_ENTRIES: usize = 1024;

/// Which hook saw the packet. Stored as a `u32` in [`IfaceCounterKey::direction`] so the key
/// stays plain data (every bit pattern valid) for `aya::Pod`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// XDP on the interface's receive path.
    XdpIngress = 0,
    /// TC classifier on the interface's transmit path.
    TcEgress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::XdpIngress, Direction::TcEgress];

    pub const fn from_u32(raw: u32) -> Option<Direction> {
        match raw {
            0 => Some(Direction::XdpIngress),
            1 => Some(Direction::TcEgress),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Direction::XdpIngress => "xdp-ingress",
            Direction::TcEgress => "tc-egress",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfaceCounterKey {
    pub ifindex: u32,
    /// A [`Direction`] as `u32`.
    pub direction: u32,
}

/// One CPU's share of a counter; the agent sums the per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (u32+u32, u64+u64), every bit pattern is a valid value.
    unsafe impl aya::Pod for super::IfaceCounterKey {}
    unsafe impl aya::Pod for super::PacketCounter {}
}
