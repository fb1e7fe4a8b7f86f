//! Finding, and where allowed installing, what the eBPF build and the tests need: Debian
//! packages through apt-get and bpf-linker through `cargo install` into a tool root we own.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

/// Whether missing prerequisites may be installed or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provision {
    /// Install what is missing (apt-get needs root on Debian; bpf-linker needs neither).
    Install,
    /// Stop with an error that names exactly what to install.
    Report,
}

/// Debian packages of the eBPF toolchain (rustc 1.96 linked to LLVM 22, the BPF `core`,
/// and what bpf-linker links against).
pub const TOOLCHAIN_PACKAGES: &[&str] =
    &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf", "llvm-22", "llvm-22-dev", "libzstd-dev", "zlib1g-dev"];

/// Debian packages the host crates need to build: `protoc` and the protobuf well-known types
/// for etcd-client's generated gRPC code.
pub const HOST_BUILD_PACKAGES: &[&str] = &["protobuf-compiler", "libprotobuf-dev"];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The resolved toolchain.
pub struct Prerequisites {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
    pub bpf_linker: PathBuf,
}

impl Prerequisites {
    /// Makes sure the toolchain is present (installing it under [`Provision::Install`]).
    pub fn ensure(provision: Provision) -> Result<Prerequisites> {
        ensure_debian_packages(TOOLCHAIN_PACKAGES, provision)?;
        let bpf_linker = ensure_bpf_linker(provision)?;
        Ok(Prerequisites { rustc: PathBuf::from("/usr/bin/rustc"), cargo: PathBuf::from("/usr/bin/cargo"), bpf_linker })
    }

    /// PATH for the eBPF build: bpf-linker's directory first, then the system's — never
    /// rustup's `~/.cargo/bin`, whose `cargo` would silently run a different rustc.
    pub fn build_path(&self) -> OsString {
        let linker_dir = self.bpf_linker.parent().unwrap_or(Path::new("/"));
        let mut path = OsString::from(linker_dir);
        path.push(":/usr/bin:/bin:/usr/sbin:/sbin");
        path
    }
}

/// Where bpf-linker is installed: `$FLANNEL_TOOLS_DIR`, else `$XDG_CACHE_HOME/flannel-rs`,
/// else `$HOME/.cache/flannel-rs`; one root per version so an upgrade never mixes builds.
pub fn tool_root() -> Result<PathBuf> {
    let base = if let Some(dir) = std::env::var_os("FLANNEL_TOOLS_DIR") {
        PathBuf::from(dir)
    } else if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(cache).join("flannel-rs")
    } else {
        let home = std::env::var_os("HOME")
            .context("neither FLANNEL_TOOLS_DIR, XDG_CACHE_HOME nor HOME is set: cannot place bpf-linker")?;
        PathBuf::from(home).join(".cache").join("flannel-rs")
    };
    Ok(base.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm22")))
}

fn bpf_linker_install_command(root: &Path) -> String {
    format!(
        "LLVM_PREFIX={LLVM_PREFIX} /usr/bin/cargo install --locked --root {} bpf-linker@{BPF_LINKER_VERSION} --no-default-features --features llvm-22",
        root.display()
    )
}

fn ensure_bpf_linker(provision: Provision) -> Result<PathBuf> {
    let root = tool_root()?;
    let binary = root.join("bin").join("bpf-linker");
    if binary.is_file() {
        return Ok(binary);
    }
    let command = bpf_linker_install_command(&root);
    if provision == Provision::Report {
        bail!("bpf-linker {BPF_LINKER_VERSION} (built with LLVM 22) is missing at {}. Install it with:\n  {command}\nor run `cargo xtask build-ebpf`, which installs it.", binary.display());
    }
    eprintln!("[ebpf-builder] installing bpf-linker {BPF_LINKER_VERSION} into {} (about a minute)", root.display());
    let status = Command::new("/usr/bin/cargo")
        .env("LLVM_PREFIX", LLVM_PREFIX)
        // An outer build's compiler settings must not reach bpf-linker's own build.
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .args(["install", "--locked", "--root"])
        .arg(&root)
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features", "llvm-22"])
        .status()
        .with_context(|| format!("running: {command}"))?;
    ensure!(status.success(), "installing bpf-linker failed ({status}); the command was:\n  {command}");
    ensure!(binary.is_file(), "`cargo install` succeeded but {} does not exist", binary.display());
    Ok(binary)
}

/// Returns the packages of `packages` that dpkg does not report as installed.
pub fn missing_debian_packages(packages: &[&str]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for package in packages {
        let output = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", package])
            .output()
            .context("running dpkg-query: this build needs a Debian or Ubuntu system (apt/dpkg)")?;
        if !output.status.success() || output.stdout != b"installed" {
            missing.push(package.to_string());
        }
    }
    Ok(missing)
}

/// Installs the missing ones of `packages` with apt-get when allowed and running as root;
/// otherwise fails naming the exact command.
pub fn ensure_debian_packages(packages: &[&str], provision: Provision) -> Result<()> {
    let missing = missing_debian_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get update && apt-get install -y --no-install-recommends {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if provision == Provision::Report || !root {
        let why = if root { "" } else { " (installing them needs root)" };
        bail!("missing Debian packages{why}: {}. Install them with:\n  {command}", missing.join(", "));
    }
    eprintln!("[prerequisites] installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        ensure!(status.success(), "apt-get {} failed ({status})", args.join(" "));
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(missing.iter().map(String::as_str));
    apt(&install)?;
    let still = missing_debian_packages(packages)?;
    ensure!(still.is_empty(), "apt-get reported success but these are still not installed: {}", still.join(", "));
    Ok(())
}
