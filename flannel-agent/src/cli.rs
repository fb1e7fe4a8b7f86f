//! The command line. Flag names, defaults and `FLANNELD_*` environment variables follow
//! flanneld; Go-style single-dash long flags (`-iface=eth0`) are accepted too (see
//! [`normalize_go_flags`]), so existing unit files and /etc/sysconfig/flanneld keep working.

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "flannel-agent",
    version,
    about = "flannel-compatible node agent with an eBPF datapath",
    long_about = "flannel-compatible node agent with an eBPF datapath.\n\n\
                  Without a subcommand it runs the daemon: acquires this node's subnet lease in etcd \
                  (flannel's v3 keys), renews it, watches every other node's lease, programs the \
                  datapath and writes subnet.env. Every flag can also be set through the FLANNELD_* \
                  environment variable named in its help."
)]
pub struct Cli {
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// Directory on a BPF filesystem under which maps and links are pinned.
    #[arg(long, global = true, env = "FLANNELD_BPF_PIN_PATH", default_value = "/sys/fs/bpf/flannel")]
    pub bpf_pin_path: PathBuf,

    /// Log verbosity, as flanneld's -v: 0 = info, 1 = debug, 2 or more = trace.
    #[arg(short = 'v', long = "v", global = true, env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// flanneld's bool flags take `--flag`, `--flag=true` or `--flag=false`.
macro_rules! bool_flag {
    () => {
        clap::ArgAction::Set
    };
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Comma-separated list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix of the network's keys (config and subnets).
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = "/coreos.com/network")]
    pub etcd_prefix: String,

    /// TLS key file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// TLS certificate file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// TLS CA file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// Username for etcd authentication.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password for etcd authentication.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Interface (name or IPv4 address) to use for inter-host traffic; repeat to give
    /// candidates in order of preference. Defaults to the default route's interface.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regular expression matched against interface names and addresses; repeatable. Used
    /// when --iface is not given.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// Use the interface through which this address is routed.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// IPv4 address other nodes use to reach this one (published as PublicIP); defaults to
    /// the external interface's address.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// File to write the subnet environment to.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,

    /// Minutes before the lease expires at which it is renewed (1 to 1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1439))]
    pub subnet_lease_renew_margin: u32,

    /// Lease TTL in seconds. flanneld uses 24 h (86400); lower it only for testing renewal.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value_t = 86400,
          value_parser = clap::value_parser!(i64).range(60..=86400))]
    pub subnet_lease_ttl: i64,

    /// Masquerade traffic from pods to destinations outside the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = bool_flag!(), num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub ip_masq: bool,

    /// Seconds between checks that the masquerade/forward rules are still in place (re-added
    /// when missing).
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,

    /// Add FLANNEL-FWD rules accepting forwarded traffic to and from the cluster network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = bool_flag!(), num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub iptables_forward_rules: bool,

    /// Address the health endpoints listen on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: std::net::IpAddr,

    /// Port of /healthz and /readyz; 0 disables them.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Datapath: ebpf (TC programs and BPF maps), netlink (flannel's classic kernel datapath), or
    /// auto (eBPF where it loads, netlink otherwise).
    #[arg(long, env = "FLANNELD_DATAPATH", value_enum, default_value_t = DatapathKind::Auto)]
    pub datapath: DatapathKind,

    /// eBPF datapath with --ip-masq: the source ports pod → outside connections are
    /// translated to, as MIN-MAX. The default stays below the kernel's ephemeral range
    /// (32768-60999), so translated connections never collide with the node's own.
    #[arg(long, env = "FLANNELD_SNAT_PORT_RANGE", default_value = "1024-32767", value_parser = parse_port_range)]
    pub snat_port_range: (u16, u16),

    /// eBPF datapath with --ip-masq: seconds a TCP translation may stay idle before the agent
    /// removes it.
    #[arg(long, env = "FLANNELD_SNAT_TCP_IDLE_TIMEOUT", default_value_t = 86400)]
    pub snat_tcp_idle_timeout: u64,

    /// eBPF datapath with --ip-masq: seconds a UDP or ICMP translation may stay idle before
    /// the agent removes it.
    #[arg(long, env = "FLANNELD_SNAT_IDLE_TIMEOUT", default_value_t = 180)]
    pub snat_idle_timeout: u64,

    /// eBPF datapath: pod ↔ remote pod traffic skips the node's routing, netfilter and
    /// conntrack in both directions (faster): what a known local pod sends to a remote pod
    /// goes from the pod bridge straight into the tunnel (vxlan) or out of the external
    /// interface (host-gw), and what arrives for a known local pod goes straight into it
    /// (bpf_redirect_peer). Both directions of a flow always take the same path: flows the
    /// stack carried one way (node traffic, ClusterIP/NodePort DNAT, masquerade, pods the
    /// agent has not learned yet) are recorded and their replies handed to the stack, so
    /// conntrack and kube-proxy keep working. Skipped for bypassed pod ↔ pod traffic:
    /// iptables/nftables rules on FORWARD (iptables-based NetworkPolicy, e.g. Canal) and
    /// conntrack accounting. Off by default.
    #[arg(long, env = "FLANNELD_NETFILTER_BYPASS", action = bool_flag!(), num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub netfilter_bypass: bool,

    /// eBPF datapath with --netfilter-bypass: the bridge the CNI plugin attaches pods to (the
    /// flannel CNI plugin's default is cni0); its programs are attached once it exists, and
    /// its pods are learned from its neighbours and forwarding database.
    #[arg(long, env = "FLANNELD_POD_BRIDGE", default_value = "cni0")]
    pub pod_bridge: String,
}

/// `MIN-MAX` with 1 ≤ MIN ≤ MAX ≤ 65535.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (min, max) = text.split_once('-').ok_or_else(|| format!("{text:?} is not MIN-MAX"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?} in {text:?}: {e}"));
    let (min, max) = (port(min)?, port(max)?);
    if min == 0 || min > max {
        return Err(format!("{text:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatapathKind {
    Auto,
    Ebpf,
    Netlink,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write Docker daemon options from subnet.env, like flannel's mk-docker-opts.sh.
    DockerOpts(DockerOptsArgs),
    /// Show the eBPF datapath's state from the pinned maps under --bpf-pin-path: this node's
    /// settings, the lease table, accepted VXLAN sources, per-path and drop counters, and the
    /// attached programs. Works whether or not the agent runs.
    Inspect {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct DockerOptsArgs {
    /// subnet.env to read.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// File to write the Docker options to.
    #[arg(short = 'd', default_value = "/run/flannel/docker")]
    pub docker_file: PathBuf,
    /// Write each option as its own DOCKER_OPT_* variable.
    #[arg(short = 'i')]
    pub individual: bool,
    /// Write the combined options variable (-k). With neither -i nor -c, both are written.
    #[arg(short = 'c')]
    pub combined: bool,
    /// Leave out --ip-masq (for old Docker versions).
    #[arg(short = 'm')]
    pub no_ipmasq: bool,
    /// Name of the combined options variable (the packaged flanneld unit uses this one;
    /// mk-docker-opts.sh's own default is DOCKER_OPTS).
    #[arg(short = 'k', default_value = "DOCKER_NETWORK_OPTIONS")]
    pub combined_key: String,
}

/// Long flag names that Go's flag package also accepts with one dash.
fn long_flag_names() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command().get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect()
}

/// Rewrites Go-style `-etcd-endpoints=…` / `-ip-masq` into `--…` for the daemon's flags.
pub fn normalize_go_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let longs = long_flag_names();
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            let is_single_dash_long = i > 0
                && arg.starts_with('-')
                && !arg.starts_with("--")
                && arg.len() > 2
                && longs.iter().any(|l| l.len() > 1 && arg[1..].split('=').next() == Some(l.as_str()));
            if is_single_dash_long {
                format!("-{arg}")
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_go_flags(args.iter().map(|s| s.to_string()))).unwrap()
    }

    #[test]
    fn flanneld_defaults() {
        let cli = parse(&["flannel-agent"]);
        let d = cli.daemon;
        assert_eq!(d.etcd_endpoints, vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]);
        assert_eq!(d.etcd_prefix, "/coreos.com/network");
        assert_eq!(d.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(d.subnet_lease_renew_margin, 60);
        assert!(!d.ip_masq);
        assert_eq!(d.healthz_port, 0);
        assert_eq!(d.datapath, DatapathKind::Auto);
        assert_eq!(cli.bpf_pin_path, PathBuf::from("/sys/fs/bpf/flannel"));
        assert!(cli.command.is_none());
    }

    #[test]
    fn go_style_and_repeated_flags() {
        let cli = parse(&[
            "flannel-agent",
            "-iface=eth2",
            "--iface",
            "192.0.2.7",
            "-etcd-endpoints=http://192.0.2.1:2379,http://192.0.2.2:2379",
            "-ip-masq",
            "-v=2",
            "--subnet-lease-renew-margin=30",
        ]);
        assert_eq!(cli.daemon.iface, vec!["eth2", "192.0.2.7"]);
        assert_eq!(cli.daemon.etcd_endpoints.len(), 2);
        assert!(cli.daemon.ip_masq);
        assert_eq!(cli.verbosity, 2);
        assert_eq!(cli.daemon.subnet_lease_renew_margin, 30);
        assert!(!parse(&["flannel-agent", "--ip-masq=false"]).daemon.ip_masq);
    }

    #[test]
    fn renew_margin_is_bounded() {
        assert!(Cli::try_parse_from(["flannel-agent", "--subnet-lease-renew-margin", "1440"]).is_err());
        assert!(Cli::try_parse_from(["flannel-agent", "--subnet-lease-renew-margin", "0"]).is_err());
    }
}
