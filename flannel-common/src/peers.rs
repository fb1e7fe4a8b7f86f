//! The set of PublicIPs that hold a vxlan lease (`fl_peers_v1`): the only sources whose VXLAN
//! packets are decapsulated (flannel's kernel vxlan device accepts them from anyone).

pub const PEERS_MAP: &str = "fl_peers_v1";
pub const PEERS_MAX_ENTRIES: usize = 65536;
