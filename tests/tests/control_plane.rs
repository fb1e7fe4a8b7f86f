//! The control plane against a real etcd (Debian etcd-server on loopback, temp data dirs):
//! lease acquisition, reuse, reservations, SubnetMin/Max, the allocation race, renewal,
//! repair, faults (etcd restart, a dead cluster member, compaction) and malformed input.

mod common;

use std::time::Duration;

use common::*;
use flannel_tests::etcd::{EtcdCluster, EtcdServer, Etcdctl};
use futures_util_free::join_all;

/// `futures::future::join_all` without the dependency: spawn and await in order.
mod futures_util_free {
    pub async fn join_all<T: Send + 'static>(
        futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
    ) -> Vec<T> {
        let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            out.push(handle.await.expect("task panicked"));
        }
        out
    }
}

const NET: &str = "10.244.0.0/16";

fn etcd() -> (EtcdServer, Etcdctl, Vec<String>) {
    let server = EtcdServer::start().expect("etcd starts");
    let endpoints = vec![server.client_url()];
    let ctl = Etcdctl::new(&endpoints);
    (server, ctl, endpoints)
}

fn lease_count(ctl: &Etcdctl) -> usize {
    // "found N leases"
    let out = ctl.run(&["lease", "list"]).unwrap();
    out.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("unexpected: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_created_with_ttl_and_reused_across_restart() {
    let (_etcd, ctl, endpoints) = etcd();
    let spec = NodeSpec::new(node_ip(1), &agent_config());
    let (plane, _) = start_plane(&endpoints, &spec).await.unwrap();
    let first = plane.own().clone();
    let key = first.key.clone();
    let (lease_id, ttl) = ctl.key_lease(&key).unwrap().expect("lease has a TTL");
    assert!(ttl > 86000 && ttl <= 86400, "24 h TTL, got {ttl}");
    assert_eq!(ctl.get(&key).unwrap().unwrap(), peer_value(node_ip(1)), "lease value is flannel's JSON");
    drop(plane);

    // A restart (same PublicIP) finds the lease and keeps it and its etcd lease.
    let (plane, _) = start_plane(&endpoints, &spec).await.unwrap();
    assert_eq!(plane.own(), &first);
    assert_eq!(ctl.key_lease(&key).unwrap().unwrap().0, lease_id);
    assert_eq!(lease_count(&ctl), 1, "no etcd lease leaked by the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_subnet_env_subnet_is_preferred_when_free() {
    let (_etcd, _ctl, endpoints) = etcd();
    let mut spec = NodeSpec::new(node_ip(2), &agent_config());
    spec.previous = Some("10.244.177.0/24".parse().unwrap());
    let (plane, _) = start_plane(&endpoints, &spec).await.unwrap();
    assert_eq!(plane.own().subnet, "10.244.177.0/24".parse().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_is_honoured_and_never_given_a_ttl() {
    let (_etcd, ctl, endpoints) = etcd();
    // An operator reserves 10.244.150.0/24 for our node and 10.244.51.0/24 for another one.
    ctl.put(&subnet_key("10.244.150.0/24"), &format!(r#"{{"PublicIP":"{}"}}"#, node_ip(3))).unwrap();
    ctl.put(&subnet_key("10.244.51.0/24"), &peer_value(node_ip(4))).unwrap();
    let mut spec = NodeSpec::new(node_ip(3), &agent_config());
    spec.ttl_secs = 60;
    spec.renew_margin = Duration::from_secs(59); // renew every second
    let (plane, datapath) = start_plane(&endpoints, &spec).await.unwrap();
    assert_eq!(plane.own().subnet, "10.244.150.0/24".parse().unwrap());
    assert_eq!(plane.own().etcd_lease, None);
    let running = Running::spawn(plane);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let plane = running.stop().await;
    let key = subnet_key("10.244.150.0/24");
    assert_eq!(ctl.key_lease(&key).unwrap(), None, "still a reservation after renewal ticks");
    assert_eq!(ctl.get(&key).unwrap().unwrap(), peer_value(node_ip(3)), "our attributes were published");
    assert_eq!(ctl.key_lease(&subnet_key("10.244.51.0/24")).unwrap(), None, "the other reservation is untouched");
    assert_eq!(datapath.subnets(), vec!["10.244.51.0/24".parse().unwrap()], "the other reservation is a peer");
    assert_eq!(plane.stats().reacquired, 0);
    assert_eq!(plane.stats().renewals, 0, "a reservation has no etcd lease to keep alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_one_etcd_lease() {
    let (_etcd, ctl, endpoints) = etcd();
    let mut spec = NodeSpec::new(node_ip(5), &agent_config());
    spec.ttl_secs = 60;
    spec.renew_margin = Duration::from_secs(58); // renew about every 2 s
    let (plane, _) = start_plane(&endpoints, &spec).await.unwrap();
    let key = plane.own().key.clone();
    let (lease_id, _) = ctl.key_lease(&key).unwrap().unwrap();
    let running = Running::spawn(plane);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, ttl_before) = ctl.key_lease(&key).unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let plane = running.stop().await;
    let (same_id, ttl) = ctl.key_lease(&key).unwrap().unwrap();
    // The control plane's own count: its keep-alives ran (the TTL below only says that
    // something refreshed the lease).
    let stats = plane.stats();
    assert!(stats.renewals > 0, "no renewal in 5 s with a renewal due every 2 s: {stats:?}");
    assert_eq!(stats.reacquired, 0, "renewed, not re-acquired: {stats:?}");
    assert_eq!(same_id, lease_id, "renewal refreshes the same etcd lease");
    assert!(ttl >= 57, "TTL was refreshed (before {ttl_before}, now {ttl})");
    assert_eq!(lease_count(&ctl), 1, "no etcd lease leaked per renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_stay_within_subnet_min_and_max() {
    let (_etcd, _ctl, endpoints) = etcd();
    let config = config_json(NET, r#","SubnetMin":"10.244.200.0","SubnetMax":"10.244.203.0""#);
    let mut subnets = Vec::new();
    for n in 10..14 {
        let (plane, _) = start_plane(&endpoints, &NodeSpec::new(node_ip(n), &config)).await.unwrap();
        subnets.push(plane.own().subnet.to_string());
    }
    subnets.sort();
    assert_eq!(subnets, ["10.244.200.0/24", "10.244.201.0/24", "10.244.202.0/24", "10.244.203.0/24"]);
    let error = start_plane(&endpoints, &NodeSpec::new(node_ip(14), &config)).await.err().expect("no subnet left");
    assert!(format!("{error:#}").contains("out of subnets"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_of_32_agents_on_32_subnets_and_the_33rd_is_out_of_subnets() {
    let (_etcd, ctl, endpoints) = etcd();
    let config = config_json(NET, r#","SubnetMin":"10.244.1.0","SubnetMax":"10.244.32.0""#);
    let starts: Vec<_> = (1..=32u8)
        .map(|n| {
            let endpoints = endpoints.clone();
            let spec = NodeSpec::new(node_ip(n), &config);
            async move { start_plane(&endpoints, &spec).await.map(|(plane, _)| plane.own().subnet) }
        })
        .collect();
    let mut subnets: Vec<_> =
        join_all(starts).await.into_iter().map(|r| r.expect("each of 32 agents gets a lease")).collect();
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 32, "32 distinct subnets");
    assert_eq!(ctl.get_prefix(&format!("{PREFIX}/subnets/")).unwrap().len(), 32);
    let error = start_plane(&endpoints, &NodeSpec::new(node_ip(33), &config)).await.err().expect("33rd fails");
    let message = format!("{error:#}");
    assert!(message.contains("out of subnets") && message.contains("32 subnets"), "{message}");
    assert_eq!(lease_count(&ctl), 32, "lost races leave no etcd lease behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_adds_replaces_removes_and_skips_malformed_leases() {
    let (_etcd, ctl, endpoints) = etcd();
    ctl.put(&subnet_key("10.244.9.0/24"), &peer_value(node_ip(9))).unwrap();
    ctl.put(&subnet_key("10.244.10.0/24"), "{not json").unwrap();
    ctl.put(&format!("{PREFIX}/subnets/banana"), &peer_value(node_ip(11))).unwrap();
    let (plane, datapath) = start_plane(&endpoints, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    assert_eq!(datapath.subnets(), vec!["10.244.9.0/24".parse().unwrap()], "malformed ones skipped at list time");
    assert_eq!(plane.stats().malformed_skipped, 2);
    let running = Running::spawn(plane);

    ctl.put(&subnet_key("10.244.12.0/24"), &peer_value(node_ip(12))).unwrap();
    ctl.put(&subnet_key("10.244.13.0/24"), r#"{"PublicIP":"300.1.1.1"}"#).unwrap();
    ctl.put(&subnet_key("10.244.9.0/24"), &peer_value(node_ip(99))).unwrap();
    ctl.delete(&subnet_key("10.244.12.0/24")).unwrap();
    ctl.put(&subnet_key("10.244.14.0/24"), &peer_value(node_ip(14))).unwrap();
    let expected: Vec<ipnet::Ipv4Net> = vec!["10.244.14.0/24".parse().unwrap(), "10.244.9.0/24".parse().unwrap()];
    let mut wanted = expected.clone();
    wanted.sort();
    assert!(eventually(Duration::from_secs(5), || datapath.subnets() == wanted).await, "{:?}", datapath.subnets());
    assert_eq!(datapath.lease("10.244.9.0/24").unwrap().attrs.public_ip, node_ip(99), "replace applied");
    assert!(running.is_running(), "malformed input does not stop the agent");
    let plane = running.stop().await;
    assert_eq!(plane.stats().malformed_skipped, 3, "{:?}", plane.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_lease_deleted_by_someone_else_is_repaired() {
    let (_etcd, ctl, endpoints) = etcd();
    let (plane, _) = start_plane(&endpoints, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let own = plane.own().clone();
    let running = Running::spawn(plane);
    ctl.delete(&own.key).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || ctl.get(&own.key).unwrap().is_some()).await,
        "the agent re-created its lease"
    );
    let plane = running.stop().await;
    assert_eq!(plane.own().subnet, own.subnet, "same subnet");
    assert_eq!(ctl.key_lease(&own.key).unwrap().unwrap().0, own.etcd_lease.unwrap(), "same etcd lease reused");
    assert_eq!(plane.stats().reacquired, 1);
    assert_eq!(lease_count(&ctl), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_reconnects_keeps_lease_and_catches_up() {
    let (mut server, ctl, endpoints) = etcd();
    ctl.put(&subnet_key("10.244.20.0/24"), &peer_value(node_ip(20))).unwrap();
    let (plane, datapath) = start_plane(&endpoints, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let own = plane.own().clone();
    let running = Running::spawn(plane);

    server.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running.is_running(), "the agent survives etcd being down");
    server.restart().unwrap();
    // Changes made right after the restart, while the agent's watch is still reconnecting.
    ctl.put(&subnet_key("10.244.21.0/24"), &peer_value(node_ip(21))).unwrap();
    ctl.delete(&subnet_key("10.244.20.0/24")).unwrap();
    let want = vec!["10.244.21.0/24".parse().unwrap()];
    assert!(eventually(Duration::from_secs(15), || datapath.subnets() == want).await, "{:?}", datapath.subnets());
    let plane = running.stop().await;
    assert_eq!(plane.own(), &own, "lease kept");
    assert_eq!(ctl.key_lease(&own.key).unwrap().unwrap().0, own.etcd_lease.unwrap());
    assert!(plane.stats().watch_reconnects >= 1);
    assert_eq!(plane.stats().relists, 0, "resumed from its revision: nothing was compacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_member_killed_the_agent_keeps_working() {
    let mut cluster = EtcdCluster::start(3).expect("3-member cluster");
    let endpoints = cluster.client_urls();
    // The test writes through the surviving members; the agent is given all three.
    let ctl = Etcdctl::new(&endpoints[1..]);
    let (plane, datapath) = start_plane(&endpoints, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let running = Running::spawn(plane);
    // The first endpoint is the one a fresh client tends to use: kill it.
    cluster.members[0].kill().unwrap();
    // Writes right after a leader dies stall until a new one is elected (etcd 3.4).
    cluster.wait_for_leader().unwrap();
    ctl.put(&subnet_key("10.244.30.0/24"), &peer_value(node_ip(30))).unwrap();
    let want = vec!["10.244.30.0/24".parse().unwrap()];
    assert!(eventually(Duration::from_secs(15), || datapath.subnets() == want).await, "{:?}", datapath.subnets());
    // A new agent can still acquire a lease through the surviving members.
    let (other, _) = start_plane(&endpoints, &NodeSpec::new(node_ip(2), &agent_config())).await.unwrap();
    assert_ne!(other.own().subnet, running.stop().await.own().subnet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_watch_revision_relists_exactly_once() {
    let (_etcd, ctl, endpoints) = etcd();
    ctl.put(&subnet_key("10.244.40.0/24"), &peer_value(node_ip(40))).unwrap();
    ctl.put(&subnet_key("10.244.41.0/24"), &peer_value(node_ip(41))).unwrap();
    let (plane, datapath) = start_plane(&endpoints, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    // Before the watch starts: changes, then a compaction past the revision the watch will ask for.
    ctl.delete(&subnet_key("10.244.40.0/24")).unwrap();
    ctl.put(&subnet_key("10.244.42.0/24"), &peer_value(node_ip(42))).unwrap();
    for n in 0..20 {
        ctl.put(&format!("/unrelated/{n}"), "x").unwrap();
    }
    ctl.compact(ctl.revision().unwrap()).unwrap();

    let running = Running::spawn(plane);
    let want: Vec<ipnet::Ipv4Net> = vec!["10.244.41.0/24".parse().unwrap(), "10.244.42.0/24".parse().unwrap()];
    assert!(eventually(Duration::from_secs(5), || datapath.subnets() == want).await, "{:?}", datapath.subnets());
    // Keep running a while: a hot loop would re-list again and again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctl.put(&subnet_key("10.244.43.0/24"), &peer_value(node_ip(43))).unwrap();
    assert!(eventually(Duration::from_secs(5), || datapath.subnets().len() == 3).await, "watch resumed after re-list");
    let plane = running.stop().await;
    assert_eq!(plane.stats().relists, 1, "exactly one re-list");
    let r = datapath.0.lock().unwrap();
    assert_eq!(
        r.events.len(),
        3,
        "the re-list applied only the difference (remove .40, add .42) then .43: {:?}",
        r.events
    );
}
