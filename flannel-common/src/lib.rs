//! Types shared by the eBPF programs (`flannel-ebpf`) and the agent (`flannel-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so that its layout is identical on
//! both sides and in the BTF that `bpftool map dump` uses to print field names. Map names
//! carry a version suffix: when a layout changes the name changes, so a new agent never
//! reuses a pinned map of the old layout (aya reuses pins without checking them).
#![no_std]

pub mod endpoints;
pub mod flows;
pub mod leases;
pub mod node;
pub mod peers;
pub mod snat;
pub mod stats;

pub use endpoints::{EndpointEntry, ENDPOINTS_MAP};
pub use flows::{FlowKey, STACK_FLOWS_MAP};
pub use leases::{LeaseEntry, LeaseKind, LEASES_MAP};
pub use node::{NodeConfig, NODE_MAP};
pub use peers::PEERS_MAP;
pub use snat::{SnatEntry, SnatKey, SNAT_MAP};
pub use stats::{Stat, STATS_MAP};
