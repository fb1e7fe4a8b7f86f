//! The maps the forwarding programs share, all BTF-defined and pinned by the agent under
//! `--bpf-pin-path/maps` (their layouts live in `flannel-common`).

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use flannel_common::{
    endpoints::{EndpointEntry, ENDPOINTS_MAX_ENTRIES},
    flows::{FlowKey, STACK_FLOWS_MAX_ENTRIES},
    leases::{LeaseEntry, LEASES_MAX_ENTRIES},
    node::NodeConfig,
    peers::PEERS_MAX_ENTRIES,
    snat::{InboundBudget, SnatEntry, SnatKey, SNAT_INBOUND_MAX_ENTRIES, SNAT_MAX_ENTRIES},
    stats::{Stat, STAT_SLOTS},
};

/// Subnet → how to reach it; written by the agent from etcd.
#[btf_map(name = "fl_leases_v1")]
pub static LEASES: LpmTrie<[u8; 4], LeaseEntry, LEASES_MAX_ENTRIES> = LpmTrie::new();

/// This node's own settings (one entry).
#[btf_map(name = "fl_node_v3")]
pub static NODE: Array<NodeConfig, 1> = Array::new();

/// PublicIPs holding a vxlan lease: the only accepted VXLAN sources.
#[btf_map(name = "fl_peers_v1")]
pub static PEERS: HashMap<[u8; 4], u32, PEERS_MAX_ENTRIES> = HashMap::new();

/// Masquerade translations, both halves of each (see `flannel_common::snat`).
#[btf_map(name = "fl_snat_v1")]
pub static SNAT: LruHashMap<SnatKey, SnatEntry, { SNAT_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Identity entries of flows outside hosts open to local pods (see `flannel_common::snat`).
#[btf_map(name = "fl_snat_inbound_v1")]
pub static SNAT_INBOUND: LruHashMap<SnatKey, SnatEntry, { SNAT_INBOUND_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Per-CPU budget of new identity entries in `SNAT_INBOUND`.
#[btf_map(name = "fl_snat_budget_v1")]
pub static SNAT_BUDGET: PerCpuArray<InboundBudget, 1> = PerCpuArray::new();

/// Local pods: where `--netfilter-bypass` delivers their traffic (see `flannel_common::endpoints`).
#[btf_map(name = "fl_endpoints_v1")]
pub static ENDPOINTS: HashMap<[u8; 4], EndpointEntry, ENDPOINTS_MAX_ENTRIES> = HashMap::new();

/// Flows the stack carried, value: last seen (ns); see `flannel_common::flows`.
#[btf_map(name = "fl_stack_flows_v1")]
pub static STACK_FLOWS: LruHashMap<FlowKey, u64, { STACK_FLOWS_MAX_ENTRIES as usize }> = LruHashMap::new();

/// Per-CPU packet counters per path and drop reason.
#[btf_map(name = "fl_stats_v1")]
pub static STATS: PerCpuArray<u64, { STAT_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it, no preemption inside a program.
        unsafe { *slot += 1 };
    }
}
