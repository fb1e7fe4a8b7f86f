//! Real traffic between namespaces from test code: a TCP exchange that reports the source
//! address the server saw, and a sequenced UDP stream that counts what was lost.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::NetNs;

/// Connects from `client` to `server_ip:port` (a listener in `server`), sends a greeting and
/// returns the peer address the server saw.
pub fn tcp_source_seen(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs, port: u16) -> Result<SocketAddr> {
    tcp_source_seen_via(server, server_ip, port, client, SocketAddr::from((server_ip, port)))
}

/// As [`tcp_source_seen`], with the client connecting to `connect` — a ClusterIP that the
/// stack translates to the listener `server_ip:port`, say.
pub fn tcp_source_seen_via(
    server: &NetNs,
    server_ip: Ipv4Addr,
    port: u16,
    client: &NetNs,
    connect: SocketAddr,
) -> Result<SocketAddr> {
    let listener = server.run_in(move || TcpListener::bind((server_ip, port)))??;
    std::thread::scope(|scope| {
        let accepted = scope.spawn(move || -> Result<SocketAddr> {
            let (mut stream, peer) = accept_within(&listener, Duration::from_secs(10))
                .with_context(|| format!("no connection to {server_ip}:{port}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf)?;
            stream.write_all(b"world")?;
            Ok(peer)
        });
        client.run_in(move || -> Result<()> {
            let mut stream = TcpStream::connect_timeout(&connect, Duration::from_secs(5))
                .with_context(|| format!("TCP connect to {connect}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf)?;
            Ok(())
        })??;
        accepted.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?
    })
}

/// The next connection on `listener`, polled until `limit` passes: a connection that never
/// arrives (a broken path) fails the caller instead of blocking it in accept. The accepted
/// stream is blocking.
pub fn accept_within(listener: &TcpListener, limit: Duration) -> Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                return Ok((stream, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(e).context("accepting a TCP connection"),
        }
    }
}

/// Result of a sequenced UDP stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpStreamReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
}

/// Sends UDP datagrams carrying sequence numbers from `client` to `server_ip:port` every
/// `interval` while `during` runs (it gets the time to do its work), then for `tail` more,
/// and counts the sequence numbers that never arrived.
pub fn udp_stream_during(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    port: u16,
    interval: Duration,
    tail: Duration,
    during: impl FnOnce() -> Result<()> + Send,
) -> Result<UdpStreamReport> {
    let receiver = server.run_in(move || UdpSocket::bind((server_ip, port)))??;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let sender = client.run_in(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
    let stop = AtomicBool::new(false);
    let done_sending = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<UdpStreamReport> {
        let stop = &stop;
        let done_sending = &done_sending;
        let rx = scope.spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut buf = [0u8; 64];
            let mut quiet_since: Option<Instant> = None;
            loop {
                match receiver.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        seen.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        quiet_since = None;
                    }
                    _ => {
                        if done_sending.load(Ordering::SeqCst) {
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(500) {
                                return seen;
                            }
                        }
                    }
                }
            }
        });
        let tx = scope.spawn(move || -> Result<u64> {
            let mut seq = 0u64;
            let target = SocketAddr::from((server_ip, port));
            let mut stopped_at: Option<Instant> = None;
            loop {
                sender.send_to(&seq.to_be_bytes(), target).with_context(|| format!("sending datagram {seq}"))?;
                seq += 1;
                std::thread::sleep(interval);
                if stop.load(Ordering::SeqCst) {
                    let at = *stopped_at.get_or_insert_with(Instant::now);
                    if at.elapsed() >= tail {
                        return Ok(seq);
                    }
                }
            }
        });
        let work = during();
        stop.store(true, Ordering::SeqCst);
        let sent = tx.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        done_sending.store(true, Ordering::SeqCst);
        let seen = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        work?;
        let received = seen.iter().filter(|s| **s < sent).count() as u64;
        if received == 0 {
            bail!("no datagram of {sent} arrived");
        }
        Ok(UdpStreamReport { sent, received, lost: sent - received })
    })
}
