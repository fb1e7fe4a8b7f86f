//! Reading Ethernet/IPv4 headers from a TC packet: the one parser every program uses.

use aya_ebpf::programs::TcContext;
use flannel_common::{
    flows::FlowKey,
    node::NodeConfig,
    snat::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
const TCP_FLAGS_OFF: usize = 13;

/// The parts of an IPv4 packet the programs decide on.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Offset of the L4 header.
    pub l4: usize,
    /// TCP/UDP ports; ICMP echo: the identifier as the requester's port (the request's
    /// source port, the reply's destination port), so a reply's reversed tuple is its
    /// request's. 0 for everything else and for non-first fragments.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags, read once with the ports; 0 otherwise.
    pub tcp_flags: u8,
    /// ICMP type; 0xff for other protocols.
    pub icmp_type: u8,
    /// A non-first fragment: no L4 header.
    pub later_fragment: bool,
}

impl Flow {
    /// The tuple of this flow's replies.
    #[inline(always)]
    pub fn reversed(&self) -> Flow {
        Flow { src: self.dst, dst: self.src, src_port: self.dst_port, dst_port: self.src_port, ..*self }
    }

    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_ip: self.src,
            dst_ip: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// True for an Ethernet frame carrying IPv4.
#[inline(always)]
pub fn is_ipv4(ctx: &TcContext) -> bool {
    matches!(ctx.load::<u16>(12), Ok(t) if u16::from_be(t) == ETH_P_IP)
}

/// The flow of an IPv4 frame; None for anything else or a header that does not fit.
#[inline(always)]
pub fn ipv4_flow(ctx: &TcContext) -> Option<Flow> {
    if !is_ipv4(ctx) {
        return None;
    }
    let ip: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
        return None;
    }
    let l4 = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let mut flow = Flow {
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
        proto,
        l4,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0xff,
        later_fragment,
    };
    if later_fragment {
        return Some(flow);
    }
    match proto {
        IPPROTO_TCP => {
            let head: [u8; TCP_FLAGS_OFF + 1] = ctx.load(l4).ok()?;
            flow.src_port = u16::from_be_bytes([head[0], head[1]]);
            flow.dst_port = u16::from_be_bytes([head[2], head[3]]);
            flow.tcp_flags = head[TCP_FLAGS_OFF];
        }
        IPPROTO_UDP => {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP => {
            let head: [u8; 6] = ctx.load(l4).ok()?;
            flow.icmp_type = head[0];
            let id = u16::from_be_bytes([head[4], head[5]]);
            match head[0] {
                ICMP_ECHO_REQUEST => flow.src_port = id,
                ICMP_ECHO_REPLY => flow.dst_port = id,
                _ => {}
            }
        }
        _ => {}
    }
    Some(flow)
}

/// True when `ip` lies in the cluster network.
#[inline(always)]
pub fn in_network(ip: [u8; 4], node: &NodeConfig) -> bool {
    let prefix = u32::from(node.network_prefix);
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32)) };
    u32::from_be_bytes(ip) & mask == u32::from_be_bytes(node.network) & mask
}
