//! The etcd side of flannel's data model (v3 API): the config key, lease keys under
//! `<prefix>/subnets/`, transactions that create them, keep-alives and the watch.
//! Every call is bounded by a timeout and fails over to the next endpoint, so a dead member
//! never hangs the agent.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions, TlsOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use tokio::sync::OnceCell;

/// Bound on one unary etcd call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub cafile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A key-value pair as read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    /// etcd lease ID; 0 when the key has none (a reservation).
    pub lease: i64,
    pub mod_revision: i64,
}

impl RawKv {
    fn from_kv(kv: &etcd_client::KeyValue) -> RawKv {
        RawKv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// Every lease key with the store revision it was read at.
#[derive(Clone, Debug)]
pub struct LeaseListing {
    pub kvs: Vec<RawKv>,
    pub revision: i64,
}

/// etcd access with failover: one lazily connected client per endpoint, calls pinned to the
/// endpoint that last answered and moved on to the next one when a call fails or times out
/// (what etcd's own clientv3 balancer does; a balanced gRPC channel would keep sending to a
/// dead member).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
    prefix: String,
}

struct Inner {
    endpoints: Vec<Endpoint>,
    current: AtomicUsize,
    options: ConnectOptions,
    joined: String,
}

struct Endpoint {
    url: String,
    client: OnceCell<Client>,
}

impl Registry {
    /// Prepares clients for every endpoint with TLS and/or username/password when
    /// configured, and checks that at least one endpoint answers.
    pub async fn connect(options: &EtcdOptions) -> Result<Registry> {
        anyhow::ensure!(!options.endpoints.is_empty(), "no etcd endpoints given (--etcd-endpoints)");
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // As flannel's watch: a member cut off from the leader must not serve stale data.
            .with_require_leader(true)
            // etcd forgets an auth token that has not been used for --auth-token-ttl (5 min by
            // default): authenticate again when a call is refused for it, instead of failing
            // every call from then on. (No-op without a username.)
            .with_auto_token_refresh(true);
        if let Some(tls) = tls_options(options)? {
            connect = connect.with_tls(tls);
        }
        if let Some(user) = &options.username {
            connect = connect.with_user(user.clone(), options.password.clone().unwrap_or_default());
        }
        let endpoints =
            options.endpoints.iter().map(|url| Endpoint { url: url.clone(), client: OnceCell::new() }).collect();
        let inner =
            Inner { endpoints, current: AtomicUsize::new(0), options: connect, joined: options.endpoints.join(",") };
        let registry = Registry { inner: Arc::new(inner), prefix: options.prefix.trim_end_matches('/').to_string() };
        // Fail now when no endpoint answers, so the caller can report and retry.
        registry.call(|| "checking etcd".to_string(), |mut c| async move { c.status().await }).await?;
        Ok(registry)
    }

    /// Runs `call` against the current endpoint, moving on to the next on failure, until one
    /// answers or all have failed.
    async fn call<T, F, Fut>(&self, what: impl Fn() -> String, call: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let inner = &self.inner;
        let count = inner.endpoints.len();
        let first = inner.current.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let endpoint = &inner.endpoints[index];
            let attempt = async {
                let client = endpoint
                    .client
                    .get_or_try_init(|| Client::connect([endpoint.url.as_str()], Some(inner.options.clone())))
                    .await?
                    .clone();
                call(client).await
            };
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok(value)) => {
                    if step > 0 {
                        inner.current.store(index, Ordering::Relaxed);
                        tracing::warn!(endpoint = endpoint.url, "switched to another etcd endpoint");
                    }
                    return Ok(value);
                }
                Ok(Err(error)) => failures.push(format!("{}: {error}", endpoint.url)),
                Err(_) => failures.push(format!("{}: no answer within {CALL_TIMEOUT:?}", endpoint.url)),
            }
        }
        Err(anyhow::anyhow!("{}", failures.join("; "))).with_context(what)
    }

    pub fn endpoints(&self) -> &str {
        &self.inner.joined
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn lease_key(&self, name: &str) -> String {
        format!("{}{name}", self.subnets_prefix())
    }

    /// The network config JSON, or None while the key does not exist.
    pub async fn get_config(&self) -> Result<Option<String>> {
        let response = self.range(&self.config_key(), None).await?;
        Ok(response.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn list_leases(&self) -> Result<LeaseListing> {
        let response = self.range(&self.subnets_prefix(), Some(GetOptions::new().with_prefix())).await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        Ok(LeaseListing { kvs: response.kvs().iter().map(RawKv::from_kv).collect(), revision })
    }

    pub async fn get(&self, key: &str) -> Result<Option<RawKv>> {
        Ok(self.range(key, None).await?.kvs().first().map(RawKv::from_kv))
    }

    async fn range(&self, key: &str, options: Option<GetOptions>) -> Result<etcd_client::GetResponse> {
        self.call(
            || format!("reading {key}"),
            |mut c| {
                let options = options.clone();
                let key = key.to_string();
                async move { c.get(key, options).await }
            },
        )
        .await
    }

    /// Runs `txn` and returns whether its condition held.
    async fn txn(&self, what: &str, txn: Txn) -> Result<bool> {
        let response = self
            .call(
                || what.to_string(),
                |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                },
            )
            .await?;
        Ok(response.succeeded())
    }

    /// Grants an etcd lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let response = self
            .call(|| "granting an etcd lease".into(), |mut c| async move { c.lease_grant(ttl, None).await })
            .await?;
        Ok(response.id())
    }

    pub async fn revoke(&self, lease: i64) -> Result<()> {
        self.call(|| format!("revoking etcd lease {lease:x}"), |mut c| async move { c.lease_revoke(lease).await })
            .await?;
        Ok(())
    }

    /// Creates `key` only if it does not exist (`Version(key) == 0`), attached to `lease`
    /// (0 = no lease). Returns false when the key already existed: another agent won it.
    pub async fn create(&self, key: &str, value: &str, lease: i64) -> Result<bool> {
        let put = PutOptions::new().with_lease(lease);
        let txn =
            Txn::new().when([Compare::version(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(key, value, Some(put))]);
        self.txn(&format!("creating {key}"), txn).await
    }

    /// Overwrites `key` only if it is unchanged since `mod_revision` (so a concurrent
    /// delete or takeover is noticed, not clobbered). Returns false when it changed.
    pub async fn update(&self, key: &str, value: &str, lease: i64, mod_revision: i64) -> Result<bool> {
        let put = PutOptions::new().with_lease(lease);
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)]).and_then([TxnOp::put(
            key,
            value,
            Some(put),
        )]);
        self.txn(&format!("updating {key}"), txn).await
    }

    /// Deletes `key` only if it is unchanged since `mod_revision`.
    pub async fn delete_if_unchanged(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(&format!("deleting {key}"), txn).await
    }

    /// Remaining TTL of `lease` in seconds, or None when etcd no longer has it.
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>> {
        let response = self
            .call(
                || format!("reading the TTL of etcd lease {lease:x}"),
                |mut c| async move { c.lease_time_to_live(lease, None).await },
            )
            .await?;
        Ok((response.ttl() > 0).then_some(response.ttl()))
    }

    /// Refreshes `lease` to its full TTL once; returns the new TTL, or None when etcd no
    /// longer has the lease.
    pub async fn keep_alive_once(&self, lease: i64) -> Result<Option<i64>> {
        let response = self
            .call(
                || format!("keeping etcd lease {lease:x} alive"),
                |mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                },
            )
            .await?;
        Ok(response.map(|r| r.ttl()).filter(|ttl| *ttl > 0))
    }

    /// Watches every lease key from `revision` (inclusive). Returns once etcd has confirmed
    /// the watch (that first, empty, response is consumed here); a watch etcd refuses is an
    /// error, so the caller retries with backoff rather than at once.
    pub async fn watch_leases(&self, revision: i64) -> Result<WatchStream> {
        let prefix = self.subnets_prefix();
        let options = WatchOptions::new().with_prefix().with_start_revision(revision);
        self.call(
            || format!("watching {prefix} from revision {revision}"),
            |mut c| {
                let options = options.clone();
                let prefix = prefix.clone();
                async move {
                    let mut refreshed = false;
                    loop {
                        let mut stream = c.watch(prefix.as_str(), Some(options.clone())).await?;
                        let refusal = match stream.message().await? {
                            Some(first) if first.created() && !first.canceled() => return Ok(stream),
                            Some(first) if first.canceled() => first.cancel_reason().to_string(),
                            Some(first) => format!("unexpected first response {first:?}"),
                            None => "stream closed".to_string(),
                        };
                        // An expired auth token refuses a watch by canceling it, not with the
                        // Unauthenticated status the client's automatic refresh reacts to.
                        if !refreshed && refusal.contains("invalid auth token") {
                            refreshed = true;
                            c.refresh_token().await?;
                            continue;
                        }
                        return Err(etcd_client::Error::WatchError(format!(
                            "etcd did not create the watch: {refusal}"
                        )));
                    }
                }
            },
        )
        .await
    }
}

fn tls_options(options: &EtcdOptions) -> Result<Option<TlsOptions>> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("reading etcd {what} {}", path.display()))
    };
    let mut tls = TlsOptions::new();
    let mut any = false;
    if let Some(ca) = &options.cafile {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA file (--etcd-cafile)")?));
        any = true;
    }
    match (&options.certfile, &options.keyfile) {
        (Some(cert), Some(key)) => {
            let identity =
                Identity::from_pem(read(cert, "certificate (--etcd-certfile)")?, read(key, "key (--etcd-keyfile)")?);
            tls = tls.identity(identity);
            any = true;
        }
        (None, None) => {}
        _ => anyhow::bail!("--etcd-certfile and --etcd-keyfile must be given together"),
    }
    Ok(any.then_some(tls))
}
