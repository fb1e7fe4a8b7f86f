//! BPF_PROG_TEST_RUN unit tests of masquerade (`fl_snat_egress`, `fl_snat_ingress`): the
//! translation and its reverse with valid checksums for TCP, UDP and ICMP echo, flannel's skip
//! decisions, port exhaustion, restoring an evicted half, and the agent's idle sweep; and the
//! fail-closed cases: mid-flow TCP without a translation, fragments and malformed headers,
//! ICMP errors about translated flows, racing CPUs, inbound floods, a flow resuming during a
//! sweep; and the address-only translation of every other protocol (GRE, ESP, SCTP, …) with a
//! property: no pod source address leaves toward a non-cluster destination. Root only; fails
//! loudly otherwise.

use std::{net::Ipv4Addr, time::Duration};

use aya::{
    maps::{Array, HashMap, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use flannel_agent::{
    datapath::ebpf::snat::{SnatOptions, SnatTable},
    ebpf::decode::monotonic_ns,
};
use flannel_common::{
    snat::{address_only, IPPROTO_TCP, IPPROTO_UDP, SNAT_EGRESS, SNAT_INBOUND_MAP, SNAT_INGRESS},
    NodeConfig, SnatEntry, SnatKey, Stat, NODE_MAP, SNAT_MAP, STATS_MAP,
};
use flannel_tests::{
    packet::{self, TCP_SYN, TCP_SYN_ACK},
    require_root,
};

#[path = "support/ebpf_node.rs"]
mod ebpf_node;

/// TC_ACT_UNSPEC (-1): TCX runs the next program, then the stack takes the packet.
const TC_ACT_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn setup(port_min: u16, port_max: u16) -> Ebpf {
    require_root().unwrap();
    ebpf_node::snat_object(port_min, port_max).unwrap()
}

fn run(ebpf: &Ebpf, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &SchedClassifier = ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn egress(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    run(ebpf, "fl_snat_egress", frame)
}

fn ingress(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    run(ebpf, "fl_snat_ingress", frame)
}

fn stat(ebpf: &Ebpf, stat: Stat) -> u64 {
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map(STATS_MAP).unwrap()).unwrap();
    stats.get(&(stat as u32), 0).unwrap().iter().sum()
}

fn src(frame: &[u8]) -> (Ipv4Addr, u16) {
    let ip = &frame[14..34];
    (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), u16::from_be_bytes([frame[34], frame[35]]))
}

fn dst(frame: &[u8]) -> (Ipv4Addr, u16) {
    let ip = &frame[14..34];
    (Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), u16::from_be_bytes([frame[36], frame[37]]))
}

/// The frame with everything but the addresses, ports and checksums compared.
fn payload(frame: &[u8]) -> Vec<u8> {
    frame[54..].to_vec()
}

#[test]
fn tcp_to_outside_is_masqueraded_and_the_reply_returns_to_the_pod() {
    let ebpf = setup(1024, 32767);
    let sent = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"GET / HTTP/1.1");
    let (verdict, out) = egress(&ebpf, &sent);
    assert_eq!(verdict, TC_ACT_NEXT);
    let (ip, port) = src(&out);
    assert_eq!(ip, NODE, "source is the node address");
    assert!((1024..=32767).contains(&port), "port {port} from the range (40000 is outside it)");
    assert_eq!(dst(&out), (OUTSIDE, 443));
    assert!(packet::checksums_valid(&out), "IPv4 and TCP checksums valid after translation");
    assert_eq!(payload(&out), payload(&sent));

    // The same connection keeps its port.
    let (_, again) = egress(&ebpf, &packet::tcp4(POD, OUTSIDE, 40000, 443, b"more"));
    assert_eq!(src(&again), (NODE, port));

    let reply = packet::tcp4(OUTSIDE, NODE, 443, port, b"HTTP/1.1 200 OK");
    let (verdict, back) = ingress(&ebpf, &reply);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(dst(&back), (POD, 40000), "reply translated back to the pod");
    assert_eq!(src(&back), (OUTSIDE, 443));
    assert!(packet::checksums_valid(&back));
    assert_eq!(
        (stat(&ebpf, Stat::SnatNewMapping), stat(&ebpf, Stat::SnatTranslated), stat(&ebpf, Stat::SnatReplyTranslated)),
        (1, 2, 1)
    );
}

#[test]
fn udp_with_and_without_checksum_and_icmp_echo_are_translated_both_ways() {
    let ebpf = setup(1024, 32767);
    // The pod's port is in range and free: it is kept.
    let sent = packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, b"query");
    let (_, out) = egress(&ebpf, &sent);
    assert_eq!(src(&out), (NODE, 5353));
    assert!(packet::checksums_valid(&out));
    let reply = packet::udp4([2; 6], [0; 6], OUTSIDE, NODE, 53, 5353, b"answer");
    let (_, back) = ingress(&ebpf, &reply);
    assert_eq!(dst(&back), (POD, 5353));
    assert!(packet::checksums_valid(&back));

    // A UDP datagram without a checksum keeps none.
    let mut no_sum = packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5354, 53, b"query");
    no_sum[40..42].copy_from_slice(&[0, 0]);
    let (_, out) = egress(&ebpf, &no_sum);
    assert_eq!(&out[40..42], &[0, 0], "zero UDP checksum stays zero");
    assert_eq!(src(&out).0, NODE);

    // ICMP echo: the identifier is the translated "port".
    let ping = packet::icmp_echo4(POD, OUTSIDE, 8, 777, 1);
    let (_, out) = egress(&ebpf, &ping);
    assert_eq!(src(&out).0, NODE);
    assert!(packet::checksums_valid(&out), "ICMP checksum valid");
    let id = u16::from_be_bytes([out[38], out[39]]);
    let pong = packet::icmp_echo4(OUTSIDE, NODE, 0, id, 1);
    let (_, back) = ingress(&ebpf, &pong);
    assert_eq!(dst(&back).0, POD);
    assert_eq!(u16::from_be_bytes([back[38], back[39]]), 777, "identifier restored");
    assert!(packet::checksums_valid(&back));
}

#[test]
fn cluster_multicast_foreign_and_unknown_traffic_is_left_alone() {
    let ebpf = setup(1024, 32767);
    for frame in [
        packet::tcp4_flags(POD, Ipv4Addr::new(10, 244, 2, 3), 40000, 80, TCP_SYN, b"pod to pod"),
        packet::udp4([2; 6], [0; 6], POD, Ipv4Addr::new(239, 1, 2, 3), 5000, 5000, b"multicast"),
        packet::tcp4_flags(NODE, OUTSIDE, 40000, 443, TCP_SYN, b"the node's own traffic"),
        packet::tcp4_flags(Ipv4Addr::new(198, 51, 100, 7), OUTSIDE, 40000, 443, TCP_SYN, b"forwarded, not a pod"),
    ] {
        assert_eq!(egress(&ebpf, &frame), (TC_ACT_NEXT, frame.clone()));
    }
    // Replies to ports no translation owns, and the node's own traffic, reach the stack as they are.
    let stray = packet::tcp4(OUTSIDE, NODE, 443, 2222, b"not ours");
    assert_eq!(ingress(&ebpf, &stray), (TC_ACT_NEXT, stray.clone()));
    assert_eq!(stat(&ebpf, Stat::SnatTranslated) + stat(&ebpf, Stat::SnatReplyTranslated), 0);
}

#[test]
fn replies_of_connections_from_outside_keep_the_pod_address() {
    let ebpf = setup(1024, 32767);
    // TCP: a client outside the cluster (host-gw, direct routes) connects to the pod; the
    // SYN is noted on the way in, and the pod's SYN-ACK and what follows leave as they are.
    let syn = packet::tcp4_flags(NODE, POD, 51000, 8080, TCP_SYN, b"");
    assert_eq!(ingress(&ebpf, &syn), (TC_ACT_NEXT, syn.clone()));
    let syn_ack = packet::tcp4_flags(POD, NODE, 8080, 51000, TCP_SYN_ACK, b"");
    assert_eq!(egress(&ebpf, &syn_ack), (TC_ACT_NEXT, syn_ack.clone()));
    let data = packet::tcp4(POD, NODE, 8080, 51000, b"response");
    assert_eq!(egress(&ebpf, &data), (TC_ACT_NEXT, data.clone()));
    // UDP: a query from outside for the pod is noted on the way in; the answer leaves as is.
    let query = packet::udp4([2; 6], [0; 6], NODE, POD, 51000, 53, b"query");
    assert_eq!(ingress(&ebpf, &query), (TC_ACT_NEXT, query.clone()));
    let answer = packet::udp4([2; 6], [0; 6], POD, NODE, 53, 51000, b"answer");
    assert_eq!(egress(&ebpf, &answer), (TC_ACT_NEXT, answer.clone()));
    assert_eq!(stat(&ebpf, Stat::SnatNewMapping) + stat(&ebpf, Stat::SnatTranslated), 0);
    assert_eq!(stat(&ebpf, Stat::DropSnatNoMapping), 0);
    // A pod's own SYN still gets a mapping.
    let syn = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"");
    assert_eq!(src(&egress(&ebpf, &syn).1).0, NODE);
}

#[test]
fn with_masquerade_off_nothing_is_translated() {
    let mut ebpf = setup(1024, 32767);
    let mut node: Array<_, NodeConfig> = Array::try_from(ebpf.map_mut(NODE_MAP).unwrap()).unwrap();
    let config = NodeConfig { snat: 0, ..node.get(&0, 0).unwrap() };
    node.set(0, config, 0).unwrap();
    let frame = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"data");
    assert_eq!(egress(&ebpf, &frame), (TC_ACT_NEXT, frame.clone()));
}

#[test]
fn an_exhausted_port_range_drops_and_counts_and_other_destinations_still_work() {
    let ebpf = setup(5000, 5000);
    let (_, first) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"a"));
    assert_eq!(src(&first), (NODE, 5000));
    // A second connection to the same server needs a second port: there is none.
    let (verdict, _) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40001, 443, TCP_SYN, b"b"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(stat(&ebpf, Stat::DropSnatNoPort), 1);
    // The port is per destination: another server gets it too.
    let other_server = Ipv4Addr::new(203, 0, 113, 11);
    let (verdict, other) = egress(&ebpf, &packet::tcp4_flags(POD, other_server, 40001, 443, TCP_SYN, b"c"));
    assert_eq!((verdict, src(&other)), (TC_ACT_NEXT, (NODE, 5000)));
}

fn snat_map(ebpf: &mut Ebpf) -> HashMap<&mut aya::maps::MapData, SnatKey, SnatEntry> {
    HashMap::try_from(ebpf.map_mut(SNAT_MAP).unwrap()).unwrap()
}

#[test]
fn an_evicted_reply_half_is_restored_by_the_next_packet() {
    let mut ebpf = setup(1024, 32767);
    let (_, out) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"a"));
    let port = src(&out).1;
    let sent = packet::tcp4(POD, OUTSIDE, 40000, 443, b"a");
    let forward = SnatKey {
        src_ip: POD.octets(),
        dst_ip: OUTSIDE.octets(),
        src_port: 40000,
        dst_port: 443,
        proto: IPPROTO_TCP,
        direction: SNAT_EGRESS,
        _pad: [0; 2],
    };
    let reply = SnatKey {
        src_ip: OUTSIDE.octets(),
        dst_ip: NODE.octets(),
        src_port: 443,
        dst_port: port,
        proto: IPPROTO_TCP,
        direction: SNAT_INGRESS,
        _pad: [0; 2],
    };
    {
        let mut map = snat_map(&mut ebpf);
        // As the LRU would under pressure; and the forward half looks due for a refresh.
        map.remove(&reply).unwrap();
        let mut entry = map.get(&forward, 0).unwrap();
        entry.last_seen_ns = 0;
        map.insert(forward, entry, 0).unwrap();
    }
    let (_, again) = egress(&ebpf, &sent);
    assert_eq!(src(&again), (NODE, port), "same translation");
    assert_eq!(stat(&ebpf, Stat::SnatRestored), 1);
    let (_, back) = ingress(&ebpf, &packet::tcp4(OUTSIDE, NODE, 443, port, b"b"));
    assert_eq!(dst(&back), (POD, 40000), "the reply finds the restored half");
}

#[test]
fn the_agent_sweeps_pairs_idle_past_their_protocol_timeout() {
    let mut ebpf = setup(1024, 32767);
    egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"tcp"));
    egress(&ebpf, &packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, b"udp"));
    let options = SnatOptions {
        port_min: 1024,
        port_max: 32767,
        tcp_idle: Duration::from_secs(3600),
        other_idle: Duration::from_secs(60),
    };
    let mut table = SnatTable::take(&mut ebpf).unwrap();
    let now = monotonic_ns();
    assert_eq!(table.sweep(&options, now).unwrap().removed, 0, "all fresh");
    // Two minutes on: the UDP pair is idle past 60 s, the TCP pair is not past an hour.
    let later = now + Duration::from_secs(120).as_nanos() as u64;
    let sweep = table.sweep(&options, later).unwrap();
    assert_eq!((sweep.removed, sweep.kept), (2, 2));
    let remaining: Vec<u8> = table_protocols(&mut table);
    assert_eq!(remaining, vec![IPPROTO_TCP, IPPROTO_TCP]);
    assert!(!remaining.contains(&IPPROTO_UDP));
    let much_later = now + Duration::from_secs(7200).as_nanos() as u64;
    assert_eq!(table.sweep(&options, much_later).unwrap().removed, 2);
}

#[test]
fn a_closed_tcp_translation_expires_after_time_wait_not_the_idle_timeout() {
    let mut ebpf = setup(1024, 32767);
    let (_, out) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b""));
    let port = src(&out).1;
    egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40001, 443, TCP_SYN, b""));
    // The first connection's server closes it.
    ingress(&ebpf, &packet::tcp4_flags(OUTSIDE, NODE, 443, port, 0x11, b""));
    let options = SnatOptions {
        port_min: 1024,
        port_max: 32767,
        tcp_idle: Duration::from_secs(86400),
        other_idle: Duration::from_secs(180),
    };
    let mut table = SnatTable::take(&mut ebpf).unwrap();
    let later = monotonic_ns() + Duration::from_secs(300).as_nanos() as u64;
    let sweep = table.sweep(&options, later).unwrap();
    assert_eq!((sweep.removed, sweep.kept), (2, 2), "only the closed pair went");
}

fn table_protocols(table: &mut SnatTable) -> Vec<u8> {
    table.entries().unwrap().into_iter().map(|(k, _)| k.proto).collect()
}

/// `frame` with its IPv4 header checksum recomputed.
fn fix_ip_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = packet::checksum(&frame[14..14 + ihl.max(20)]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}

/// `frame` as an IPv4 fragment: More Fragments flag and offset (in 8-byte units).
fn fragment(mut frame: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
    let field = (u16::from(more) << 13) | offset;
    frame[20..22].copy_from_slice(&field.to_be_bytes());
    fix_ip_checksum(frame)
}

fn delta(ebpf: &Ebpf, stats: &[Stat], before: &[u64]) -> Vec<u64> {
    stats.iter().zip(before).map(|(s, b)| stat(ebpf, *s) - b).collect()
}

fn stats_now(ebpf: &Ebpf, stats: &[Stat]) -> Vec<u64> {
    stats.iter().map(|s| stat(ebpf, *s)).collect()
}

#[test]
fn mid_flow_tcp_without_a_translation_is_dropped_never_sent_with_the_pod_address() {
    let ebpf = setup(1024, 32767);
    // Evicted or swept: data, FIN and RST of a connection no translation knows.
    for flags in [0x18, 0x11, 0x04, 0x14, 0x10] {
        let frame = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, flags, b"mid-flow");
        assert_eq!(egress(&ebpf, &frame).0, TC_ACT_SHOT, "flags {flags:#x}");
    }
    assert_eq!(stat(&ebpf, Stat::DropSnatNoMapping), 5);
    assert_eq!(stat(&ebpf, Stat::SnatTranslated) + stat(&ebpf, Stat::SnatNewMapping), 0);
    // A SYN opens one, and the connection's next packets use it.
    let (verdict, out) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b""));
    assert_eq!((verdict, src(&out).0), (TC_ACT_NEXT, NODE));
    let (verdict, out) = egress(&ebpf, &packet::tcp4(POD, OUTSIDE, 40000, 443, b"data"));
    assert_eq!((verdict, src(&out).0), (TC_ACT_NEXT, NODE));
    assert_eq!(stat(&ebpf, Stat::DropSnatNoMapping), 5);
}

#[test]
fn fragments_and_malformed_headers_to_the_outside_are_translated_or_dropped_never_leaked() {
    let ebpf = setup(1024, 32767);
    let counters = [Stat::DropSnatFragment, Stat::DropMalformed, Stat::SnatTranslated];
    let before = stats_now(&ebpf, &counters);
    // The first fragment carries the ports: translated.
    let first = fragment(packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, &[7; 64]), true, 0);
    let (verdict, out) = egress(&ebpf, &first);
    assert_eq!((verdict, src(&out)), (TC_ACT_NEXT, (NODE, 5353)));
    assert_eq!(packet::checksum(&out[14..34]), 0, "IPv4 checksum valid");
    assert_eq!(&out[20..22], &first[20..22], "fragment fields kept");
    // A later one has none: dropped, whatever the flow.
    let later = fragment(packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, &[7; 64]), false, 9);
    assert_eq!(egress(&ebpf, &later).0, TC_ACT_SHOT);
    assert_eq!(delta(&ebpf, &counters, &before), vec![1, 0, 1]);
    // IHL < 5, a total length beyond the frame, a TCP header cut short: dropped as malformed.
    let mut short_ihl = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"");
    short_ihl[14] = 0x44;
    let short_ihl = fix_ip_checksum(short_ihl);
    let mut long_total = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"");
    let total = u16::from_be_bytes([long_total[16], long_total[17]]) + 1;
    long_total[16..18].copy_from_slice(&total.to_be_bytes());
    let long_total = fix_ip_checksum(long_total);
    let mut cut = packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, b"");
    cut.truncate(14 + 20 + 6);
    cut[16..18].copy_from_slice(&26u16.to_be_bytes());
    let cut = fix_ip_checksum(cut);
    for frame in [&short_ihl, &long_total, &cut] {
        assert_eq!(egress(&ebpf, frame).0, TC_ACT_SHOT);
    }
    assert_eq!(delta(&ebpf, &counters, &before), vec![1, 3, 1]);
    // Ethernet padding after the IPv4 packet is not a bad length.
    let mut padded = packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5354, 53, b"x");
    padded.extend_from_slice(&[0; 12]);
    let (verdict, out) = egress(&ebpf, &padded);
    assert_eq!((verdict, src(&out).0), (TC_ACT_NEXT, NODE));
    // Not pod → outside: the same packets pass untouched, uncounted.
    let mut node_ihl = packet::tcp4_flags(NODE, OUTSIDE, 40000, 443, TCP_SYN, b"");
    node_ihl[14] = 0x44;
    let node_ihl = fix_ip_checksum(node_ihl);
    let cluster_later = fragment(packet::udp4([2; 6], [0; 6], POD, Ipv4Addr::new(10, 244, 2, 3), 1, 2, b"x"), false, 9);
    let node_later = fragment(packet::udp4([2; 6], [0; 6], NODE, OUTSIDE, 1, 2, b"x"), false, 9);
    for frame in [node_ihl, cluster_later, node_later] {
        assert_eq!(egress(&ebpf, &frame), (TC_ACT_NEXT, frame.clone()));
    }
    assert_eq!(delta(&ebpf, &counters, &before), vec![1, 3, 2]);
}

/// An ICMP error from `router` to the node about `quoted` (an Ethernet frame the node sent):
/// its IPv4 header and the first `l4_bytes` of its L4 header.
fn icmp_error(router: Ipv4Addr, icmp_type: u8, code: u8, quoted: &[u8], l4_bytes: usize) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0x78]; // next-hop MTU 1400
    icmp.extend_from_slice(&quoted[14..14 + 20 + l4_bytes]);
    let c = packet::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut frame = vec![0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend_from_slice(&packet::ipv4_header(router, NODE, 1, icmp.len() as u16));
    frame.extend_from_slice(&icmp);
    frame
}

#[test]
fn icmp_errors_about_translated_flows_go_back_to_the_pod_with_valid_checksums() {
    let ebpf = setup(1024, 32767);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let (_, tcp) = egress(&ebpf, &packet::tcp4_flags(POD, OUTSIDE, 40000, 443, TCP_SYN, &[1; 40]));
    let (_, udp) = egress(&ebpf, &packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 40001, 53, b"query"));
    let (_, ping) = egress(&ebpf, &packet::icmp_echo4(POD, OUTSIDE, 8, 777, 1));
    let cases = [
        (icmp_error(router, 3, 4, &tcp, 8), 40000u16, "frag-needed about TCP (8-byte quote)"),
        (icmp_error(router, 3, 3, &udp, 8 + 5), 40001, "port unreachable about UDP (whole datagram)"),
        (icmp_error(router, 11, 0, &ping, 8), 777, "time exceeded about an echo request"),
    ];
    for (i, (error, pod_port, what)) in cases.iter().enumerate() {
        let (verdict, back) = ingress(&ebpf, error);
        assert_eq!(verdict, TC_ACT_NEXT, "{what}");
        assert_eq!(dst(&back).0, POD, "{what}: outer destination is the pod");
        assert_eq!(src(&back).0, router, "{what}");
        assert!(packet::checksums_valid(&back), "{what}: outer IPv4 and ICMP checksums");
        let quote = &back[42..];
        assert_eq!(packet::checksum(&quote[..20]), 0, "{what}: quoted IPv4 header checksum");
        assert_eq!(Ipv4Addr::new(quote[12], quote[13], quote[14], quote[15]), POD, "{what}: quoted source");
        assert_eq!(&quote[16..20], &OUTSIDE.octets(), "{what}: quoted destination kept");
        let port_at = if quote[9] == 1 { 24 } else { 20 };
        assert_eq!(u16::from_be_bytes([quote[port_at], quote[port_at + 1]]), *pod_port, "{what}: quoted port");
        // Everything else as it came: MTU, quoted destination port, the quoted L4 checksum.
        assert_eq!(&back[34..36], &error[34..36], "{what}: type and code");
        assert_eq!(&back[38..42], &error[38..42], "{what}: next-hop MTU");
        // The quoted L4 header around the port, its checksum included, is left as it is.
        assert_eq!(&back[42 + 20..42 + port_at], &error[42 + 20..42 + port_at], "{what}: quoted L4 before the port");
        assert_eq!(&back[42 + port_at + 2..], &error[42 + port_at + 2..], "{what}: rest of the quote");
        assert_eq!(stat(&ebpf, Stat::SnatIcmpErrorTranslated), i as u64 + 1);
    }
    // About a port no translation owns (the node's own traffic): untouched.
    let own = packet::tcp4_flags(NODE, OUTSIDE, 45000, 443, TCP_SYN, b"");
    let error = icmp_error(router, 3, 4, &own, 8);
    assert_eq!(ingress(&ebpf, &error), (TC_ACT_NEXT, error.clone()));
    assert_eq!(stat(&ebpf, Stat::SnatIcmpErrorTranslated), 3);
}

#[test]
fn two_cpus_racing_on_new_flows_leave_one_translation_each_and_no_orphan_port() {
    let mut ebpf = setup(1024, 32767);
    const FLOWS: u16 = 4000;
    let program: &SchedClassifier = ebpf.program("fl_snat_egress").unwrap().try_into().unwrap();
    let frames: Vec<Vec<u8>> =
        (0..FLOWS).map(|i| packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 40000 + i, 53, b"q")).collect();
    let arrived = std::sync::atomic::AtomicUsize::new(0);
    let ports: Vec<Vec<u16>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut ports = Vec::with_capacity(frames.len());
                    for (i, frame) in frames.iter().enumerate() {
                        // Spin until both threads reached flow i, then send it at once.
                        arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        while arrived.load(std::sync::atomic::Ordering::SeqCst) < 2 * (i + 1) {
                            std::hint::spin_loop();
                        }
                        let mut out = vec![0u8; frame.len() + 64];
                        let opts =
                            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
                        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
                        assert_eq!(result.return_value, TC_ACT_NEXT);
                        ports.push(src(&out).1);
                    }
                    ports
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let differing = ports[0].iter().zip(&ports[1]).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "both packets of a flow leave with the same port");
    assert_eq!(stat(&ebpf, Stat::SnatNewMapping), u64::from(FLOWS), "one mapping per flow");
    assert_eq!(stat(&ebpf, Stat::SnatTranslated), 2 * u64::from(FLOWS));
    let entries: Vec<(SnatKey, SnatEntry)> = snat_map(&mut ebpf).iter().map(Result::unwrap).collect();
    let halves = |direction| entries.iter().filter(|(k, _)| k.direction == direction).count();
    assert_eq!((halves(SNAT_EGRESS), halves(SNAT_INGRESS)), (FLOWS as usize, FLOWS as usize), "no orphan reply half");
}

#[test]
fn a_flood_of_inbound_udp_tuples_cannot_evict_a_live_translation() {
    let ebpf = setup(1024, 32767);
    let (_, out) = egress(&ebpf, &packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, b"query"));
    let port = src(&out).1;
    // More distinct tuples than fl_snat_v1 holds, from outside to the pod.
    const FLOOD: u32 = 140_000;
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    for i in 0..FLOOD {
        let from = Ipv4Addr::from(base + i % 131_072);
        let frame = packet::udp4([2; 6], [0; 6], from, POD, 1000 + (i / 131_072) as u16, 53, b"flood");
        assert_eq!(ingress(&ebpf, &frame), (TC_ACT_NEXT, frame.clone()));
    }
    let over = stat(&ebpf, Stat::SnatInboundOverBudget);
    let recorded =
        HashMap::<_, SnatKey, SnatEntry>::try_from(ebpf.map(SNAT_INBOUND_MAP).unwrap()).unwrap().keys().count();
    assert!(over > 0, "the flood ran over the budget");
    assert_eq!(over + recorded as u64, u64::from(FLOOD), "every inbound tuple recorded or counted");
    // The translation is intact both ways.
    let (_, back) = ingress(&ebpf, &packet::udp4([2; 6], [0; 6], OUTSIDE, NODE, 53, port, b"answer"));
    assert_eq!(dst(&back), (POD, 5353));
    let (_, again) = egress(&ebpf, &packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, b"again"));
    assert_eq!(src(&again), (NODE, port));
    assert_eq!(stat(&ebpf, Stat::SnatNewMapping), 1);
}

#[test]
fn a_flow_that_resumes_during_the_sweep_keeps_its_translation() {
    let mut ebpf = setup(1024, 32767);
    let query = packet::udp4([2; 6], [0; 6], POD, OUTSIDE, 5353, 53, b"query");
    let (_, out) = egress(&ebpf, &query);
    let port = src(&out).1;
    {
        // Both halves long idle.
        let mut map = snat_map(&mut ebpf);
        let entries: Vec<(SnatKey, SnatEntry)> = map.iter().map(Result::unwrap).collect();
        for (key, entry) in entries {
            map.insert(key, SnatEntry { last_seen_ns: 0, ..entry }, 0).unwrap();
        }
    }
    let options = SnatOptions {
        port_min: 1024,
        port_max: 32767,
        tcp_idle: Duration::from_secs(3600),
        other_idle: Duration::from_secs(60),
    };
    let mut table = SnatTable::take(&mut ebpf).unwrap();
    let now = monotonic_ns() + Duration::from_secs(120).as_nanos() as u64;
    // The pod sends again after the sweep's snapshot, before its deletions.
    let sweep = table.sweep_observed(&options, now, || assert_eq!(egress(&ebpf, &query).0, TC_ACT_NEXT)).unwrap();
    assert_eq!((sweep.removed, sweep.kept), (0, 2), "the resumed pair stays, both halves");
    let (_, back) = ingress(&ebpf, &packet::udp4([2; 6], [0; 6], OUTSIDE, NODE, 53, port, b"answer"));
    assert_eq!(dst(&back), (POD, 5353));
    // Idle again much later: both halves go together.
    let later = monotonic_ns() + Duration::from_secs(600).as_nanos() as u64;
    assert_eq!(
        table.sweep(&options, later).unwrap(),
        flannel_agent::datapath::ebpf::snat::Sweep { kept: 0, removed: 2 }
    );
}

#[test]
fn identity_entries_of_inbound_flows_are_swept_when_idle() {
    let mut ebpf = setup(1024, 32767);
    ingress(&ebpf, &packet::udp4([2; 6], [0; 6], OUTSIDE, POD, 51000, 53, b"query"));
    ingress(&ebpf, &packet::tcp4_flags(OUTSIDE, POD, 51001, 80, TCP_SYN, b""));
    let options = SnatOptions {
        port_min: 1024,
        port_max: 32767,
        tcp_idle: Duration::from_secs(3600),
        other_idle: Duration::from_secs(60),
    };
    let mut table = SnatTable::take(&mut ebpf).unwrap();
    assert_eq!(table.inbound_entries().unwrap().len(), 2);
    let later = monotonic_ns() + Duration::from_secs(120).as_nanos() as u64;
    assert_eq!(table.sweep(&options, later).unwrap().removed, 1, "UDP idle past 60 s; TCP not past an hour");
    assert_eq!(table.inbound_entries().unwrap()[0].0.proto, IPPROTO_TCP);
}

// Address-only masquerade of every protocol but TCP, UDP and ICMP (conntrack's generic L3
// tracking under MASQUERADE): the 3-tuple {pod, remote, proto} with ports 0.

const IPPROTO_GRE: u8 = 47;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_RAW_253: u8 = 253;
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// A GRE header (no checksum, no key) carrying IPv4, and some of the tunnelled packet.
const GRE_PAYLOAD: &[u8] = &[0x00, 0x00, 0x08, 0x00, 0x45, 0x00, 0x00, 0x1c, 1, 2, 3, 4, 5, 6, 7, 8];

/// An Ethernet + IPv4 (valid header checksum) frame of protocol `proto` carrying `payload`.
fn raw4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(&packet::ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&packet::ipv4_header(src, dst, proto, payload.len() as u16));
    frame.extend_from_slice(payload);
    frame
}

fn address_only_key(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, direction: u8) -> SnatKey {
    SnatKey { src_ip: src.octets(), dst_ip: dst.octets(), proto, direction, ..SnatKey::default() }
}

#[test]
fn gre_and_other_protocols_to_outside_are_translated_by_address_and_their_replies_return() {
    let mut ebpf = setup(1024, 32767);
    let sent = raw4(POD, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD);
    let (verdict, out) = egress(&ebpf, &sent);
    assert_eq!(verdict, TC_ACT_NEXT);
    // Exactly the packet the node would have sent itself: only the source and the IPv4
    // header checksum differ, the GRE header and what it carries are untouched.
    assert_eq!(out, raw4(NODE, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!(packet::checksum(&out[14..34]), 0, "IPv4 header checksum valid");
    assert_ne!(&out[24..26], &sent[24..26], "the checksum did change");
    // Both halves, ports 0.
    {
        let map = snat_map(&mut ebpf);
        let forward = map.get(&address_only_key(POD, OUTSIDE, IPPROTO_GRE, SNAT_EGRESS), 0).unwrap();
        assert_eq!((forward.to_ip, forward.to_port), (NODE.octets(), 0));
        let back = map.get(&address_only_key(OUTSIDE, NODE, IPPROTO_GRE, SNAT_INGRESS), 0).unwrap();
        assert_eq!((back.to_ip, back.to_port), (POD.octets(), 0));
    }
    // The flow's next packet uses the same mapping.
    assert_eq!(egress(&ebpf, &sent), (TC_ACT_NEXT, out.clone()));
    // The remote's reply goes back to the pod, exactly.
    let reply = raw4(OUTSIDE, NODE, IPPROTO_GRE, GRE_PAYLOAD);
    let (verdict, back) = ingress(&ebpf, &reply);
    assert_eq!((verdict, back), (TC_ACT_NEXT, raw4(OUTSIDE, POD, IPPROTO_GRE, GRE_PAYLOAD)));
    assert_eq!(
        (stat(&ebpf, Stat::SnatNewMapping), stat(&ebpf, Stat::SnatTranslated), stat(&ebpf, Stat::SnatReplyTranslated)),
        (1, 2, 1)
    );

    // ESP, SCTP (its CRC32c does not cover the addresses) and a raw protocol alike, each its
    // own mapping to the same remote; an ICMP echo with identifier 0 (ports 0 as well) next
    // to them is a different key (proto is part of it) and keeps working.
    let ping = packet::icmp_echo4(POD, OUTSIDE, 8, 0, 1);
    let (verdict, ping_out) = egress(&ebpf, &ping);
    assert_eq!((verdict, src(&ping_out).0), (TC_ACT_NEXT, NODE));
    let ping_id = u16::from_be_bytes([ping_out[38], ping_out[39]]);
    for proto in [IPPROTO_ESP, IPPROTO_SCTP, IPPROTO_RAW_253] {
        let payload = [proto; 24];
        let (verdict, out) = egress(&ebpf, &raw4(POD, OUTSIDE, proto, &payload));
        assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, OUTSIDE, proto, &payload)), "proto {proto}");
        let (verdict, back) = ingress(&ebpf, &raw4(OUTSIDE, NODE, proto, &payload));
        assert_eq!((verdict, back), (TC_ACT_NEXT, raw4(OUTSIDE, POD, proto, &payload)), "proto {proto}");
    }
    let (verdict, pong) = ingress(&ebpf, &packet::icmp_echo4(OUTSIDE, NODE, 0, ping_id, 1));
    assert_eq!((verdict, dst(&pong).0), (TC_ACT_NEXT, POD));
    assert_eq!(u16::from_be_bytes([pong[38], pong[39]]), 0, "identifier 0 restored");
    assert!(packet::checksums_valid(&pong));
    assert_eq!(stat(&ebpf, Stat::SnatNewMapping), 5);
    // A reply of a protocol nobody here talks to that remote reaches the stack unchanged.
    let stray = raw4(OUTSIDE, NODE, 99, b"node's own");
    assert_eq!(ingress(&ebpf, &stray), (TC_ACT_NEXT, stray.clone()));
}

#[test]
fn a_second_pod_with_the_same_protocol_to_the_same_remote_is_dropped_and_counted() {
    let mut ebpf = setup(1024, 32767);
    let (verdict, _) = egress(&ebpf, &raw4(POD, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!(verdict, TC_ACT_NEXT);
    // Its replies could not be told from the first pod's: dropped, never sent as the pod.
    let second = raw4(POD2, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD);
    assert_eq!(egress(&ebpf, &second).0, TC_ACT_SHOT);
    assert_eq!(egress(&ebpf, &second).0, TC_ACT_SHOT);
    assert_eq!((stat(&ebpf, Stat::DropSnatNoPort), stat(&ebpf, Stat::SnatNewMapping)), (2, 1));
    // The same pod with another protocol, or to another remote, is fine; the first pod too.
    let other_remote = Ipv4Addr::new(203, 0, 113, 11);
    let (verdict, out) = egress(&ebpf, &raw4(POD2, other_remote, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, other_remote, IPPROTO_GRE, GRE_PAYLOAD)));
    let (verdict, out) = egress(&ebpf, &raw4(POD2, OUTSIDE, IPPROTO_ESP, b"esp"));
    assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, OUTSIDE, IPPROTO_ESP, b"esp")));
    let (verdict, out) = egress(&ebpf, &raw4(POD, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD)));
    assert_eq!(stat(&ebpf, Stat::DropSnatNoPort), 2);
    let (_, back) = ingress(&ebpf, &raw4(OUTSIDE, NODE, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!(dst(&back).0, POD, "the replies are the first pod's");

    // The first pod's pair idle past --snat-idle-timeout is swept like UDP (the TCP timeout
    // does not apply), and then the second pod gets the 3-tuple.
    let options = SnatOptions {
        port_min: 1024,
        port_max: 32767,
        tcp_idle: Duration::from_secs(86400),
        other_idle: Duration::from_secs(60),
    };
    let mut table = SnatTable::take(&mut ebpf).unwrap();
    let now = monotonic_ns();
    assert_eq!(table.sweep(&options, now).unwrap().removed, 0, "all fresh");
    let sweep = table.sweep(&options, now + Duration::from_secs(120).as_nanos() as u64).unwrap();
    assert_eq!((sweep.removed, sweep.kept), (6, 0), "three address-only pairs, idle like UDP");
    // The programs keep using the map the table now holds: the 3-tuple is free again.
    let (verdict, out) = egress(&ebpf, &second);
    assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD)));
    let pairs: Vec<SnatKey> = table.entries().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(pairs.contains(&address_only_key(POD2, OUTSIDE, IPPROTO_GRE, SNAT_EGRESS)));
}

#[test]
fn fragments_of_other_protocols_are_translated_when_first_and_dropped_when_later() {
    let ebpf = setup(1024, 32767);
    let counters = [Stat::DropSnatFragment, Stat::SnatTranslated];
    let before = stats_now(&ebpf, &counters);
    let first = fragment(raw4(POD, OUTSIDE, IPPROTO_GRE, &[7; 64]), true, 0);
    let (verdict, out) = egress(&ebpf, &first);
    assert_eq!((verdict, out), (TC_ACT_NEXT, fragment(raw4(NODE, OUTSIDE, IPPROTO_GRE, &[7; 64]), true, 0)));
    let later = fragment(raw4(POD, OUTSIDE, IPPROTO_GRE, &[7; 64]), false, 9);
    assert_eq!(egress(&ebpf, &later).0, TC_ACT_SHOT, "a later fragment is still dropped");
    let later = fragment(raw4(POD, OUTSIDE, IPPROTO_SCTP, &[7; 64]), true, 3);
    assert_eq!(egress(&ebpf, &later).0, TC_ACT_SHOT);
    assert_eq!(delta(&ebpf, &counters, &before), vec![2, 1]);
}

#[test]
fn an_address_only_mapping_survives_losing_a_half_and_inbound_flows_keep_the_pod_address() {
    let mut ebpf = setup(1024, 32767);
    egress(&ebpf, &raw4(POD, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD));
    // The LRU took the forward half: the reply half still names this pod, so the pod's next
    // packet reclaims it (restored) instead of being dropped as a clash.
    snat_map(&mut ebpf).remove(&address_only_key(POD, OUTSIDE, IPPROTO_GRE, SNAT_EGRESS)).unwrap();
    let (verdict, out) = egress(&ebpf, &raw4(POD, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD));
    assert_eq!((verdict, out), (TC_ACT_NEXT, raw4(NODE, OUTSIDE, IPPROTO_GRE, GRE_PAYLOAD)));
    assert_eq!((stat(&ebpf, Stat::SnatRestored), stat(&ebpf, Stat::DropSnatNoPort)), (1, 0));
    assert!(snat_map(&mut ebpf).get(&address_only_key(POD, OUTSIDE, IPPROTO_GRE, SNAT_EGRESS), 0).is_ok());

    // A host outside the cluster (host-gw, direct routes) sends GRE straight to a pod: the
    // pod's answers leave with its own address, as conntrack's entry for it would have them.
    let peer = Ipv4Addr::new(198, 51, 100, 7);
    let inbound = raw4(peer, POD2, IPPROTO_GRE, GRE_PAYLOAD);
    assert_eq!(ingress(&ebpf, &inbound), (TC_ACT_NEXT, inbound.clone()));
    let answer = raw4(POD2, peer, IPPROTO_GRE, GRE_PAYLOAD);
    assert_eq!(egress(&ebpf, &answer), (TC_ACT_NEXT, answer.clone()));
    let inbound_map: HashMap<_, SnatKey, SnatEntry> = HashMap::try_from(ebpf.map(SNAT_INBOUND_MAP).unwrap()).unwrap();
    assert!(inbound_map.get(&address_only_key(POD2, peer, IPPROTO_GRE, SNAT_EGRESS), 0).is_ok());
}

mod address_properties {
    use proptest::{
        prelude::*,
        test_runner::{Config, TestCaseError, TestRunner},
    };

    use super::*;

    fn in_cluster(ip: Ipv4Addr) -> bool {
        ip.octets()[..2] == [10, 244]
    }

    #[derive(Clone, Debug)]
    struct Case {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        sport: u16,
        dport: u16,
        /// TCP flags; ICMP type.
        detail: u8,
        payload: Vec<u8>,
        /// (More Fragments, offset)
        fragment: (bool, u16),
        /// The reversed packet went through fl_snat_ingress first (a flow from outside).
        inbound_first: bool,
    }

    fn address() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            3 => (0u8..4, any::<u8>()).prop_map(|(c, d)| Ipv4Addr::new(10, 244, c, d)),
            2 => any::<u32>().prop_map(Ipv4Addr::from),
            1 => Just(OUTSIDE),
            1 => (224u8..240, any::<u8>()).prop_map(|(a, d)| Ipv4Addr::new(a, 0, 0, d)),
        ]
    }

    fn proto() -> impl Strategy<Value = u8> {
        prop_oneof![
            4 => any::<u8>(),
            1 => prop::sample::select(vec![IPPROTO_GRE, IPPROTO_ESP, IPPROTO_SCTP, IPPROTO_RAW_253]),
            1 => prop::sample::select(vec![1u8, IPPROTO_TCP, IPPROTO_UDP]),
        ]
    }

    fn case() -> impl Strategy<Value = Case> {
        let detail = prop_oneof![Just(0u8), Just(8u8), Just(packet::TCP_SYN), Just(3u8), Just(11u8), any::<u8>()];
        let fragment =
            prop_oneof![6 => Just((false, 0u16)), 1 => Just((true, 0u16)), 1 => (any::<bool>(), 1u16..0x2000)];
        (
            (address(), address(), proto()),
            (0u16..4, 0u16..4).prop_map(|(a, b)| (40000 + a, 440 + b)),
            detail,
            prop::collection::vec(any::<u8>(), 0..48),
            fragment,
            prop::bool::weighted(0.2),
        )
            .prop_map(|((src, dst, proto), (sport, dport), detail, payload, fragment, inbound_first)| Case {
                src,
                dst,
                proto,
                sport,
                dport,
                detail,
                payload,
                fragment,
                inbound_first,
            })
    }

    fn frame(case: &Case, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let frame = match case.proto {
            IPPROTO_TCP => packet::tcp4_flags(src, dst, sport, dport, case.detail, &case.payload),
            IPPROTO_UDP => packet::udp4([2; 6], [0; 6], src, dst, sport, dport, &case.payload),
            1 => packet::icmp_echo4(src, dst, case.detail, sport, 1),
            proto => raw4(src, dst, proto, &case.payload),
        };
        match case.fragment {
            (false, 0) => frame,
            (more, offset) => fragment(frame, more, offset),
        }
    }

    /// The pod's packet as an identity entry of fl_snat_inbound_v1 names it.
    fn egress_key(case: &Case) -> SnatKey {
        let (src_port, dst_port) = match case.proto {
            IPPROTO_TCP | IPPROTO_UDP => (case.sport, case.dport),
            1 if case.detail == 8 => (case.sport, 0),
            _ => (0, 0),
        };
        SnatKey {
            src_ip: case.src.octets(),
            dst_ip: case.dst.octets(),
            src_port,
            dst_port,
            proto: case.proto,
            direction: SNAT_EGRESS,
            _pad: [0; 2],
        }
    }

    fn check(ebpf: &Ebpf, case: &Case) -> Result<(), TestCaseError> {
        if case.inbound_first {
            ingress(ebpf, &frame(case, case.dst, case.src, case.dport, case.sport));
        }
        let sent = frame(case, case.src, case.dst, case.sport, case.dport);
        let (verdict, out) = egress(ebpf, &sent);
        let first_fragment = case.fragment.1 == 0;
        let leaves = in_cluster(case.src) && !in_cluster(case.dst) && case.dst.octets()[0] & 0xf0 != 0xe0;
        if verdict != TC_ACT_NEXT || !first_fragment || !leaves {
            prop_assert!(!(leaves && !first_fragment && verdict == TC_ACT_NEXT), "a later fragment passed");
            return Ok(());
        }
        let out_src = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
        // ICMP other than echo requests (echo replies, errors a pod sends) answers what an
        // outside host sent the pod and passes as it is, as it does through MASQUERADE when
        // conntrack relates it; so do replies of flows outside hosts opened (identity entries).
        let icmp_answer = case.proto == 1 && case.detail != 8;
        let inbound: HashMap<_, SnatKey, SnatEntry> = HashMap::try_from(ebpf.map(SNAT_INBOUND_MAP).unwrap()).unwrap();
        let identity = inbound.get(&egress_key(case), 0).is_ok();
        if icmp_answer || identity {
            prop_assert_eq!(&out, &sent, "an exception passes unchanged");
            return Ok(());
        }
        prop_assert!(!in_cluster(out_src), "pod source {} left toward {} (proto {})", out_src, case.dst, case.proto);
        prop_assert_eq!(out_src, NODE);
        prop_assert_eq!(packet::checksum(&out[14..34]), 0, "IPv4 header checksum");
        if address_only(case.proto) {
            // Address only: the packet as sent but for the source and the IPv4 header
            // checksum, L4 included.
            let mut expected = sent.clone();
            expected[26..30].copy_from_slice(&NODE.octets());
            prop_assert_eq!(out, fix_ip_checksum(expected));
        }
        Ok(())
    }

    #[test]
    fn no_pod_source_address_leaves_toward_a_non_cluster_destination() {
        let ebpf = setup(1024, 32767);
        let config = Config { cases: 512, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new(config);
        if let Err(error) = runner.run(&case(), |case| check(&ebpf, &case)) {
            panic!("{error}");
        }
        assert!(stat(&ebpf, Stat::SnatTranslated) > 0, "the property saw translations");
    }
}
