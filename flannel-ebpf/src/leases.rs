//! The lease map: subnet → how to reach it. Written by the agent from etcd; read by the
//! forwarding programs.

use aya_ebpf::{btf_maps::LpmTrie, macros::btf_map};
use flannel_common::leases::{LeaseEntry, LEASES_MAX_ENTRIES};

#[btf_map(name = "fl_leases_v1")]
pub static LEASES: LpmTrie<[u8; 4], LeaseEntry, LEASES_MAX_ENTRIES> = LpmTrie::new();
