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

/// The embedded object as the pinned-map check needs it, parsed once for all maps.
pub struct ObjectMaps {
    object: aya_obj::Object,
    /// The object's BTF; None when it has none (then no map can be layout-checked).
    types: Option<btf::Types>,
}

impl ObjectMaps {
    pub fn parse(elf: &[u8]) -> Result<ObjectMaps> {
        let object = aya_obj::Object::parse(elf).context("parsing the embedded eBPF object")?;
        let types = match &object.btf {
            Some(b) => Some(btf::Types::parse(b.to_bytes()).context("parsing the embedded object's BTF")?),
            None => None,
        };
        Ok(ObjectMaps { object, types })
    }

    fn layout(&self, name: &str) -> Result<MapLayout> {
        let map =
            self.object.maps.get(name).with_context(|| format!("map {name} is not in the embedded eBPF object"))?;
        let (aya_obj::Map::Btf(map), Some(types)) = (map, &self.types) else {
            bail!("map {name} of the embedded eBPF object has no BTF (the object must be built with BTF maps)")
        };
        let layout = |id| types.layout(id).with_context(|| format!("BTF type {id} of {name} in the embedded object"));
        Ok(MapLayout { key: layout(map.def.btf_key_type_id)?, value: layout(map.def.btf_value_type_id)? })
    }
}

/// If a map is pinned at `pin`, fails unless it is the map `name` of `object`: same type,
/// key size, value size and capacity, and the same BTF key and value layout (type names,
/// sizes, member names, offsets and types). aya would otherwise reuse a pin of another layout
/// and the programs would read garbage: a field moved inside an equally sized value is
/// invisible to the size check.
///
/// A pin without BTF is refused too: every version of this agent pinned its maps with BTF
/// (they are all `#[btf_map]`s), so a BTF-less map under our name was made by something else
/// and its layout cannot be verified.
pub fn check_pinned_map(object: &ObjectMaps, pin: &Path, name: &str) -> Result<()> {
    if !pin.exists() {
        return Ok(());
    }
    let wanted =
        object.object.maps.get(name).with_context(|| format!("map {name} is not in the embedded eBPF object"))?;
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
    let ours = object.layout(name)?;
    let theirs = pinned_layout(pin)?;
    if Some(&ours) != theirs.as_ref() {
        let theirs = theirs.map_or_else(|| "without BTF (layout unknown)".to_string(), |l| l.to_string());
        bail!(
            "pinned map {} has the layout {theirs} but this agent's {name} needs {ours}; \
             it was left by an incompatible version or another program: remove it (and the programs using it) to continue",
            pin.display()
        );
    }
    Ok(())
}

/// A map's key and value types as BTF describes them.
#[derive(Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub key: btf::TypeLayout,
    pub value: btf::TypeLayout,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {}, value {}", self.key, self.value)
    }
}

/// The layout of the map pinned at `pin`, from the BTF the kernel holds for it; None when the
/// map was created without BTF.
pub fn pinned_layout(pin: &Path) -> Result<Option<MapLayout>> {
    let map = sys::obj_get(pin)?;
    // SAFETY: bpf_map_info is plain old data; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_map_info = unsafe { std::mem::zeroed() };
    sys::obj_info(&map, &mut info).with_context(|| format!("reading the info of pinned map {}", pin.display()))?;
    if info.btf_id == 0 || info.btf_value_type_id == 0 {
        return Ok(None);
    }
    let bytes =
        sys::btf_by_id(info.btf_id).with_context(|| format!("reading the BTF of pinned map {}", pin.display()))?;
    let types = btf::Types::parse(bytes).with_context(|| format!("parsing the BTF of pinned map {}", pin.display()))?;
    let layout = |id| types.layout(id).with_context(|| format!("BTF type {id} of pinned map {}", pin.display()));
    Ok(Some(MapLayout { key: layout(info.btf_key_type_id)?, value: layout(info.btf_value_type_id)? }))
}

/// The few raw bpf(2) commands aya does not expose: opening a pin as a plain fd and reading an
/// object's info (a link's interface, a map's BTF ids) and a BTF object's bytes.
pub mod sys {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    use anyhow::{Context, Result};

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

    /// bpf(2) with `attr`, the prefix of `union bpf_attr` that `command` reads (shared with
    /// the tests that make foreign BPF objects). Callers keep `attr`'s pointers valid.
    pub fn bpf<A>(command: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
        // SAFETY: attr is a valid, initialised bpf_attr prefix for `command`, and its size is
        // passed along (the kernel zero-fills the rest).
        let rc = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut A, size_of::<A>() as u32) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn owned(fd: libc::c_long) -> OwnedFd {
        // SAFETY: the kernel just returned this new fd; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// BPF_OBJ_GET: the object pinned at `pin`. A missing pin is an io::ErrorKind::NotFound.
    pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
        let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
        #[repr(C)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let mut attr = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
        bpf(BPF_OBJ_GET, &mut attr).map(owned)
    }

    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// BPF_OBJ_GET_INFO_BY_FD into `info` (bpf_link_info, bpf_map_info, ...).
    pub fn obj_info<T>(fd: &OwnedFd, info: &mut T) -> io::Result<()> {
        let mut attr =
            InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of::<T>() as u32, info: info as *mut T as u64 };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    }

    /// The raw BTF (header, types, strings) of the BTF object `id`.
    pub fn btf_by_id(id: u32) -> Result<Vec<u8>> {
        #[repr(C)]
        struct ById {
            id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let btf = bpf(BPF_BTF_GET_FD_BY_ID, &mut ById { id, next_id: 0, open_flags: 0 }).map(owned)?;
        #[repr(C)]
        #[derive(Default)]
        struct BtfInfo {
            btf: u64,
            btf_size: u32,
            id: u32,
            name: u64,
            name_len: u32,
            kernel_btf: u32,
        }
        // First the size, then the bytes.
        let mut info = BtfInfo::default();
        obj_info(&btf, &mut info).context("BPF_OBJ_GET_INFO_BY_FD (size)")?;
        let mut bytes = vec![0u8; info.btf_size as usize];
        let mut info = BtfInfo { btf: bytes.as_mut_ptr() as u64, btf_size: bytes.len() as u32, ..Default::default() };
        obj_info(&btf, &mut info).context("BPF_OBJ_GET_INFO_BY_FD (bytes)")?;
        bytes.truncate(info.btf_size as usize);
        Ok(bytes)
    }
}

/// Just enough of the BTF format (linux/btf.h) to describe a map's key and value types: aya-obj
/// parses BTF but keeps its types crate-private.
pub mod btf {
    use anyhow::{bail, ensure, Context, Result};

    const MAGIC: u16 = 0xeb9f;
    const KIND_INT: u32 = 1;
    const KIND_PTR: u32 = 2;
    const KIND_ARRAY: u32 = 3;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_ENUM: u32 = 6;
    const KIND_TYPEDEF: u32 = 8;
    const KIND_FUNC_PROTO: u32 = 13;
    const KIND_VAR: u32 = 14;
    const KIND_DATASEC: u32 = 15;
    const KIND_DECL_TAG: u32 = 17;
    const KIND_VOLATILE: u32 = 9;
    const KIND_CONST: u32 = 10;
    const KIND_RESTRICT: u32 = 11;
    const KIND_TYPE_TAG: u32 = 18;
    const KIND_ENUM64: u32 = 19;

    /// One type: its kind, name, size-or-type field and where the kind-specific data after it
    /// lies in `Types::bytes`.
    struct Type {
        kind: u32,
        name_off: u32,
        size_or_type: u32,
        vlen: usize,
        extra: std::ops::Range<usize>,
    }

    pub struct Types {
        bytes: Vec<u8>,
        /// Indexed by type id; id 0 is `void`.
        types: Vec<Type>,
        strings: std::ops::Range<usize>,
    }

    /// A type as the programs see it: name (of the resolved type; typedefs, const and volatile
    /// looked through), size, and for structs and unions their members: name, bit offset and
    /// type name.
    #[derive(Debug, PartialEq, Eq)]
    pub struct TypeLayout {
        pub name: String,
        pub size: u32,
        pub members: Vec<(String, u32, String)>,
    }

    impl std::fmt::Display for TypeLayout {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} ({} bytes)", self.name, self.size)?;
            if !self.members.is_empty() {
                let members: Vec<String> = self
                    .members
                    .iter()
                    .map(|(name, bits, ty)| format!("{name}: {ty} @{}", f64::from(*bits) / 8.0))
                    .collect();
                write!(f, " {{ {} }}", members.join(", "))?;
            }
            Ok(())
        }
    }

    fn u32_at(bytes: &[u8], at: usize) -> Result<u32> {
        let b = bytes.get(at..at + 4).context("BTF truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    impl Types {
        /// Parses little-endian BTF (what both the ELF's .BTF section and the kernel hold here).
        pub fn parse(bytes: Vec<u8>) -> Result<Types> {
            ensure!(bytes.len() >= 24, "BTF shorter than its header");
            ensure!(u16::from_le_bytes([bytes[0], bytes[1]]) == MAGIC, "not little-endian BTF (bad magic)");
            let hdr_len = u32_at(&bytes, 4)? as usize;
            let (type_off, type_len) = (u32_at(&bytes, 8)? as usize, u32_at(&bytes, 12)? as usize);
            let (str_off, str_len) = (u32_at(&bytes, 16)? as usize, u32_at(&bytes, 20)? as usize);
            let section = |off: usize, len: usize| {
                let range = hdr_len + off..hdr_len + off + len;
                ensure!(range.end <= bytes.len(), "BTF truncated");
                Ok(range)
            };
            let (data, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
            let mut types = vec![Type { kind: 0, name_off: 0, size_or_type: 0, vlen: 0, extra: 0..0 }];
            let mut at = data.start;
            while at < data.end {
                let info = u32_at(&bytes, at + 4)?;
                let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
                let extra_len = match kind {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    // Element type, index type, number of elements.
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    _ => 0,
                };
                let extra = at + 12..at + 12 + extra_len;
                ensure!(extra.end <= data.end, "BTF truncated");
                let (name_off, size_or_type) = (u32_at(&bytes, at)?, u32_at(&bytes, at + 8)?);
                types.push(Type { kind, name_off, size_or_type, vlen, extra });
                at += 12 + extra_len;
            }
            Ok(Types { bytes, types, strings })
        }

        fn get(&self, id: u32) -> Result<&Type> {
            self.types.get(id as usize).with_context(|| format!("no BTF type {id}"))
        }

        fn name(&self, offset: u32) -> Result<String> {
            let strings = &self.bytes[self.strings.clone()];
            let tail = strings.get(offset as usize..).context("BTF string offset out of range")?;
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
        }

        /// `id` with typedefs and qualifiers looked through.
        fn resolve(&self, mut id: u32) -> Result<u32> {
            for _ in 0..32 {
                match self.get(id)?.kind {
                    KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                        id = self.get(id)?.size_or_type
                    }
                    _ => return Ok(id),
                }
            }
            bail!("BTF type chain too long at {id}")
        }

        /// The kind-specific u32 at byte `at` after type `t`.
        fn extra(&self, t: &Type, at: usize) -> Result<u32> {
            ensure!(t.extra.start + at + 4 <= t.extra.end, "BTF type data out of range");
            u32_at(&self.bytes, t.extra.start + at)
        }

        fn size(&self, id: u32) -> Result<u32> {
            let t = self.get(self.resolve(id)?)?;
            Ok(match t.kind {
                KIND_ARRAY => self.size(self.extra(t, 0)?)? * self.extra(t, 8)?,
                KIND_PTR => 8,
                _ => t.size_or_type,
            })
        }

        fn type_name(&self, id: u32) -> Result<String> {
            let id = self.resolve(id)?;
            let t = self.get(id)?;
            match t.kind {
                KIND_ARRAY => Ok(format!("[{}; {}]", self.type_name(self.extra(t, 0)?)?, self.extra(t, 8)?)),
                _ if t.name_off == 0 => Ok(format!("<anonymous kind {}>", t.kind)),
                _ => self.name(t.name_off),
            }
        }

        pub fn layout(&self, id: u32) -> Result<TypeLayout> {
            let resolved = self.resolve(id)?;
            let t = self.get(resolved)?;
            let mut members = Vec::new();
            if matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                for m in 0..t.vlen {
                    // The offset word holds the bitfield size above bit 24 when the kind flag
                    // is set; compared as is, both sides use the same encoding.
                    let ty = self.type_name(self.extra(t, 12 * m + 4)?)?;
                    members.push((self.name(self.extra(t, 12 * m)?)?, self.extra(t, 12 * m + 8)?, ty));
                }
            }
            Ok(TypeLayout { name: self.type_name(resolved)?, size: self.size(resolved)?, members })
        }
    }
}
