//! Network namespaces and veth pairs the lab creates and removes.

use std::{
    ffi::OsStr,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

use crate::names::unique;

/// A named network namespace (`/run/netns/<name>`), deleted on drop with everything in it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Open handle on the namespace, so entering it after fork needs no allocation.
    handle: File,
}

impl NetNs {
    /// Creates `fl-<tag>-<unique>` with loopback up and IPv6 off (tests count exact packets,
    /// and IPv6 would add router/neighbour solicitations).
    pub fn create(tag: &str) -> Result<NetNs> {
        let name = format!("fl-{tag}-{}", unique(""));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let path = PathBuf::from("/run/netns").join(&name);
        let handle = match File::open(&path) {
            Ok(handle) => handle,
            Err(error) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                return Err(error).with_context(|| format!("opening {}", path.display()));
            }
        };
        let ns = NetNs { name, handle };
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside this namespace. Only the network namespace is
    /// entered (unlike `ip netns exec`, which remounts /sys and hides /sys/fs/bpf).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        let fd = self.handle.as_raw_fd();
        // SAFETY: between fork and exec the child only calls setns, which is async-signal-safe
        // and allocates nothing; `fd` stays open as long as this NetNs (the caller spawns the
        // command while holding it).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Runs `f` on a new thread that has entered this namespace (setns affects only the
    /// calling thread), for sockets opened from test code inside the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.handle.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: fd is an open netns handle owned by self, which outlives the scope.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("entering the namespace");
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread inside namespace panicked"))?
        })
    }

    /// Runs `ip <args>` in this namespace and fails with its stderr on error.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Sets a sysctl of this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]))?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Creates a veth pair `a_if` in `a` ↔ `b_if` in `b`, both up. It dies with the namespaces.
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Runs a command to completion; a non-zero exit is an error carrying the command and stderr.
pub fn run(command: &mut Command) -> Result<Output> {
    let output = command.output().with_context(|| format!("spawning {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}
