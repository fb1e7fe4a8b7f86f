//! Finding the binaries cargo built next to the caller: the `flannel-agent` daemon and the
//! `flannel` CNI plugin.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// `$FLANNEL_AGENT_BIN`, else `flannel-agent` in the caller's target directory (test
/// binaries live in `target/<profile>/deps`, xtask in `target/<profile>`).
pub fn binary() -> Result<PathBuf> {
    find("flannel-agent", "FLANNEL_AGENT_BIN")
}

/// The CNI plugin: `$FLANNEL_CNI_BIN`, else `flannel` in the caller's target directory.
pub fn cni_plugin_binary() -> Result<PathBuf> {
    find("flannel", "FLANNEL_CNI_BIN")
}

fn find(name: &str, override_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} binary not found next to {}; build it first (`cargo build -p flannel-agent --bins`) or set {override_var}",
        exe.display()
    )
}
