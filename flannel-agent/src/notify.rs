//! systemd readiness (`Type=notify`): sends `READY=1` to `$NOTIFY_SOCKET` when it is set.

use std::os::unix::net::UnixDatagram;

use anyhow::{Context, Result};

pub fn notify_ready() -> Result<()> {
    let Some(socket_path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let socket = UnixDatagram::unbound().context("creating a socket for sd_notify")?;
    let path = socket_path.to_string_lossy().into_owned();
    let sent = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
        socket.send_to_addr(b"READY=1", &address)
    } else {
        socket.send_to(b"READY=1", &path)
    };
    sent.with_context(|| format!("sending READY=1 to NOTIFY_SOCKET {path}"))?;
    tracing::info!(socket = path, "notified systemd: READY=1");
    Ok(())
}
