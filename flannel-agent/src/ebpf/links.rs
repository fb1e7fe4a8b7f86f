//! Attaching programs through pinned bpf_links, so they outlive the agent and a new agent
//! swaps its program into the running link atomically (never detach-then-attach, which
//! drops packets in between).
//!
//! A link is pinned as `<pin root>/links/<interface>/<program>`.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
}

/// `<pin root>/links/<interface>`. bpffs refuses names with a dot (`flannel.1`), and no
/// interface name contains a colon, so dots are pinned as colons.
pub fn links_dir(pin_root: &Path, interface: &str) -> PathBuf {
    pin_root.join("links").join(interface.replace('.', ":"))
}

/// The interface a directory under `<pin root>/links` stands for.
pub fn interface_of(dir_name: &str) -> String {
    dir_name.replace(':', ".")
}

/// The interfaces that have link pins under `pin_root`.
pub fn pinned_interfaces(pin_root: &Path) -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(pin_root.join("links")) else { return Vec::new() };
    dirs.flatten().map(|d| interface_of(&d.file_name().to_string_lossy())).collect()
}

pub fn link_pin(pin_root: &Path, interface: &str, program: &str) -> PathBuf {
    links_dir(pin_root, interface).join(program)
}

/// Loads `program` (once) and attaches it at `hook` of `interface` under its link pin: a
/// live pinned link gets the program replaced inside it; otherwise a new link is made and
/// pinned.
pub fn attach(ebpf: &mut Ebpf, program: &str, interface: &str, hook: Hook, pin_root: &Path) -> Result<()> {
    let dir = links_dir(pin_root, interface);
    super::bpffs::ensure_pin_dir(&dir)?;
    let pin = dir.join(program);
    attach_pinned(loaded::<SchedClassifier>(ebpf, program)?, interface, &pin, hook)
}

/// Removes the link pin of `program` on `interface` (which detaches it) and the interface's
/// pin directory once empty. Missing pins are fine.
pub fn detach(pin_root: &Path, interface: &str, program: &str) -> Result<bool> {
    let pin = link_pin(pin_root, interface, program);
    let removed = match std::fs::remove_file(&pin) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("removing link pin {}", pin.display())),
    };
    let _ = std::fs::remove_dir(links_dir(pin_root, interface));
    Ok(removed)
}

/// The program `name` of the object, loaded into the kernel (the verifier runs once).
pub fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    P: LinkAttach + 'a,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program =
        ebpf.program_mut(name).with_context(|| format!("program {name} is not in the embedded eBPF object"))?;
    let program: &mut P = program.try_into().with_context(|| format!("program {name} has an unexpected type"))?;
    if !program.is_loaded() {
        program.load_program().with_context(|| format!("loading {name} into the kernel (verifier)"))?;
    }
    Ok(program)
}

/// A program that can be attached to an interface through a bpf_link, and swapped inside an
/// existing link.
pub trait LinkAttach {
    type Link: TryFrom<FdLink, Error = LinkError>;
    fn is_loaded(&self) -> bool;
    fn load_program(&mut self) -> Result<()>;
    fn attach_new(&mut self, interface: &str, hook: Hook) -> Result<FdLink>;
    fn replace_in(&mut self, link: Self::Link) -> Result<()>;
}

impl LinkAttach for SchedClassifier {
    type Link = SchedClassifierLink;
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_program(&mut self) -> Result<()> {
        Ok(self.load()?)
    }
    fn attach_new(&mut self, interface: &str, hook: Hook) -> Result<FdLink> {
        let (attach_type, what) = match hook {
            Hook::TcIngress => (TcAttachType::Ingress, "ingress"),
            Hook::TcEgress => (TcAttachType::Egress, "egress"),
        };
        // On kernels >= 6.6 aya attaches through TCX, which gives a pinnable bpf_link.
        let id = self.attach(interface, attach_type).with_context(|| format!("attaching TC {what} to {interface}"))?;
        let link = self.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("TC on {interface} was attached without a TCX link (needs Linux >= 6.6)"))
    }
    fn replace_in(&mut self, link: SchedClassifierLink) -> Result<()> {
        let id = self.attach_to_link(link)?;
        drop(self.take_link(id)?);
        Ok(())
    }
}

fn attach_pinned<P: LinkAttach>(program: &mut P, interface: &str, pin: &Path, hook: Hook) -> Result<()> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            let replaced = P::Link::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|link| program.replace_in(link));
            match replaced {
                Ok(()) => {
                    tracing::info!(interface, pin = %pin.display(), "replaced the program in the existing link");
                    return Ok(());
                }
                Err(error) => {
                    // Typically ENOLINK: the interface was deleted (or recreated) since; or a
                    // link of another kind (an earlier version's XDP link) under this name.
                    tracing::warn!(interface, pin = %pin.display(), error = format!("{error:#}"), "pinned link is unusable; attaching anew");
                    std::fs::remove_file(pin).with_context(|| format!("removing stale link pin {}", pin.display()))?;
                }
            }
        }
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("opening link pin {}", pin.display())),
    }
    let link = program.attach_new(interface, hook)?;
    link.pin(pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    tracing::info!(interface, ?hook, pin = %pin.display(), "attached and pinned");
    Ok(())
}
