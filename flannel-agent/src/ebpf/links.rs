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
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf,
};

use super::bpffs::sys;

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
}

impl Hook {
    fn tc(self) -> TcAttachType {
        match self {
            Hook::TcIngress => TcAttachType::Ingress,
            Hook::TcEgress => TcAttachType::Egress,
        }
    }

    /// The kernel's attach type of a TCX link at this hook (BPF_TCX_INGRESS / _EGRESS).
    fn tcx_attach_type(self) -> u32 {
        match self {
            Hook::TcIngress => aya_obj::generated::bpf_attach_type::BPF_TCX_INGRESS as u32,
            Hook::TcEgress => aya_obj::generated::bpf_attach_type::BPF_TCX_EGRESS as u32,
        }
    }
}

/// Where a new link goes among the programs already at its hook. TCX runs them in order,
/// each passing the packet on (TC_ACT_UNSPEC, TCX_NEXT) or deciding; ours always pass on
/// unless they act on the packet, so programs of others after ours still see what ours leave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order<'a> {
    /// After everything attached (the kernel's default).
    #[default]
    Last,
    /// Right before the link of our program `.0` at the same hook, if that one is attached
    /// here; else last.
    Before(&'a str),
    /// Right after the link of our program `.0` at the same hook, if attached; else last.
    After(&'a str),
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

/// Loads `program` (once) and makes it the program at `hook` of `interface`, through its link
/// pin: a live pinned link gets the program swapped in atomically; a missing, dead or foreign
/// one gets a new link at `order`. What was done is returned.
pub fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    interface: &str,
    hook: Hook,
    pin_root: &Path,
    order: Order<'_>,
) -> Result<Attached> {
    let dir = links_dir(pin_root, interface);
    super::bpffs::ensure_pin_dir(&dir)?;
    let pin = dir.join(program);
    let classifier = loaded(ebpf, program)?;
    let ours = classifier.info().with_context(|| format!("reading the id of program {program}"))?.id();
    let index = ifindex(interface)?;
    let replaced = match pin_state(&pin, index, hook)? {
        PinState::Live { program_id } if program_id == ours => return Ok(Attached::Unchanged),
        PinState::Live { .. } => match replace_in(classifier, &pin) {
            Ok(()) => {
                tracing::info!(interface, program, pin = %pin.display(), "replaced the program in the existing link");
                return Ok(Attached::Replaced);
            }
            // The interface went between the check and the update: dead after all.
            Err(error) if is_defunct(&error) => Some("the link became defunct (ENOLINK)".to_string()),
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "replacing the program in link pin {} with {program} at {hook:?} of {interface} failed; \
                         the program already in the link stays attached",
                        pin.display()
                    )
                })
            }
        },
        PinState::Missing => None,
        PinState::Replaceable(why) => Some(why),
    };
    // The new link is made before the old pin goes: for a link of another type (still running
    // an earlier version's program) there is no moment with neither; a dead one ran nothing.
    let sibling_pin = |sibling: &str| link_pin(pin_root, interface, sibling);
    let order = match order {
        Order::Last => None,
        Order::Before(sibling) => live_sibling(&sibling_pin(sibling), index, hook)?.map(|l| (true, l)),
        Order::After(sibling) => live_sibling(&sibling_pin(sibling), index, hook)?.map(|l| (false, l)),
    };
    let link = attach_new(classifier, interface, hook, order.as_ref().map(|(before, l)| (*before, l)))
        .with_context(|| format!("attaching {program} at {hook:?} of {interface}"))?;
    if let Some(why) = &replaced {
        std::fs::remove_file(&pin).with_context(|| format!("removing unusable link pin {}", pin.display()))?;
        tracing::warn!(interface, program, pin = %pin.display(), why, "pinned link was unusable: replaced by a new one");
    }
    link.pin(&pin).with_context(|| format!("pinning the link of {program} on {interface} at {}", pin.display()))?;
    tracing::info!(interface, program, ?hook, pin = %pin.display(), "attached and pinned");
    Ok(Attached::Created { replaced })
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

/// What [`attach`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The pinned link was live and already ran this program.
    Unchanged,
    /// The program was swapped into the live pinned link.
    Replaced,
    /// A new link was made and pinned; `replaced` says why the pin there before (if any) could
    /// not be updated in place.
    Created { replaced: Option<String> },
}

/// What a link pin holds, for a program meant to run at `hook` of the interface `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinState {
    Missing,
    /// A live TCX link at that hook of that interface, running the program `program_id`.
    Live {
        program_id: u32,
    },
    /// Nothing an update could make right: a defunct link (its interface was deleted), a
    /// link on another interface (the name now belongs to a new interface), at the other
    /// hook, or of another type. The reason says which.
    Replaceable(String),
}

/// Reads what the pin `pin` holds. Errors (the pin is not a link, bpffs is unreadable) are
/// errors, not "replaceable": only a link known to be dead or foreign may be replaced.
pub fn pin_state(pin: &Path, index: u32, hook: Hook) -> Result<PinState> {
    let fd = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PinState::Missing),
        Err(e) => return Err(e).with_context(|| format!("opening link pin {}", pin.display())),
    };
    // SAFETY: bpf_link_info is plain old data; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    sys::obj_info(&fd, &mut info).with_context(|| format!("reading the link pinned at {}", pin.display()))?;
    if info.type_ != aya_obj::generated::bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
        // An earlier version pinned an XDP link under a name a TC program now uses. A link
        // can only take a program of its own type, and that version's program no longer
        // exists in this agent: the only way forward is a new link.
        return Ok(PinState::Replaceable(format!("a link of another type ({}) than TCX", info.type_)));
    }
    // SAFETY: the kernel filled the union's tcx member (the link is a TCX link).
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    Ok(if tcx.ifindex == 0 {
        // The kernel clears the device of a TCX link when its interface is unregistered.
        PinState::Replaceable("a defunct link (its interface was deleted)".to_string())
    } else if tcx.ifindex != index {
        PinState::Replaceable(format!("a link on interface index {} (the interface was recreated)", tcx.ifindex))
    } else if tcx.attach_type != hook.tcx_attach_type() {
        PinState::Replaceable(format!("a link at the other hook (attach type {})", tcx.attach_type))
    } else {
        PinState::Live { program_id: info.prog_id }
    })
}

/// The link pinned at `pin` if it is live at `hook` of `index`: the anchor of an [`Order`].
fn live_sibling(pin: &Path, index: u32, hook: Hook) -> Result<Option<SchedClassifierLink>> {
    if !matches!(pin_state(pin, index, hook)?, PinState::Live { .. }) {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(pin).with_context(|| format!("opening link pin {}", pin.display()))?;
    Ok(Some(SchedClassifierLink::try_from(FdLink::from(link))?))
}

/// The index of `interface` in this network namespace.
fn ifindex(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface).with_context(|| format!("interface name {interface:?}"))?;
    // SAFETY: name is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("looking up interface {interface}"));
    }
    Ok(index)
}

/// ENOLINK from BPF_LINK_UPDATE: the link is defunct.
fn is_defunct(error: &anyhow::Error) -> bool {
    matches!(error.downcast_ref::<ProgramError>(), Some(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOLINK))
}

/// Swaps `classifier` into the TCX link pinned at `pin` (BPF_LINK_UPDATE: atomic, the link
/// keeps its place among the hook's programs).
fn replace_in(classifier: &mut SchedClassifier, pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(pin).with_context(|| format!("opening link pin {}", pin.display()))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
    let id = classifier.attach_to_link(link)?;
    // The pin keeps the link; the fd aya holds is closed here.
    drop(classifier.take_link(id)?);
    Ok(())
}

/// A new TCX link of `classifier` at `hook` of `interface`: before (`true`) or after the
/// given link, else last.
fn attach_new(
    classifier: &mut SchedClassifier,
    interface: &str,
    hook: Hook,
    anchor: Option<(bool, &SchedClassifierLink)>,
) -> Result<FdLink> {
    let order = match anchor {
        None => LinkOrder::last(),
        Some((true, link)) => LinkOrder::before_link(link)?,
        Some((false, link)) => LinkOrder::after_link(link)?,
    };
    let id = classifier.attach_with_options(interface, hook.tc(), TcAttachOptions::TcxOrder(order))?;
    let link = classifier.take_link(id)?;
    Ok(FdLink::try_from(link)?)
}

/// The program `name` of the object, loaded into the kernel (the verifier runs once).
pub fn loaded<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let program =
        ebpf.program_mut(name).with_context(|| format!("program {name} is not in the embedded eBPF object"))?;
    let program: &mut SchedClassifier =
        program.try_into().with_context(|| format!("program {name} is not a TC classifier"))?;
    if program.fd().is_err() {
        program.load().with_context(|| format!("loading {name} into the kernel (verifier)"))?;
    }
    Ok(program)
}
