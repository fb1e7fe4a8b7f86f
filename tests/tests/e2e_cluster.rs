//! End to end on the lab: 3 nodes × 2 pods made by the real CNI chain, real agents, real
//! etcd, real packets. Root only; fails loudly otherwise. Each test builds its own lab.
//!
//! The whole suite runs once per datapath mode: `netlink::…` (flannel-classic), `ebpf::…`
//! (the eBPF datapath, netfilter symmetric) and `ebpf_bypass::…` (`--netfilter-bypass`).
//! Every connectivity check runs with kube-proxy's rules in place (its INVALID drop in
//! FORWARD and a ClusterIP DNAT to a pod on another node), so a mode that let conntrack see
//! only one direction of a flow, or skipped a reverse translation, fails here.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use flannel_tests::{
    capture::{self, Capture},
    kube_proxy::{self, ClusterIp},
    lab::{self, Lab, LabConfig, EXTERNAL_IP, NETWORK, SUBNETS_PREFIX},
    traffic::{tcp_source_seen, tcp_source_seen_via, udp_stream_during},
    NetNs,
};

/// The agent arguments of a mode: `netlink`, `ebpf` or `ebpf_bypass`.
fn mode_config(backend: &str, mode: &str) -> LabConfig {
    let (datapath, args) = match mode {
        "netlink" => ("netlink", vec![]),
        "ebpf" => ("ebpf", vec![]),
        "ebpf_bypass" => ("ebpf", vec!["--netfilter-bypass".to_string()]),
        other => panic!("unknown mode {other}"),
    };
    LabConfig { backend: backend.into(), datapath: datapath.into(), agent_args: args, ..LabConfig::default() }
}

fn lab(backend: &str, mode: &str) -> Lab {
    Lab::start(mode_config(backend, mode)).expect("lab starts")
}

fn is_ebpf(lab: &Lab) -> bool {
    lab.config.datapath == "ebpf"
}

fn is_bypass(lab: &Lab) -> bool {
    lab.config.agent_args.iter().any(|a| a == "--netfilter-bypass")
}

/// Whether node `node`'s datapath holds `subnet`: a route (netlink) or a lease map entry (eBPF).
fn programmed(lab: &Lab, node: usize, subnet: &ipnet::Ipv4Net) -> bool {
    if is_ebpf(lab) {
        let state = lab.inspect(node).expect("inspect");
        state["leases"].as_array().expect("leases").iter().any(|l| l["subnet"] == subnet.to_string())
    } else {
        !route_to(&lab.nodes[node].ns, subnet).is_empty()
    }
}

/// A counter of node `node`'s eBPF datapath, from `flannel-agent inspect`.
fn counter(lab: &Lab, node: usize, name: &str) -> u64 {
    lab.inspect(node).expect("inspect")["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
}

/// The ClusterIP every node has, backed by the first pod of node 1 (port 8080 → 18080).
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 18080;

/// kube-proxy's rules on every node: its INVALID drop and the ClusterIP.
fn install_kube_proxy(lab: &Lab) {
    let backend = lab.nodes[1].pods[0].ip;
    let service = ClusterIp { vip: SERVICE_VIP, port: SERVICE_PORT, backend, backend_port: BACKEND_PORT };
    for node in &lab.nodes {
        kube_proxy::install(&node.ns, NETWORK, &[service]).expect("kube-proxy rules");
    }
}

/// Every pod reaches every other pod over ICMP and TCP, keeping its own source address; pods
/// reach the external host masqueraded to their node's address; a ClusterIP backed by a pod
/// on another node answers pods and nodes — all with kube-proxy's rules in place.
fn connectivity(lab: &Lab) {
    install_kube_proxy(lab);
    let pods = lab.pods();
    assert_eq!(pods.len(), 6);
    let mut port = 20000;
    for (from_node, from) in &pods {
        for (to_node, to) in &pods {
            if from.ip == to.ip {
                continue;
            }
            lab::ping(&from.ns, to.ip, 2)
                .unwrap_or_else(|e| panic!("ping {} (node {from_node}) → {} (node {to_node}): {e:#}", from.ip, to.ip));
            port += 1;
            let seen = tcp_source_seen(&to.ns, to.ip, &from.ns, port)
                .unwrap_or_else(|e| panic!("TCP {} → {}: {e:#}", from.ip, to.ip));
            assert_eq!(seen.ip(), from.ip, "pod-to-pod keeps the pod source address");
        }
        port += 1;
        let seen = tcp_source_seen(&lab.external, EXTERNAL_IP, &from.ns, port)
            .unwrap_or_else(|e| panic!("TCP {} → external: {e:#}", from.ip));
        assert_eq!(seen.ip(), lab.nodes[*from_node].ip, "pod-to-external is masqueraded to the node address");
    }
    // The nodes themselves reach remote pods, from the source flanneld's routes give: the
    // subnet's base address (flannel.1's) with vxlan, the node address with host-gw.
    for (node, to) in [(0, &lab.nodes[1].pods[0]), (2, &lab.nodes[0].pods[1])] {
        lab::ping(&lab.nodes[node].ns, to.ip, 2).unwrap_or_else(|e| panic!("node {node} → pod {}: {e:#}", to.ip));
        port += 1;
        let seen = tcp_source_seen(&to.ns, to.ip, &lab.nodes[node].ns, port).unwrap();
        let expected = match lab.config.backend.as_str() {
            "vxlan" => lab.nodes[node].subnet().unwrap().network(),
            _ => lab.nodes[node].ip,
        };
        assert_eq!(seen.ip(), expected, "node {node} → pod source");
    }
    cluster_ip(lab);
    if is_ebpf(lab) {
        ebpf_did_the_forwarding(lab);
    }
}

/// The ClusterIP, DNATed by node 0's kube-proxy rules to the pod on node 1, from node 0's
/// pods (their source kept: kube-proxy masquerades only sources outside the cluster) and from
/// node 0 itself; the replies must go back through node 0's conntrack to be un-DNATed.
fn cluster_ip(lab: &Lab) {
    let backend = &lab.nodes[1].pods[0];
    let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    for client in &lab.nodes[0].pods {
        let seen = tcp_source_seen_via(&backend.ns, backend.ip, BACKEND_PORT, &client.ns, vip).unwrap_or_else(|e| {
            let state = |n: usize| if is_ebpf(lab) { lab.inspect(n).unwrap().to_string() } else { String::new() };
            panic!(
                "pod {} → ClusterIP {vip} (pod {} on node 1): {e:#}\nnode 0: {}\nnode 1: {}",
                client.ip,
                backend.ip,
                state(0),
                state(1)
            )
        });
        assert_eq!(seen.ip(), client.ip, "pod → ClusterIP keeps the pod source");
    }
    tcp_source_seen_via(&backend.ns, backend.ip, BACKEND_PORT, &lab.nodes[0].ns, vip)
        .unwrap_or_else(|e| panic!("node 0 → ClusterIP {vip} (pod {} on node 1): {e:#}", backend.ip));
}

/// The traffic went through our programs and maps, not per-lease kernel state.
fn ebpf_did_the_forwarding(lab: &Lab) {
    for node in 0..lab.nodes.len() {
        let ns = &lab.nodes[node].ns;
        let state = lab.inspect(node).unwrap();
        match lab.config.backend.as_str() {
            "vxlan" => {
                let device = String::from_utf8(ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap().stdout).unwrap();
                assert!(device.contains("external"), "node {node}: flannel.1 is not the metadata device: {device}");
                let neighbours =
                    String::from_utf8(ns.ip(&["neigh", "show", "dev", "flannel.1"]).unwrap().stdout).unwrap();
                assert!(neighbours.trim().is_empty(), "node {node}: per-lease neighbours on flannel.1: {neighbours}");
                assert!(counter(lab, node, "vxlan-encapsulated") > 0, "node {node} encapsulated nothing: {state}");
                assert!(counter(lab, node, "vxlan-decapsulated") > 0, "node {node} accepted nothing: {state}");
            }
            _ => {
                for other in lab.nodes.iter().filter(|n| n.index != node) {
                    let subnet = other.subnet().unwrap();
                    let route = route_to(ns, &subnet);
                    assert!(
                        route.contains(&format!("via {}", other.ip)),
                        "node {node}: no host-gw route to {subnet}: {route}"
                    );
                }
            }
        }
        if is_bypass(lab) {
            assert!(counter(lab, node, "bypass-forwarded") > 0, "node {node} bypassed nothing: {state}");
            assert!(counter(lab, node, "bypass-delivered-to-pod") > 0, "node {node} delivered nothing: {state}");
            let endpoints = state["endpoints"].as_array().unwrap();
            assert_eq!(endpoints.len(), 2, "node {node} knows its two pods: {state}");
            let links = state["links"].to_string();
            assert!(links.contains("cni0/fl_bridge_egress"), "{state}");
            assert_eq!(links.matches("/fl_pod_egress").count(), 2, "on each pod's veth: {state}");
        }
        // Masquerade too: flannel's pod → outside iptables rule is not installed.
        assert!(counter(lab, node, "snat-translated") > 0, "node {node} masqueraded nothing in eBPF");
        let nat = lab::output(ns.command("iptables-save").args(["-t", "nat"])).unwrap();
        assert!(!nat.contains("! -d 224.0.0.0/4"), "node {node} still has the pod MASQUERADE rule:\n{nat}");
    }
    if is_bypass(lab) {
        // The ClusterIP replies reached node 0 through the bypass's entry point and were
        // handed to the stack, which un-DNATed them.
        assert!(counter(lab, 0, "bypass-to-stack") > 0, "{}", lab.inspect(0).unwrap());
    }
}

fn route_to(ns: &NetNs, subnet: &ipnet::Ipv4Net) -> String {
    String::from_utf8(ns.ip(&["route", "show", &subnet.to_string()]).unwrap().stdout).unwrap()
}

fn within(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if condition() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The suite, for one mode.
macro_rules! suite {
    ($mode:ident) => {
        mod $mode {
            const MODE: &str = stringify!($mode);

            #[test]
            fn vxlan_every_pod_pair_cluster_ip_and_masquerade() {
                super::connectivity(&super::lab("vxlan", MODE));
            }

            #[test]
            fn host_gw_every_pod_pair_cluster_ip_and_masquerade() {
                super::connectivity(&super::lab("host-gw", MODE));
            }

            #[test]
            fn vxlan_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
                super::leave_join_and_repair("vxlan", MODE);
            }

            #[test]
            fn host_gw_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
                super::leave_join_and_repair("host-gw", MODE);
            }

            #[test]
            fn host_gw_refuses_a_peer_behind_a_gateway() {
                super::host_gw_refuses_a_peer_behind_a_gateway(MODE);
            }

            #[test]
            fn deleted_datapath_device_comes_back() {
                super::deleted_datapath_device_comes_back(MODE);
            }

            #[test]
            fn vxlan_agent_restarts_lose_no_packet() {
                super::restart_without_loss("vxlan", MODE);
            }

            #[test]
            fn host_gw_agent_restarts_lose_no_packet() {
                super::restart_without_loss("host-gw", MODE);
            }

            #[test]
            fn interop_with_a_flanneld_configured_node() {
                super::interop_with_a_flanneld_configured_node(MODE);
            }
        }
    };
}

suite!(netlink);
suite!(ebpf);
suite!(ebpf_bypass);

fn host_gw_refuses_a_peer_behind_a_gateway(mode: &str) {
    let lab = lab("host-gw", mode);
    // A node whose PublicIP is only reachable through the default gateway.
    let key = format!("{SUBNETS_PREFIX}10.244.220.0-24");
    lab.etcdctl().put(&key, r#"{"PublicIP":"198.51.100.7","PublicIPv6":null,"BackendType":"host-gw"}"#).unwrap();
    let logged = within(Duration::from_secs(3), || {
        lab.nodes[0].log_text().contains("host-gw needs every node on the local L2 segment")
    });
    assert!(logged.is_some(), "no clear error: {}", lab.nodes[0].log_text());
    assert!(lab.nodes[0].log_text().contains("198.51.100.7"), "the error names the peer");
    assert!(!programmed(&lab, 0, &"10.244.220.0/24".parse().unwrap()), "nothing programmed for it");
    // Everything else keeps working.
    lab::ping(&lab.nodes[0].pods[0].ns, lab.nodes[1].pods[0].ip, 1).unwrap();
}

fn leave_join_and_repair(backend: &str, mode: &str) {
    let lab = lab(backend, mode);
    let subnet2 = lab.nodes[2].subnet().unwrap();
    let key2 = format!("{SUBNETS_PREFIX}{}-{}", subnet2.network(), subnet2.prefix_len());
    let value2 = lab.etcdctl().get(&key2).unwrap().expect("node 2's lease");
    // Node 2 leaves: its agent stops (leaving its lease), then the lease is deleted.
    lab.stop_agent(2, libc::SIGTERM).unwrap();
    assert!(programmed(&lab, 0, &subnet2));
    lab.etcdctl().delete(&key2).unwrap();
    let took = within(Duration::from_secs(1), || !programmed(&lab, 0, &subnet2) && !programmed(&lab, 1, &subnet2));
    assert!(took.is_some(), "the departed node is still programmed after 1 s");
    // It joins again.
    lab.etcdctl().put(&key2, &value2).unwrap();
    let took = within(Duration::from_secs(1), || programmed(&lab, 0, &subnet2) && programmed(&lab, 1, &subnet2));
    assert!(took.is_some(), "the joined node is not programmed after 1 s");

    // Someone deletes node 1's lease while its agent runs: the agent re-creates it.
    let subnet1 = lab.nodes[1].subnet().unwrap();
    let key1 = format!("{SUBNETS_PREFIX}{}-{}", subnet1.network(), subnet1.prefix_len());
    lab.etcdctl().delete(&key1).unwrap();
    assert!(
        within(Duration::from_secs(5), || lab.etcdctl().get(&key1).unwrap().is_some()).is_some(),
        "lease not repaired"
    );
    assert!(lab.nodes[1].log_text().contains("re-acquiring"));
    // Pods across nodes still talk.
    let (a, b) = (lab.nodes[0].pods[0].ip, lab.nodes[1].pods[0].ip);
    lab::ping(&lab.nodes[1].pods[0].ns, a, 2).unwrap();
    lab::ping(&lab.nodes[0].pods[0].ns, b, 2).unwrap();
}

/// Someone deletes the datapath's device — flannel.1, classic (netlink) or the metadata
/// tunnel device (eBPF) — and the agent's periodic resync brings it back.
fn deleted_datapath_device_comes_back(mode: &str) {
    let lab = lab("vxlan", mode);
    let node0 = &lab.nodes[0];
    let device = "flannel.1";
    let created = if is_ebpf(&lab) { "created the tunnel device" } else { "created the vxlan device" };
    let from = &node0.pods[0].ns;
    let remote = lab.nodes[1].pods[0].ip;
    lab::ping(from, remote, 1).unwrap();
    node0.ns.ip(&["link", "del", device]).unwrap();
    assert!(lab::ping(from, remote, 1).is_err(), "traffic needs {device}");
    let back = within(Duration::from_secs(15), || lab::ping(from, remote, 1).is_ok());
    assert!(back.is_some(), "the agent did not recreate {device}: {}", node0.log_text());
    assert!(node0.log_text().matches(created).count() >= 2, "{}", node0.log_text());
}

fn restart_without_loss(backend: &str, mode: &str) {
    let lab = lab(backend, mode);
    let (server, client) = (&lab.nodes[1].pods[0], &lab.nodes[0].pods[0]);
    let tick = Duration::from_millis(1);
    let report = udp_stream_during(&server.ns, server.ip, &client.ns, 30000, tick, Duration::from_millis(500), || {
        std::thread::sleep(Duration::from_millis(300));
        for (node, signal) in [(0, libc::SIGTERM), (1, libc::SIGKILL), (0, libc::SIGKILL), (1, libc::SIGTERM)] {
            lab.stop_agent(node, signal)?;
            std::thread::sleep(Duration::from_millis(200));
            let restarted = std::time::SystemTime::now();
            lab.start_agent(node)?;
            lab.wait_ready_since(node, Duration::from_secs(20), Some(restarted))?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    })
    .unwrap();
    assert!(report.sent > 1000, "{report:?}");
    assert_eq!(report.lost, 0, "packets lost across agent restarts: {report:?}");
}

/// A node configured by hand exactly as flanneld configures its kernel (the commands from
/// flannel's vxlan backend) exchanges traffic with our nodes in both directions: the VXLAN we
/// put on the wire is what a kernel vxlan device accepts, and what it sends is what we accept.
fn interop_with_a_flanneld_configured_node(mode: &str) {
    let lab = lab("vxlan", mode);
    // The hand-made node: 192.0.2.50, subnet 10.244.200.0/24, VtepMAC 02:aa:00:00:00:50.
    let hand = lab.hand_node("192.0.2.50/24").unwrap();
    let (vtep, gw) = ("02:aa:00:00:00:50", "10.244.200.1/24");
    for cmd in [
        vec![
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            "192.0.2.50",
            "dev",
            "eth0",
            "nolearning",
            "dstport",
            "8472",
        ],
        vec!["link", "set", "flannel.1", "address", vtep, "mtu", "1450", "up"],
        vec!["addr", "add", "10.244.200.0/32", "dev", "flannel.1"],
        vec!["link", "add", "cni0", "type", "bridge"],
        vec!["addr", "add", gw, "dev", "cni0"],
        vec!["link", "set", "cni0", "up"],
    ] {
        hand.ip(&cmd).unwrap();
    }
    hand.sysctl("net.ipv4.ip_forward", "1").unwrap();
    // Like flanneld: for each of our nodes' leases, neighbour + FDB + onlink route.
    for (key, value) in lab.etcdctl().get_prefix(SUBNETS_PREFIX).unwrap() {
        let lease: serde_json::Value = serde_json::from_str(&value).unwrap();
        let name = key.rsplit('/').next().unwrap();
        let (base, len) = name.split_once('-').unwrap();
        let mac = lease["BackendData"]["VtepMAC"].as_str().unwrap();
        let public = lease["PublicIP"].as_str().unwrap();
        hand.ip(&["neigh", "replace", base, "lladdr", mac, "dev", "flannel.1", "nud", "permanent"]).unwrap();
        flannel_tests::netns::run(hand.command("bridge").args([
            "fdb",
            "append",
            mac,
            "dev",
            "flannel.1",
            "dst",
            public,
            "self",
            "permanent",
        ]))
        .unwrap();
        hand.ip(&["route", "replace", &format!("{base}/{len}"), "via", base, "dev", "flannel.1", "onlink"]).unwrap();
    }
    // …and its lease, as flanneld writes it.
    lab.etcdctl()
        .put(
            &format!("{SUBNETS_PREFIX}10.244.200.0-24"),
            &format!(r#"{{"PublicIP":"192.0.2.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep}"}}}}"#),
        )
        .unwrap();
    let pod = &lab.nodes[0].pods[0];
    // Checksums are finished in software before capture (veth would leave them to an
    // offload that never happens), so the captured outer UDP checksums can be verified.
    for ns in [&hand, &lab.nodes[0].ns] {
        capture::disable_tx_checksum_offload(ns, "eth0").unwrap();
    }
    let mut wire = Capture::start(&hand, "eth0").unwrap();
    let hand_ip: Ipv4Addr = "10.244.200.1".parse().unwrap();
    let reached = within(Duration::from_secs(3), || lab::ping(&pod.ns, hand_ip, 1).is_ok());
    assert!(reached.is_some(), "pod → flanneld node failed");
    flannel_tests::netns::run(hand.command("ping").args([
        "-c",
        "2",
        "-W",
        "1",
        "-I",
        "10.244.200.1",
        &pod.ip.to_string(),
    ]))
    .expect("flanneld node → pod");
    let seen = tcp_source_seen(&pod.ns, pod.ip, &hand, 31000).unwrap();
    // As with flanneld: traffic the node itself sends to a remote pod leaves from flannel.1's
    // address (the subnet's base address).
    assert_eq!(seen.ip(), "10.244.200.0".parse::<Ipv4Addr>().unwrap());
    same_outer_headers_as_flannel_1(&mut wire, lab.nodes[0].ip);
}

/// What our node put on the wire towards the flanneld node has the outer headers the
/// flanneld node's own flannel.1 puts on the wire: a valid, non-zero UDP checksum, the same
/// TTL, DF and ECN, a source port from the same range.
fn same_outer_headers_as_flannel_1(wire: &mut Capture, ours: Ipv4Addr) {
    let frames =
        wire.collect_for(Duration::from_millis(300), |f| f.vxlan().is_some_and(|v| v.dst_port == 8472)).unwrap();
    let (from_us, from_flannel_1): (Vec<_>, Vec<_>) =
        frames.iter().filter_map(|f| f.vxlan()).partition(|v| v.src == ours);
    assert!(!from_us.is_empty() && !from_flannel_1.is_empty(), "captured both directions: {frames:?}");
    let reference = &from_flannel_1[0];
    for v in from_us.iter().chain(&from_flannel_1) {
        assert_eq!(v.udp_checksum_valid, Some(true), "outer UDP checksum present and valid: {v:?}");
        assert_eq!((v.ttl, v.dont_fragment, v.ecn), (reference.ttl, reference.dont_fragment, reference.ecn), "{v:?}");
        assert!((32768..=60999).contains(&v.src_port), "source port from the flow-hash range: {v:?}");
        assert_eq!(v.vni, 1);
    }
}

/// The receive side accepts exactly what flannel's membership allows: VXLAN from a node
/// without a lease, with another VNI, for another VTEP MAC, or carrying anything but IPv4
/// (an inner ARP would otherwise teach the node a spoofed neighbour) is dropped and counted
/// by reason; the same frame from a lease holder, correct, is accepted.
#[test]
fn ebpf_vxlan_receive_drops_and_counts_what_flannel_membership_rejects() {
    use flannel_tests::vxlan_probe::{inner_arp_request, inner_ipv4_icmp_echo, send_vxlan, VXLAN_PORT};
    let lab = Lab::start(LabConfig { nodes: 2, pods_per_node: 1, ..mode_config("vxlan", "ebpf") }).expect("lab");
    let hand = lab.hand_node("192.0.2.50/24").unwrap();
    let hand_ip = Ipv4Addr::new(192, 0, 2, 50);
    let node = lab.nodes[0].ip;
    let pod = lab.nodes[0].pods[0].ip;
    let vtep: [u8; 6] = lab.inspect(0).unwrap()["node"]["vtep_mac"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let hand_vtep = [0x02, 0xaa, 0, 0, 0, 0x50];
    let from_hand = Ipv4Addr::new(10, 244, 200, 1);
    let echo = inner_ipv4_icmp_echo(vtep, hand_vtep, from_hand, pod, 7, 1);
    // Sends `inner` with `vni` and waits until counter `name` moved by one.
    let expect_counted = |vni: u32, inner: &[u8], name: &str| {
        let before = counter(&lab, 0, name);
        send_vxlan(&hand, hand_ip, node, VXLAN_PORT, vni, inner).unwrap();
        let counted = within(Duration::from_secs(3), || counter(&lab, 0, name) == before + 1);
        assert!(counted.is_some(), "{name} did not count the frame: {}", lab.inspect(0).unwrap());
    };
    expect_counted(1, &echo, "drop-vxlan-unknown-source");
    // The hand node becomes a member.
    lab.etcdctl()
        .put(
            &format!("{SUBNETS_PREFIX}10.244.200.0-24"),
            r#"{"PublicIP":"192.0.2.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:aa:00:00:00:50"}}"#,
        )
        .unwrap();
    let member = within(Duration::from_secs(3), || lab.inspect(0).unwrap()["peers"].to_string().contains("192.0.2.50"));
    assert!(member.is_some(), "the hand node became a peer");
    expect_counted(2, &echo, "drop-vxlan-wrong-vni");
    let wrong_mac = inner_ipv4_icmp_echo([0x02, 0xbb, 0, 0, 0, 1], hand_vtep, from_hand, pod, 7, 2);
    expect_counted(1, &wrong_mac, "drop-vxlan-wrong-vtep-mac");
    let mut arp = inner_arp_request(hand_vtep, from_hand, node);
    arp[0..6].copy_from_slice(&vtep);
    expect_counted(1, &arp, "drop-vxlan-inner-not-ipv4");
    let neighbours = String::from_utf8(lab.nodes[0].ns.ip(&["neigh"]).unwrap().stdout).unwrap();
    assert!(!neighbours.contains("10.244.200.1"), "the inner ARP taught nothing: {neighbours}");
    expect_counted(1, &echo, "vxlan-decapsulated");
}

/// With --netfilter-bypass the endpoint map follows pods as the CNI plugin creates and
/// deletes them, while traffic between two other pods keeps flowing without a loss.
#[test]
fn ebpf_bypass_endpoint_map_follows_pods_under_traffic() {
    let mut lab =
        Lab::start(LabConfig { nodes: 2, pods_per_node: 1, ..mode_config("vxlan", "ebpf_bypass") }).expect("lab");
    let endpoints = |lab: &Lab| lab.inspect(0).unwrap()["endpoints"].to_string();
    let (client, server) = (lab.nodes[0].pods[0].ip, lab.nodes[1].pods[0].ip);
    // A pod is learned from its first packet (an ARP for its gateway). Until both ends are — in
    // the endpoint map AND fl_pod_egress attached to their veths — a flow stays on the stack's
    // path both ways, for as long as it lives.
    lab::ping(&lab.nodes[0].pods[0].ns, server, 1).unwrap();
    let bypassing = |lab: &Lab, node: usize, pod: Ipv4Addr| {
        let state = lab.inspect(node).unwrap();
        state["endpoints"].to_string().contains(&format!("\"{pod}\""))
            && state["links"].to_string().contains("/fl_pod_egress")
    };
    let learned = within(Duration::from_secs(5), || bypassing(&lab, 0, client) && bypassing(&lab, 1, server));
    assert!(learned.is_some(), "pods learned: {} / {}", lab.inspect(0).unwrap(), lab.inspect(1).unwrap());
    let delivered_before = counter(&lab, 0, "bypass-delivered-to-pod");
    // 200 pings per second for 4 s, from a process of its own, while the lab changes.
    let traffic = lab.nodes[0].pods[0]
        .ns
        .command("ping")
        .args(["-q", "-c", "800", "-i", "0.005", "-W", "1", &server.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let new_pod = lab.add_pod(0).unwrap();
    lab::ping(&lab.nodes[0].pods[1].ns, server, 2).unwrap();
    let learned = within(Duration::from_secs(5), || endpoints(&lab).contains(&format!("\"{new_pod}\"")));
    assert!(learned.is_some(), "new pod {new_pod} learned: {}", endpoints(&lab));
    assert_eq!(lab.remove_last_pod(0).unwrap(), new_pod);
    let gone = within(Duration::from_secs(5), || !endpoints(&lab).contains(&format!("\"{new_pod}\"")));
    assert!(gone.is_some(), "deleted pod {new_pod} still in the endpoint map: {}", endpoints(&lab));
    assert!(endpoints(&lab).contains(&format!("\"{client}\"")), "the other pod stays: {}", endpoints(&lab));
    let output = traffic.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("800 packets transmitted, 800 received"), "pings lost meanwhile: {summary}");
    let delivered = counter(&lab, 0, "bypass-delivered-to-pod") - delivered_before;
    assert!(delivered >= 800, "replies went through the bypass: {delivered} of 800");
}

/// A node switches datapaths under a running cluster: flannel-classic's flannel.1 is taken
/// over by the metadata tunnel device of the same name (one vxlan device per UDP port), and
/// handed back; pods across nodes talk after each switch, and no eBPF link stays behind.
#[test]
fn a_node_switches_between_classic_and_ebpf_and_back() {
    let lab = Lab::start(LabConfig { nodes: 2, pods_per_node: 1, ..mode_config("vxlan", "netlink") }).expect("lab");
    let device = |lab: &Lab| {
        String::from_utf8(lab.nodes[0].ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap().stdout).unwrap()
    };
    let (from, to) = (&lab.nodes[0].pods[0], lab.nodes[1].pods[0].ip);
    assert!(!device(&lab).contains("external"), "starts classic: {}", device(&lab));
    for (datapath, external) in [("ebpf", true), ("netlink", false)] {
        lab.stop_agent(0, libc::SIGTERM).unwrap();
        let restarted = std::time::SystemTime::now();
        lab.start_agent_with_datapath(0, datapath).unwrap();
        lab.wait_ready_since(0, Duration::from_secs(20), Some(restarted)).unwrap();
        assert_eq!(device(&lab).contains("external"), external, "after switching to {datapath}: {}", device(&lab));
        let reached = within(Duration::from_secs(3), || lab::ping(&from.ns, to, 1).is_ok());
        assert!(reached.is_some(), "pod → pod after switching to {datapath}: {}", lab.nodes[0].log_text());
        lab::ping(&lab.nodes[1].pods[0].ns, from.ip, 2).unwrap();
    }
    let links = lab.inspect(0).unwrap()["links"].clone();
    assert_eq!(links, serde_json::json!([]), "no eBPF program left attached after going back to netlink");
}
