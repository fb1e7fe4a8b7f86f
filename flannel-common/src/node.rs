//! This node's datapath settings (`fl_node_v3`, a one-entry array written by the agent).

pub const NODE_MAP: &str = "fl_node_v3";

/// What the programs need to know about this node. 48 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Our PublicIP, network byte order.
    pub public_ip: [u8; 4],
    /// Our VtepMAC: the tunnel device's MAC, inner source MAC of what we encapsulate, and the
    /// only inner destination MAC we accept.
    pub vtep_mac: [u8; 6],
    /// 1 with `--netfilter-bypass`: the bypass programs forward, and the stack's exits record
    /// the flows they carry so that their replies go back through the stack.
    pub bypass: u8,
    pub _pad: u8,
    /// VXLAN network identifier: the only one the tunnel device's ingress accepts.
    pub vni: u32,
    /// The tunnel device (`flannel.<VNI>`, collect-metadata vxlan) pod traffic is redirected
    /// into by the bypass; 0 without vxlan.
    pub tunnel_ifindex: u32,
    /// The external (underlay) interface host-gw traffic leaves through.
    pub ext_ifindex: u32,
    /// The pod bridge (cni0) and its MAC, the source MAC of frames delivered into pods.
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
    /// The cluster network's prefix length (`network` below).
    pub network_prefix: u8,
    /// 1: masquerade pod → outside traffic (`--ip-masq`); 0: translate nothing.
    pub snat: u8,
    /// The cluster network (config `Network`), network byte order.
    pub network: [u8; 4],
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
