//! `somcast demo`: the whole flow on loopback, in one process and without
//! root: an origin (`somcast serve`), N agents with caches of their own on a
//! private control group, one task to all of them. Prints each agent's role
//! and time, and the origin's bytes against the package size.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::agent::admit;
use crate::agent::task::{self, State};
use crate::agent::{AgentConfig, Running};
use crate::cache::now_unix;
use crate::cli::DemoArgs;
use crate::demo::{generate_file, private_group};
use crate::manifest::Manifest;
use crate::trust::issue::{self, TaskOrder};
use crate::trust::{Action, Signer};
use crate::units::human_bytes;

pub fn run(dir: &Path, args: &DemoArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(flow(dir, args))
}

async fn flow(dir: &Path, args: &DemoArgs) -> anyhow::Result<bool> {
    let origin = Origin::start(dir, args.size).await?;
    // The demo is its own publisher: a key of its own, trusted by its
    // agents, and a signed task, as in production.
    let publisher = Signer::generate()?;
    // And a fleet key of its own: every datagram and repair connection of
    // the demo's agents is authenticated.
    let fleet = multicast::auth::FleetKeys::new(vec![multicast::auth::FleetKey::from_secret(
        &multicast::auth::new_secret(),
    )]);
    let group = private_group();
    let control = std::net::SocketAddrV4::new(*group.ip(), group.port().wrapping_add(1).max(1024));
    if !args.json {
        eprintln!(
            "demo: origin http://{}/, {} agents on loopback (control group {control}), a {} package, startup delay {:?}",
            origin.addr,
            args.agents,
            human_bytes(args.size),
            args.delay
        );
        eprintln!(
            "demo: the task is signed by publisher key {} (the only key the agents trust); their LAN traffic is sealed with a fleet key of the demo's own",
            publisher.public.id
        );
    }
    let mut agents: Vec<Running> = Vec::new();
    for i in 0..args.agents {
        let config = agent_config(dir, i, args, control, &publisher, &fleet)?;
        agents.push(crate::agent::start(config).await?);
    }
    let t0 = Instant::now();
    let bundle = signed_task(&origin.manifest, args, &publisher)?;
    for a in &agents {
        admit::task(&a.agent, bundle.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let statuses = wait_for(&agents, t0 + Duration::from_secs(120) + args.delay).await;
    let served = origin_bytes(origin.addr).await.unwrap_or(0);
    let mut identical = 0;
    for s in &statuses {
        if let Some(p) = &s.path
            && files_equal(Path::new(p), &origin.file)?
        {
            identical += 1;
        }
    }
    let ok = statuses.len() == agents.len()
        && statuses.iter().all(|s| s.state == State::Done)
        && identical == statuses.len();
    let outcome = Outcome {
        statuses,
        served,
        identical,
        ok,
    };
    if args.json {
        outcome.print_json(args.size);
    } else {
        outcome.print_table(args.size);
    }
    for a in agents {
        a.stop().await?;
    }
    origin.task.abort();
    Ok(ok)
}

/// The demo's origin: a `somcast serve` of a generated package on loopback.
struct Origin {
    addr: std::net::SocketAddr,
    file: std::path::PathBuf,
    manifest: Manifest,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Origin {
    async fn start(dir: &Path, size: u64) -> anyhow::Result<Origin> {
        let origin_dir = dir.join("origin");
        std::fs::create_dir_all(&origin_dir)?;
        let file = origin_dir.join("package.msi");
        generate_file(&file, size, 42).context("generating the demo package")?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            axum::serve(listener, crate::serve::router(&origin_dir, 0, None)).await
        });
        let url = format!("http://{addr}/package.msi");
        let manifest = {
            let file = file.clone();
            tokio::task::spawn_blocking(move || Manifest::create(&file, vec![url])).await??
        };
        Ok(Origin {
            addr,
            file,
            manifest,
            task,
        })
    }
}

/// Agent `i`'s configuration: loopback, a cache of its own, the demo's
/// control group, publisher and fleet key.
fn agent_config(
    dir: &Path,
    i: u32,
    args: &DemoArgs,
    control: std::net::SocketAddrV4,
    publisher: &Signer,
    fleet: &Option<multicast::auth::FleetKeys>,
) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig {
        iface: Some("127.0.0.1".into()),
        cache: dir.join(format!("agent-{i}")),
        api: "127.0.0.1:0".parse()?,
        token: Some(format!("demo-token-{}", multicast::driver::random_id())),
        control_group: control,
        presence_interval: Duration::from_secs(1),
        preference: 0,
        rate_bps: args.rate,
        rate_set: true,
        rate_min_bps: crate::agent::config::DEFAULT_RATE_MIN,
        rate_mode: multicast::rate::Mode::Background,
        repair_rate_bps: crate::agent::config::DEFAULT_REPAIR_RATE,
        lab_corrupt_repair: false,
        lab_drop_rate: 0.0,
        cache_max: u64::MAX,
        cache_min_free: 0,
        trusted_keys: vec![publisher.public.clone()],
        insecure_unsigned: false,
        fleet: fleet.clone(),
        encrypt: false,
        task_retention: crate::agent::config::DEFAULT_TASK_RETENTION,
        metrics: None,
        channel: None,
        poll: crate::agent::config::DEFAULT_POLL,
        tags: Vec::new(),
        topology: None,
    })
}

/// The demo's task, signed by its publisher: fetch the package.
fn signed_task(
    manifest: &Manifest,
    args: &DemoArgs,
    publisher: &Signer,
) -> anyhow::Result<crate::trust::Bundle> {
    let order = TaskOrder {
        id: Some("demo".into()),
        action: Action::Fetch,
        delay_ms: args.delay.as_millis() as u64,
        rate_bps: Some(args.rate),
        priority: 0,
        not_before: None,
        expires: now_unix() + 3600,
        manifest_url: None,
        encrypt: false,
        targets: None,
        report_url: None,
    };
    issue::task(
        issue::manifest(manifest, Some(publisher))?,
        &order,
        Some(publisher),
        now_unix(),
    )
}

/// Every agent's status of the demo task once all have ended, or as they
/// stand at `deadline`.
async fn wait_for(agents: &[Running], deadline: Instant) -> Vec<task::TaskStatus> {
    loop {
        let statuses: Vec<task::TaskStatus> = agents
            .iter()
            .filter_map(|a| a.agent.tasks().get("demo").map(|t| t.status.clone()))
            .collect();
        if statuses.iter().all(|s| s.state.is_terminal()) || Instant::now() > deadline {
            return statuses;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How the demo went.
struct Outcome {
    statuses: Vec<task::TaskStatus>,
    /// Bytes the origin sent.
    served: u64,
    /// Caches holding a byte-identical copy.
    identical: usize,
    ok: bool,
}

impl Outcome {
    fn print_json(&self, size: u64) {
        println!(
            "{}",
            json!({
                "agents": self.statuses,
                "package_bytes": size,
                "origin_bytes": self.served,
                "origin_ratio": self.served as f64 / size.max(1) as f64,
                "identical": self.identical,
                "ok": self.ok,
            })
        );
    }

    fn print_table(&self, size: u64) {
        let statuses = &self.statuses;
        println!("agent             role             state     seconds   multicast      origin");
        for s in statuses {
            println!(
                "{:<16}  {:<15}  {:<8}  {:>7.1}  {:>10}  {:>10}",
                s.node,
                s.role.as_deref().unwrap_or("-"),
                format!("{:?}", s.state).to_lowercase(),
                s.seconds.unwrap_or(f64::NAN),
                human_bytes(s.bytes.multicast),
                human_bytes(s.bytes.origin),
            );
        }
        println!(
            "origin sent {} for a {} package ({:.2}x): one download for {} agents; {}/{} caches hold a byte-identical copy",
            human_bytes(self.served),
            human_bytes(size),
            self.served as f64 / size.max(1) as f64,
            statuses.len(),
            self.identical,
            statuses.len()
        );
        if !self.ok {
            for s in statuses.iter().filter(|s| s.state != State::Done) {
                println!(
                    "{}: {}",
                    s.node,
                    s.error.as_deref().unwrap_or("not finished")
                );
            }
        }
    }
}

async fn origin_bytes(origin: std::net::SocketAddr) -> anyhow::Result<u64> {
    let body = crate::fetch::client()
        .get(format!("http://{origin}/stats"))
        .send()
        .await?
        .bytes()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(v["bytes_served"].as_u64().unwrap_or(0))
}

fn files_equal(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
