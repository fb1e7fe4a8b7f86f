//! The eBPF object configured as one node of a two-node vxlan cluster, with the forwarding
//! programs loaded — shared by the BPF_PROG_TEST_RUN tests and the datapath benchmark
//! (included with `#[path]`).
// Included by several test and bench crates, each of which uses a part.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use flannel_agent::ebpf::object;
use flannel_common::{LeaseEntry, LeaseKind, NodeConfig, LEASES_MAP, NODE_MAP, PEERS_MAP};

pub const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x11];

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
    for name in ["fl_snat_egress", "fl_snat_ingress"] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into()?;
        program.load()?;
    }
    Ok(ebpf)
}

pub fn lease(public_ip: Ipv4Addr, kind: LeaseKind, vtep_mac: [u8; 6]) -> LeaseEntry {
    LeaseEntry { public_ip: public_ip.octets(), vtep_mac, kind: kind as u8, _pad: 0, vni: 1 }
}

/// Node `me` (VtepMAC `my_vtep`, subnet 10.244.1.0/24) with `peer` (`peer_vtep`) holding
/// 10.244.2.0/24 over vxlan and a host-gw peer holding 10.244.3.0/24; VNI 1, port 8472,
/// external interface index 1 with MAC [`EXT_MAC`]; the forwarding programs loaded.
pub fn node_object(me: Ipv4Addr, my_vtep: [u8; 6], peer: Ipv4Addr, peer_vtep: [u8; 6]) -> anyhow::Result<Ebpf> {
    let mut ebpf = object::load_unpinned()?;
    let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(ebpf.map_mut(LEASES_MAP).expect("map"))?;
    for (subnet, entry) in [
        ([10, 244, 1, 0], lease(me, LeaseKind::Local, my_vtep)),
        ([10, 244, 2, 0], lease(peer, LeaseKind::Vxlan, peer_vtep)),
        ([10, 244, 3, 0], lease(Ipv4Addr::new(192, 0, 2, 13), LeaseKind::HostGw, [0; 6])),
    ] {
        leases.insert(&Key::new(24, subnet), entry, 0)?;
    }
    let mut node: Array<_, NodeConfig> = Array::try_from(ebpf.map_mut(NODE_MAP).expect("map"))?;
    let config = NodeConfig {
        public_ip: me.octets(),
        vtep_mac: my_vtep,
        vni: 1,
        vxlan_port: 8472,
        ext_ifindex: 1,
        ext_mac: EXT_MAC,
        ..Default::default()
    };
    node.set(0, config, 0)?;
    let mut peers: HashMap<_, [u8; 4], u32> = HashMap::try_from(ebpf.map_mut(PEERS_MAP).expect("map"))?;
    peers.insert(peer.octets(), 1, 0)?;
    for name in ["fl_pod_egress", "fl_host_egress"] {
        let egress: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into()?;
        egress.load()?;
    }
    let ingress: &mut Xdp = ebpf.program_mut("fl_underlay_ingress").expect("program").try_into()?;
    ingress.load()?;
    Ok(ebpf)
}
