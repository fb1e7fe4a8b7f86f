//! Embeds the eBPF object: builds `flannel-ebpf` through the same builder as
//! `cargo xtask build-ebpf` (one recipe) and copies the object into OUT_DIR, so a built
//! agent binary is self-contained. It never installs anything: when the toolchain is
//! missing it fails naming what to install (`cargo xtask build-ebpf` installs it).
use std::path::PathBuf;

use anyhow::{Context, Result};
use flannel_ebpf_builder::{build, BuildOptions, Provision};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?);
    let workspace = manifest_dir.parent().context("flannel-agent has no parent directory")?;
    for input in [
        "flannel-ebpf/src",
        "flannel-ebpf/Cargo.toml",
        "flannel-ebpf/Cargo.lock",
        "flannel-common/src",
        "flannel-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    for var in ["FLANNEL_TOOLS_DIR", "XDG_CACHE_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let object = build(&BuildOptions::for_workspace(workspace, Provision::Report))?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR unset")?).join("flannel-ebpf.o");
    std::fs::copy(&object, &out).with_context(|| format!("copying {} to {}", object.display(), out.display()))?;
    Ok(())
}
