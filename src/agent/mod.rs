//! `somcast agent`: the daemon on every endpoint. For now it runs presence
//! on the subnet's control group and serves the control API; distribution
//! tasks build on both.

pub mod admit;
pub mod api;
pub mod channel;
pub mod config;
mod control;
pub mod metrics;
pub mod repair;
pub mod report;
pub mod site;
pub mod task;
pub mod tcp;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use std::collections::HashMap;

use multicast::wire::{AddrV4, Held};
use scanner::inventory::Inventory;
use scanner::{LocalNode, Presence, PresenceConfig, Subnet};
use tokio::sync::watch;

use crate::cache::{Cache, CacheLimits};
use crate::cli::AgentArgs;
pub use config::AgentConfig;

/// What the agent's tasks share.
pub struct Agent {
    pub node: u64,
    pub started: Instant,
    pub iface_name: Option<String>,
    pub iface_addr: Ipv4Addr,
    pub subnet: Option<Subnet>,
    pub config: AgentConfig,
    pub token: String,
    pub presence: Mutex<Presence>,
    pub cache: Cache,
    pub http: reqwest::Client,
    pub tasks: Mutex<task::Tasks>,
    pub elections: Mutex<HashMap<String, task::ElectionSlot>>,
    /// Wakes the control loop when an election is added.
    pub control_wake: tokio::sync::Notify,
    /// Which orders this agent acts on.
    pub gate: crate::trust::Gate,
    /// The fleet key(s) that seal LAN traffic; `None`: unauthenticated.
    pub fleet: Option<multicast::auth::FleetKeys>,
    /// One lock per content being worked on: tasks for the same content
    /// take turns, so the second finds the first's download in the cache.
    pub contents: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    /// Offers dropped as impossible (see `election::BadOffer`).
    pub offers_refused: std::sync::atomic::AtomicU64,
    /// Datagrams and repair connections dropped for want of the fleet key.
    pub auth: Arc<multicast::auth::AuthState>,
    /// What only the metrics count.
    pub counters: metrics::Counters,
    /// This host's name, for tasks that target hostnames.
    pub hostname: String,
    /// What the task channel's poller has seen, for the status.
    pub channel: Mutex<channel::Status>,
    /// Wakes the report sender when a report is queued.
    pub reports_wake: tokio::sync::Notify,
    /// The topology in force and this agent's site in it.
    pub site: Mutex<site::SiteState>,
    /// Who fetches each content through this agent as a rendezvous point.
    pub members: Mutex<::repair::members::Members>,
    /// What recent repair uploads got through, by requester: the next
    /// upload to one starts near it.
    pub upload_paths: Mutex<::repair::pace::PathMemory<std::net::IpAddr>>,
    /// The blocks of the files it serves that repair has hash-checked
    /// already (and the files verified whole on their way into the cache).
    pub checked_blocks: Mutex<repair::CheckedFiles>,
}

impl Agent {
    /// Locks the presence machine. A panic while it was held cannot leave
    /// it half-updated in a way that matters more than stopping would, so a
    /// poisoned lock is taken over.
    pub fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.presence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn tasks(&self) -> std::sync::MutexGuard<'_, task::Tasks> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn elections(&self) -> std::sync::MutexGuard<'_, HashMap<String, task::ElectionSlot>> {
        self.elections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lock of one content id (see `contents`); entries no task holds
    /// any more are dropped as new ones come, so the map stays as small as
    /// the number of contents in progress.
    pub fn content_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .contents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(lock) = map.get(id).and_then(std::sync::Weak::upgrade) {
            return lock;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(id.to_string(), Arc::downgrade(&lock));
        lock
    }

    /// The contents this agent holds, for its presence announcements: the
    /// newest tasks first.
    pub fn held(&self) -> Vec<Held> {
        let mut v: Vec<(u64, Held)> = self
            .tasks()
            .values()
            .filter_map(|t| {
                let held = t.holding.as_ref().filter(|h| h.blocks.done() > 0)?;
                let id = t.status.content_id.as_bytes();
                let mut content = [0u8; 8];
                for (i, c) in content.iter_mut().enumerate() {
                    let pair = std::str::from_utf8(id.get(2 * i..2 * i + 2)?).ok()?;
                    *c = u8::from_str_radix(pair, 16).ok()?;
                }
                Some((
                    t.status.created,
                    Held {
                        content,
                        blocks_done: held.blocks.done(),
                        block_count: held.blocks.count(),
                        have: ranges(&held.blocks),
                    },
                ))
            })
            .collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.0));
        v.dedup_by_key(|x| x.1.content);
        v.into_iter()
            .map(|x| x.1)
            .take(multicast::wire::MAX_HELD)
            .collect()
    }
}

/// HAVE ranges of a download's blocks; none when they do not fit in an
/// announcement.
fn ranges(blocks: &crate::blocks::Blocks) -> Vec<[u32; 2]> {
    let mut out = blocks.ranges();
    if out.len() > multicast::wire::MAX_RANGES {
        out.clear();
    }
    out
}

/// Parses settings, then runs the agent until SIGINT or SIGTERM.
pub fn main(args: &AgentArgs) -> anyhow::Result<bool> {
    let config = AgentConfig::load(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("somcast-agent")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config, shutdown_signal()))?;
    Ok(true)
}

/// Runs the agent until `shutdown` resolves: then it says goodbye to the
/// subnet and stops.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown.await;
    running.stop().await
}

/// A started agent: its state, its API address, and how to stop it.
pub struct Running {
    pub agent: Arc<Agent>,
    pub api: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Says goodbye to the subnet and stops the control loop and the API.
    pub async fn stop(self) -> anyhow::Result<()> {
        tracing::info!("agent {:016x} stopping", self.agent.node);
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.context("agent task")??;
        }
        Ok(())
    }
}

/// Starts an agent on the current tokio runtime.
pub async fn start(config: AgentConfig) -> anyhow::Result<Running> {
    make_private_dir(&config.cache)
        .with_context(|| format!("creating cache directory {}", config.cache.display()))?;
    let (node, note) = scanner::node::load_or_create(&config.cache, multicast::driver::random_id)
        .with_context(|| format!("node id in {}", config.cache.display()))?;
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    let token = load_token(&config)?;
    let gate = crate::trust::Gate::open(
        config.trusted_keys.clone(),
        config.insecure_unsigned,
        &config.cache,
    )
    .context("opening the replay ledger")?;
    announce_trust(&gate);
    announce_fleet(&config);
    let iface_addr = crate::lab::pick_iface(config.iface.as_deref())?;
    let (iface_name, prefix) = describe_iface(iface_addr);
    let subnet = prefix.map(|p| Subnet::of(iface_addr, p));
    let (listener, api_addr, repair_listener) = bind(&config, iface_addr).await?;
    let me = local_node(node, iface_addr, prefix, api_addr, &repair_listener)?;
    let presence = presence_of(&config, me, subnet);
    let agent = Arc::new(Agent {
        node,
        started: Instant::now(),
        iface_name: iface_name.clone(),
        iface_addr,
        subnet,
        presence: Mutex::new(presence),
        cache: open_cache(&config)?,
        http: crate::fetch::client(),
        tasks: Mutex::new(HashMap::new()),
        elections: Mutex::new(HashMap::new()),
        control_wake: tokio::sync::Notify::new(),
        gate,
        fleet: config.fleet.clone(),
        auth: Arc::default(),
        offers_refused: Default::default(),
        counters: Default::default(),
        hostname: hostname(),
        channel: Default::default(),
        reports_wake: tokio::sync::Notify::new(),
        site: Mutex::default(),
        members: Mutex::default(),
        upload_paths: Mutex::default(),
        checked_blocks: Mutex::default(),
        contents: Mutex::new(HashMap::new()),
        config,
        token,
    });
    site::load(&agent)?;
    task::restore(&agent);
    task::prune(&agent, crate::cache::now_unix());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sockets = control::open(&agent)?;
    tracing::info!(
        "agent {node:016x} on {} ({iface_addr}{}), control group {}, control API on http://{api_addr}",
        iface_name.as_deref().unwrap_or("?"),
        subnet.map(|s| format!(", subnet {s}")).unwrap_or_default(),
        agent.config.control_group,
    );
    let tasks = spawn_services(&agent, sockets, listener, repair_listener, stop_rx).await?;
    Ok(Running {
        agent,
        api: api_addr,
        stop: stop_tx,
        tasks,
    })
}

/// What this agent announces of itself: its address on the interface and
/// the ports of its API and its repair server.
fn local_node(
    node: u64,
    iface_addr: Ipv4Addr,
    prefix: Option<u8>,
    api_addr: SocketAddr,
    repair_listener: &tokio::net::TcpListener,
) -> anyhow::Result<LocalNode> {
    Ok(LocalNode {
        node,
        version: env!("CARGO_PKG_VERSION").into(),
        addrs: vec![AddrV4 {
            addr: iface_addr.octets(),
            prefix: prefix.unwrap_or(32),
        }],
        api_port: api_addr.port(),
        repair_port: repair_listener.local_addr()?.port(),
        rank: Default::default(),
        held: Vec::new(),
    })
}

/// This agent's presence on its subnet, announcing `me`.
fn presence_of(config: &AgentConfig, me: LocalNode, subnet: Option<Subnet>) -> Presence {
    let cfg = PresenceConfig {
        interval: config.presence_interval,
        ..PresenceConfig::default()
    };
    Presence::new(
        cfg,
        me,
        subnet,
        Instant::now(),
        multicast::driver::random_id(),
    )
}

/// The agent's cache, within its configured limits.
fn open_cache(config: &AgentConfig) -> anyhow::Result<Cache> {
    let limits = CacheLimits {
        max_bytes: config.cache_max,
        min_free_bytes: config.cache_min_free,
    };
    Cache::open(&config.cache, limits)
        .with_context(|| format!("opening the cache in {}", config.cache.display()))
}

/// Says whether LAN traffic is sealed, and with which fleet key.
fn announce_fleet(config: &AgentConfig) {
    match &config.fleet {
        Some(k) => tracing::info!(
            "LAN traffic sealed with fleet key {}",
            k.ids()
                .iter()
                .map(|i| format!("{i:04x}"))
                .collect::<Vec<_>>()
                .join(", then ")
        ),
        None => tracing::warn!(
            "no fleet key: this agent's LAN traffic (presence, election, multicast, repair) is unauthenticated; give one with --fleet-key NAME.fleet"
        ),
    }
}

/// The control API's listener and address, and peer repair's listener: on
/// the interface's address, on the API port + 1 when free (predictable
/// for firewalls), else on any port (presence announces which).
async fn bind(
    config: &AgentConfig,
    iface_addr: std::net::Ipv4Addr,
) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr, tokio::net::TcpListener)> {
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| {
            format!(
                "binding the control API to {} (is another agent running?)",
                config.api
            )
        })?;
    let api_addr: SocketAddr = listener.local_addr()?;
    // Peer repair listens on the interface's address, on the API port + 1
    // when free (predictable for firewalls), else on any port: presence
    // announces which.
    let repair_listener =
        match tokio::net::TcpListener::bind((iface_addr, api_addr.port().wrapping_add(1))).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind((iface_addr, 0))
                .await
                .context("binding the peer repair port")?,
        };
    Ok((listener, api_addr, repair_listener))
}

/// The agent's loops: the control group, peer repair, reports, the
/// channel (if any), metrics (if asked for), the API.
async fn spawn_services(
    agent: &Arc<Agent>,
    sockets: control::Sockets,
    listener: tokio::net::TcpListener,
    repair_listener: tokio::net::TcpListener,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let control_task = tokio::spawn(control::run(agent.clone(), sockets, stop_rx.clone()));
    let repair_task = tokio::spawn(repair::serve(
        repair_listener,
        agent.clone(),
        stop_rx.clone(),
    ));
    let mut tasks = vec![control_task, repair_task];
    // Reports queued before a restart go out at once.
    agent.reports_wake.notify_one();
    tasks.push(tokio::spawn(report::run(agent.clone(), stop_rx.clone())));
    if agent.config.channel.is_some() {
        tasks.push(tokio::spawn(channel::run(agent.clone(), stop_rx.clone())));
    }
    if let Some(addr) = agent.config.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        tasks.push(tokio::spawn(api::serve_metrics(
            l,
            agent.clone(),
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(api::serve(listener, agent.clone(), stop_rx)));
    Ok(tasks)
}

/// Says at start which orders the agent will act on; the lab mode and a
/// keyless agent say it as a warning.
fn announce_trust(gate: &crate::trust::Gate) {
    let ids: Vec<String> = gate.keys().iter().map(|k| k.id.to_string()).collect();
    if gate.insecure() {
        tracing::warn!(
            "INSECURE LAB MODE (--insecure-unsigned): this agent acts on UNSIGNED tasks from anyone who holds the API token; never use it outside a lab"
        );
    } else if ids.is_empty() {
        tracing::warn!(
            "no trusted publisher key: every task will be refused; give one with --trust KEY.pub"
        );
    } else {
        tracing::info!("acting on tasks signed by key(s) {}", ids.join(", "));
    }
}

/// The interface's name and prefix length, where the inventory knows them.
fn describe_iface(addr: Ipv4Addr) -> (Option<String>, Option<u8>) {
    let Ok(inv) = Inventory::scan() else {
        return (None, None);
    };
    for i in &inv.interfaces {
        for a in &i.addresses {
            if a.addr == std::net::IpAddr::V4(addr) {
                return (Some(i.name.clone()), Some(a.prefix_len));
            }
        }
    }
    (None, None)
}

/// The configured token, or the one kept in `<cache>/api-token`, created on
/// first start (readable by its owner only).
fn load_token(config: &AgentConfig) -> anyhow::Result<String> {
    if let Some(t) = &config.token {
        return Ok(t.clone());
    }
    let path = config.cache.join("api-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 8 {
            return Ok(t);
        }
    }
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("the OS random source: {e}"))?;
    let t = crate::lab::hex(&raw);
    write_private(&path, &t).with_context(|| format!("writing {}", path.display()))?;
    tracing::warn!(
        "no --token given: the control API token is in {}",
        path.display()
    );
    Ok(t)
}

/// Replaces `path` with `text`: a temporary file created readable by its
/// owner only (0600 from its first byte, where there are modes), synced,
/// then renamed over `path`.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The cache holds task files with their commands, the API token and the
/// replay ledger: readable by the agent's user only.
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The host's name ("" when it cannot be read).
fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if r == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        String::new()
    }
    #[cfg(not(unix))]
    {
        std::env::var("COMPUTERNAME").unwrap_or_default()
    }
}

impl Agent {
    /// What tasks' targets are matched against.
    pub fn identity(&self) -> crate::trust::targets::Identity {
        crate::trust::targets::Identity {
            addr: self.iface_addr,
            tags: self.config.tags.clone(),
            hostname: self.hostname.clone(),
            node: self.node,
        }
    }
}

/// Resolves on SIGINT, and on SIGTERM where there is one.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `d` scaled by a random factor in [1 - `spread`, 1 + `spread`): agents
/// that started together do not all ask at one moment.
pub(crate) fn jittered(d: std::time::Duration, spread: f64) -> std::time::Duration {
    let r = (multicast::driver::random_id() % 1_000_000) as f64 / 1_000_000.0;
    d.mul_f64(1.0 - spread + 2.0 * spread * r)
}
