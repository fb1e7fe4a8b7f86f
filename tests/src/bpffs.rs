//! A private BPF filesystem instance per test or demo run, so pins never collide with a real
//! agent's or another run's, and everything pinned disappears with the unmount.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::names::unique;

#[derive(Debug)]
pub struct PrivateBpffs {
    mountpoint: PathBuf,
}

impl PrivateBpffs {
    /// Mounts a fresh bpffs on a new directory under the temp dir.
    pub fn mount() -> Result<PrivateBpffs> {
        let mountpoint = std::env::temp_dir().join(format!("flannel-bpffs-{}", unique("")));
        std::fs::create_dir(&mountpoint).with_context(|| format!("creating {}", mountpoint.display()))?;
        let target = CString::new(mountpoint.as_os_str().as_bytes())?;
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&mountpoint);
            return Err(error).with_context(|| format!("mounting bpffs on {}", mountpoint.display()));
        }
        Ok(PrivateBpffs { mountpoint })
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: valid NUL-terminated path. MNT_DETACH so a lingering fd cannot block it.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}
