//! The lab: throwaway network namespaces, veth pairs and private BPF filesystems with
//! per-run unique names, each removed when its guard drops (also when a test panics), plus
//! helpers to run the agent binary inside a namespace. Used by the end-to-end tests and by
//! `cargo xtask demo`.

pub mod agent;
pub mod agent_node;
pub mod bench;
pub mod bpffs;
pub mod capture;
pub mod etcd;
pub mod kube_proxy;
pub mod lab;
pub mod names;
pub mod netns;
pub mod packet;
pub mod pki;
pub mod readiness;
pub mod traffic;
pub mod vxlan_probe;

pub use bpffs::PrivateBpffs;
pub use netns::{veth_pair, NetNs};

/// Fails with a clear message unless running as root: the lab needs namespaces and BPF.
/// Tests call this instead of skipping, so a non-root run fails loudly.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("this needs root (network namespaces, BPF); run it as root, e.g. via `cargo xtask test` in CI");
    }
    Ok(())
}
