//! `/run/flannel/subnet.env`, in flanneld's exact format and order, written atomically (temp
//! file in the same directory, fsync, rename) so readers such as the CNI plugin never see a
//! half-written file.

use std::{collections::BTreeMap, io::Write, net::Ipv4Addr, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// flanneld's WriteSubnetFile: FLANNEL_SUBNET is the subnet's first usable address with
    /// the subnet's prefix length (10.5.52.0/24 → 10.5.52.1/24).
    pub fn render(&self) -> String {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first,
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.render().as_bytes())
    }
}

/// Writes `contents` to `path` with mode 0644 so that `path` is always either the old or the
/// new file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(contents).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `KEY=value` lines of an env file (comments and blank lines skipped, surrounding quotes
/// removed), as `source` would see them.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The subnet recorded by a previous run (FLANNEL_SUBNET), used to ask for the same subnet
/// again. A missing or unreadable file is not an error: there simply is no previous subnet.
pub fn read_previous_subnet(path: &Path) -> Option<Ipv4Net> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), "cannot read the previous subnet file: {error}");
            return None;
        }
    };
    let value = parse_env(&text).remove("FLANNEL_SUBNET")?;
    match value.parse::<Ipv4Net>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            tracing::warn!(path = %path.display(), value, "ignoring malformed FLANNEL_SUBNET in the previous subnet file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_format() {
        let env = SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.52.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn writes_atomically_with_mode_0644_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let env = SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.52.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: false,
        };
        env.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(read_previous_subnet(&path), Some("10.5.52.0/24".parse().unwrap()));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn previous_subnet_tolerates_missing_and_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_previous_subnet(&dir.path().join("none")), None);
        let path = dir.path().join("subnet.env");
        std::fs::write(&path, "FLANNEL_SUBNET=banana\n").unwrap();
        assert_eq!(read_previous_subnet(&path), None);
    }
}
