//! The daemon: wires the command line, etcd, interface selection, the datapath and the
//! control plane together, writes subnet.env once the datapath is programmed, reports
//! readiness, and on SIGTERM/SIGINT exits leaving the lease and the datapath in place.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::{
    cli::{DaemonArgs, DatapathKind},
    config::{Backend, NetworkConfig},
    control::{self, ControlPlane, Settings},
    datapath::{
        ebpf::{self as ebpf_datapath, snat::SnatOptions, EbpfDatapath, EbpfOptions},
        netlink::NetlinkDatapath,
        Datapath, LocalNode,
    },
    etcd::{EtcdOptions, Registry},
    health::{self, Readiness},
    iface::{self, IfaceSelection},
    masq::{Backend as MasqBackend, MasqConfig, TrafficRules},
    notify,
    subnet::{lease::Mac, BackendData, LeaseAttrs, VxlanBackendData},
    subnet_env::{self, SubnetEnv},
};

pub struct DaemonOptions {
    pub args: DaemonArgs,
    pub bpf_pin_path: PathBuf,
}

pub async fn run(options: DaemonOptions) -> Result<()> {
    let shutdown = Shutdown::install()?;
    let args = &options.args;
    let readiness = Readiness::default();
    if args.healthz_port != 0 {
        health::serve(SocketAddr::new(args.healthz_ip, args.healthz_port), readiness.clone()).await?;
    }

    let registry = tokio::select! {
        registry = connect(args) => registry?,
        _ = shutdown.signalled() => return Ok(()),
    };
    let config = tokio::select! {
        config = control::wait_for_config(&registry) => config?,
        _ = shutdown.signalled() => return Ok(()),
    };
    check_supported(&config)?;
    tracing::info!(network = ?config.network, backend = config.backend.type_name(), "network config loaded");

    let external = iface::select(&IfaceSelection {
        iface: args.iface.clone(),
        iface_regex: args.iface_regex.clone(),
        iface_can_reach: args.iface_can_reach,
    })?;
    let public_ip = args.public_ip.unwrap_or(external.address);
    tracing::info!(interface = external.name, address = %external.address, %public_ip, mtu = external.mtu, "external interface selected");

    let vtep_mac = match &config.backend {
        Backend::Vxlan(v) => Some(derived_vtep_mac(public_ip, v.vni)),
        _ => None,
    };
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6: None,
        backend_type: config.backend.type_name().to_string(),
        backend_data: match (&config.backend, vtep_mac) {
            (Backend::Vxlan(v), Some(mac)) => BackendData::Vxlan(VxlanBackendData { vni: v.vni, vtep_mac: mac }),
            _ => BackendData::None,
        },
    };
    let network = config.network.context("the network config has no IPv4 Network")?;
    let local = LocalNode {
        subnet: network, // replaced by our lease's subnet once acquired
        network,
        public_ip,
        external,
        backend: config.backend.clone(),
        vtep_mac,
    };
    let masq = MasqConfig {
        network,
        subnet: network, // replaced by our lease's subnet
        ip_masq: args.ip_masq,
        forward_rules: args.iptables_forward_rules,
        ebpf_snat: false, // decided once the datapath is chosen
        backend: if config.enable_nftables { MasqBackend::Nftables } else { MasqBackend::Iptables },
    };
    let settings = Settings {
        config,
        attrs,
        ttl_secs: args.subnet_lease_ttl,
        renew_margin: Duration::from_secs(u64::from(args.subnet_lease_renew_margin) * 60),
    };
    let node = Node { registry, settings, local, masq, readiness };
    let ebpf_options = EbpfOptions {
        pin_root: options.bpf_pin_path.clone(),
        pod_bridge: args.pod_bridge.clone(),
        netfilter_bypass: args.netfilter_bypass,
        masquerade: args.ip_masq.then_some(SnatOptions {
            port_min: args.snat_port_range.0,
            port_max: args.snat_port_range.1,
            tcp_idle: Duration::from_secs(args.snat_tcp_idle_timeout),
            other_idle: Duration::from_secs(args.snat_idle_timeout),
        }),
    };
    if let (Some(masquerade), false) = (&ebpf_options.masquerade, args.datapath == DatapathKind::Netlink) {
        // The eBPF masquerade shares the node's port space without conntrack's view of it.
        ebpf_datapath::snat::warn_if_local_ports_overlap(masquerade);
    }
    match args.datapath {
        DatapathKind::Ebpf => {
            let datapath =
                EbpfDatapath::open(ebpf_options).context("--datapath ebpf: the eBPF datapath cannot be loaded")?;
            tracing::info!("--datapath ebpf: forwarding with TC programs on the tunnel device, the pod bridge and the external interface");
            run_with(node, datapath, args, &shutdown).await
        }
        DatapathKind::Auto => match EbpfDatapath::open(ebpf_options.clone()) {
            Ok(datapath) => {
                tracing::info!("--datapath auto: the eBPF programs loaded; forwarding with TC programs on the tunnel device, the pod bridge and the external interface");
                run_with(node, datapath, args, &shutdown).await
            }
            Err(error) => {
                tracing::warn!(
                    "--datapath auto: the eBPF datapath cannot be used here ({error:#}); falling back to the netlink \
                     (flannel-classic) datapath"
                );
                run_netlink(node, args, &ebpf_options, &shutdown).await
            }
        },
        DatapathKind::Netlink => {
            tracing::info!("--datapath netlink: programming the classic flannel datapath (vxlan device, routes, FDB)");
            run_netlink(node, args, &ebpf_options, &shutdown).await
        }
    }
}

/// The classic datapath, after removing what an earlier eBPF run left attached (its programs
/// would otherwise keep forwarding around the vxlan device).
async fn run_netlink(node: Node, args: &DaemonArgs, ebpf: &EbpfOptions, shutdown: &Shutdown) -> Result<()> {
    ebpf_datapath::remove(&ebpf.pin_root, &node.local.external.name, &ebpf.pod_bridge).await?;
    let datapath = NetlinkDatapath::new()?;
    run_with(node, datapath, args, shutdown).await
}

/// Everything known about this node before its lease is acquired.
struct Node {
    registry: Registry,
    settings: Settings,
    local: LocalNode,
    masq: MasqConfig,
    readiness: Readiness,
}

async fn run_with<D: Datapath>(node: Node, datapath: D, args: &DaemonArgs, shutdown: &Shutdown) -> Result<()> {
    let Node { registry, settings, local, masq, readiness } = node;
    let previous = subnet_env::read_previous_subnet(&args.subnet_file);
    let ip_masq = args.ip_masq;
    let subnet_file = args.subnet_file.clone();
    let name = datapath.name();
    let mut plane = tokio::select! {
        plane = ControlPlane::start(registry, settings, local, previous, datapath) => plane?,
        _ = shutdown.signalled() => return Ok(()),
    };
    let env_for = move |plane_local: &LocalNode, mtu: u32| SubnetEnv {
        network: plane_local.network,
        subnet: plane_local.subnet,
        mtu,
        ipmasq: ip_masq,
    };
    // Masquerade and forward rules for our subnet, in place before we report ready, then
    // re-checked every --iptables-resync seconds.
    let ebpf_snat = plane.datapath().masquerades();
    let mut rules = TrafficRules::new(MasqConfig { subnet: plane.local().subnet, ebpf_snat, ..masq });
    {
        let mut rules = rules.clone();
        tokio::task::spawn_blocking(move || rules.ensure()).await?.context("installing masquerade/forward rules")?;
    }
    tokio::spawn(rules.clone().resync_loop(Duration::from_secs(args.iptables_resync.max(1))));

    let mtu = plane.datapath().pod_mtu(plane.local());
    let env = env_for(plane.local(), mtu);
    env.write(&subnet_file).with_context(|| format!("writing subnet file {}", subnet_file.display()))?;
    tracing::info!(path = %subnet_file.display(), subnet = %env.subnet, mtu, datapath = name, "subnet file written; ready");
    let file = subnet_file.clone();
    plane.on_local_changed(Box::new(move |local| {
        rules.set_subnet(local.subnet)?;
        env_for(local, mtu).write(&file)
    }));
    readiness.set_ready();
    notify::notify_ready()?;

    plane.run(shutdown.signalled()).await?;
    tracing::info!(key = plane.own().key, "shutting down; the lease and the datapath stay in place");
    Ok(())
}

async fn connect(args: &DaemonArgs) -> Result<Registry> {
    let options = EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        keyfile: args.etcd_keyfile.clone(),
        certfile: args.etcd_certfile.clone(),
        cafile: args.etcd_cafile.clone(),
        username: args.etcd_username.clone(),
        password: args.etcd_password.clone(),
    };
    // Configuration mistakes (unreadable TLS files) fail now; unreachable etcd is retried.
    let mut delay = Duration::from_millis(200);
    loop {
        match Registry::connect(&options).await {
            Ok(registry) => return Ok(registry),
            Err(error) if format!("{error:#}").contains("reading etcd") => return Err(error),
            Err(error) => {
                tracing::warn!("etcd not reachable yet, retrying in {delay:?}: {error:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Refuses configurations this agent cannot serve, with the reason.
fn check_supported(config: &NetworkConfig) -> Result<()> {
    if config.enable_ipv6 {
        bail!("the network config sets EnableIPv6: this agent supports IPv4 networks only");
    }
    if !config.enable_ipv4 {
        bail!("the network config disables IPv4 (EnableIPv4 false): this agent supports IPv4 networks only");
    }
    match &config.backend {
        Backend::Vxlan(_) | Backend::HostGw => Ok(()),
        other => bail!("backend type {:?} is not supported: use vxlan or host-gw", other.type_name()),
    }
}

/// A VTEP MAC that is the same every time this node starts (derived from its public IP and
/// the VNI), so peers' FDB and neighbour entries stay valid across restarts and reboots —
/// flanneld picks a random one per device and strands peers until they catch up.
pub fn derived_vtep_mac(public_ip: std::net::Ipv4Addr, vni: u32) -> Mac {
    // FNV-1a 64 over the inputs: stable across releases, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in public_ip.octets().into_iter().chain(vni.to_be_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    // Locally administered, unicast.
    Mac([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

/// SIGTERM/SIGINT, registered once when the daemon starts: a signal that arrives between
/// two phases (say, right after READY=1 and before the watch loop starts) is not lost, as it
/// would be with a listener created per phase.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn install() -> Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            let _ = tx.send(true);
        });
        Ok(Shutdown(rx))
    }

    /// Resolves once a signal has arrived (immediately if one already has).
    pub async fn signalled(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|signalled| *signalled).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_local_unicast_and_distinct() {
        let a = derived_vtep_mac("192.0.2.1".parse().unwrap(), 1);
        assert_eq!(a, derived_vtep_mac("192.0.2.1".parse().unwrap(), 1));
        assert_ne!(a, derived_vtep_mac("192.0.2.2".parse().unwrap(), 1));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast");
    }
}
