//! Builds the `flannel-ebpf` object with kernel-valid BTF, following the measured recipe in
//! `shared/reference/ebpf-toolchain.md`:
//!
//! * Debian's `rustc-web` (`/usr/bin/rustc`, `/usr/bin/cargo`) and `libstd-rust-web-dev-bpf`,
//!   which ships a prebuilt `core` for `bpfel-unknown-none` — no rustup, no `-Z build-std`;
//! * `bpf-linker` 0.13.0 built against Debian's `llvm-22` (the rustc's own LLVM), installed
//!   by `cargo install` into a tool root this crate owns;
//! * `RUSTC_BOOTSTRAP=aya_ebpf` (aya-ebpf's one unstable feature, for that crate only) and
//!   `-C debuginfo=2 -C link-arg=--btf` so bpf-linker emits `.BTF`/`.BTF.ext`.
//!
//! `cargo xtask build-ebpf` calls [`build`] with [`Provision::Install`]; flannel-agent's
//! build.rs calls it with [`Provision::Report`], so a plain `cargo build` never runs apt.

pub mod prerequisites;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use object::{Object, ObjectSection};

pub use prerequisites::{Prerequisites, Provision};

/// The eBPF target; its `core` comes from Debian's `libstd-rust-web-dev-bpf`.
pub const TARGET: &str = "bpfel-unknown-none";

/// ELF sections the object must contain for the agent to work: the TC classifier programs
/// (the datapath has no XDP program), the BTF-defined maps, and the BTF the kernel and
/// `bpftool map dump` need for field names. bpf-linker drops `.BTF`/`.BTF.ext` silently when
/// `--btf` does not reach it, so their absence is the usual sign of a broken recipe.
pub const REQUIRED_SECTIONS: &[&str] = &[".BTF", ".BTF.ext", ".maps", "classifier"];

pub struct BuildOptions {
    /// Root of the flannel workspace (holds `flannel-ebpf/`).
    pub workspace_root: PathBuf,
    /// Cargo target directory for the eBPF build (kept apart from the host build's).
    pub target_dir: PathBuf,
    pub provision: Provision,
}

impl BuildOptions {
    /// Defaults for a workspace: target dir `<root>/target/ebpf`.
    pub fn for_workspace(workspace_root: &Path, provision: Provision) -> Self {
        BuildOptions {
            workspace_root: workspace_root.to_path_buf(),
            target_dir: workspace_root.join("target").join("ebpf"),
            provision,
        }
    }
}

/// Builds `flannel-ebpf` and returns the path of the object, after checking that it holds
/// BTF and the program sections.
pub fn build(options: &BuildOptions) -> Result<PathBuf> {
    let tools = Prerequisites::ensure(options.provision)?;
    let manifest = options.workspace_root.join("flannel-ebpf").join("Cargo.toml");
    ensure!(
        manifest.is_file(),
        "{} not found: is {} the flannel workspace?",
        manifest.display(),
        options.workspace_root.display()
    );

    let mut cargo = Command::new(&tools.cargo);
    // Start from an empty environment: inside a build script (or `cargo clippy`) the outer
    // cargo's RUSTFLAGS, RUSTC_WRAPPER, CARGO_* and target settings would leak into this
    // build and make it compile for the host or with clippy.
    cargo.env_clear();
    for keep in ["HOME", "CARGO_HOME", "TMPDIR", "CARGO_NET_OFFLINE", "http_proxy", "https_proxy", "HTTPS_PROXY"] {
        if let Some(value) = std::env::var_os(keep) {
            cargo.env(keep, value);
        }
    }
    cargo
        .env("PATH", tools.build_path())
        .env("RUSTC", &tools.rustc)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .arg("build")
        .arg("--locked")
        .arg("--release")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&options.target_dir);
    let status =
        cargo.status().with_context(|| format!("running {} for {}", tools.cargo.display(), manifest.display()))?;
    ensure!(status.success(), "building {} failed ({status}); see the compiler output above", manifest.display());

    let object = options.target_dir.join(TARGET).join("release").join("flannel-ebpf");
    check_object(&object)?;
    Ok(object)
}

/// Fails unless `path` is a BPF ELF object holding every section in [`REQUIRED_SECTIONS`].
pub fn check_object(path: &Path) -> Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading eBPF object {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing eBPF object {} as ELF", path.display()))?;
    let names: Vec<&str> = file.sections().filter_map(|s| s.name().ok()).collect();
    let missing: Vec<&str> = REQUIRED_SECTIONS.iter().copied().filter(|want| !names.contains(want)).collect();
    if !missing.is_empty() {
        bail!(
            "eBPF object {} lacks sections {missing:?} (has {names:?}); \
             was it linked by bpf-linker with --btf?",
            path.display()
        );
    }
    Ok(())
}
