//! Finding and running the `flannel-agent` binary that cargo built next to the caller.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// `$FLANNEL_AGENT_BIN`, else `flannel-agent` in the caller's target directory (test
/// binaries live in `target/<profile>/deps`, xtask in `target/<profile>`).
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLANNEL_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("flannel-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "flannel-agent binary not found next to {}; build it first (`cargo build -p flannel-agent`) or set FLANNEL_AGENT_BIN",
        exe.display()
    )
}
