//! Per-CPU datapath counters (`fl_stats_v1`): one slot per path and per drop reason.

pub const STATS_MAP: &str = "fl_stats_v1";

/// Slots of the per-CPU array; the agent names them in `inspect`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// VXLAN from a current lease's PublicIP, decapsulated.
    Decapsulated = 0,
    /// VXLAN on our port and VNI from an address that holds no lease: dropped.
    DropSpoofedSource = 1,
    /// VXLAN from a peer whose inner destination MAC is not our VtepMAC: dropped.
    DropWrongVtepMac = 2,
    /// Pod traffic encapsulated towards a remote vxlan lease.
    Encapsulated = 3,
}

pub const STAT_SLOTS: u32 = 4;

impl Stat {
    pub const ALL: [Stat; STAT_SLOTS as usize] =
        [Stat::Decapsulated, Stat::DropSpoofedSource, Stat::DropWrongVtepMac, Stat::Encapsulated];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Decapsulated => "vxlan-decapsulated",
            Stat::DropSpoofedSource => "drop-vxlan-unknown-source",
            Stat::DropWrongVtepMac => "drop-vxlan-wrong-vtep-mac",
            Stat::Encapsulated => "vxlan-encapsulated",
        }
    }
}
