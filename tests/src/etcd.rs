//! Real etcd for tests: members of the Debian `etcd-server` package (etcd 3.4) with throwaway
//! data dirs, and `etcdctl` (API v3, Debian `etcd-client`) to read and change the store behind
//! the agent's back. Every process here is one this module started; each is SIGKILLed and
//! reaped, and its data removed, when its guard drops (also when a test panics).
//!
//! A member runs either in the caller's network namespace on 127.0.0.1 or, for the lab, inside
//! a node namespace on an address that namespace owns ([`EtcdServer::start_in`]): node
//! namespaces cannot reach the host's loopback.
//!
//! Security, for the agent's `--etcd-*` TLS and auth flags: [`EtcdServer::start_tls`] serves
//! https client URLs that require a client certificate ([`EtcdTls`], generated at test time by
//! [`EtcdTls::generate`]); [`EtcdServer::enable_auth`] turns on username/password auth. The
//! member's own [`EtcdServer::etcdctl`] (and its health checks) then present the client
//! certificate and/or the root credentials; other etcdctl values take them with
//! [`Etcdctl::with_tls`] and [`Etcdctl::with_user`]. [`EtcdServer::start_with`] also takes extra
//! etcd flags ([`MemberOptions`]).

use std::{
    collections::hash_map::RandomState,
    fs::{File, OpenOptions},
    hash::{BuildHasher, Hasher},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{
    names::unique,
    pki::{CertKey, TestCa},
    NetNs,
};

/// How long a start or restart may take until every member answers a health check.
const HEALTH_DEADLINE: Duration = Duration::from_secs(20);
/// Upper bound on one etcdctl invocation (it has its own, shorter, dial and command timeouts;
/// this only guards against a hung process, e.g. a watch that never ends).
const ETCDCTL_DEADLINE: Duration = Duration::from_secs(15);
/// Fresh port sets tried when a member fails to bind because something took a port meanwhile.
const START_ATTEMPTS: usize = 5;
/// Lines of a member's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// Where a process runs. A namespace is kept by path rather than by a `&NetNs` borrow, so a
/// server can be restarted later and an [`Etcdctl`] can be stored freely; the namespace must
/// still exist when a process is spawned there (the error says so otherwise).
#[derive(Debug, Clone)]
enum Place {
    Host,
    Netns(PathBuf),
}

impl Place {
    fn of(netns: &NetNs) -> Place {
        Place::Netns(netns.path())
    }

    /// Runs `f` here: directly, or in a short-lived thread that has entered the namespace
    /// (setns changes only the calling thread). None if the namespace cannot be entered.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Option<T> {
        match self {
            Place::Host => Some(f()),
            Place::Netns(path) => {
                let ns = File::open(path).ok()?;
                thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            // SAFETY: plain syscall on a descriptor that `ns` keeps open.
                            let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
                            entered.then(f)
                        })
                        .join()
                        .ok()
                        .flatten()
                })
            }
        }
    }

    /// Whether something accepts TCP connections on `addr` here.
    fn accepts(&self, addr: SocketAddr) -> bool {
        self.within(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()).unwrap_or(false)
    }

    /// Whether an HTTP server answers on `addr` here (not merely a bound socket whose owner
    /// does not accept yet).
    fn serves_http(&self, addr: SocketAddr) -> bool {
        self.within(|| {
            let attempt = || -> std::io::Result<bool> {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
                stream.set_read_timeout(Some(Duration::from_millis(100)))?;
                stream.write_all(b"GET /version HTTP/1.0\r\n\r\n")?;
                let mut head = [0; 5];
                stream.read_exact(&mut head)?;
                Ok(&head == b"HTTP/")
            };
            attempt().unwrap_or(false)
        })
        .unwrap_or(false)
    }

    /// Spawns `command` here. In a namespace the child enters it (network namespace only,
    /// like [`NetNs::command`]) between fork and exec. Spawn each command once: its pre_exec
    /// hook refers to a descriptor closed on return.
    fn spawn(&self, command: &mut Command) -> Result<Child> {
        match self {
            Place::Host => command.spawn().with_context(|| format!("spawning {command:?}")),
            Place::Netns(path) => {
                let ns = File::open(path)
                    .with_context(|| format!("opening network namespace {} (was it deleted?)", path.display()))?;
                let fd = ns.as_raw_fd();
                // SAFETY: between fork and exec the child only calls setns, which is
                // async-signal-safe and allocates nothing; `ns` (and so `fd`) stays open until
                // spawn has returned. The descriptor is close-on-exec.
                unsafe {
                    command.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = command.spawn().with_context(|| format!("spawning {command:?} in {}", path.display()));
                drop(ns);
                child
            }
        }
    }
}

/// A command for `program` with the caller's `<prefix>*` environment variables removed, so an
/// `ETCD_*`/`ETCDCTL_*` setting of the developer's shell cannot change or contradict the flags.
fn clean_command(program: &str, env_prefix: &str) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(env_prefix) {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// What etcdctl presents to a TLS member (`--cacert`, `--cert`, `--key`).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA the member's certificate must chain to.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS on a member's client URLs ([`EtcdServer::start_tls`]): https with `server` as
/// `--cert-file`/`--key-file`, and `--client-cert-auth --trusted-ca-file=<client.ca>`, so every
/// client must present a certificate signed by that one CA. `client` is such a certificate,
/// used by the member's own etcdctl (health checks, [`EtcdServer::etcdctl`]). Peer URLs stay
/// plain http. The files must outlive the server (it reads them again on restart).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub server: CertKey,
    pub client: ClientTls,
}

impl EtcdTls {
    /// A throwaway CA (`etcd-ca`), a server certificate for 127.0.0.1 (`etcd-server`) and a
    /// client certificate (`etcd-client`), all written into `dir` (see [`crate::pki`]).
    pub fn generate(dir: &Path) -> Result<EtcdTls> {
        let ca = TestCa::create(dir, "etcd-ca")?;
        let server = ca.issue_server("etcd-server", Ipv4Addr::LOCALHOST)?;
        let client = ca.issue_client("etcd-client")?;
        Ok(EtcdTls { server, client: ClientTls { ca: ca.cert().to_path_buf(), cert: client.cert, key: client.key } })
    }
}

/// Settings for a single member started by [`EtcdServer::start_with`]; the default is what
/// [`EtcdServer::start`] runs.
#[derive(Debug, Clone, Default)]
pub struct MemberOptions {
    /// Serve https client URLs that require a client certificate.
    pub tls: Option<EtcdTls>,
    /// More etcd flags, after the harness's own (e.g. `--auth-token-ttl=1`); kept for restarts.
    pub extra_args: Vec<String>,
}

/// One etcd member process with its own temp data dir; killed and its data removed on Drop.
#[derive(Debug)]
pub struct EtcdServer {
    name: String,
    place: Place,
    client_url: String,
    /// The client side of [`EtcdTls`] when the member serves https.
    client_tls: Option<ClientTls>,
    /// Root credentials once [`EtcdServer::enable_auth`] has turned auth on.
    user: Option<(String, String)>,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    /// Full etcd command line (without the program), reused verbatim by [`EtcdServer::restart`].
    args: Vec<String>,
    child: Option<Child>,
    /// Holds `data/` and `etcd.log`; removed after the process is gone (field order).
    dir: tempfile::TempDir,
}

/// The addresses of one member before it is spawned.
struct MemberPlan {
    name: String,
    client: SocketAddrV4,
    peer: SocketAddrV4,
}

impl EtcdServer {
    /// Single-member cluster listening on 127.0.0.1 with free ports; returns once it answers
    /// (bounded wait, clear error with etcd's log tail on failure).
    pub fn start() -> Result<EtcdServer> {
        EtcdServer::start_with(&MemberOptions::default())
    }

    /// Same, with https client URLs that require a client certificate (see [`EtcdTls`]).
    /// Its [`EtcdServer::etcdctl`] presents `tls.client`.
    pub fn start_tls(tls: &EtcdTls) -> Result<EtcdServer> {
        EtcdServer::start_with(&MemberOptions { tls: Some(tls.clone()), ..MemberOptions::default() })
    }

    /// Same, with TLS and/or extra etcd flags.
    pub fn start_with(options: &MemberOptions) -> Result<EtcdServer> {
        let mut members = launch(&Place::Host, Ipv4Addr::LOCALHOST, 1, options)?;
        Ok(members.pop().expect("one member"))
    }

    /// Same, but the process runs inside `netns` and listens on `ip`, which must already be an
    /// address of an interface there (e.g. the lab's underlay address, or one added to `lo`).
    /// Use [`EtcdServer::etcdctl`] (or [`Etcdctl::in_netns`]) to talk to it: the host cannot
    /// reach it.
    pub fn start_in(netns: &NetNs, ip: Ipv4Addr) -> Result<EtcdServer> {
        let mut members = launch(&Place::of(netns), ip, 1, &MemberOptions::default())?;
        Ok(members.pop().expect("one member"))
    }

    /// e.g. `http://127.0.0.1:23791` (`https://…` for [`EtcdServer::start_tls`]).
    pub fn client_url(&self) -> String {
        self.client_url.clone()
    }

    /// The member name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last `lines` lines of the member's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path(), lines)
    }

    /// An etcdctl for this member alone, running where the member runs (its namespace, if any),
    /// with the member's client certificate and root credentials when it has them.
    pub fn etcdctl(&self) -> Etcdctl {
        Etcdctl {
            endpoints: self.client_url.clone(),
            place: self.place.clone(),
            tls: self.client_tls.clone(),
            user: self.user.clone(),
        }
    }

    /// Turns on username/password auth: adds user `root` (etcd's superuser) with
    /// `root_password` and runs `etcdctl auth enable`. From then on every client must
    /// authenticate; this member's [`EtcdServer::etcdctl`] and health checks use root.
    pub fn enable_auth(&mut self, root_password: &str) -> Result<()> {
        let ctl = self.etcdctl();
        ctl.run(&["user", "add", &format!("root:{root_password}")])?;
        ctl.run(&["auth", "enable"])?;
        self.user = Some(("root".to_owned(), root_password.to_owned()));
        Ok(())
    }

    /// SIGKILL the process (data kept); no-op if already stopped.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if the child was already reaped, which `child` being Some excludes;
            // if it has exited on its own, the signal goes to a zombie and is harmless.
            child.kill().with_context(|| format!("killing etcd member {}", self.name))?;
            child.wait().with_context(|| format!("reaping etcd member {}", self.name))?;
        }
        Ok(())
    }

    /// Start it again with the same name, data dir, ports and cluster; waits until healthy.
    /// A running member is killed first. In a cluster, "healthy" needs a quorum of members up.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()?;
        wait_healthy(std::slice::from_mut(self), Instant::now() + HEALTH_DEADLINE)
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(child) => match child.try_wait() {
                Ok(None) => true,
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                    false
                }
            },
        }
    }

    fn new(
        place: &Place,
        plan: &MemberPlan,
        initial_cluster: &str,
        token: &str,
        single: bool,
        options: &MemberOptions,
    ) -> Result<EtcdServer> {
        let tls = options.tls.as_ref();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{}", plan.client);
        let peer_url = format!("http://{}", plan.peer);
        // Fast elections. A single member has no peer to miss heartbeats from, so it can use
        // a tiny election timeout (it matters on restart: ~1-2 election timeouts until it
        // leads again); a real cluster keeps margin against spurious elections on a busy CI
        // machine.
        let (heartbeat_ms, election_ms) = if single { (10, 100) } else { (50, 500) };
        let dir = tempfile::Builder::new().prefix("flannel-etcd-").tempdir().context("creating etcd temp dir")?;
        let data_dir = dir.path().join("data");
        let mut args = vec![
            format!("--name={}", plan.name),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new".to_owned(),
            format!("--initial-cluster-token={token}"),
            format!("--heartbeat-interval={heartbeat_ms}"),
            format!("--election-timeout={election_ms}"),
        ];
        if let Some(tls) = tls {
            args.extend([
                format!("--cert-file={}", tls.server.cert.display()),
                format!("--key-file={}", tls.server.key.display()),
                "--client-cert-auth".to_owned(),
                format!("--trusted-ca-file={}", tls.client.ca.display()),
            ]);
        }
        args.extend(options.extra_args.iter().cloned());
        let mut server = EtcdServer {
            name: plan.name.clone(),
            place: place.clone(),
            client_url,
            client_tls: tls.map(|tls| tls.client.clone()),
            user: None,
            client_addr: plan.client.into(),
            peer_addr: plan.peer.into(),
            args,
            child: None,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = clean_command("etcd", "ETCD_");
        command.args(&self.args).stdout(log.try_clone()?).stderr(log);
        let child =
            self.place.spawn(&mut command).context("starting etcd (Debian package etcd-server; is it installed?)")?;
        self.child = Some(child);
        Ok(())
    }

    /// One health probe: `etcdctl endpoint health` on this member (a quorum read), once the
    /// client port accepts connections (etcdctl's gRPC dial backs off for a second after a
    /// refused connection, so probing a port nobody listens on yet would cost that second).
    fn probe(&self) -> bool {
        if !self.place.accepts(self.client_addr) {
            return false;
        }
        self.etcdctl()
            .output_with(&["--dial-timeout=500ms", "--command-timeout=1s", "endpoint", "health"], ETCDCTL_DEADLINE)
            .map(|output| output.status.success())
            .unwrap_or(false)
    }

    /// The process's exit status if it has exited (and reaps it).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Whether the log says a listener could not bind because the port is taken.
    fn port_clash(&self) -> bool {
        std::fs::read_to_string(self.log_path()).is_ok_and(|log| log.contains("address already in use"))
    }

    fn failure(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "etcd member {} ({}) {what}; last lines of {}:\n{}",
            self.name,
            self.client_url,
            self.log_path().display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `dir` (data and log) is removed after this, the process being gone.
    }
}

/// A multi-member cluster on loopback (each member its own ports and data dir).
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `members` members on 127.0.0.1 and waits until all are healthy.
    pub fn start(members: usize) -> Result<EtcdCluster> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        Ok(EtcdCluster { members: launch(&Place::Host, Ipv4Addr::LOCALHOST, members, &MemberOptions::default())? })
    }

    /// Client URLs of all members (running or not), in member order.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::client_url).collect()
    }

    /// An etcdctl against all members.
    pub fn etcdctl(&self) -> Etcdctl {
        Etcdctl::new(&self.client_urls())
    }

    /// Waits until all running members agree on a leader among them and returns its index in
    /// `members`. Use it after killing a member: a write sent while the survivors still follow
    /// a dead leader is forwarded to it, lost, and hangs until etcd's request timeout (~5 s),
    /// which then fails etcdctl's 5 s command timeout. Bounded (20 s); needs a quorum running.
    pub fn wait_for_leader(&mut self) -> Result<usize> {
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let mut last = String::from("no member running");
        loop {
            let running: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].is_running()).collect();
            if !running.is_empty() {
                let urls: Vec<String> = running.iter().map(|&i| self.members[i].client_url()).collect();
                match self.leader_among(&running, &urls) {
                    Ok(Some(leader)) => return Ok(leader),
                    Ok(None) => last = "members do not agree on a running leader yet".to_owned(),
                    Err(error) => last = format!("{error:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!("etcd cluster {:?} has no leader after {HEALTH_DEADLINE:?}: {last}", self.client_urls());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The index of the leader if every member in `running` names the same one among them.
    fn leader_among(&self, running: &[usize], urls: &[String]) -> Result<Option<usize>> {
        // `endpoint status` answers from each member's own raft state, without a quorum.
        let ctl = Etcdctl::new(urls);
        let json = ctl.json(&["--dial-timeout=500ms", "--command-timeout=1s", "endpoint", "status"])?;
        let statuses = json.as_array().with_context(|| format!("endpoint status is not an array: {json}"))?;
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for status in statuses {
            let url = status.get("Endpoint").and_then(Value::as_str).context("no Endpoint in endpoint status")?;
            let index = running
                .iter()
                .copied()
                .find(|&i| self.members[i].client_url == url)
                .with_context(|| format!("unknown endpoint {url}"))?;
            let id = status.pointer("/Status/header/member_id").and_then(Value::as_u64).context("no member_id")?;
            let leader = status.pointer("/Status/leader").and_then(Value::as_u64).context("no leader")?;
            ids.push((id, index));
            leaders.push(leader);
        }
        if statuses.len() != running.len() || leaders.windows(2).any(|pair| pair[0] != pair[1]) {
            return Ok(None);
        }
        Ok(leaders.first().and_then(|leader| ids.iter().find(|(id, _)| id == leader)).map(|&(_, index)| index))
    }
}

/// Spawns a fresh `count`-member cluster at `place` on `ip`, every member with `options`, and
/// waits for it, retrying with new ports when a member lost a port race.
fn launch(place: &Place, ip: Ipv4Addr, count: usize, options: &MemberOptions) -> Result<Vec<EtcdServer>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ports = free_ports(2 * count)?;
        let token = format!("flannel-tests-{}", unique(""));
        let plans: Vec<MemberPlan> = ports
            .chunks(2)
            .map(|pair| MemberPlan {
                name: unique("etcd"),
                client: SocketAddrV4::new(ip, pair[0]),
                peer: SocketAddrV4::new(ip, pair[1]),
            })
            .collect();
        let initial_cluster =
            plans.iter().map(|plan| format!("{}=http://{}", plan.name, plan.peer)).collect::<Vec<_>>().join(",");
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let mut members = Vec::with_capacity(count);
        let mut started = Ok(());
        for (index, plan) in plans.iter().enumerate() {
            members.push(EtcdServer::new(place, plan, &initial_cluster, &token, count == 1, options)?);
            // A new member first asks the other members' peer URLs whether it was bootstrapped
            // already, waiting up to 1 s on a peer that has bound its port but does not serve
            // yet (etcd 3.4 binds early and serves only after its own such check), which can
            // chain to seconds. Starting members one by one, each once the previous serves
            // its peer URL, makes every check answered or refused at once.
            if count > 1 && index + 1 < count {
                started = wait_peer_serving(members.last_mut().expect("just pushed"), deadline);
                if started.is_err() {
                    break;
                }
            }
        }
        match started.and_then(|()| wait_healthy(&mut members, deadline)) {
            Ok(()) => return Ok(members),
            Err(_) if attempt < START_ATTEMPTS && members.iter().any(EtcdServer::port_clash) => continue,
            Err(error) => return Err(error),
        }
        // `members` drop here: killed and removed before the next attempt.
    }
}

/// Waits until `member` serves HTTP on its peer URL, failing as soon as it exits.
fn wait_peer_serving(member: &mut EtcdServer, deadline: Instant) -> Result<()> {
    loop {
        if let Some(status) = member.exited() {
            return Err(member.failure(&format!("exited during startup ({status})")));
        }
        if member.place.serves_http(member.peer_addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(member.failure(&format!("not serving its peer URL after {HEALTH_DEADLINE:?}")));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every member answers a health check, failing as soon as one exits.
fn wait_healthy(members: &mut [EtcdServer], deadline: Instant) -> Result<()> {
    let mut healthy = vec![false; members.len()];
    loop {
        for (member, healthy) in members.iter_mut().zip(healthy.iter_mut()).filter(|(_, healthy)| !**healthy) {
            if let Some(status) = member.exited() {
                return Err(member.failure(&format!("exited during startup ({status})")));
            }
            *healthy = member.probe();
        }
        if healthy.iter().all(|&healthy| healthy) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let member = &members[healthy.iter().position(|&healthy| !healthy).expect("one unhealthy")];
            return Err(member.failure(&format!("not healthy after {HEALTH_DEADLINE:?}")));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `count` distinct ports currently free on 127.0.0.1, chosen below the kernel's ephemeral
/// range: an ephemeral port can be taken by any outgoing connection (e.g. a peer dialling a
/// killed member) between our check and etcd's bind, or while a member is down before a
/// restart. Falls back to kernel-assigned ports when that range is too small.
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 15000;
    let mut listeners = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    if ephemeral_low > LOW + 1000 {
        let span = u64::from(ephemeral_low - LOW);
        let mut tries = 0;
        while ports.len() < count && tries < 1000 {
            tries += 1;
            let port = LOW + (random() % span) as u16;
            if ports.contains(&port) {
                continue;
            }
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                listeners.push(listener);
                ports.push(port);
            }
        }
    }
    while ports.len() < count {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
        ports.push(listener.local_addr()?.port());
        listeners.push(listener);
    }
    // Listeners close here; the caller binds the ports right away (and retries on a clash).
    Ok(ports)
}

/// A random number (std's per-instance random hash keys; no rand dependency needed here).
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

/// The last `lines` lines of a file (or why it could not be read).
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// etcdctl (API v3) against the given endpoints, for tests to put/get/delete/compact behind
/// the agent's back. Every call is one etcdctl process with a 2 s dial and 5 s command timeout.
#[derive(Debug, Clone)]
pub struct Etcdctl {
    /// Comma-separated, as `--endpoints` takes them.
    endpoints: String,
    place: Place,
    /// `--cacert`, `--cert`, `--key`.
    tls: Option<ClientTls>,
    /// `--user=<name>:<password>`.
    user: Option<(String, String)>,
}

impl Etcdctl {
    /// etcdctl run in the caller's network namespace.
    pub fn new(endpoints: &[String]) -> Etcdctl {
        Etcdctl { endpoints: endpoints.join(","), place: Place::Host, tls: None, user: None }
    }

    /// etcdctl run inside `netns` (for a server from [`EtcdServer::start_in`]). The namespace
    /// is looked up by path at each call, so it must outlive the calls, not this value.
    pub fn in_netns(endpoints: &[String], netns: &NetNs) -> Etcdctl {
        Etcdctl { endpoints: endpoints.join(","), place: Place::of(netns), tls: None, user: None }
    }

    /// Presents `tls` to https endpoints (`--cacert --cert --key`).
    pub fn with_tls(mut self, tls: ClientTls) -> Etcdctl {
        self.tls = Some(tls);
        self
    }

    /// Authenticates as `user` with `password` (`--user`), for a store with auth enabled.
    pub fn with_user(mut self, user: &str, password: &str) -> Etcdctl {
        self.user = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// The comma-separated endpoint list passed to `--endpoints`.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs `etcdctl --endpoints=… <args>` and returns its output whatever the exit status
    /// (e.g. to see a watch fail). Killed after 15 s.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.output_with(&[&["--dial-timeout=2s", "--command-timeout=5s"][..], args].concat(), ETCDCTL_DEADLINE)
    }

    /// Runs `etcdctl --endpoints=… <args>`; a non-zero exit is an error with its stderr.
    /// Returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let output = self.output(args)?;
        if !output.status.success() {
            bail!(
                "etcdctl --endpoints={} {} failed ({}): {}",
                self.endpoints,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8(output.stdout).context("etcdctl printed non-UTF-8")
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.run(&["put", "--", key, value])?;
        Ok(())
    }

    /// Puts `key` attached to lease `lease` (an ID from [`Etcdctl::lease_grant`]).
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> Result<()> {
        self.run(&["put", &format!("--lease={lease:x}"), "--", key, value])?;
        Ok(())
    }

    /// Grants a lease of `ttl_secs` seconds and returns its ID (`etcdctl lease grant`).
    pub fn lease_grant(&self, ttl_secs: i64) -> Result<i64> {
        let json = self.json(&["lease", "grant", &ttl_secs.to_string()])?;
        json.get("ID").and_then(Value::as_i64).with_context(|| format!("no lease ID in {json}"))
    }

    /// The value of `key`, None if absent.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get_kv(key)?.map(|kv| kv.value))
    }

    /// Keys and values under `prefix`, sorted by key (`""` lists everything).
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let json = self.json(&["get", "--prefix", "--", prefix])?;
        kvs(&json)?.into_iter().map(|kv| Ok((kv.key, kv.value))).collect()
    }

    /// Deletes `key`; deleting an absent key is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.run(&["del", "--", key])?;
        Ok(())
    }

    /// The etcd lease ID attached to `key` (None for a key without a lease) and that lease's
    /// remaining TTL in seconds (-1 if the lease has just expired). An absent key is an error.
    pub fn key_lease(&self, key: &str) -> Result<Option<(i64, i64)>> {
        let kv = self.get_kv(key)?.with_context(|| format!("key {key} not found in etcd"))?;
        let Some(lease) = kv.lease else { return Ok(None) };
        let json = self.json(&["lease", "timetolive", &format!("{lease:x}")])?;
        let ttl = json.get("ttl").and_then(Value::as_i64).with_context(|| format!("no ttl in {json}"))?;
        Ok(Some((lease, ttl)))
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let json = self.json(&["get", "--", "/flannel-tests/revision-probe"])?;
        header_revision(&json)
    }

    /// Compacts the key-value history up to `revision`: watches and reads at older revisions
    /// then fail with "required revision has been compacted".
    pub fn compact(&self, revision: i64) -> Result<()> {
        self.run(&["compaction", &revision.to_string()])?;
        Ok(())
    }

    fn get_kv(&self, key: &str) -> Result<Option<Kv>> {
        let json = self.json(&["get", "--", key])?;
        Ok(kvs(&json)?.into_iter().next())
    }

    /// Runs `etcdctl -w json <args>` and parses stdout.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let stdout = self.run(&[&["-w", "json"][..], args].concat())?;
        serde_json::from_str(&stdout).with_context(|| format!("parsing etcdctl JSON output {stdout:?}"))
    }

    fn output_with(&self, args: &[&str], deadline: Duration) -> Result<Output> {
        let mut command = clean_command("etcdctl", "ETCDCTL_");
        command.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoints));
        if let Some(tls) = &self.tls {
            command.arg("--cacert").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
        }
        if let Some((user, password)) = &self.user {
            command.arg(format!("--user={user}:{password}"));
        }
        command.args(args);
        run_bounded(&self.place, &mut command, deadline)
    }
}

/// One key-value of etcdctl's JSON output, decoded.
struct Kv {
    key: String,
    value: String,
    lease: Option<i64>,
}

/// The `kvs` of a `get -w json` answer (absent when nothing matched), base64-decoded.
fn kvs(json: &Value) -> Result<Vec<Kv>> {
    let Some(kvs) = json.get("kvs") else { return Ok(Vec::new()) };
    let kvs = kvs.as_array().with_context(|| format!("kvs is not an array in {json}"))?;
    kvs.iter()
        .map(|kv| {
            let field = |name: &str| -> Result<String> {
                // etcd omits empty fields, e.g. the value of a key put with "".
                let encoded = kv.get(name).and_then(Value::as_str).unwrap_or("");
                String::from_utf8(base64_decode(encoded)?).with_context(|| format!("{name} in {kv} is not UTF-8"))
            };
            Ok(Kv {
                key: field("key")?,
                value: field("value")?,
                lease: kv.get("lease").and_then(Value::as_i64).filter(|&lease| lease != 0),
            })
        })
        .collect()
}

fn header_revision(json: &Value) -> Result<i64> {
    json.pointer("/header/revision").and_then(Value::as_i64).with_context(|| format!("no header.revision in {json}"))
}

/// Standard base64 with optional padding (what etcdctl's JSON output uses for bytes).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in text.trim_end_matches('=').bytes() {
        let sextet = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("invalid base64 {text:?}"),
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Runs `command` at `place` to completion with output captured, killing it after `deadline`.
fn run_bounded(place: &Place, command: &mut Command, deadline: Duration) -> Result<Output> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = place.spawn(command)?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = reader(child.stdout.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>));
    let stderr = reader(child.stderr.take().map(|pipe| Box::new(pipe) as Box<dyn Read + Send>));
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let problem = match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < end => None,
            Ok(None) => Some(anyhow!("{command:?} did not finish within {deadline:?}")),
            Err(error) => Some(anyhow!(error).context(format!("waiting for {command:?}"))),
        };
        if let Some(problem) = problem {
            let _ = child.kill();
            let _ = child.wait();
            return Err(problem);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    };
    let stdout = stdout.join().map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = stderr.join().map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok(Output { status, stdout, stderr })
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_etcdctl_output() {
        assert_eq!(base64_decode("L2EvYg==").unwrap(), b"/a/b");
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("dg==").unwrap(), b"v");
        assert_eq!(base64_decode("LXdlaXJk").unwrap(), b"-weird");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a*b").is_err());
    }
}
