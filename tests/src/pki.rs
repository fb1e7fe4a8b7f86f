//! Throwaway X.509 material for TLS tests, made with the `openssl` command-line tool (Debian
//! package `openssl`) into a directory the caller owns (and removes): a CA and leaf
//! certificates it signs. Keys are ECDSA P-256 (PKCS#8 PEM), certificates X.509 v3 valid for
//! two days, with the extensions strict verifiers (Go's crypto/tls, rustls/webpki) insist on:
//! CA basic constraints and key usage, leaf extended key usage and IP subject alt names.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

/// A certificate and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed certificate authority whose files live in a caller-owned directory.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub ca: CertKey,
    dir: PathBuf,
}

impl TestCa {
    /// Creates the CA `name` (also its file stem and common name) in `dir`.
    pub fn create(dir: &Path, name: &str) -> Result<TestCa> {
        let ca = CertKey { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        let config = write_config(
            dir,
            name,
            "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )?;
        let mut command = openssl();
        command.args(["req", "-x509", "-new", "-config"]).arg(&config);
        command.args(["-extensions", "ext", "-days", "2", "-nodes"]).args(new_key()).arg("-keyout").arg(&ca.key);
        command.arg("-out").arg(&ca.cert);
        run(&mut command)?;
        Ok(TestCa { ca, dir: dir.to_path_buf() })
    }

    /// The CA certificate (what a peer is told to trust).
    pub fn cert(&self) -> &Path {
        &self.ca.cert
    }

    /// A server certificate `name` for `ip` (subject alt name IP, extended key usage
    /// serverAuth).
    pub fn issue_server(&self, name: &str, ip: Ipv4Addr) -> Result<CertKey> {
        self.issue(name, &format!("extendedKeyUsage = serverAuth\nsubjectAltName = IP:{ip}\n"))
    }

    /// A client certificate `name` (extended key usage clientAuth; the common name is `name`).
    pub fn issue_client(&self, name: &str) -> Result<CertKey> {
        self.issue(name, "extendedKeyUsage = clientAuth\n")
    }

    fn issue(&self, name: &str, extensions: &str) -> Result<CertKey> {
        let leaf = CertKey { cert: self.dir.join(format!("{name}.crt")), key: self.dir.join(format!("{name}.key")) };
        let config = write_config(
            &self.dir,
            name,
            &format!(
                "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
                 {extensions}"
            ),
        )?;
        let csr = self.dir.join(format!("{name}.csr"));
        let mut request = openssl();
        request.args(["req", "-new", "-config"]).arg(&config).arg("-nodes").args(new_key());
        request.arg("-keyout").arg(&leaf.key).arg("-out").arg(&csr);
        run(&mut request)?;
        // A distinct serial per certificate without a serial file: the clock in nanoseconds.
        let serial = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut sign = openssl();
        sign.args(["x509", "-req", "-in"]).arg(&csr).arg("-CA").arg(&self.ca.cert).arg("-CAkey").arg(&self.ca.key);
        sign.args(["-set_serial", &serial.to_string(), "-days", "2", "-extfile"]).arg(&config);
        sign.args(["-extensions", "ext", "-out"]).arg(&leaf.cert);
        run(&mut sign)?;
        Ok(leaf)
    }
}

/// `openssl` with the caller's `OPENSSL_CONF` removed (every call passes its own config).
fn openssl() -> Command {
    let mut command = Command::new("openssl");
    command.env_remove("OPENSSL_CONF");
    command
}

/// Arguments of `openssl req` for a new unencrypted P-256 key.
fn new_key() -> [&'static str; 4] {
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
}

/// `<dir>/<name>.cnf`: the subject `CN=<name>` and the extension section `ext`.
fn write_config(dir: &Path, name: &str, extensions: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.cnf"));
    let text = format!("[req]\nprompt = no\ndistinguished_name = dn\n\n[dn]\nCN = {name}\n\n[ext]\n{extensions}");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn run(command: &mut Command) -> Result<()> {
    let output =
        command.output().with_context(|| format!("running {command:?} (Debian package openssl; is it installed?)"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
