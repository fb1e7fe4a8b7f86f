//! flannel-agent: a flannel-compatible node agent whose datapath runs in eBPF.
//!
//! See ARCHITECTURE.md at the repository root for which module owns what.

pub mod blocking;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod docker_opts;
pub mod ebpf;
pub mod etcd;
pub mod gojson;
pub mod health;
pub mod iface;
pub mod masq;
pub mod notify;
pub mod subnet;
pub mod subnet_env;
