//! The eBPF object configured as one node of a small cluster, with its programs loaded —
//! shared by the BPF_PROG_TEST_RUN tests and the datapath benchmark (included with `#[path]`).
//!
//! The cluster (see [`node_object_with`]): network 10.244.0.0/16, VNI 1; our subnet
//! 10.244.1.0/24 with two local pods ([`POD`], [`POD2`]) in the endpoint map; the vxlan peer's
//! 10.244.2.0/24; a host-gw peer ([`HOST_GW_PEER`]) holding 10.244.3.0/24. BPF_PROG_TEST_RUN
//! returns a redirect's verdict without performing it, but the bypass asks the target
//! device's MTU first (`bpf_check_mtu`), so the interface indexes must exist: run the
//! programs inside [`node_netns`], which has a device at each index with a known MTU.
// Included by several test and bench crates, each of which uses a part.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    programs::SchedClassifier,
    Ebpf,
};
use flannel_agent::ebpf::object;
use flannel_common::{
    EndpointEntry, LeaseEntry, LeaseKind, NodeConfig, ENDPOINTS_MAP, LEASES_MAP, NODE_MAP, PEERS_MAP,
};
use flannel_tests::NetNs;

/// VXLAN network identifier of the cluster.
pub const VNI: u32 = 1;
/// The tunnel device (`flannel.1`, collect-metadata vxlan) the bypass redirects into.
pub const TUNNEL_IFINDEX: u32 = 3;
/// The external (underlay) interface.
pub const EXT_IFINDEX: u32 = 2;
/// The pod bridge (cni0) and its MAC: the source MAC of frames delivered into pods.
pub const BRIDGE_IFINDEX: u32 = 4;
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x01];
/// A local pod in the endpoint map: its address, MAC (its eth0) and host-side veth. The veth
/// is the loopback device's index (1): BPF_PROG_TEST_RUN runs frames as received on the
/// loopback device, so this pod's frames come from its own veth as far as the programs see.
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x02];
pub const POD_IFINDEX: u32 = 1;
/// A second local pod in the endpoint map, on another veth: its frames in BPF_PROG_TEST_RUN
/// arrive on a device that is not its own.
pub const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const POD2_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x03];
pub const POD2_IFINDEX: u32 = 6;
/// The MTUs of the devices [`node_netns`] creates: the tunnel device (pod MTU, underlay − 50),
/// the external interface, and POD2's veth. POD's "veth" is the loopback device (65536).
pub const TUNNEL_MTU: u32 = 1450;
pub const EXT_MTU: u32 = 1500;
pub const POD2_MTU: u32 = 1450;
/// The host-gw peer's PublicIP (it holds 10.244.3.0/24).
pub const HOST_GW_PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 13);
/// The forwarding programs (TC classifiers), all loaded by [`node_object_with`].
pub const FORWARDING_PROGRAMS: [&str; 6] = [
    "fl_tunnel_egress",
    "fl_tunnel_ingress",
    "fl_pod_egress",
    "fl_underlay_ingress",
    "fl_underlay_egress",
    "fl_bridge_egress",
];
/// The masquerade programs (TC classifiers).
pub const SNAT_PROGRAMS: [&str; 2] = ["fl_snat_egress", "fl_snat_ingress"];

/// Node 192.0.2.10 of cluster network 10.244.0.0/16 masquerading to its address with source
/// ports `port_min..=port_max`; the masquerade programs loaded.
pub fn snat_object(port_min: u16, port_max: u16) -> anyhow::Result<Ebpf> {
    let mut ebpf = object::load_unpinned()?;
    let mut node: Array<_, NodeConfig> = Array::try_from(ebpf.map_mut(NODE_MAP).expect("map"))?;
    let config = NodeConfig {
        public_ip: [192, 0, 2, 10],
        ext_ifindex: 1,
        network: [10, 244, 0, 0],
        network_prefix: 16,
        snat: 1,
        snat_ip: [192, 0, 2, 10],
        snat_port_min: port_min,
        snat_port_max: port_max,
        ..Default::default()
    };
    node.set(0, config, 0)?;
    load_classifiers(&mut ebpf, &SNAT_PROGRAMS)?;
    Ok(ebpf)
}

pub fn lease(public_ip: Ipv4Addr, kind: LeaseKind, vtep_mac: [u8; 6]) -> LeaseEntry {
    let vni = if kind == LeaseKind::HostGw { 0 } else { VNI };
    LeaseEntry { public_ip: public_ip.octets(), vtep_mac, kind: kind as u8, _pad: 0, vni }
}

/// What [`node_object_with`] sets up.
#[derive(Clone, Copy, Debug)]
pub struct NodeSetup {
    /// Our PublicIP and VtepMAC (we hold 10.244.1.0/24).
    pub me: Ipv4Addr,
    pub my_vtep: [u8; 6],
    /// The vxlan peer's PublicIP and VtepMAC (it holds 10.244.2.0/24).
    pub peer: Ipv4Addr,
    pub peer_vtep: [u8; 6],
    /// `--netfilter-bypass`.
    pub bypass: bool,
    /// `--ip-masq` with this source port range (to our PublicIP); None: masquerade off.
    pub snat_ports: Option<(u16, u16)>,
}

impl NodeSetup {
    /// Bypass and masquerade off.
    pub fn new(me: Ipv4Addr, my_vtep: [u8; 6], peer: Ipv4Addr, peer_vtep: [u8; 6]) -> NodeSetup {
        NodeSetup { me, my_vtep, peer, peer_vtep, bypass: false, snat_ports: None }
    }

    /// The `fl_node_v3` entry for this setup.
    pub fn config(&self) -> NodeConfig {
        let (snat_port_min, snat_port_max) = self.snat_ports.unwrap_or((0, 0));
        NodeConfig {
            public_ip: self.me.octets(),
            vtep_mac: self.my_vtep,
            bypass: u8::from(self.bypass),
            _pad: 0,
            vni: VNI,
            tunnel_ifindex: TUNNEL_IFINDEX,
            ext_ifindex: EXT_IFINDEX,
            bridge_ifindex: BRIDGE_IFINDEX,
            bridge_mac: BRIDGE_MAC,
            network_prefix: 16,
            snat: u8::from(self.snat_ports.is_some()),
            network: [10, 244, 0, 0],
            snat_ip: self.me.octets(),
            snat_port_min,
            snat_port_max,
        }
    }
}

/// The object for `setup` (see the module documentation for the cluster): leases, peers,
/// endpoints and `fl_node_v3` written, every forwarding and masquerade program loaded.
pub fn node_object_with(setup: &NodeSetup) -> anyhow::Result<Ebpf> {
    let mut ebpf = object::load_unpinned()?;
    let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(ebpf.map_mut(LEASES_MAP).expect("map"))?;
    for (subnet, entry) in [
        ([10, 244, 1, 0], lease(setup.me, LeaseKind::Local, setup.my_vtep)),
        ([10, 244, 2, 0], lease(setup.peer, LeaseKind::Vxlan, setup.peer_vtep)),
        ([10, 244, 3, 0], lease(HOST_GW_PEER, LeaseKind::HostGw, [0; 6])),
    ] {
        leases.insert(&Key::new(24, subnet), entry, 0)?;
    }
    let mut peers: HashMap<_, [u8; 4], u32> = HashMap::try_from(ebpf.map_mut(PEERS_MAP).expect("map"))?;
    peers.insert(setup.peer.octets(), 1, 0)?;
    let mut endpoints: HashMap<_, [u8; 4], EndpointEntry> =
        HashMap::try_from(ebpf.map_mut(ENDPOINTS_MAP).expect("map"))?;
    for (ip, mac, ifindex) in [(POD, POD_MAC, POD_IFINDEX), (POD2, POD2_MAC, POD2_IFINDEX)] {
        endpoints.insert(ip.octets(), EndpointEntry { ifindex, mac, _pad: [0; 2] }, 0)?;
    }
    set_node(&mut ebpf, setup.config())?;
    load_classifiers(&mut ebpf, &FORWARDING_PROGRAMS)?;
    load_classifiers(&mut ebpf, &SNAT_PROGRAMS)?;
    Ok(ebpf)
}

/// Node `me` (VtepMAC `my_vtep`) with `peer` (`peer_vtep`) over vxlan and a host-gw peer, as
/// [`node_object_with`] describes, with the defaults: no `--netfilter-bypass`, no masquerade.
pub fn node_object(me: Ipv4Addr, my_vtep: [u8; 6], peer: Ipv4Addr, peer_vtep: [u8; 6]) -> anyhow::Result<Ebpf> {
    node_object_with(&NodeSetup::new(me, my_vtep, peer, peer_vtep))
}

/// As [`node_object`] with `--netfilter-bypass`: the bypass programs forward, and the stack's
/// exits record their flows.
pub fn bypass_node_object(me: Ipv4Addr, my_vtep: [u8; 6], peer: Ipv4Addr, peer_vtep: [u8; 6]) -> anyhow::Result<Ebpf> {
    node_object_with(&NodeSetup { bypass: true, ..NodeSetup::new(me, my_vtep, peer, peer_vtep) })
}

/// A network namespace with a device (ifb: always built, unlike dummy) at each of the fixture's interface indexes (the
/// external interface, the tunnel device, the bridge, POD2's veth) with the MTUs above; the
/// loopback (POD's veth) is index 1 in every namespace. `bpf_check_mtu` looks the index up in
/// the namespace of the packet's device, i.e. of the thread running BPF_PROG_TEST_RUN: run
/// the programs with [`NetNs::run_in`].
pub fn node_netns(tag: &str) -> anyhow::Result<NetNs> {
    let ns = NetNs::create(tag)?;
    for (name, index, mtu) in [
        ("eth-ext", EXT_IFINDEX, EXT_MTU),
        ("flannel.1", TUNNEL_IFINDEX, TUNNEL_MTU),
        ("cni0", BRIDGE_IFINDEX, TUNNEL_MTU),
        ("veth-pod2", POD2_IFINDEX, POD2_MTU),
    ] {
        let (index, mtu) = (index.to_string(), mtu.to_string());
        ns.ip(&["link", "add", name, "index", &index, "mtu", &mtu, "type", "ifb"])?;
    }
    Ok(ns)
}

/// Rewrites `fl_node_v3`.
pub fn set_node(ebpf: &mut Ebpf, config: NodeConfig) -> anyhow::Result<()> {
    let mut node: Array<_, NodeConfig> = Array::try_from(ebpf.map_mut(NODE_MAP).expect("map"))?;
    node.set(0, config, 0)?;
    Ok(())
}

fn load_classifiers(ebpf: &mut Ebpf, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let program: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into()?;
        program.load()?;
    }
    Ok(())
}
