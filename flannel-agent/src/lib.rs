//! flannel-agent: a flannel-compatible node agent whose datapath runs in eBPF.
//!
//! See ARCHITECTURE.md at the repository root for which module owns what.

pub mod cli;
pub mod ebpf;
