//! The one way the harnesses ([`crate::lab`], [`crate::agent_node`]) wait for an agent to be
//! ready: its systemd notification.
//!
//! Why `READY=1` and not subnet.env or /readyz: the daemon writes subnet.env, then marks
//! /readyz ready, then sends `READY=1` — so `READY=1` is the last and strongest of the three,
//! and seeing it implies the other two. It also needs no configuration that would change
//! the agent's command line (/readyz needs `--healthz-port`, which some tests set themselves
//! and a second copy would make clap refuse), and it belongs to one process start: a
//! subnet.env left by the previous run already exists, and telling a rewrite from it by
//! modification time depends on the file system's coarse clock. Each harness gives each agent
//! its own socket and resets it before starting an agent, so a notification read afterwards
//! comes from that agent.

use std::{
    io::ErrorKind,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How often the wait looks whether the agent is still running.
const POLL: Duration = Duration::from_millis(50);

/// A bound datagram socket an agent is pointed at with `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// The current agent's READY=1 has been read: waiting again returns at once, as waiting
    /// for a ready agent should (the agent sends it only once).
    ready: AtomicBool,
}

impl NotifySocket {
    /// Binds `path`; it must not exist yet (it lives in the harness's temp dir).
    pub fn bind(path: PathBuf) -> Result<NotifySocket> {
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("binding the notify socket {}", path.display()))?;
        Ok(NotifySocket { socket, path, ready: AtomicBool::new(false) })
    }

    /// The value for the agent's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets the previous agent: its readiness and every queued notification. Call before
    /// starting an agent: what an earlier agent sent (and nobody waited for) must not be
    /// taken for the new one's readiness.
    pub fn reset(&self) -> Result<()> {
        self.ready.store(false, Ordering::SeqCst);
        let context = || format!("draining the notify socket {}", self.path.display());
        self.socket.set_nonblocking(true).with_context(context)?;
        let mut buf = [0u8; 256];
        let drained = loop {
            match self.socket.recv(&mut buf) {
                Ok(_) => continue,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        self.socket.set_nonblocking(false).with_context(context)?;
        drained.with_context(context)
    }

    /// Waits until the agent started since the last [`Self::reset`] has sent `READY=1` here
    /// (returns at once if that was already read). Fails, with the agent's log (read from
    /// `log`), when `exited` reports that the agent has exited, when `timeout` passes, or on
    /// any other notification (the agent sends nothing else).
    pub fn wait_ready(
        &self,
        timeout: Duration,
        log: &Path,
        mut exited: impl FnMut() -> Option<ExitStatus>,
    ) -> Result<()> {
        if self.ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            // Short receive timeouts, so an agent that dies is noticed at once rather than
            // after the whole timeout. A zero timeout is invalid for SO_RCVTIMEO.
            let left = deadline.saturating_duration_since(Instant::now());
            self.socket
                .set_read_timeout(Some(left.clamp(Duration::from_millis(1), POLL)))
                .with_context(|| format!("setting a timeout on the notify socket {}", self.path.display()))?;
            match self.socket.recv(&mut buf) {
                Ok(n) if &buf[..n] == b"READY=1" => {
                    self.ready.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                Ok(n) => bail!(
                    "unexpected notification {:?} on {}; the agent's log ({}):\n{}",
                    String::from_utf8_lossy(&buf[..n]),
                    self.path.display(),
                    log.display(),
                    log_text(log)
                ),
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) => {
                    return Err(error).with_context(|| format!("reading the notify socket {}", self.path.display()))
                }
            }
            if let Some(status) = exited() {
                bail!("the agent exited ({status}) before READY=1; its log ({}):\n{}", log.display(), log_text(log));
            }
            if Instant::now() >= deadline {
                bail!("no READY=1 from the agent within {timeout:?}; its log ({}):\n{}", log.display(), log_text(log));
            }
        }
    }
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|error| format!("(cannot read {}: {error})", log.display()))
}
