//! End to end on the lab: 3 nodes × 2 pods made by the real CNI chain, real agents, real
//! etcd, real packets. Root only; fails loudly otherwise. Each test builds its own lab.
//!
//! The whole suite runs once per datapath (`netlink::…` and `ebpf::…`); where the two differ
//! (what "programmed" means, which device a test deletes) the helpers ask the lab's datapath.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use flannel_tests::{
    lab::{self, Lab, LabConfig, EXTERNAL_IP, SUBNETS_PREFIX},
    traffic::{tcp_source_seen, udp_stream_during},
    NetNs,
};

fn lab(backend: &str, datapath: &str) -> Lab {
    Lab::start(LabConfig { backend: backend.into(), datapath: datapath.into(), ..LabConfig::default() })
        .expect("lab starts")
}

fn is_ebpf(lab: &Lab) -> bool {
    lab.config.datapath == "ebpf"
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

/// Every pod reaches every other pod over ICMP and TCP, keeping its own source address; pods
/// reach the external host masqueraded to their node's address.
fn connectivity(lab: &Lab) {
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
    if is_ebpf(lab) {
        // The traffic went through our programs: there is no vxlan device to carry it.
        for node in 0..lab.nodes.len() {
            let links = String::from_utf8(lab.nodes[node].ns.ip(&["-o", "link"]).unwrap().stdout).unwrap();
            assert!(!links.contains("flannel."), "node {node} has a vxlan device: {links}");
            let forwarded = match lab.config.backend.as_str() {
                "vxlan" => counter(lab, node, "vxlan-encapsulated").min(counter(lab, node, "vxlan-decapsulated")),
                _ => counter(lab, node, "host-gw-forwarded"),
            };
            assert!(forwarded > 0, "node {node}'s programs forwarded nothing: {}", lab.inspect(node).unwrap());
            // Masquerade too: flannel's pod → outside iptables rule is not installed.
            assert!(counter(lab, node, "snat-translated") > 0, "node {node} masqueraded nothing in eBPF");
            let nat =
                flannel_tests::lab::output(lab.nodes[node].ns.command("iptables-save").args(["-t", "nat"])).unwrap();
            assert!(!nat.contains("! -d 224.0.0.0/4"), "node {node} still has the pod MASQUERADE rule:\n{nat}");
        }
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

/// The suite, for one datapath.
macro_rules! suite {
    ($datapath:ident) => {
        mod $datapath {
            const DATAPATH: &str = stringify!($datapath);

            #[test]
            fn vxlan_every_pod_pair_and_masquerade() {
                super::connectivity(&super::lab("vxlan", DATAPATH));
            }

            #[test]
            fn host_gw_every_pod_pair_and_masquerade() {
                super::connectivity(&super::lab("host-gw", DATAPATH));
            }

            #[test]
            fn vxlan_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
                super::leave_join_and_repair("vxlan", DATAPATH);
            }

            #[test]
            fn host_gw_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
                super::leave_join_and_repair("host-gw", DATAPATH);
            }

            #[test]
            fn host_gw_refuses_a_peer_behind_a_gateway() {
                super::host_gw_refuses_a_peer_behind_a_gateway(DATAPATH);
            }

            #[test]
            fn deleted_datapath_device_comes_back() {
                super::deleted_datapath_device_comes_back(DATAPATH);
            }

            #[test]
            fn vxlan_agent_restarts_lose_no_packet() {
                super::restart_without_loss("vxlan", DATAPATH);
            }

            #[test]
            fn host_gw_agent_restarts_lose_no_packet() {
                super::restart_without_loss("host-gw", DATAPATH);
            }

            #[test]
            fn interop_with_a_flanneld_configured_node() {
                super::interop_with_a_flanneld_configured_node(DATAPATH);
            }
        }
    };
}

suite!(netlink);
suite!(ebpf);

/// kube-proxy drops forwarded packets conntrack calls INVALID. The eBPF datapath leaves pod
/// traffic to the stack's routing and netfilter (unless --netfilter-bypass), so conntrack
/// sees both directions and pod-to-pod TCP works with that rule in place.
#[test]
fn ebpf_pod_traffic_survives_kube_proxys_invalid_drop_rule() {
    let config = LabConfig { datapath: "ebpf".into(), ..LabConfig::default() };
    let lab = Lab::start(config).expect("lab starts");
    for node in &lab.nodes {
        flannel_tests::netns::run(node.ns.command("iptables").args([
            "-I",
            "FORWARD",
            "1",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]))
        .unwrap();
    }
    let (client, server) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    let seen = tcp_source_seen(&server.ns, server.ip, &client.ns, 33000).expect("pod → pod TCP");
    assert_eq!(seen.ip(), client.ip);
    assert!(counter(&lab, 0, "vxlan-encapsulated") > 0, "through our programs");
}

/// With --netfilter-bypass the pod bridge's program forwards pod traffic itself.
#[test]
fn ebpf_netfilter_bypass_every_pod_pair_and_masquerade() {
    let config =
        LabConfig { datapath: "ebpf".into(), agent_args: vec!["--netfilter-bypass".into()], ..LabConfig::default() };
    let lab = Lab::start(config).expect("lab starts");
    connectivity(&lab);
    let links = lab.inspect(0).unwrap()["links"].to_string();
    assert!(links.contains("cni0/fl_pod_egress"), "{links}");
}

/// The eBPF datapath with VXLAN decapsulated at TC ingress instead of XDP.
#[test]
fn ebpf_tc_decap_every_pod_pair_and_masquerade() {
    let config = LabConfig {
        datapath: "ebpf".into(),
        agent_args: vec!["--vxlan-decap".into(), "tc".into()],
        ..LabConfig::default()
    };
    let lab = Lab::start(config).expect("lab starts");
    connectivity(&lab);
    let links = lab.inspect(0).unwrap()["links"].to_string();
    assert!(links.contains("eth0/fl_underlay_ingress_tc") && !links.contains("eth0/fl_underlay_ingress\""), "{links}");
}

fn host_gw_refuses_a_peer_behind_a_gateway(datapath: &str) {
    let lab = lab("host-gw", datapath);
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

fn leave_join_and_repair(backend: &str, datapath: &str) {
    let lab = lab(backend, datapath);
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

/// Someone deletes the datapath's device — flannel.1 (netlink) or fl_host (eBPF, the node's
/// own path into the cluster) — and the agent's periodic resync brings it back.
fn deleted_datapath_device_comes_back(datapath: &str) {
    let lab = lab("vxlan", datapath);
    let node0 = &lab.nodes[0];
    let (device, created, from) = match datapath {
        "ebpf" => ("fl_host", "created the host device pair", &node0.ns),
        _ => ("flannel.1", "created the vxlan device", &node0.pods[0].ns),
    };
    let remote = lab.nodes[1].pods[0].ip;
    lab::ping(from, remote, 1).unwrap();
    node0.ns.ip(&["link", "del", device]).unwrap();
    assert!(lab::ping(from, remote, 1).is_err(), "traffic needs {device}");
    let back = within(Duration::from_secs(15), || lab::ping(from, remote, 1).is_ok());
    assert!(back.is_some(), "the agent did not recreate {device}: {}", node0.log_text());
    assert!(node0.log_text().matches(created).count() >= 2, "{}", node0.log_text());
}

fn restart_without_loss(backend: &str, datapath: &str) {
    let lab = lab(backend, datapath);
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
fn interop_with_a_flanneld_configured_node(datapath: &str) {
    let lab = lab("vxlan", datapath);
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
}
