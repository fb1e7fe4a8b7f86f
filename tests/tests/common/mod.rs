//! Shared by the control-plane tests: a datapath that records what it is told (the control
//! plane's consumer; the kernel datapaths have their own tests), and helpers to run control
//! planes against a real etcd.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use flannel_agent::{
    config,
    control::{ControlPlane, Settings},
    datapath::{Datapath, LeaseEvent, LocalNode},
    etcd::{EtcdOptions, Registry},
    iface::ExternalInterface,
    subnet::{BackendData, Lease, LeaseAttrs, VxlanBackendData},
};
use ipnet::Ipv4Net;
use tokio::{sync::oneshot, task::JoinHandle};

pub const PREFIX: &str = "/coreos.com/network";

#[derive(Debug, Default)]
pub struct Recorded {
    pub local: Option<LocalNode>,
    pub leases: BTreeMap<Ipv4Net, Lease>,
    pub events: Vec<LeaseEvent>,
    pub reconciles: usize,
}

#[derive(Clone, Default)]
pub struct RecordingDatapath(pub Arc<Mutex<Recorded>>);

impl RecordingDatapath {
    pub fn subnets(&self) -> Vec<Ipv4Net> {
        self.0.lock().unwrap().leases.keys().copied().collect()
    }
    pub fn lease(&self, subnet: &str) -> Option<Lease> {
        self.0.lock().unwrap().leases.get(&subnet.parse().unwrap()).cloned()
    }
}

impl Datapath for RecordingDatapath {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn pod_mtu(&self, local: &LocalNode) -> u32 {
        local.external.mtu - 50
    }
    async fn set_local(&mut self, local: &LocalNode) -> Result<()> {
        self.0.lock().unwrap().local = Some(local.clone());
        Ok(())
    }
    async fn reconcile(&mut self, leases: &[Lease]) -> Result<()> {
        let mut r = self.0.lock().unwrap();
        r.reconciles += 1;
        r.leases = leases.iter().map(|l| (l.subnet, l.clone())).collect();
        Ok(())
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<()> {
        let mut r = self.0.lock().unwrap();
        match event {
            LeaseEvent::Added(l) | LeaseEvent::Replaced { new: l, .. } => {
                r.leases.insert(l.subnet, l.clone());
            }
            LeaseEvent::Removed(l) => {
                r.leases.remove(&l.subnet);
            }
        }
        r.events.push(event.clone());
        Ok(())
    }
}

/// The network config for agents under test: they allocate from 10.244.100.0 up, so the peer
/// leases tests write by hand (below 10.244.100.0) can never be the subnet an agent picked
/// at random.
pub fn agent_config() -> String {
    config_json("10.244.0.0/16", r#","SubnetMin":"10.244.100.0""#)
}

pub fn config_json(network: &str, extra: &str) -> String {
    format!(r#"{{"Network":"{network}"{extra},"Backend":{{"Type":"vxlan","VNI":1}}}}"#)
}

pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

pub fn vxlan_attrs(public_ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs {
        public_ip,
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: BackendData::Vxlan(VxlanBackendData {
            vni: 1,
            vtep_mac: flannel_agent::daemon::derived_vtep_mac(public_ip, 1),
        }),
    }
}

/// A lease value as another flannel node would write it.
pub fn peer_value(public_ip: Ipv4Addr) -> String {
    vxlan_attrs(public_ip).to_json()
}

pub async fn registry(endpoints: &[String]) -> Registry {
    let options = EtcdOptions { endpoints: endpoints.to_vec(), prefix: PREFIX.into(), ..Default::default() };
    Registry::connect(&options).await.expect("connect to etcd")
}

pub struct NodeSpec {
    pub public_ip: Ipv4Addr,
    pub config: String,
    pub previous: Option<Ipv4Net>,
    pub ttl_secs: i64,
    pub renew_margin: Duration,
}

impl NodeSpec {
    pub fn new(public_ip: Ipv4Addr, config: &str) -> NodeSpec {
        NodeSpec {
            public_ip,
            config: config.into(),
            previous: None,
            ttl_secs: 86400,
            renew_margin: Duration::from_secs(3600),
        }
    }
}

pub async fn start_plane(
    endpoints: &[String],
    spec: &NodeSpec,
) -> Result<(ControlPlane<RecordingDatapath>, RecordingDatapath)> {
    start_plane_on(registry(endpoints).await, spec).await
}

/// [`start_plane`] with full etcd options (TLS, credentials; `prefix` should be [`PREFIX`]):
/// a failure to connect is returned, not a panic.
pub async fn start_plane_with(
    options: &EtcdOptions,
    spec: &NodeSpec,
) -> Result<(ControlPlane<RecordingDatapath>, RecordingDatapath)> {
    start_plane_on(Registry::connect(options).await?, spec).await
}

async fn start_plane_on(
    registry: Registry,
    spec: &NodeSpec,
) -> Result<(ControlPlane<RecordingDatapath>, RecordingDatapath)> {
    let config = config::parse(&spec.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let network = config.network.unwrap();
    let local = LocalNode {
        subnet: network,
        network,
        public_ip: spec.public_ip,
        external: ExternalInterface { name: "eth0".into(), index: 2, address: spec.public_ip, mtu: 1500 },
        backend: config.backend.clone(),
        vtep_mac: None,
    };
    let settings = Settings {
        config,
        attrs: vxlan_attrs(spec.public_ip),
        ttl_secs: spec.ttl_secs,
        renew_margin: spec.renew_margin,
    };
    let datapath = RecordingDatapath::default();
    let plane = ControlPlane::start(registry, settings, local, spec.previous, datapath.clone()).await?;
    Ok((plane, datapath))
}

/// A control plane running in the background until stopped.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<(ControlPlane<RecordingDatapath>, Result<()>)>,
}

impl Running {
    pub fn spawn(mut plane: ControlPlane<RecordingDatapath>) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = plane
                .run(async {
                    let _ = stopped.await;
                })
                .await;
            (plane, result)
        });
        Running { stop, task }
    }

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub async fn stop(self) -> ControlPlane<RecordingDatapath> {
        let _ = self.stop.send(());
        let (plane, result) = tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("stops").unwrap();
        result.expect("control plane ran without error");
        plane
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn subnet_key(subnet: &str) -> String {
    let net: Ipv4Net = subnet.parse().unwrap();
    format!("{PREFIX}/subnets/{}-{}", net.network(), net.prefix_len())
}
