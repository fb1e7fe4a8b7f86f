//! The real-etcd harness (`flannel_tests::etcd`) against etcd 3.4: members start, serve,
//! survive kill/restart with their data, leases and compaction behave as the agent's tests
//! expect, a 3-member cluster tolerates a dead member. Only `start_in` needs root.

use std::{net::Ipv4Addr, time::Instant};

use flannel_tests::{
    etcd::{EtcdCluster, EtcdServer, Etcdctl},
    require_root, NetNs,
};

#[test]
fn single_member_put_get_prefix_delete() {
    let started = Instant::now();
    let server = EtcdServer::start().unwrap();
    eprintln!("single member healthy after {:?} at {}", started.elapsed(), server.client_url());
    assert!(server.client_url().starts_with("http://127.0.0.1:"), "{}", server.client_url());

    let ctl = Etcdctl::new(&[server.client_url()]);
    assert_eq!(ctl.get("/coreos.com/network/config").unwrap(), None);
    ctl.put("/coreos.com/network/config", r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    ctl.put("/coreos.com/network/subnets/10.5.1.0-24", r#"{"PublicIP":"192.0.2.1"}"#).unwrap();
    ctl.put("/coreos.com/network/subnets/10.5.2.0-24", "-starts-with-a-dash").unwrap();
    ctl.put("/coreos.com/networkother", "not under the subnets prefix").unwrap();
    assert_eq!(
        ctl.get("/coreos.com/network/config").unwrap().as_deref(),
        Some(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
    );
    assert_eq!(
        ctl.get_prefix("/coreos.com/network/subnets/").unwrap(),
        vec![
            ("/coreos.com/network/subnets/10.5.1.0-24".to_owned(), r#"{"PublicIP":"192.0.2.1"}"#.to_owned()),
            ("/coreos.com/network/subnets/10.5.2.0-24".to_owned(), "-starts-with-a-dash".to_owned()),
        ]
    );
    ctl.delete("/coreos.com/network/subnets/10.5.1.0-24").unwrap();
    ctl.delete("/coreos.com/network/subnets/absent").unwrap();
    assert_eq!(ctl.get("/coreos.com/network/subnets/10.5.1.0-24").unwrap(), None);
    assert_eq!(ctl.get_prefix("/coreos.com/network/subnets/").unwrap().len(), 1);
    assert!(ctl.get_prefix("/nothing/here/").unwrap().is_empty());
}

#[test]
fn kill_and_restart_keep_data_and_url() {
    let mut server = EtcdServer::start().unwrap();
    let url = server.client_url();
    let ctl = server.etcdctl();
    ctl.put("/survives", "restart").unwrap();
    let revision = ctl.revision().unwrap();

    assert!(server.is_running());
    server.kill().unwrap();
    assert!(!server.is_running());
    server.kill().unwrap(); // no-op when stopped

    let restarted = Instant::now();
    server.restart().unwrap();
    eprintln!("restart healthy after {:?}", restarted.elapsed());
    assert!(server.is_running());
    assert_eq!(server.client_url(), url);
    assert_eq!(ctl.get("/survives").unwrap().as_deref(), Some("restart"));
    assert_eq!(ctl.revision().unwrap(), revision);

    // Restarting a running member kills it first.
    server.restart().unwrap();
    assert_eq!(ctl.get("/survives").unwrap().as_deref(), Some("restart"));
}

#[test]
fn key_lease_reports_lease_and_ttl() {
    let server = EtcdServer::start().unwrap();
    let ctl = server.etcdctl();

    // As a test would do by hand: `etcdctl lease grant 60` prints the ID in hex.
    let granted = ctl.run(&["lease", "grant", "60"]).unwrap();
    let hex = granted.split_whitespace().nth(1).unwrap_or_else(|| panic!("unexpected {granted:?}"));
    let lease = i64::from_str_radix(hex, 16).unwrap();
    ctl.run(&["put", &format!("--lease={hex}"), "/leased", "v"]).unwrap();
    let (id, ttl) = ctl.key_lease("/leased").unwrap().expect("a lease");
    assert_eq!(id, lease);
    assert!((55..=60).contains(&ttl), "ttl {ttl}");

    let other = ctl.lease_grant(30).unwrap();
    ctl.put_with_lease("/leased-too", "w", other).unwrap();
    let (id, ttl) = ctl.key_lease("/leased-too").unwrap().expect("a lease");
    assert_eq!(id, other);
    assert!((25..=30).contains(&ttl), "ttl {ttl}");

    ctl.put("/plain", "v").unwrap();
    assert_eq!(ctl.key_lease("/plain").unwrap(), None);
    assert!(ctl.key_lease("/absent").is_err());
}

#[test]
fn compaction_cancels_watch_from_old_revision() {
    let server = EtcdServer::start().unwrap();
    let ctl = server.etcdctl();
    let before = ctl.revision().unwrap();
    for i in 0..3 {
        ctl.put("/compacted", &i.to_string()).unwrap();
    }
    let revision = ctl.revision().unwrap();
    assert_eq!(revision, before + 3);
    ctl.compact(revision).unwrap();

    let watch = ctl.output(&["watch", &format!("--rev={}", before + 1), "/compacted"]).unwrap();
    assert!(!watch.status.success());
    let said = format!("{}{}", String::from_utf8_lossy(&watch.stdout), String::from_utf8_lossy(&watch.stderr));
    assert!(said.contains("required revision has been compacted"), "{said}");
    // Compacting again to the same revision is an error too.
    assert!(ctl.compact(revision).is_err());

    ctl.put("/compacted", "after").unwrap();
    assert_eq!(ctl.revision().unwrap(), revision + 1);
    assert_eq!(ctl.get("/compacted").unwrap().as_deref(), Some("after"));
}

#[test]
fn three_member_cluster_survives_one_dead_member() {
    let started = Instant::now();
    let mut cluster = EtcdCluster::start(3).unwrap();
    eprintln!("3-member cluster healthy after {:?}: {:?}", started.elapsed(), cluster.client_urls());
    let urls = cluster.client_urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(urls.iter().collect::<std::collections::HashSet<_>>().len(), 3);

    cluster.etcdctl().put("/before", "kill").unwrap();
    // The worst case: the leader dies.
    let leader = cluster.wait_for_leader().unwrap();
    cluster.members[leader].kill().unwrap();
    assert!(!cluster.members[leader].is_running());
    let failover = Instant::now();
    let new_leader = cluster.wait_for_leader().unwrap();
    eprintln!("new leader after {:?}", failover.elapsed());
    assert_ne!(new_leader, leader);

    let remaining: Vec<String> = (0..3).filter(|&i| i != leader).map(|i| urls[i].clone()).collect();
    let ctl = Etcdctl::new(&remaining);
    ctl.put("/after", "kill").unwrap();
    assert_eq!(ctl.get("/before").unwrap().as_deref(), Some("kill"));
    for url in &remaining {
        assert_eq!(Etcdctl::new(std::slice::from_ref(url)).get("/after").unwrap().as_deref(), Some("kill"));
    }
    // etcdctl given all three endpoints, one of them dead, still gets through.
    assert_eq!(cluster.etcdctl().get("/after").unwrap().as_deref(), Some("kill"));

    // The dead member catches up after a restart.
    cluster.members[leader].restart().unwrap();
    assert_eq!(cluster.members[leader].etcdctl().get("/after").unwrap().as_deref(), Some("kill"));
}

#[test]
fn start_in_namespace_listens_on_its_address() {
    require_root().unwrap();
    let ns = NetNs::create("etcd").unwrap();
    let ip = Ipv4Addr::new(192, 0, 2, 100);

    // Not yet an address of the namespace: etcd cannot bind and the error quotes its log.
    let error = EtcdServer::start_in(&ns, ip).unwrap_err().to_string();
    assert!(error.contains("cannot assign requested address"), "{error}");

    ns.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"]).unwrap();
    let started = Instant::now();
    let mut server = EtcdServer::start_in(&ns, ip).unwrap();
    eprintln!("member in a namespace healthy after {:?} at {}", started.elapsed(), server.client_url());
    assert!(server.client_url().starts_with("http://192.0.2.100:"), "{}", server.client_url());

    let ctl = Etcdctl::in_netns(&[server.client_url()], &ns);
    ctl.put("/in/netns", "yes").unwrap();
    assert_eq!(server.etcdctl().get("/in/netns").unwrap().as_deref(), Some("yes"));

    server.kill().unwrap();
    server.restart().unwrap();
    assert_eq!(ctl.get("/in/netns").unwrap().as_deref(), Some("yes"));
}
