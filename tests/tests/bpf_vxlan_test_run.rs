//! BPF_PROG_TEST_RUN unit tests of the forwarding programs: VXLAN encapsulation
//! (`fl_pod_egress`, `fl_host_egress`) with byte-exact outer headers as flannel's kernel vxlan
//! writes them, host-gw forwarding, TTL handling and the pass-through decisions; VXLAN decap
//! (`fl_underlay_ingress`) with its drops. Root only; fails loudly otherwise.

use std::net::Ipv4Addr;

use aya::{
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use flannel_common::{Stat, STATS_MAP};
use flannel_tests::{packet, require_root};

#[path = "support/ebpf_node.rs"]
mod ebpf_node;
use ebpf_node::{node_object, EXT_MAC};

/// TC_ACT_UNSPEC (-1): TCX runs the next program, then the stack takes the packet.
const TC_ACT_NEXT: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const OUR_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x02];
/// The bridge's MAC as BPF_PROG_TEST_RUN sees it: frames are classified against the
/// loopback device's all-zero address, so this is what makes them PACKET_HOST.
const CNI0_MAC: [u8; 6] = [0; 6];
const TC_ACT_SHOT: u32 = 2;

/// Our node as the tests see it: see [`node_object`].
fn setup() -> Ebpf {
    require_root().unwrap();
    node_object(OUR_IP, OUR_VTEP, PEER_IP, PEER_VTEP).unwrap()
}

fn run_xdp(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &Xdp = ebpf.program("fl_underlay_ingress").unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 128];
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn stat(ebpf: &Ebpf, stat: Stat) -> u64 {
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map(STATS_MAP).unwrap()).unwrap();
    stats.get(&(stat as u32), 0).unwrap().iter().sum()
}

/// Runs `fl_pod_egress` (what pods send, bridge ingress) on `frame`; returns the verdict and
/// the output frame.
fn run(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    run_tc(ebpf, "fl_pod_egress", frame)
}

fn run_tc(ebpf: &Ebpf, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 128];
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn pod_frame(dst: Ipv4Addr, tos: u8) -> Vec<u8> {
    pod_frame_ttl(dst, tos, 64)
}

fn pod_frame_ttl(dst: Ipv4Addr, tos: u8, ttl: u8) -> Vec<u8> {
    let mut f = packet::udp4(POD_MAC, CNI0_MAC, Ipv4Addr::new(10, 244, 1, 2), dst, 40000, 5201, b"flannel-rs payload");
    f[packet::ETH_HLEN + 1] = tos;
    f[packet::ETH_HLEN + 8] = ttl;
    set_ipv4_checksum(&mut f);
    f
}

/// What the stack's forwarding does to a routed packet: TTL − 1, checksum updated.
fn forwarded(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[packet::ETH_HLEN + 8] -= 1;
    set_ipv4_checksum(&mut f);
    f
}

fn set_ipv4_checksum(f: &mut [u8]) {
    f[packet::ETH_HLEN + 10] = 0;
    f[packet::ETH_HLEN + 11] = 0;
    let c = packet::checksum(&f[packet::ETH_HLEN..packet::ETH_HLEN + packet::IPV4_HLEN]);
    f[packet::ETH_HLEN + 10..packet::ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn remote_vxlan_destination_is_encapsulated_byte_exactly() {
    let ebpf = setup();
    // ECN CE (0x03) with DSCP 0x28: only the ECN bits are copied outward.
    let inner = pod_frame(Ipv4Addr::new(10, 244, 2, 3), 0xa3);
    let (verdict, out) = run(&ebpf, &inner);
    assert_eq!(verdict, TC_ACT_REDIRECT, "handed to bpf_redirect_neigh");
    assert_eq!(out.len(), inner.len() + 50);

    let inner_ip_len = inner.len() - 14;
    let mut expected = Vec::new();
    // Outer Ethernet: MACs left for bpf_redirect_neigh to fill in; IPv4.
    expected.extend_from_slice(&[0; 12]);
    expected.extend_from_slice(&[0x08, 0x00]);
    // Outer IPv4: our PublicIP → the peer's, UDP, TTL 64, ECN from the inner header.
    let mut ip = packet::ipv4_header(OUR_IP, PEER_IP, packet::IPPROTO_UDP, (8 + 8 + 14 + inner_ip_len) as u16);
    ip[1] = 0x03;
    ip[6] = 0; // no DF, as the kernel vxlan device by default
    ip[10] = 0;
    ip[11] = 0;
    let c = packet::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    expected.extend_from_slice(&ip);
    // UDP: source port from the flow hash (checked below), dport 8472, length, checksum 0.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    expected.extend_from_slice(&sport.to_be_bytes());
    expected.extend_from_slice(&8472u16.to_be_bytes());
    expected.extend_from_slice(&((8 + 8 + 14 + inner_ip_len) as u16).to_be_bytes());
    expected.extend_from_slice(&[0, 0]);
    // VXLAN: I flag, VNI 1.
    expected.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 0x01, 0]);
    // Inner Ethernet: the peer's VtepMAC ← ours, as flannel puts it on the wire.
    expected.extend_from_slice(&PEER_VTEP);
    expected.extend_from_slice(&OUR_VTEP);
    expected.extend_from_slice(&[0x08, 0x00]);
    // The pod's IPv4 packet, forwarded: TTL 63, checksum still valid.
    expected.extend_from_slice(&forwarded(&inner)[14..]);
    assert_eq!(out, expected);
    assert_eq!(packet::checksum(&out[64..84]), 0, "inner IPv4 checksum valid");
    assert_eq!(packet::checksum(&out[14..34]), 0, "outer IPv4 checksum valid");
    assert!((32768..61000).contains(&sport), "source port {sport} in the kernel vxlan range");

    // The same flow always gets the same source port (ECMP/RSS on the underlay stay per flow).
    let (_, again) = run(&ebpf, &inner);
    assert_eq!(&again[34..36], &out[34..36]);
}

#[test]
fn host_traffic_is_encapsulated_without_a_ttl_change() {
    let ebpf = setup();
    let sent = pod_frame(Ipv4Addr::new(10, 244, 2, 3), 0);
    let (verdict, out) = run_tc(&ebpf, "fl_host_egress", &sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[64..], &sent[14..], "already routed by the stack: the inner packet is untouched");
}

#[test]
fn host_gw_destination_is_forwarded_to_the_peer_with_the_ttl_decremented() {
    let ebpf = setup();
    let frame = pod_frame(Ipv4Addr::new(10, 244, 3, 3), 0);
    let (verdict, out) = run(&ebpf, &frame);
    assert_eq!((verdict, out), (TC_ACT_REDIRECT, forwarded(&frame)));
    assert_eq!(stat(&ebpf, Stat::HostGwForwarded), 1);
    let (verdict, out) = run_tc(&ebpf, "fl_host_egress", &frame);
    assert_eq!((verdict, out), (TC_ACT_REDIRECT, frame));
    assert_eq!(stat(&ebpf, Stat::Encapsulated), 0);
}

#[test]
fn pod_traffic_at_ttl_one_is_dropped_and_counted() {
    let ebpf = setup();
    for dst in [Ipv4Addr::new(10, 244, 2, 3), Ipv4Addr::new(10, 244, 3, 3)] {
        assert_eq!(run(&ebpf, &pod_frame_ttl(dst, 0, 1)).0, TC_ACT_SHOT, "{dst}");
    }
    assert_eq!(stat(&ebpf, Stat::DropTtlExceeded), 2);
    assert_eq!(stat(&ebpf, Stat::Encapsulated) + stat(&ebpf, Stat::HostGwForwarded), 0);
}

#[test]
fn local_external_bridged_and_non_ipv4_traffic_pass_untouched() {
    let ebpf = setup();
    for dst in [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(203, 0, 113, 10)] {
        let frame = pod_frame(dst, 0);
        assert_eq!(run(&ebpf, &frame), (TC_ACT_NEXT, frame.clone()), "{dst}");
    }
    let mut arp = pod_frame(Ipv4Addr::new(10, 244, 2, 3), 0);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(run(&ebpf, &arp), (TC_ACT_NEXT, arp.clone()));
    // A frame for another MAC (PACKET_OTHERHOST, the bridge in promiscuous mode) is not ours
    // to route, even to a remote lease.
    let mut other_host = pod_frame(Ipv4Addr::new(10, 244, 2, 3), 0);
    other_host[0..6].copy_from_slice(&[0x0a, 0, 0, 0, 0, 0x07]);
    assert_eq!(run(&ebpf, &other_host), (TC_ACT_NEXT, other_host.clone()));
}

/// The pod packet the peer sends us, inside the VXLAN frame its kernel vxlan device builds.
fn from_peer(outer_src: Ipv4Addr, inner_dst_mac: [u8; 6]) -> (Vec<u8>, Vec<u8>) {
    let inner = packet::udp4(
        PEER_VTEP,
        inner_dst_mac,
        Ipv4Addr::new(10, 244, 2, 3),
        Ipv4Addr::new(10, 244, 1, 2),
        5201,
        40000,
        b"reply",
    );
    (packet::vxlan4(outer_src, OUR_IP, 45678, 8472, 1, &inner), inner)
}

#[test]
fn vxlan_from_a_peer_is_decapsulated_for_the_stack() {
    let ebpf = setup();
    let (frame, inner) = from_peer(PEER_IP, OUR_VTEP);
    let (verdict, out) = run_xdp(&ebpf, &frame);
    assert_eq!(verdict, XDP_PASS);
    let mut expected = inner.clone();
    expected[0..6].copy_from_slice(&EXT_MAC);
    assert_eq!(out, expected, "the inner frame, addressed to our external interface");
    assert_eq!(stat(&ebpf, Stat::Decapsulated), 1);
}

#[test]
fn vxlan_from_an_unknown_source_or_for_another_vtep_is_dropped_and_counted() {
    let ebpf = setup();
    let (spoofed, _) = from_peer(Ipv4Addr::new(198, 51, 100, 66), OUR_VTEP);
    assert_eq!(run_xdp(&ebpf, &spoofed).0, XDP_DROP);
    assert_eq!(stat(&ebpf, Stat::DropSpoofedSource), 1);
    let (wrong_mac, _) = from_peer(PEER_IP, [0x02, 0, 0, 0, 0, 0x99]);
    assert_eq!(run_xdp(&ebpf, &wrong_mac).0, XDP_DROP);
    assert_eq!(stat(&ebpf, Stat::DropWrongVtepMac), 1);
    assert_eq!(stat(&ebpf, Stat::Decapsulated), 0);
}

#[test]
fn other_traffic_passes_untouched() {
    let ebpf = setup();
    let (vxlan, inner) = from_peer(PEER_IP, OUR_VTEP);
    let mut other_port = vxlan.clone();
    other_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
    let mut other_vni = vxlan.clone();
    other_vni[46] = 7;
    let not_for_us = packet::vxlan4(PEER_IP, Ipv4Addr::new(192, 0, 2, 99), 45678, 8472, 1, &inner);
    let plain = packet::udp4(POD_MAC, CNI0_MAC, PEER_IP, OUR_IP, 1000, 8472, b"not vxlan at all, too short");
    for frame in [other_port, other_vni, not_for_us, plain, inner] {
        assert_eq!(run_xdp(&ebpf, &frame), (XDP_PASS, frame.clone()));
    }
    assert_eq!(stat(&ebpf, Stat::Decapsulated) + stat(&ebpf, Stat::DropSpoofedSource), 0);
}

#[test]
fn our_encapsulation_is_what_the_peer_decapsulates() {
    let us = setup();
    let peer = node_object(PEER_IP, PEER_VTEP, OUR_IP, OUR_VTEP).unwrap();
    let sent = pod_frame(Ipv4Addr::new(10, 244, 2, 3), 0);
    let (verdict, mut wire) = run(&us, &sent);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(stat(&us, Stat::Encapsulated), 1);
    // bpf_redirect_neigh would fill the outer MACs in.
    wire[0..12].copy_from_slice(&[0x02, 0, 0, 0, 0xee, 0x12, 0x02, 0, 0, 0, 0xee, 0x11]);
    // On the peer our PublicIP is a lease holder and 10.244.1.0/24 is ours.
    let (verdict, received) = run_xdp(&peer, &wire);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&received[14..], &forwarded(&sent)[14..], "the pod's packet arrives as routed once");
    assert_eq!(&received[6..12], &OUR_VTEP, "inner source MAC is our VtepMAC");
}
