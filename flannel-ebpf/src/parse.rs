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
    /// [`Ipv4Header::sound`]: the total length covers the header and fits the frame.
    pub sound: bool,
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

/// The fixed 20 bytes of an IPv4 header as read, before any check of them: enough for a
/// program to decide on the addresses alone, without touching L4 (masquerade skips most
/// packets this way), and to tell a malformed header from a sound one.
#[derive(Clone, Copy)]
pub struct Ipv4Header(pub [u8; 20]);

/// Fragment offset bits of the IPv4 flags/offset field.
const IP_OFFSET_MASK: u16 = 0x1fff;

impl Ipv4Header {
    #[inline(always)]
    pub fn src(&self) -> [u8; 4] {
        [self.0[12], self.0[13], self.0[14], self.0[15]]
    }

    #[inline(always)]
    pub fn dst(&self) -> [u8; 4] {
        [self.0[16], self.0[17], self.0[18], self.0[19]]
    }

    #[inline(always)]
    pub fn proto(&self) -> u8 {
        self.0[9]
    }

    /// Version 4 and IHL ≥ 5: the only headers [`ipv4_flow`] reads further.
    #[inline(always)]
    pub fn version_and_ihl_ok(&self) -> bool {
        self.0[0] >> 4 == 4 && self.0[0] & 0x0f >= 5
    }

    /// A non-first fragment: no L4 header.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        u16::from_be_bytes([self.0[6], self.0[7]]) & IP_OFFSET_MASK != 0
    }

    /// [`Self::version_and_ihl_ok`], and the total length covers the header and fits in the
    /// `skb_len`-byte frame (Ethernet padding may follow it). A total length of 0 on a frame
    /// over 64 KiB is IPv4 BIG TCP's GSO packet, as the kernel's `iph_totlen` reads it.
    #[inline(always)]
    pub fn sound(&self, skb_len: u32) -> bool {
        if !self.version_and_ihl_ok() {
            return false;
        }
        let ip_len = skb_len.saturating_sub(ETH_HLEN as u32);
        let total = u32::from(u16::from_be_bytes([self.0[2], self.0[3]]));
        if total == 0 {
            return ip_len > 0xffff;
        }
        total >= u32::from(self.0[0] & 0x0f) * 4 && total <= ip_len
    }
}

/// The IPv4 header of an Ethernet frame carrying IPv4, unchecked; None for anything else or
/// a frame too short for 20 bytes of it.
#[inline(always)]
pub fn ipv4_header(ctx: &TcContext) -> Option<Ipv4Header> {
    if !is_ipv4(ctx) {
        return None;
    }
    ctx.load(ETH_HLEN).ok().map(Ipv4Header)
}

/// [`ipv4_header`] read straight from the packet when the linear data holds the Ethernet and
/// IPv4 headers, as it does for nearly every packet: no helper call, which is most of what
/// deciding to skip a packet costs (masquerade sees every packet on the external interface).
/// Headers beyond the linear data are copied by the helper as [`ipv4_header`] does.
#[inline(always)]
pub fn ipv4_header_fast(ctx: &TcContext) -> Option<Ipv4Header> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_HLEN + 20 > end {
        return ipv4_header(ctx);
    }
    // SAFETY: both reads lie within [data, data_end), checked just above (and by the verifier).
    let (ethertype, header) = unsafe {
        (
            core::ptr::read_unaligned((data + 12) as *const [u8; 2]),
            core::ptr::read_unaligned((data + ETH_HLEN) as *const [u8; 20]),
        )
    };
    (u16::from_be_bytes(ethertype) == ETH_P_IP).then_some(Ipv4Header(header))
}

/// The flow of an IPv4 frame; None for anything else or a header that does not fit.
#[inline(always)]
pub fn ipv4_flow(ctx: &TcContext) -> Option<Flow> {
    let header = ipv4_header(ctx)?;
    if !header.version_and_ihl_ok() {
        return None;
    }
    header_flow(ctx, &header)
}

/// The flow of a frame whose IPv4 header passed [`Ipv4Header::version_and_ihl_ok`]: the
/// addresses, and the ports (ICMP: type and echo identifier) unless it is a later fragment;
/// None when the L4 header they come from does not fit.
#[inline(always)]
pub fn header_flow(ctx: &TcContext, header: &Ipv4Header) -> Option<Flow> {
    let ip = &header.0;
    let l4 = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let later_fragment = header.later_fragment();
    let mut flow = Flow {
        src: header.src(),
        dst: header.dst(),
        proto,
        l4,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0xff,
        later_fragment,
        sound: header.sound(ctx.len()),
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
