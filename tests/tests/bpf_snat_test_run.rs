//! BPF_PROG_TEST_RUN unit tests of masquerade (`fl_snat_egress`, `fl_snat_ingress`): the
//! translation and its reverse with valid checksums for TCP, UDP and ICMP echo, flannel's skip
//! decisions, port exhaustion, restoring an evicted half, and the agent's idle sweep. Root
//! only; fails loudly otherwise.

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
    snat::{IPPROTO_TCP, IPPROTO_UDP, SNAT_EGRESS, SNAT_INGRESS},
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
    // TCP: the pod's SYN-ACK to a client outside the cluster (host-gw, NodePort) opens nothing.
    let syn_ack = packet::tcp4_flags(POD, NODE, 8080, 51000, TCP_SYN_ACK, b"");
    assert_eq!(egress(&ebpf, &syn_ack), (TC_ACT_NEXT, syn_ack.clone()));
    // UDP: a query from outside for the pod is noted on the way in; the answer leaves as is.
    let query = packet::udp4([2; 6], [0; 6], NODE, POD, 51000, 53, b"query");
    assert_eq!(ingress(&ebpf, &query), (TC_ACT_NEXT, query.clone()));
    let answer = packet::udp4([2; 6], [0; 6], POD, NODE, 53, 51000, b"answer");
    assert_eq!(egress(&ebpf, &answer), (TC_ACT_NEXT, answer.clone()));
    assert_eq!(stat(&ebpf, Stat::SnatNewMapping) + stat(&ebpf, Stat::SnatTranslated), 0);
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
