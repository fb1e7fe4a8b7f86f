//! Injecting crafted VXLAN from a namespace: the receive-side tests send what a member, a
//! non-member or a misconfigured peer would, and check what the node delivers, drops and counts.
//!
//! [`send_vxlan`] sends through a plain UDP socket, so the kernel of the sending namespace
//! builds the outer Ethernet/IPv4/UDP headers (its routing, ARP, ephemeral source port and UDP
//! checksum) exactly as for any datagram; only the VXLAN header and the inner frame are ours.
//! (Through a veth that checksum stays unfinished unless offload is off on the sender: see
//! [`crate::capture`].)

use std::net::{Ipv4Addr, UdpSocket};

use anyhow::{ensure, Context, Result};

use crate::{
    packet::{icmp_echo4, Mac, ETH_P_ARP, ETH_P_IP, VXLAN_FLAG_VNI, VXLAN_HLEN},
    NetNs,
};

/// flannel's VXLAN port (Linux's default, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;

/// Sends one VXLAN datagram from `src_ip` (an address of `from`: a hand node, the external
/// host) to `dst_ip:dst_port`: the 8-byte VXLAN header with `vni` and `inner` (an Ethernet
/// frame) as the UDP payload.
pub fn send_vxlan(
    from: &NetNs,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    dst_port: u16,
    vni: u32,
    inner: &[u8],
) -> Result<()> {
    ensure!(vni < 1 << 24, "VNI {vni} does not fit VXLAN's 24 bits");
    let mut payload = Vec::with_capacity(VXLAN_HLEN + inner.len());
    payload.extend_from_slice(&[VXLAN_FLAG_VNI, 0, 0, 0]);
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let place = format!("{src_ip} in {} → {dst_ip}:{dst_port}", from.name());
    from.run_in(|| -> Result<()> {
        // Bound to `src_ip` so the outer source is the sender being impersonated, not whatever
        // address routing would pick. Port 0: an ephemeral port, from the range a vxlan
        // device's flow-hash ports come from too (receivers do not check it).
        let socket = UdpSocket::bind((src_ip, 0)).context("binding the UDP socket")?;
        let sent = socket.send_to(&payload, (dst_ip, dst_port)).context("sending")?;
        ensure!(sent == payload.len(), "sent {sent} of {} bytes", payload.len());
        Ok(())
    })
    .and_then(|sent| sent)
    .with_context(|| format!("sending VXLAN (VNI {vni}) from {place}"))
}

/// An inner Ethernet frame with an ICMP echo request `src_ip` → `dst_ip` (DF, TTL 64, valid
/// checksums), as a pod's ping looks inside VXLAN.
pub fn inner_ipv4_icmp_echo(
    dst_mac: Mac,
    src_mac: Mac,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    id: u16,
    seq: u16,
) -> Vec<u8> {
    const ICMP_ECHO_REQUEST: u8 = 8;
    let mut frame = icmp_echo4(src_ip, dst_ip, ICMP_ECHO_REQUEST, id, seq);
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame
}

/// An inner Ethernet frame with a broadcast ARP request "who has `target_ip`, tell
/// `sender_ip`" from `src_mac` (flannel never sends ARP over VXLAN: it programs neighbours).
pub fn inner_arp_request(src_mac: Mac, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPOP_REQUEST: u16 = 1;
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&ARPHRD_ETHER.to_be_bytes());
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&[6, 4]); // hardware and protocol address lengths
    frame.extend_from_slice(&ARPOP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&sender_ip.octets());
    frame.extend_from_slice(&[0; 6]); // target hardware address: unknown, being asked
    frame.extend_from_slice(&target_ip.octets());
    frame
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{
        capture::{
            disable_tx_checksum_offload,
            tests::{pair, A, B, MAC_A, MAC_B},
            Capture, Direction,
        },
        packet::{checksums_valid, ETH_HLEN, IPPROTO_ICMP, IPV4_HLEN, UDP_HLEN},
    };

    const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);

    #[test]
    fn inner_echo_is_a_valid_ping() {
        let frame = inner_ipv4_icmp_echo(MAC_B, MAC_A, POD_A, POD_B, 0x1234, 7);
        assert!(checksums_valid(&frame));
        assert_eq!(&frame[0..12], [MAC_B, MAC_A].concat());
        assert_eq!(frame[12..14], ETH_P_IP.to_be_bytes());
        let ip = &frame[ETH_HLEN..];
        assert_eq!((ip[9], &ip[12..16], &ip[16..20]), (IPPROTO_ICMP, &POD_A.octets()[..], &POD_B.octets()[..]));
        let icmp = &ip[IPV4_HLEN..];
        assert_eq!((icmp[0], &icmp[4..8]), (8, &[0x12, 0x34, 0, 7][..]), "echo request, id, seq");
    }

    #[test]
    fn inner_arp_request_layout() {
        let frame = inner_arp_request(MAC_A, POD_A, POD_B);
        #[rustfmt::skip]
        let expected = [
            &[0xff; 6][..], &MAC_A, &[0x08, 0x06],                 // Ethernet: broadcast, ARP
            &[0, 1, 0x08, 0x00, 6, 4, 0, 1],                       // Ethernet/IPv4, request
            &MAC_A, &POD_A.octets(), &[0; 6], &POD_B.octets(),     // sender, target
        ]
        .concat();
        assert_eq!(frame, expected);
    }

    /// What `send_vxlan` sends is exactly what a capture on the receiver reads back.
    #[test]
    fn sent_vxlan_reads_back_through_a_capture_on_the_receiver() {
        let (a, b) = pair("probe");
        // So the kernel finishes the UDP checksum before the frame leaves (see `capture`).
        disable_tx_checksum_offload(&a, "eth0").unwrap();
        let mut capture = Capture::start(&b, "eth0").unwrap();
        let inner = inner_ipv4_icmp_echo(MAC_B, MAC_A, POD_A, POD_B, 1, 1);
        send_vxlan(&a, A, B, VXLAN_PORT, 0x123456, &inner).unwrap();
        let frames = capture.frames_until(Instant::now() + Duration::from_secs(2), 1, |f| f.vxlan().is_some()).unwrap();
        let frame = frames.first().expect("the VXLAN frame arrived");
        assert_eq!(frame.direction, Direction::Incoming);
        assert!(!frame.checksum_pending);
        let v = frame.vxlan().unwrap();
        assert_eq!((v.src, v.dst, v.dst_port, v.vni), (A, B, VXLAN_PORT, 0x123456));
        assert_eq!((v.inner_dst_mac, v.inner_src_mac, v.inner_ethertype), (MAC_B, MAC_A, ETH_P_IP));
        assert_eq!((v.inner_src_ip, v.inner_dst_ip), (Some(POD_A), Some(POD_B)));
        assert!(v.udp_checksum != 0 && v.udp_checksum_valid == Some(true), "{v:?}");
        let payload = &frame.data[ETH_HLEN + IPV4_HLEN + UDP_HLEN..];
        assert_eq!(payload[..8], [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(&payload[8..], inner, "the inner frame unchanged");

        let arp = inner_arp_request(MAC_A, POD_A, POD_B);
        send_vxlan(&a, A, B, VXLAN_PORT, 1, &arp).unwrap();
        let frames = capture.frames_until(Instant::now() + Duration::from_secs(2), 1, |f| f.vxlan().is_some()).unwrap();
        let v = frames.first().expect("the ARP VXLAN frame arrived").vxlan().unwrap();
        assert_eq!((v.inner_dst_mac, v.inner_ethertype, v.inner_src_ip), ([0xff; 6], ETH_P_ARP, None));
    }

    #[test]
    fn send_vxlan_errors_name_the_sender() {
        let (a, _b) = pair("probeerr");
        let foreign = Ipv4Addr::new(198, 51, 100, 7);
        let error = format!("{:#}", send_vxlan(&a, foreign, B, VXLAN_PORT, 1, &[0; 14]).unwrap_err());
        assert!(error.contains("198.51.100.7") && error.contains(a.name()), "not an address of the namespace: {error}");
        let error = format!("{:#}", send_vxlan(&a, A, B, VXLAN_PORT, 1 << 24, &[0; 14]).unwrap_err());
        assert!(error.contains("24 bits"), "{error}");
    }
}
