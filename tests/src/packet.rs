//! Crafting packets for BPF_PROG_TEST_RUN: Ethernet/IPv4/UDP frames with valid checksums.

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
/// The VXLAN header's "I" flag: the VNI field is valid (RFC 7348); every VXLAN frame has it.
pub const VXLAN_FLAG_VNI: u8 = 0x08;

pub type Mac = [u8; 6];

/// An Ethernet + IPv4 + UDP frame carrying `payload`, with IPv4 and UDP checksums set.
pub fn udp4(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = (UDP_HLEN + payload.len()) as u16;
    let mut frame = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + udp_len as usize);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ipv4_header(src, dst, IPPROTO_UDP, udp_len));
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let checksum = match l4_checksum(src, dst, IPPROTO_UDP, &udp) {
        0 => 0xffff, // RFC 768: a computed zero is sent as all ones
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&udp);
    frame
}

/// Fixed MACs for frames whose L2 addresses do not matter (BPF_PROG_TEST_RUN classifies a
/// frame for the all-zero address as PACKET_HOST).
const ANY_MACS: [u8; 12] = [0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0x01];

fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + segment.len());
    frame.extend_from_slice(&ANY_MACS);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ipv4_header(src, dst, protocol, segment.len() as u16));
    frame.extend_from_slice(segment);
    frame
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_SYN_ACK: u8 = 0x12;
pub const TCP_PSH_ACK: u8 = 0x18;

/// An Ethernet + IPv4 + TCP (20-byte header, ACK|PSH) frame with valid checksums.
pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp4_flags(src, dst, sport, dport, TCP_PSH_ACK, payload)
}

/// As [`tcp4`] with the given TCP flags byte.
pub fn tcp4_flags(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let c = l4_checksum(src, dst, IPPROTO_TCP, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src, dst, IPPROTO_TCP, &tcp)
}

/// An Ethernet + IPv4 + ICMP echo frame (`icmp_type` 8 request, 0 reply).
pub fn icmp_echo4(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![icmp_type, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"flannel-rs ping");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(src, dst, IPPROTO_ICMP, &icmp)
}

/// Whether an Ethernet + IPv4 frame's IPv4 and L4 checksums verify (a UDP checksum of 0
/// means "none" and verifies).
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    if checksum(ip) != 0 {
        return false;
    }
    let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let segment = &frame[ETH_HLEN + IPV4_HLEN..];
    match ip[9] {
        IPPROTO_UDP if segment[6..8] == [0, 0] => true,
        IPPROTO_TCP | IPPROTO_UDP => l4_checksum(src, dst, ip[9], segment) == 0,
        IPPROTO_ICMP => checksum(segment) == 0,
        _ => true,
    }
}

/// A VXLAN frame as flannel's kernel vxlan device sends it: outer Ethernet/IPv4/UDP (checksum
/// 0) and VXLAN (flag I, `vni`) around `inner_frame` (an Ethernet frame).
pub fn vxlan4(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    vni: u32,
    inner_frame: &[u8],
) -> Vec<u8> {
    let udp_len = (UDP_HLEN + 8 + inner_frame.len()) as u16;
    let mut frame = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + udp_len as usize);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0xee, 0x02, 0x02, 0, 0, 0, 0xee, 0x01]);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = ipv4_header(outer_src, outer_dst, IPPROTO_UDP, udp_len);
    ip[6] = 0;
    ip[10] = 0;
    ip[11] = 0;
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&[0x08, 0, 0, 0]);
    frame.extend_from_slice(&(vni << 8).to_be_bytes());
    frame.extend_from_slice(inner_frame);
    frame
}

/// A 20-byte IPv4 header (DF, TTL 64) with its checksum.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> [u8; IPV4_HLEN] {
    let total = (IPV4_HLEN as u16) + l4_len;
    let mut h = [0u8; IPV4_HLEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) of `data`; 0 when `data` already carries a valid one.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// TCP/UDP checksum over the IPv4 pseudo-header and `segment`.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = protocol;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    !fold(sum(segment, sum(&pseudo, 0)))
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word =
            if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let h = ipv4_header(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2), IPPROTO_UDP, 8);
        assert_eq!(checksum(&h), 0, "a header with its checksum sums to zero");
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0x220d);
    }

    #[test]
    fn udp_checksum_verifies() {
        let (s, d) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 3));
        let f = udp4([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], s, d, 1234, 5678, b"hello");
        assert_eq!(f.len(), ETH_HLEN + IPV4_HLEN + UDP_HLEN + 5);
        assert_eq!(l4_checksum(s, d, IPPROTO_UDP, &f[ETH_HLEN + IPV4_HLEN..]), 0);
    }
}
