//! The control plane against an etcd that requires TLS with client certificates
//! (`--etcd-cafile/--etcd-certfile/--etcd-keyfile`) or username/password auth
//! (`--etcd-username/--etcd-password`), and the errors for a misconfigured client. Certificates
//! are generated per test with `openssl` into a temp dir; everything runs on 127.0.0.1.

mod common;

use std::{path::Path, time::Duration};

use common::*;
use flannel_agent::etcd::{EtcdOptions, Registry};
use flannel_tests::{
    etcd::{EtcdServer, EtcdTls, Etcdctl, MemberOptions},
    pki::TestCa,
};
use tempfile::TempDir;

const PASSWORD: &str = "s3cret-root";
/// Bound on a connect attempt that must fail: longer than the registry's own 5 s call timeout.
const FAIL_WITHIN: Duration = Duration::from_secs(20);

fn temp_dir() -> TempDir {
    tempfile::Builder::new().prefix("flannel-etcd-tls-").tempdir().expect("temp dir")
}

/// A TLS member requiring client certificates, its etcdctl (with the client certificate) and
/// the agent's options for it (CA, client certificate and key).
fn tls_etcd(dir: &Path) -> (EtcdServer, Etcdctl, EtcdOptions) {
    let tls = EtcdTls::generate(dir).expect("certificates");
    let server = EtcdServer::start_tls(&tls).expect("TLS etcd starts");
    assert!(server.client_url().starts_with("https://127.0.0.1:"), "{}", server.client_url());
    let options = EtcdOptions {
        endpoints: vec![server.client_url()],
        prefix: PREFIX.into(),
        cafile: Some(tls.client.ca.clone()),
        certfile: Some(tls.client.cert.clone()),
        keyfile: Some(tls.client.key.clone()),
        ..Default::default()
    };
    let ctl = server.etcdctl();
    (server, ctl, options)
}

/// A plain member with auth enabled (user root), its etcdctl (as root) and the agent's options
/// with the right credentials.
fn auth_etcd() -> (EtcdServer, Etcdctl, EtcdOptions) {
    auth_etcd_with(&MemberOptions::default())
}

fn auth_etcd_with(member: &MemberOptions) -> (EtcdServer, Etcdctl, EtcdOptions) {
    let mut server = EtcdServer::start_with(member).expect("etcd starts");
    server.enable_auth(PASSWORD).expect("auth enabled");
    let options = EtcdOptions {
        endpoints: vec![server.client_url()],
        prefix: PREFIX.into(),
        username: Some("root".into()),
        password: Some(PASSWORD.into()),
        ..Default::default()
    };
    let ctl = server.etcdctl();
    (server, ctl, options)
}

/// `Registry::connect` that must fail, and not hang; returns the error chain as text.
async fn connect_error(options: &EtcdOptions) -> String {
    match tokio::time::timeout(FAIL_WITHIN, Registry::connect(options)).await {
        Ok(Ok(_)) => panic!("connecting with {options:?} succeeded"),
        Ok(Err(error)) => {
            eprintln!("connect error (as expected): {error:#}");
            format!("{error:#}")
        }
        Err(_) => panic!("connecting with {options:?} hung for {FAIL_WITHIN:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certs_acquires_a_lease_and_watches_peers() {
    let dir = temp_dir();
    let (_etcd, ctl, options) = tls_etcd(dir.path());
    ctl.put(&subnet_key("10.244.9.0/24"), &peer_value(node_ip(9))).unwrap();

    let (plane, datapath) = start_plane_with(&options, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let own = plane.own().clone();
    assert_eq!(ctl.get(&own.key).unwrap().unwrap(), peer_value(node_ip(1)), "lease written over TLS");
    assert!(ctl.key_lease(&own.key).unwrap().is_some(), "with an etcd lease");
    assert_eq!(datapath.subnets(), vec!["10.244.9.0/24".parse().unwrap()], "listed over TLS");

    let running = Running::spawn(plane);
    ctl.put(&subnet_key("10.244.10.0/24"), &peer_value(node_ip(10))).unwrap();
    let want: Vec<ipnet::Ipv4Net> = vec!["10.244.9.0/24".parse().unwrap(), "10.244.10.0/24".parse().unwrap()];
    assert!(eventually(Duration::from_secs(5), || datapath.subnets() == want).await, "{:?}", datapath.subnets());
    let plane = running.stop().await;
    assert_eq!(plane.own(), &own);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_misconfiguration_fails_with_a_clear_error() {
    let dir = temp_dir();
    let (_etcd, _ctl, options) = tls_etcd(dir.path());

    // A CA file that does not exist: named with its flag.
    let absent = dir.path().join("no-such-ca.crt");
    let error = connect_error(&EtcdOptions { cafile: Some(absent.clone()), ..options.clone() }).await;
    assert!(error.contains(&absent.display().to_string()) && error.contains("--etcd-cafile"), "{error}");

    // A client certificate without its key, and a key without its certificate.
    let error = connect_error(&EtcdOptions { keyfile: None, ..options.clone() }).await;
    assert!(error.contains("--etcd-certfile and --etcd-keyfile must be given together"), "{error}");
    let error = connect_error(&EtcdOptions { certfile: None, ..options.clone() }).await;
    assert!(error.contains("--etcd-certfile and --etcd-keyfile must be given together"), "{error}");

    // A CA that did not sign the server's certificate: the server is not trusted.
    let other = TestCa::create(dir.path(), "other-ca").unwrap();
    let error = connect_error(&EtcdOptions { cafile: Some(other.cert().to_path_buf()), ..options.clone() }).await;
    assert!(error.contains(&options.endpoints[0]) && error.contains("certificate"), "{error}");

    // The right CA but no client certificate: the server requires one.
    let error = connect_error(&EtcdOptions { certfile: None, keyfile: None, ..options.clone() }).await;
    assert!(error.contains(&options.endpoints[0]), "{error}");

    // A plain http endpoint with TLS options.
    let http = options.endpoints[0].replacen("https://", "http://", 1);
    let error = connect_error(&EtcdOptions { endpoints: vec![http], ..options.clone() }).await;
    assert!(error.contains("HTTPS"), "{error}");

    // The files were right: the same options connect.
    Registry::connect(&options).await.expect("correct TLS options connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_password_auth_acquires_a_lease() {
    let (_etcd, ctl, options) = auth_etcd();
    // Auth is really on: etcdctl without credentials is refused.
    let anonymous = Etcdctl::new(&options.endpoints);
    assert!(anonymous.put("/anonymous", "x").is_err(), "auth is enabled");
    ctl.put(&subnet_key("10.244.9.0/24"), &peer_value(node_ip(9))).unwrap();

    let (plane, datapath) = start_plane_with(&options, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let own = plane.own().clone();
    assert_eq!(ctl.get(&own.key).unwrap().unwrap(), peer_value(node_ip(1)));
    assert!(ctl.key_lease(&own.key).unwrap().is_some(), "with an etcd lease");
    assert_eq!(datapath.subnets(), vec!["10.244.9.0/24".parse().unwrap()]);

    let running = Running::spawn(plane);
    ctl.put(&subnet_key("10.244.10.0/24"), &peer_value(node_ip(10))).unwrap();
    assert!(eventually(Duration::from_secs(5), || datapath.subnets().len() == 2).await, "{:?}", datapath.subnets());
    running.stop().await;

    // Without credentials the agent cannot read the config (etcd's status call needs none).
    let anonymous = EtcdOptions { username: None, password: None, ..options.clone() };
    let error =
        tokio::time::timeout(FAIL_WITHIN, start_plane_with(&anonymous, &NodeSpec::new(node_ip(2), &agent_config())))
            .await
            .expect("does not hang")
            .err()
            .expect("refused without credentials");
    assert!(format!("{error:#}").contains("user name is empty"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let (_etcd, _ctl, options) = auth_etcd();
    let error = connect_error(&EtcdOptions { password: Some("wrong".into()), ..options.clone() }).await;
    assert!(error.contains("authentication failed"), "{error}");
    let error = connect_error(&EtcdOptions { username: Some("nobody".into()), ..options.clone() }).await;
    assert!(error.contains("authentication failed"), "{error}");
}

/// A member with auth enabled whose auth tokens expire after 1 s unused (etcd's default is
/// 5 min), as [`auth_etcd`].
fn auth_etcd_short_tokens() -> (EtcdServer, Etcdctl, EtcdOptions) {
    auth_etcd_with(&MemberOptions { extra_args: vec!["--auth-token-ttl=1".into()], ..MemberOptions::default() })
}

/// etcd drops an auth token unused for `--auth-token-ttl`; the registry then authenticates
/// again, for unary calls (refused with Unauthenticated) and for a new watch (which etcd
/// refuses by canceling it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_authenticates_again_after_its_token_expired() {
    let (_etcd, ctl, options) = auth_etcd_short_tokens();
    let registry = Registry::connect(&options).await.unwrap();
    let key = subnet_key("10.244.9.0/24");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut watch = registry.watch_leases(1).await.expect("a watch after the token expired");
    ctl.put(&key, &peer_value(node_ip(9))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("an event").unwrap();
    let response = response.expect("stream open");
    assert!(!response.canceled(), "{response:?}");
    assert_eq!(response.events().len(), 1, "{response:?}");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let lease = registry.grant(60).await.expect("a grant after the token expired");
    assert!(registry.create(&subnet_key("10.244.10.0/24"), "{}", lease).await.unwrap());
    assert!(registry.get(&key).await.unwrap().is_some());
}

/// The agent keeps working once its token has expired: it repairs its deleted lease (reads and
/// transactions) and, after etcd restarts, re-creates its watch and sees new peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_working_after_its_auth_token_expired() {
    let (mut server, ctl, options) = auth_etcd_short_tokens();
    let (plane, datapath) = start_plane_with(&options, &NodeSpec::new(node_ip(1), &agent_config())).await.unwrap();
    let own = plane.own().clone();
    let running = Running::spawn(plane);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    ctl.delete(&own.key).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || ctl.get(&own.key).unwrap().is_some()).await,
        "the agent re-created its lease"
    );

    server.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.restart().unwrap();
    ctl.put(&subnet_key("10.244.21.0/24"), &peer_value(node_ip(21))).unwrap();
    let want = vec!["10.244.21.0/24".parse().unwrap()];
    assert!(eventually(Duration::from_secs(15), || datapath.subnets() == want).await, "{:?}", datapath.subnets());
    let plane = running.stop().await;
    assert_eq!(plane.own().subnet, own.subnet);
    assert_eq!(plane.stats().reacquired, 1);
}
