//! The console: `somcast manifest create` and `somcast task start | status
//! | cancel`, talking to agents' control APIs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cache::now_unix;
use crate::cli::{KeyCommand, ManifestCommand, OrderArgs, TargetsRef, TaskCommand};
use crate::manifest::Manifest;
use crate::trust::issue::{self, TaskOrder};
use crate::trust::{Action, Bundle, ControlAction, Signer};

pub fn manifest(cmd: &ManifestCommand) -> anyhow::Result<bool> {
    let ManifestCommand::Create {
        file,
        url,
        out,
        sign,
    } = cmd;
    let signer = sign.as_deref().map(Signer::load).transpose()?;
    let m = Manifest::create(file, url.clone())?;
    let out = out.clone().unwrap_or_else(|| {
        let mut name = file.file_name().unwrap_or_default().to_os_string();
        name.push(".somcast.json");
        file.with_file_name(name)
    });
    let env = issue::manifest(&m, signer.as_ref())?;
    // A signed manifest is written as its envelope; an unsigned one as the
    // plain manifest, as before.
    let bytes = match &signer {
        Some(_) => serde_json::to_vec_pretty(&env)?,
        None => env.document.into_bytes(),
    };
    std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "{}: content {} ({} bytes, {} blocks) -> {}{}",
        file.display(),
        m.content_id,
        m.size,
        m.block_hashes.len(),
        out.display(),
        signer
            .map(|s| format!(", signed by key {}", s.public.id))
            .unwrap_or_default()
    );
    Ok(true)
}

/// `somcast topology sign|show`.
pub fn topology(cmd: &crate::cli::TopologyCommand) -> anyhow::Result<bool> {
    use crate::cli::TopologyCommand;
    use crate::topology::SitesFile;
    use crate::trust::Envelope;
    match cmd {
        TopologyCommand::Sign {
            sites,
            sign,
            out,
            valid,
            channel,
        } => {
            let signer = Signer::load(sign)?;
            let text = std::fs::read_to_string(sites)
                .with_context(|| format!("reading {}", sites.display()))?;
            let file: SitesFile = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a sites file", sites.display()))?;
            let n = file.sites.len();
            let doc = crate::topology::document(file.sites, now_unix(), valid.as_secs())
                .map_err(|e| anyhow::anyhow!("{}: {e}", sites.display()))?;
            let env = Envelope::sign(serde_json::to_string_pretty(&doc)?, &signer, "topology")?;
            std::fs::write(out, serde_json::to_vec_pretty(&env)?)
                .with_context(|| format!("writing {}", out.display()))?;
            if let Some(dir) = channel {
                crate::channel::topology(dir, &doc.id, &env)?;
            }
            eprintln!(
                "topology {}: {n} site(s), signed by key {} -> {}{}",
                doc.id,
                signer.public.id,
                out.display(),
                channel
                    .as_ref()
                    .map(|d| format!(", and on the channel {}", d.display()))
                    .unwrap_or_default()
            );
            Ok(true)
        }
        TopologyCommand::Show { file, trust, addr } => show_topology(file, trust, *addr),
    }
}

/// `somcast topology show`: the sites of a signed topology (its signature
/// checked against `trust`, if given), and where `addr` falls.
fn show_topology(
    file: &std::path::Path,
    trust: &[std::path::PathBuf],
    addr: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<bool> {
    use crate::topology::{Topology, TopologyDoc};
    use crate::trust::Envelope;
    let env: Envelope = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("{}: not a signed document", file.display()))?;
    let mut keys = Vec::new();
    for p in trust {
        keys.extend(crate::trust::keys::read_public(p)?);
    }
    let dir = tempfile::tempdir()?;
    let gate = crate::trust::Gate::open(keys, trust.is_empty(), dir.path())?;
    let t = Topology::open(&env, &gate, now_unix())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let doc: TopologyDoc = crate::trust::document::parse(&env, crate::topology::TOPOLOGY_TYPE)?;
    if trust.is_empty() {
        eprintln!("(signature not checked: give --trust NAME.pub)");
    }
    println!("topology {} (expires at unix {})", t.id, doc.expires);
    for s in t.sites() {
        println!(
            "  {:<20} {:<5} parent {:<12} subnets {}  rendezvous {}",
            s.name,
            s.kind.as_str(),
            s.parent.as_deref().unwrap_or("-"),
            s.subnets.join(","),
            if s.rendezvous.is_empty() {
                "-".into()
            } else {
                s.rendezvous.join(",")
            }
        );
    }
    if let Some(a) = addr {
        match t.place(a, crate::topology::DEFAULT_REPAIR_PORT) {
            Some(p) => println!("{a}: {}", serde_json::to_string(&p)?),
            None => println!("{a}: in no site (its subnet on its own)"),
        }
    }
    Ok(true)
}

/// `somcast key generate NAME`.
pub fn key(cmd: &KeyCommand) -> anyhow::Result<bool> {
    let KeyCommand::Generate { name, fleet } = cmd;
    if *fleet {
        let (path, id) = crate::trust::keys::generate_fleet_file(name)?;
        eprintln!(
            "fleet key {id:04x}: {} (give it to every agent with --fleet-key; anyone who holds it speaks for the fleet on the LAN)",
            path.display()
        );
        return Ok(true);
    }
    let (key, public, signer) = crate::trust::keys::generate_files(name)?;
    eprintln!(
        "key {}: secret {} (keep it offline; never share it), public {} (give it to agents with --trust)",
        signer.public.id,
        key.display(),
        public.display()
    );
    Ok(true)
}

pub fn task(cmd: &TaskCommand) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(task_async(cmd))
}

struct Console {
    http: reqwest::Client,
    token: Option<String>,
    agents: Vec<String>,
}

impl Console {
    fn new(t: TargetsRef<'_>) -> anyhow::Result<Self> {
        let mut agents: Vec<String> = t.agents.to_vec();
        if let Some(f) = t.agents_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the agent list {}", f.display()))?;
            agents.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        if agents.is_empty() {
            bail!("no agents: give --agent URL (repeatable) or --agents FILE");
        }
        for a in &mut agents {
            if !a.starts_with("http://") && !a.starts_with("https://") {
                *a = format!("http://{a}");
            }
            while a.ends_with('/') {
                a.pop();
            }
        }
        Ok(Self {
            http: crate::fetch::client(),
            token: t.token.map(str::to_string),
            agents,
        })
    }

    async fn call(
        &self,
        agent: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{agent}{path}"))
            .timeout(Duration::from_secs(15));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{agent}: no answer"))?;
        let code = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
        Ok((code, v))
    }
}

async fn load_manifest(
    http: &reqwest::Client,
    src: &str,
) -> anyhow::Result<(crate::trust::Envelope, Manifest)> {
    let bytes = if src.starts_with("http://") || src.starts_with("https://") {
        let r = http
            .get(src)
            .send()
            .await
            .with_context(|| format!("fetching {src}"))?;
        if !r.status().is_success() {
            bail!("fetching {src}: HTTP {}", r.status());
        }
        r.bytes().await?.to_vec()
    } else {
        std::fs::read(Path::new(src)).with_context(|| format!("reading {src}"))?
    };
    issue::read_manifest(&bytes, src)
}

/// The task bundle `order` describes, signed when it names a key.
async fn make_bundle(http: &reqwest::Client, order: &OrderArgs) -> anyhow::Result<Bundle> {
    let Some(src) = &order.manifest else {
        bail!("no manifest: give --manifest FILE|URL (or --task TASK.json)");
    };
    let signer = order.sign.as_deref().map(Signer::load).transpose()?;
    let (env, _) = load_manifest(http, src).await?;
    let now = now_unix();
    let time = |s: &str, what: &str| {
        crate::units::parse_time(s, now).map_err(|e| anyhow::anyhow!("--{what}: {e}"))
    };
    let action = match (&order.run, order.cache_only) {
        (Some(c), _) => Action::Run {
            command: c.clone(),
            timeout_s: order.run_timeout.as_secs().max(1),
        },
        (None, true) => Action::CacheOnly {
            pin_days: order.pin_days,
        },
        (None, false) => Action::Fetch,
    };
    let task_order = TaskOrder {
        id: order.id.clone(),
        action,
        delay_ms: order.delay.as_millis() as u64,
        rate_bps: order.rate,
        priority: order.priority,
        not_before: order
            .not_before
            .as_deref()
            .map(|s| time(s, "not-before"))
            .transpose()?,
        expires: time(&order.expires, "expires")?,
        manifest_url: src.starts_with("http").then(|| src.clone()),
        encrypt: order.encrypt,
        targets: Some(crate::trust::targets::Targets {
            subnets: order.target_subnets.clone(),
            tags: order.target_tags.clone(),
            hosts: order.target_hosts.clone(),
            nodes: order.target_nodes.clone(),
        }),
        report_url: order.report_url.clone(),
    };
    issue::task(env, &task_order, signer.as_ref(), now)
}

/// The id inside a bundle's task document.
/// A task document file, as `task sign` writes it.
fn read_bundle(path: &std::path::Path) -> anyhow::Result<Bundle> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice::<Bundle>(&bytes)
        .with_context(|| format!("{} is not a task document", path.display()))
}

fn bundle_id(b: &Bundle) -> anyhow::Result<String> {
    let doc: crate::trust::TaskDoc =
        crate::trust::document::parse(&b.task, crate::trust::document::TASK_TYPE)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(doc.id)
}

/// `task sign`: writes the signed task (and its manifest) to `out`.
async fn sign_task(order: &crate::cli::OrderArgs, out: &Path) -> anyhow::Result<bool> {
    if order.sign.is_none() {
        bail!("task sign needs --sign NAME.key (make one with `somcast key generate NAME`)");
    }
    let b = make_bundle(&crate::fetch::client(), order).await?;
    let id = bundle_id(&b)?;
    std::fs::write(out, serde_json::to_vec_pretty(&b)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("task {id} -> {}", out.display());
    println!("{id}");
    Ok(true)
}

/// `task status --reports`: the agents' reports summed up.
async fn status_from_reports(id: &str, src: &str, json: bool) -> anyhow::Result<bool> {
    let reports = crate::report::load(src, id).await?;
    if reports.is_empty() {
        bail!("no reports of task {id} in {src}");
    }
    let s = crate::report::summarize(id, &reports);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        crate::report::print(&s);
    }
    Ok(s.by_state.get("done") == Some(&s.agents))
}

/// `task status`: each target agent asked.
async fn status_from_agents(
    id: &str,
    targets: &crate::cli::Targets,
    json: bool,
) -> anyhow::Result<bool> {
    let c = Console::new(targets.as_ref())?;
    let statuses = poll(&c, id).await;
    if json {
        let v: Vec<Value> = statuses
            .iter()
            .map(|(a, s)| json!({ "agent": a, "status": s }))
            .collect();
        println!("{}", Value::Array(v));
    } else {
        print_table(&statuses);
    }
    Ok(statuses.values().all(|s| s["state"] == "done"))
}

/// `task publish`: a signed task onto a channel directory.
async fn publish(
    channel: &Path,
    task: Option<&Path>,
    order: &crate::cli::OrderArgs,
) -> anyhow::Result<bool> {
    let bundle = match task {
        Some(path) => read_bundle(path)?,
        None if order.sign.is_none() => bail!(
            "agents take from a channel only signed tasks: give --sign NAME.key (or --task TASK.json from `task sign`)"
        ),
        None => make_bundle(&crate::fetch::client(), order).await?,
    };
    if bundle.task.signature.is_none() {
        bail!("the task is unsigned: agents take from a channel only signed tasks");
    }
    let id = bundle_id(&bundle)?;
    crate::channel::publish(channel, &id, &bundle)?;
    eprintln!("task {id} published on {}", channel.display());
    println!("{id}");
    Ok(true)
}

async fn task_async(cmd: &TaskCommand) -> anyhow::Result<bool> {
    match cmd {
        TaskCommand::Sign { order, out } => sign_task(order, out).await,
        TaskCommand::Start {
            targets,
            task,
            order,
            wait,
            timeout,
        } => start_task(targets.as_ref(), task.as_deref(), order, *wait, *timeout).await,
        TaskCommand::Status {
            id,
            targets: _,
            reports: Some(src),
            json,
        } => status_from_reports(id, src, *json).await,
        TaskCommand::Status {
            id, targets, json, ..
        } => status_from_agents(id, targets, *json).await,
        TaskCommand::Publish {
            channel,
            task,
            order,
        } => publish(channel, task.as_deref(), order).await,
        TaskCommand::Withdraw { id, channel, sign } => {
            let order = channel_order(ControlAction::Cancel, id, channel, sign)?;
            crate::channel::withdraw(channel, id, &order)?;
            eprintln!("task {id} withdrawn from {}", channel.display());
            Ok(true)
        }
        TaskCommand::Cancel { id, targets, sign } => {
            control(ControlAction::Cancel, id, targets, sign.as_deref()).await
        }
        TaskCommand::Pause(hold) => pause_or_resume(ControlAction::Pause, hold).await,
        TaskCommand::Resume(hold) => pause_or_resume(ControlAction::Resume, hold).await,
    }
}

/// `task start`: the task to every target agent; with `wait`, their
/// progress until each is done or `timeout`. True when every agent took it
/// (and, waiting, finished it).
async fn start_task(
    targets: TargetsRef<'_>,
    task: Option<&Path>,
    order: &OrderArgs,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let c = Console::new(targets)?;
    if wait && c.token.is_none() {
        bail!(
            "--wait reads each agent's status, which needs the agents' API token: give --token (or SOMCAST_TOKEN); nothing was sent"
        );
    }
    let bundle = match task {
        Some(path) => read_bundle(path)?,
        None => make_bundle(&c.http, order).await?,
    };
    let id = bundle_id(&bundle)?;
    let body = serde_json::to_value(&bundle)?;
    let mut refused = 0;
    for a in &c.agents {
        match c
            .call(a, reqwest::Method::POST, "/v1/tasks", Some(&body))
            .await
        {
            Ok((201, _)) => {}
            Ok((code, v)) => {
                refused += 1;
                eprintln!(
                    "{a}: refused ({code}): {}",
                    v["error"].as_str().unwrap_or("?")
                );
            }
            Err(e) => {
                refused += 1;
                eprintln!("{a}: {}", crate::error_text(e.as_ref()));
            }
        }
    }
    println!("{id}");
    if refused == c.agents.len() {
        bail!("no agent took the task");
    }
    if !wait {
        return Ok(refused == 0);
    }
    let ok = watch(&c, &id, timeout).await?;
    Ok(ok && refused == 0)
}

/// A signed order about task `id` on `channel`, valid as long as the task:
/// an agent that could still start it must still take the order.
fn channel_order(
    action: ControlAction,
    id: &str,
    channel: &Path,
    sign: &Path,
) -> anyhow::Result<crate::trust::Envelope> {
    let signer = Signer::load(sign)?;
    let now = now_unix();
    let until = crate::channel::task_expires(channel, id)
        .unwrap_or(now + crate::trust::document::MAX_VALIDITY_S)
        .max(now + 3600);
    issue::control_until(action, id, Some(&signer), now, until)
}

/// A pause or resume: on the channel when one is given, else to the
/// target agents.
async fn pause_or_resume(
    action: ControlAction,
    hold: &crate::cli::HoldArgs,
) -> anyhow::Result<bool> {
    let id = hold.id.as_str();
    let (Some(channel), Some(sign)) = (&hold.channel, &hold.sign) else {
        return control(action, id, &hold.targets, hold.sign.as_deref()).await;
    };
    let order = channel_order(action, id, channel, sign)?;
    let doc: crate::trust::ControlDoc =
        crate::trust::document::parse(&order, crate::trust::document::CONTROL_TYPE)?;
    crate::channel::order(channel, id, &doc.id, &order)?;
    eprintln!("task {id}: {action:?} put on {}", channel.display());
    Ok(true)
}

/// Sends a (signed) order about task `id` to every target agent: cancel,
/// pause or resume. Whether every agent took it.
async fn control(
    action: ControlAction,
    id: &str,
    targets: &crate::cli::Targets,
    sign: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let c = Console::new(targets.as_ref())?;
    let signer = sign.map(Signer::load).transpose()?;
    let order = issue::control(action, id, signer.as_ref(), now_unix())?;
    let body = Some(serde_json::to_value(&order)?);
    let (verb, doing) = match action {
        ControlAction::Cancel => ("cancel", "cancelling"),
        ControlAction::Pause => ("pause", "paused"),
        ControlAction::Resume => ("resume", "resumed"),
    };
    let mut ok = true;
    for a in &c.agents {
        match c
            .call(
                a,
                reqwest::Method::POST,
                &format!("/v1/tasks/{id}/{verb}"),
                body.as_ref(),
            )
            .await
        {
            Ok((200, _)) => println!("{a}: {doing}"),
            Ok((code, v)) => {
                ok = false;
                println!("{a}: {code} {}", v["error"].as_str().unwrap_or("?"));
            }
            Err(e) => {
                ok = false;
                println!("{a}: {}", crate::error_text(e.as_ref()));
            }
        }
    }
    Ok(ok)
}

/// Every agent's status of task `id` (an error object for agents that do
/// not answer).
async fn poll(c: &Console, id: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for a in &c.agents {
        let v = match c
            .call(a, reqwest::Method::GET, &format!("/v1/tasks/{id}"), None)
            .await
        {
            Ok((200, v)) => v,
            Ok((code, v)) => {
                json!({ "state": "unknown", "error": format!("{code}: {}", v["error"].as_str().unwrap_or("?")) })
            }
            Err(e) => json!({ "state": "unreachable", "error": crate::error_text(e.as_ref()) }),
        };
        out.insert(a.clone(), v);
    }
    out
}

fn terminal(s: &Value) -> bool {
    matches!(
        s["state"].as_str(),
        Some("done" | "failed" | "cancelled" | "unknown")
    )
}

/// Follows the task on every agent until all have ended: on a terminal a
/// bar per agent (blocks, role, state, bytes by source); otherwise a line
/// whenever an agent's role, state or tenth of progress changes.
async fn watch(c: &Console, id: &str, timeout: Duration) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:<28} [{bar:30}] {pos:>4}/{len:<4} {msg}")
            .expect("a constant template parses")
            .progress_chars("=> ");
    let bars: BTreeMap<String, indicatif::ProgressBar> = if tty {
        c.agents
            .iter()
            .map(|a| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(a.trim_start_matches("http://").to_string());
                (a.clone(), bar)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let statuses = poll(c, id).await;
        for (a, s) in &statuses {
            let (done, count) = (
                s["blocks_done"].as_u64().unwrap_or(0),
                s["block_count"].as_u64().unwrap_or(0),
            );
            let mut msg = format!(
                "{} {} (multicast {}, peers {}, origin {})",
                s["role"].as_str().unwrap_or("-"),
                s["state"].as_str().unwrap_or("?"),
                crate::units::human_bytes(s["bytes"]["multicast"].as_u64().unwrap_or(0)),
                crate::units::human_bytes(s["bytes"]["peers"].as_u64().unwrap_or(0)),
                crate::units::human_bytes(s["bytes"]["origin"].as_u64().unwrap_or(0)),
            );
            if s["state"] == "sending"
                && let Some(rate) = s["multicast"]["rate_bps"].as_u64()
            {
                msg += &format!(
                    ", multicasting at {} Mbit/s: {}",
                    rate / 1_000_000,
                    s["multicast"]["rate_reason"].as_str().unwrap_or("-")
                );
            }
            if let Some(bar) = bars.get(a) {
                bar.set_length(count);
                bar.set_position(done);
                bar.set_message(msg);
            } else {
                let key = format!(
                    "{} {} {}",
                    s["role"].as_str().unwrap_or("-"),
                    s["state"].as_str().unwrap_or("?"),
                    (done * 10).checked_div(count).unwrap_or(0)
                );
                if last.get(a) != Some(&key) {
                    eprintln!(
                        "[{:>6.1}s] {a}: {done}/{count} blocks, {msg}",
                        t0.elapsed().as_secs_f64()
                    );
                    last.insert(a.clone(), key);
                }
            }
        }
        let ended = statuses.values().filter(|s| terminal(s)).count();
        if ended == statuses.len() || t0.elapsed() > timeout {
            for bar in bars.values() {
                bar.finish();
            }
            print_table(&statuses);
            if ended < statuses.len() {
                bail!("not finished within {timeout:?}: {}", summary(&statuses));
            }
            return Ok(statuses.values().all(|s| s["state"] == "done"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn summary(statuses: &BTreeMap<String, Value>) -> String {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for s in statuses.values() {
        *by_state
            .entry(s["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    by_state
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per site (when agents are in a topology): agents by state, and bytes
/// from the origin and from rendezvous points: one download per site
/// shows as origin bytes of about one package.
fn print_sites(statuses: &BTreeMap<String, Value>) {
    #[derive(Default)]
    struct Site {
        states: BTreeMap<String, usize>,
        origin: u64,
        rendezvous: u64,
    }
    let mut sites: BTreeMap<&str, Site> = BTreeMap::new();
    for s in statuses.values() {
        let Some(name) = s["site"].as_str() else {
            continue;
        };
        let site = sites.entry(name).or_default();
        *site
            .states
            .entry(s["state"].as_str().unwrap_or("?").into())
            .or_default() += 1;
        site.origin += s["bytes"]["origin"].as_u64().unwrap_or(0);
        site.rendezvous += s["bytes"]["rendezvous"].as_u64().unwrap_or(0);
    }
    if sites.is_empty() {
        return;
    }
    println!(
        "{:<20} {:>12} {:>12}  states",
        "site", "origin", "rendezvous"
    );
    for (name, site) in &sites {
        let states: Vec<String> = site
            .states
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        println!(
            "{name:<20} {:>12} {:>12}  {}",
            site.origin,
            site.rendezvous,
            states.join(", ")
        );
    }
}

fn print_table(statuses: &BTreeMap<String, Value>) {
    println!(
        "{:<28} {:<15} {:<11} {:>9} {:>12} {:>12} {:>12} {:>8}  error",
        "agent", "role", "state", "blocks", "multicast", "peers", "origin", "seconds"
    );
    for (a, s) in statuses {
        println!(
            "{:<28} {:<15} {:<11} {:>9} {:>12} {:>12} {:>12} {:>8}  {}",
            a,
            s["role"].as_str().unwrap_or("-"),
            s["state"].as_str().unwrap_or("?"),
            format!(
                "{}/{}",
                s["blocks_done"].as_u64().unwrap_or(0),
                s["block_count"].as_u64().unwrap_or(0)
            ),
            s["bytes"]["multicast"].as_u64().unwrap_or(0),
            s["bytes"]["peers"].as_u64().unwrap_or(0),
            s["bytes"]["origin"].as_u64().unwrap_or(0),
            s["seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            s["error"].as_str().unwrap_or("")
        );
    }
    print_sites(statuses);
}
