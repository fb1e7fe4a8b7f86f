//! The BPF filesystem under `--bpf-pin-path`: making sure it is there, and checking pinned
//! maps before a new program reuses them.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::maps::MapInfo;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Where systemd mounts bpffs; the only place we mount it ourselves.
pub const SYSTEM_BPFFS: &str = "/sys/fs/bpf";

/// True when `path` (which must exist) is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes `dir` an existing directory on bpffs. When it lies under `/sys/fs/bpf` and nothing
/// is mounted there (systemd normally does it), mounts bpffs there first, as Cilium and
/// Calico do; any other non-bpffs location is an error naming the mount to make.
pub fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let existing = nearest_existing_ancestor(dir)?;
    if !is_bpffs(&existing)? {
        let system = Path::new(SYSTEM_BPFFS);
        if dir.starts_with(system) && system.is_dir() && !is_bpffs(system)? {
            mount_bpffs(system)?;
            tracing::info!(path = SYSTEM_BPFFS, "mounted the BPF filesystem (it was not mounted)");
        } else {
            bail!(
                "BPF pin path {} is not on a BPF filesystem ({} is not bpffs); mount one with `mount -t bpf bpf <dir>` or choose a --bpf-pin-path under {SYSTEM_BPFFS}",
                dir.display(),
                existing.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating BPF pin directory {}", dir.display()))
}

fn nearest_existing_ancestor(dir: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    absolute
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .with_context(|| format!("no existing ancestor of {}", dir.display()))
}

/// Mounts a BPF filesystem on `target` (an existing directory).
pub fn mount_bpffs(target: &Path) -> Result<()> {
    let c_target = CString::new(target.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", target.display()))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), c_target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs on {} (needs root / CAP_SYS_ADMIN)", target.display()));
    }
    Ok(())
}

/// If a map is pinned at `pin`, fails unless its type, key size, value size and capacity
/// equal those of the map `name` in the embedded object. aya would otherwise reuse a pin of
/// another layout and the programs would read garbage.
pub fn check_pinned_map_matches_object(pin: &Path, name: &str) -> Result<()> {
    if !pin.exists() {
        return Ok(());
    }
    let object = aya_obj::Object::parse(super::object::EBPF_OBJECT).context("parsing the embedded eBPF object")?;
    let wanted = object.maps.get(name).with_context(|| format!("map {name} is not in the embedded eBPF object"))?;
    let pinned = MapInfo::from_pin(pin).with_context(|| format!("reading pinned map {}", pin.display()))?;
    let ours = (wanted.map_type(), wanted.key_size(), wanted.value_size(), wanted.max_entries());
    let pinned_type =
        pinned.map_type().with_context(|| format!("reading the type of pinned map {}", pin.display()))? as u32;
    let theirs = (pinned_type, pinned.key_size(), pinned.value_size(), pinned.max_entries());
    if ours != theirs {
        bail!(
            "pinned map {} has (type, key size, value size, max entries) = {theirs:?} but this agent's {name} needs {ours:?}; \
             it was left by an incompatible version: remove it (and the programs using it) to continue",
            pin.display()
        );
    }
    Ok(())
}
