//! `/healthz` (the process answers) and `/readyz` (200 once subnet.env is written and the
//! datapath is programmed, 503 before) on `--healthz-ip:--healthz-port`. A minimal HTTP/1.1
//! responder: these endpoints take no input, so a full HTTP stack would be dead weight.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Binds now (so a bad address fails the start) and serves in the background.
pub async fn serve(address: SocketAddr, readiness: Readiness) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(address).await.with_context(|| format!("binding the health endpoint on {address}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let readiness = readiness.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, readiness)).await;
                    });
                }
                Err(error) => tracing::debug!("health accept failed: {error}"),
            }
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, readiness: Readiness) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n"),
        "/readyz" if readiness.is_ready() => ("200 OK", "ready\n"),
        "/readyz" => ("503 Service Unavailable", "not ready\n"),
        _ => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
