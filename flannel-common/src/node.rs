//! This node's datapath settings (`fl_node_v2`, a one-entry array written by the agent).

pub const NODE_MAP: &str = "fl_node_v2";

/// What the programs need to know about this node. 48 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Our PublicIP (outer source address), network byte order.
    pub public_ip: [u8; 4],
    /// Our VtepMAC (inner source MAC of encapsulated frames).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// VXLAN network identifier.
    pub vni: u32,
    /// VXLAN UDP destination port, host byte order (8472 unless the config says otherwise).
    pub vxlan_port: u16,
    pub _pad2: u16,
    /// The external (underlay) interface encapsulated packets leave through.
    pub ext_ifindex: u32,
    /// The external interface's MAC: decapsulated frames are addressed to it so that the
    /// stack accepts them as its own and routes them to the pod.
    pub ext_mac: [u8; 6],
    pub _pad3: [u8; 2],
    /// The cluster network (config `Network`), network byte order, and its prefix length.
    pub network: [u8; 4],
    pub network_prefix: u8,
    /// 1: masquerade pod → outside traffic (`--ip-masq`); 0: translate nothing.
    pub snat: u8,
    pub _pad4: [u8; 2],
    /// The address pod → outside traffic is translated to (the external interface's).
    pub snat_ip: [u8; 4],
    /// The masquerade port range, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), explicit padding fields, every bit pattern valid.
    unsafe impl aya::Pod for super::NodeConfig {}
}
