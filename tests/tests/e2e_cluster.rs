//! End to end on the lab: 3 nodes × 2 pods made by the real CNI chain, real agents, real
//! etcd, real packets. Root only; fails loudly otherwise. Each test builds its own lab.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use flannel_tests::{
    lab::{self, Lab, LabConfig, EXTERNAL_IP, SUBNETS_PREFIX},
    traffic::{tcp_source_seen, udp_stream_during},
    NetNs,
};

fn lab(backend: &str) -> Lab {
    Lab::start(LabConfig { backend: backend.into(), ..LabConfig::default() }).expect("lab starts")
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

#[test]
fn vxlan_every_pod_pair_and_masquerade() {
    connectivity(&lab("vxlan"));
}

#[test]
fn host_gw_every_pod_pair_and_masquerade() {
    connectivity(&lab("host-gw"));
}

#[test]
fn vxlan_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
    leave_join_and_repair("vxlan");
}

#[test]
fn host_gw_node_leave_and_join_reach_the_kernel_within_a_second_and_own_lease_is_repaired() {
    leave_join_and_repair("host-gw");
}

#[test]
fn host_gw_refuses_a_peer_behind_a_gateway() {
    let lab = lab("host-gw");
    // A node whose PublicIP is only reachable through the default gateway.
    let key = format!("{SUBNETS_PREFIX}10.244.220.0-24");
    lab.etcdctl().put(&key, r#"{"PublicIP":"198.51.100.7","PublicIPv6":null,"BackendType":"host-gw"}"#).unwrap();
    let logged = within(Duration::from_secs(3), || {
        lab.nodes[0].log_text().contains("host-gw needs every node on the local L2 segment")
    });
    assert!(logged.is_some(), "no clear error: {}", lab.nodes[0].log_text());
    assert!(lab.nodes[0].log_text().contains("198.51.100.7"), "the error names the peer");
    assert!(route_to(&lab.nodes[0].ns, &"10.244.220.0/24".parse().unwrap()).is_empty(), "no route installed");
    // Everything else keeps working.
    lab::ping(&lab.nodes[0].pods[0].ns, lab.nodes[1].pods[0].ip, 1).unwrap();
}

fn leave_join_and_repair(backend: &str) {
    let lab = lab(backend);
    let subnet2 = lab.nodes[2].subnet().unwrap();
    let key2 = format!("{SUBNETS_PREFIX}{}-{}", subnet2.network(), subnet2.prefix_len());
    let value2 = lab.etcdctl().get(&key2).unwrap().expect("node 2's lease");
    // Node 2 leaves: its agent stops (leaving its lease), then the lease is deleted.
    lab.stop_agent(2, libc::SIGTERM).unwrap();
    assert!(!route_to(&lab.nodes[0].ns, &subnet2).is_empty());
    lab.etcdctl().delete(&key2).unwrap();
    let took = within(Duration::from_secs(1), || {
        route_to(&lab.nodes[0].ns, &subnet2).is_empty() && route_to(&lab.nodes[1].ns, &subnet2).is_empty()
    });
    assert!(took.is_some(), "route to the departed node still present after 1 s");
    // It joins again.
    lab.etcdctl().put(&key2, &value2).unwrap();
    let took = within(Duration::from_secs(1), || {
        !route_to(&lab.nodes[0].ns, &subnet2).is_empty() && !route_to(&lab.nodes[1].ns, &subnet2).is_empty()
    });
    assert!(took.is_some(), "route to the joined node missing after 1 s");

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

#[test]
fn deleted_vxlan_device_and_routes_come_back() {
    let lab = lab("vxlan");
    let node0 = &lab.nodes[0];
    let (pod, remote) = (&node0.pods[0], lab.nodes[1].pods[0].ip);
    node0.ns.ip(&["link", "del", "flannel.1"]).unwrap();
    assert!(lab::ping(&pod.ns, remote, 1).is_err(), "traffic needs the device");
    let back = within(Duration::from_secs(15), || lab::ping(&pod.ns, remote, 1).is_ok());
    assert!(back.is_some(), "the agent did not recreate flannel.1 and its routes");
    assert!(node0.log_text().matches("created the vxlan device").count() >= 2, "{}", node0.log_text());
}

fn restart_without_loss(backend: &str) {
    let lab = lab(backend);
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

#[test]
fn vxlan_agent_restarts_lose_no_packet() {
    restart_without_loss("vxlan");
}

#[test]
fn host_gw_agent_restarts_lose_no_packet() {
    restart_without_loss("host-gw");
}

/// A node configured by hand exactly as flanneld configures its kernel (the commands from
/// flannel's vxlan backend) exchanges traffic with our nodes in both directions.
#[test]
fn interop_with_a_flanneld_configured_node() {
    let lab = lab("vxlan");
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
