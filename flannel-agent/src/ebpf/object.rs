//! The eBPF object built by `xtask/ebpf-builder` and embedded at compile time.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};

/// The `flannel-ebpf` ELF object (8-byte aligned, as the ELF parser requires).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel-ebpf.o"));

/// Every map of the object, by its (versioned) name.
pub const MAP_NAMES: &[&str] = &[
    flannel_common::ENDPOINTS_MAP,
    flannel_common::LEASES_MAP,
    flannel_common::NODE_MAP,
    flannel_common::PEERS_MAP,
    flannel_common::SNAT_MAP,
    flannel_common::snat::SNAT_INBOUND_MAP,
    flannel_common::snat::SNAT_BUDGET_MAP,
    flannel_common::STACK_FLOWS_MAP,
    flannel_common::STATS_MAP,
];

/// Loads the object with every map pinned as `<maps_dir>/<map name>`; existing pins are
/// reused (so counters and tables survive an agent restart) after their layout is checked
/// against the object, which is parsed once for all of them.
pub fn load_pinned(maps_dir: &Path) -> Result<Ebpf> {
    let object = super::bpffs::ObjectMaps::parse(EBPF_OBJECT)?;
    let mut loader = EbpfLoader::new();
    for name in MAP_NAMES {
        let pin = maps_dir.join(name);
        super::bpffs::check_pinned_map(&object, &pin, name)?;
        loader.map_pin_path(name, pin);
    }
    loader
        .load(EBPF_OBJECT)
        .with_context(|| format!("loading the embedded eBPF object with maps pinned under {}", maps_dir.display()))
}

/// Loads the object with private, unpinned maps (BPF_PROG_TEST_RUN tests, benchmarks).
pub fn load_unpinned() -> Result<Ebpf> {
    EbpfLoader::new().load(EBPF_OBJECT).context("loading the embedded eBPF object")
}
