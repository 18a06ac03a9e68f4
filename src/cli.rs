//! Command line: one subcommand per job.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::units::{parse_duration, parse_rate, parse_size};

/// The default lab group: administratively scoped (239.192.0.0/14 is the
/// organization-local scope of RFC 2365), so it stays inside the site.
pub const DEFAULT_GROUP: &str = "239.192.0.1:7400";
/// The control group agents announce themselves on (same scope).
pub const DEFAULT_CONTROL_GROUP: &str = "239.192.0.2:7479";

#[derive(Debug, Parser)]
#[command(
    name = "somcast",
    version,
    about = "Self-organizing subnet multicast for software packages",
    long_about = "Self-organizing subnet multicast for software packages.\n\n\
                  Lab commands: `somcast send` and `somcast recv` move one file over \
                  IP multicast with RaptorQ fountain coding; `somcast demo` shows it on \
                  loopback with no root and no network."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send one file to a multicast group (lab).
    Send(SendArgs),
    /// Receive one file from a multicast group (lab).
    Recv(RecvArgs),
    /// A generated file sent to several receivers over loopback multicast.
    Demo(DemoArgs),
    /// This host's interfaces, subnets, multicast interface and kernel
    /// limits; with --probe, the agents that answer on this subnet.
    Scan(ScanArgs),
    /// The daemon on every endpoint: presence, tasks, control API.
    Agent(AgentArgs),
    /// Publisher keys (sign what agents act on).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Describe a package for distribution.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Start, watch and cancel distribution tasks on agents (console).
    #[command(subcommand)]
    Task(TaskCommand),
    /// A lab origin: serves a directory over HTTP with Range support.
    Serve(ServeArgs),
    /// The agent as a Windows service: install, uninstall, start, stop.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Sites: sign the topology agents map themselves into.
    #[command(subcommand)]
    Topology(TopologyCommand),
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Sign SITES (JSON: {"sites": [{"name", "subnets", "parent", "type",
    /// "rendezvous"}]}) into a topology document agents take with
    /// --topology, or from a channel.
    Sign {
        sites: PathBuf,
        /// The publisher key (NAME.key).
        #[arg(long)]
        sign: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        /// How long agents take it (then they fall back to no topology).
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        valid: Duration,
        /// Also put it on this channel directory (agents that poll the
        /// channel take it in place of their --topology).
        #[arg(long)]
        channel: Option<PathBuf>,
    },
    /// Check a signed topology and show where an address stands in it.
    Show {
        file: PathBuf,
        /// Publisher key (NAME.pub) it must be signed with.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// Show the site and sources of this agent address.
        #[arg(long)]
        addr: Option<std::net::Ipv4Addr>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Register `somcast agent` with the service control manager (starts
    /// with Windows, as LocalSystem, restarted on failure), write a starting
    /// config file if there is none, and let the agent through the Windows
    /// firewall. Run it from where somcast.exe will stay.
    Install {
        /// The agent's config file (default %ProgramData%\somcast\agent.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Leave the Windows firewall alone (the rules are in the README).
        #[arg(long)]
        no_firewall: bool,
    },
    /// Stop the service and remove it and its firewall rule; the config,
    /// cache and logs stay.
    Uninstall,
    /// Start the installed service and wait until it runs.
    Start,
    /// Stop the service (the agent's clean stop) and wait until it has.
    Stop,
    /// The service control manager's entry point, not for use by hand.
    #[command(hide = true)]
    Run {
        #[arg(long)]
        config: PathBuf,
        /// The log file (`service install` names the one it printed).
        #[arg(long)]
        log: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write NAME.key (secret, 0600, never printed) and NAME.pub (one line,
    /// for agents' --trust); minisign's formats. With --fleet: NAME.fleet,
    /// a 256-bit fleet key for agents' --fleet-key (0600).
    Generate {
        name: PathBuf,
        /// A fleet key (LAN authentication) instead of a publisher key.
        #[arg(long)]
        fleet: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Hash FILE and write its manifest (FILE.somcast.json unless -o).
    Create {
        file: PathBuf,
        /// Origin URL(s) the package can be fetched from.
        #[arg(long, required = true)]
        url: Vec<String>,
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Sign the manifest with this publisher key (NAME.key).
        #[arg(long)]
        sign: Option<PathBuf>,
    },
}

/// What a task orders: `task sign` writes it, `task start` can too.
#[derive(Debug, Args)]
pub struct OrderArgs {
    /// Manifest file or URL.
    #[arg(long)]
    pub manifest: Option<String>,
    /// Sign with this publisher key (NAME.key); agents act only on tasks
    /// signed by a key they trust.
    #[arg(long)]
    pub sign: Option<PathBuf>,
    /// Stage the package in the cache only (pinned), run nothing.
    #[arg(long, conflicts_with = "run")]
    pub cache_only: bool,
    /// Command run with the verified file's path: `sh -c` with $1 and
    /// $SOMCAST_FILE; on Windows `cmd /C` with %SOMCAST_FILE%.
    #[arg(long)]
    pub run: Option<String>,
    /// Longest run of the command; then it is stopped.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub run_timeout: Duration,
    /// How long a cache-only package stays pinned, in days.
    #[arg(long, default_value_t = 30)]
    pub pin_days: u32,
    /// From election to multicast start.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub delay: Duration,
    /// Multicast rate of the representative (default: the agent's).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Higher first: an agent with several tasks holds the fetching and
    /// sending of lower ones while a higher one runs (0-255, default 0).
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
    /// Agents refuse the task before this time (2026-12-24T18:00:00Z, unix
    /// seconds, or a duration from now such as 2h).
    #[arg(long)]
    pub not_before: Option<String>,
    /// Agents refuse the task after this time (same forms; at most a year).
    #[arg(long, default_value = "7d")]
    pub expires: String,
    /// Task id (default: 128 random bits); an agent runs an id once, ever.
    #[arg(long)]
    pub id: Option<String>,
    /// Encrypt the package on the LAN (agents need a fleet key).
    #[arg(long)]
    pub encrypt: bool,
    /// Only agents whose address is in this IPv4 CIDR (repeat; any target
    /// given makes an agent a target).
    #[arg(long = "target-subnet")]
    pub target_subnets: Vec<String>,
    /// Only agents with this tag in their config (`tags`, `--tag`).
    #[arg(long = "target-tag")]
    pub target_tags: Vec<String>,
    /// Only agents whose hostname matches this glob (`kiosk-*`).
    #[arg(long = "target-host")]
    pub target_hosts: Vec<String>,
    /// Only the agent with this node id (16 hex digits).
    #[arg(long = "target-node")]
    pub target_nodes: Vec<String>,
    /// Each agent POSTs a JSON report here when the task ends (`somcast
    /// serve --reports DIR` takes them at /reports; any HTTP endpoint that
    /// takes a POST will do).
    #[arg(long)]
    pub report_url: Option<String>,
}

/// Which agents a console command talks to.
#[derive(Debug, Args)]
pub struct Targets {
    /// Agent API URL (http://10.0.0.5:7480); repeat for more.
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// File with one agent URL per line (# comments allowed).
    #[arg(long = "agents")]
    pub agents_file: Option<PathBuf>,
    /// The agents' API token: needed to read status, and to start or
    /// cancel unsigned tasks on insecure lab agents.
    #[arg(long, env = "SOMCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Borrowed view of [`Targets`].
pub struct TargetsRef<'a> {
    pub agents: &'a [String],
    pub agents_file: Option<&'a PathBuf>,
    pub token: Option<&'a str>,
}

impl Targets {
    pub fn as_ref(&self) -> TargetsRef<'_> {
        TargetsRef {
            agents: &self.agents,
            agents_file: self.agents_file.as_ref(),
            token: self.token.as_deref(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Write one task document (signed with --sign) and its manifest to
    /// -o, for `task start --task` or any other way to agents.
    Sign {
        #[command(flatten)]
        order: OrderArgs,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Hand a task to every target agent (a document from `task sign`, or
    /// one made from --manifest and the options); prints the task id.
    Start {
        #[command(flatten)]
        targets: Targets,
        /// A task document written by `task sign`, sent unchanged.
        #[arg(long, conflicts_with_all = ["manifest", "sign", "run", "cache_only", "id"])]
        task: Option<PathBuf>,
        #[command(flatten)]
        order: OrderArgs,
        /// Wait and show progress; exit 0 only when every agent succeeded.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The task's state on every target agent, or from the agents'
    /// reports (--reports DIR or URL): counts by state and subnet, failures
    /// by reason, origin bytes per subnet, the slowest agents.
    Status {
        id: String,
        #[command(flatten)]
        targets: Targets,
        /// A reports directory (`serve --reports DIR`) or its URL
        /// (http://origin:8080/reports).
        #[arg(long)]
        reports: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put a signed task on a channel: a directory of static files that
    /// any HTTP server serves, polled by agents started with --channel.
    Publish {
        /// The channel directory (created if missing).
        #[arg(long)]
        channel: PathBuf,
        /// A task document written by `task sign`, published unchanged.
        #[arg(long, conflicts_with_all = ["manifest", "sign", "run", "cache_only", "id"])]
        task: Option<PathBuf>,
        #[command(flatten)]
        order: OrderArgs,
    },
    /// Withdraw a task from a channel with a signed order: agents that have
    /// not started it never will, agents running it cancel it.
    Withdraw {
        id: String,
        #[arg(long)]
        channel: PathBuf,
        /// The publisher key (NAME.key) that signs the withdrawal.
        #[arg(long)]
        sign: PathBuf,
    },
    /// Cancel the task on every target agent.
    Cancel {
        id: String,
        #[command(flatten)]
        targets: Targets,
        /// Sign the order with this publisher key (agents that are not in
        /// the insecure lab mode take only signed orders).
        #[arg(long)]
        sign: Option<PathBuf>,
    },
    /// Pause the task on every target agent: a representative stops its
    /// multicast (and says so, so receivers wait), fetching and installs
    /// wait; what each holds is kept.
    Pause(HoldArgs),
    /// Resume a paused task on every target agent (or, with --channel,
    /// every agent that polls the channel), where it stood.
    Resume(HoldArgs),
}

/// Whom a pause or resume is for, and who signs it.
#[derive(Debug, Args)]
pub struct HoldArgs {
    pub id: String,
    #[command(flatten)]
    pub targets: Targets,
    /// Put the signed order on this channel (the directory `task publish`
    /// wrote) instead of sending it to agents: each agent that polls the
    /// channel carries out the latest pause or resume of the task.
    #[arg(long, conflicts_with_all = ["agents", "agents_file"], requires = "sign")]
    pub channel: Option<PathBuf>,
    /// Sign the order with this publisher key.
    #[arg(long)]
    pub sign: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Lab WAN link: bits per second shared by all downloads (0 = unlimited).
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub rate: u64,
    /// Take agents' task reports at POST /reports and keep them here
    /// (`task status ID --reports` reads them, or GET /reports/ID).
    #[arg(long)]
    pub reports: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The file to send.
    pub file: PathBuf,
    /// Multicast group and port.
    #[arg(long, default_value = DEFAULT_GROUP, env = "SOMCAST_GROUP", value_parser = parse_group)]
    pub group: SocketAddrV4,
    /// Interface name (eth0) or address (10.0.0.5); default: the one with the default route.
    #[arg(long, env = "SOMCAST_IFACE")]
    pub iface: Option<String>,
    /// The most the sender sends, bit/s on the wire, headers included
    /// (50M, 200M, 1G; 0 = unpaced, no rate control). Below it the rate
    /// adapts to what receivers report (loss, queueing delay).
    #[arg(long, default_value = "100M", value_parser = parse_rate)]
    pub rate: u64,
    /// The least the rate control goes down to; equal to --rate for a
    /// fixed rate.
    #[arg(long, default_value = "1M", value_parser = parse_rate)]
    pub rate_min: u64,
    /// How to share the network: foreground competes like a TCP flow,
    /// background keeps the queue it causes low and yields to other traffic.
    #[arg(long, value_enum, default_value_t = RateMode::Foreground)]
    pub mode: RateMode,
    /// A receiver far slower than the rest: wait for it (the rate follows
    /// it), or leave it to fetch what it misses elsewhere after the pass.
    #[arg(long, value_enum, default_value_t = SlowPolicy::Wait)]
    pub slow_receivers: SlowPolicy,
    /// Least repair symbols per block in the first pass, in percent; raised
    /// automatically to match the loss receivers report.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=400))]
    pub overhead: u32,
    /// Wait for this many receivers to join before sending.
    #[arg(long, default_value_t = 0)]
    pub min_receivers: u32,
    /// Longest wait for --min-receivers; then sending starts anyway.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub join_timeout: Duration,
    /// Bytes per block (rounded up to whole symbols); at most 64M.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub block_size: u64,
    /// Bytes per symbol; 1400 fits a 1500-byte MTU, up to 8900 for jumbo frames.
    #[arg(long, default_value_t = 1400)]
    pub symbol_size: u16,
    /// Multicast TTL; 1 keeps traffic on the local subnet.
    #[arg(long, default_value_t = 1)]
    pub ttl: u32,
    /// Fleet key file (NAME.fleet, from `somcast key generate --fleet`):
    /// seal every datagram and take only sealed ones.
    #[arg(long, env = "SOMCAST_FLEET_KEY")]
    pub key: Option<PathBuf>,
    /// Encrypt the file's bytes on the wire too (XChaCha20 under --key).
    #[arg(long, requires = "key")]
    pub encrypt: bool,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Multicast group and port.
    #[arg(long, default_value = DEFAULT_GROUP, env = "SOMCAST_GROUP", value_parser = parse_group)]
    pub group: SocketAddrV4,
    /// Interface name (eth0) or address (10.0.0.5); default: the one with the default route.
    #[arg(long, env = "SOMCAST_IFACE")]
    pub iface: Option<String>,
    /// Where to write the file; it appears only once verified.
    #[arg(long)]
    pub out: PathBuf,
    /// Give up when nothing of the session is heard for this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Lab feature: drop this share (0..1) of received datagrams, to test
    /// loss without root.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub drop_rate: f64,
    /// Seed of --drop-rate's choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Most memory for partly received blocks.
    #[arg(long, default_value = "48M", value_parser = parse_size)]
    pub buffer: u64,
    /// Fleet key file (NAME.fleet, from `somcast key generate --fleet`):
    /// seal every datagram and take only sealed ones.
    #[arg(long, env = "SOMCAST_FLEET_KEY")]
    pub key: Option<PathBuf>,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

/// `somcast demo`: the whole flow on loopback (an origin, agents, one
/// task), or with --lab the bare data plane (send to receivers).
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Agents to start (the whole flow).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub agents: u32,
    /// Size of the generated package.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Startup delay between election and multicast.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub delay: Duration,
    /// Multicast rate in bit/s.
    #[arg(long, default_value = "400M", value_parser = parse_rate)]
    pub rate: u64,
    /// The data plane only: `send` to --receivers with --loss injected.
    #[arg(long)]
    pub lab: bool,
    /// Receivers of --lab.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub receivers: u32,
    /// Loss injected at each --lab receiver (0..1), so repair is seen at work.
    #[arg(long, default_value_t = 0.05, value_parser = parse_share)]
    pub loss: f64,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Interface name (eth0) or address to report as the multicast interface.
    #[arg(long, env = "SOMCAST_IFACE")]
    pub iface: Option<String>,
    /// Probe the control group and list every agent that answers.
    #[arg(long)]
    pub probe: bool,
    /// How long to wait for answers to --probe.
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    pub wait: Duration,
    /// The agents' control group.
    #[arg(long, default_value = DEFAULT_CONTROL_GROUP, env = "SOMCAST_CONTROL_GROUP", value_parser = parse_group)]
    pub control_group: SocketAddrV4,
    /// The fleet key (NAME.fleet) of agents that use one: --probe seals its
    /// probes with it and takes only sealed answers.
    #[arg(long, env = "SOMCAST_FLEET_KEY")]
    pub fleet_key: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `somcast agent`. Every flag also comes from a SOMCAST_* variable and
/// from the config file; a flag beats the variable, which beats the file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML file with any of the settings below (iface, cache, api, token,
    /// control_group, presence_interval, preference).
    #[arg(long, env = "SOMCAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Interface name (eth0) or address; default: the one with the default route.
    #[arg(long, env = "SOMCAST_IFACE")]
    pub iface: Option<String>,
    /// Cache directory: node id, API token, packages.
    #[arg(long, env = "SOMCAST_CACHE")]
    pub cache: Option<PathBuf>,
    /// Address of the control API (default 127.0.0.1:7480; port 0 picks one).
    #[arg(long, env = "SOMCAST_API")]
    pub api: Option<std::net::SocketAddr>,
    /// Bearer token the control API requires; default: one generated and
    /// kept in <cache>/api-token.
    #[arg(long, env = "SOMCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The control group agents announce themselves on.
    #[arg(long, env = "SOMCAST_CONTROL_GROUP", value_parser = parse_group)]
    pub control_group: Option<SocketAddrV4>,
    /// How often this agent announces itself (peers drop it after three).
    #[arg(long, env = "SOMCAST_PRESENCE_INTERVAL", value_parser = parse_duration)]
    pub presence_interval: Option<Duration>,
    /// Operator preference in elections: higher wins (0-255).
    #[arg(long, env = "SOMCAST_PREFERENCE")]
    pub preference: Option<u8>,
    /// The most this agent multicasts as representative, bit/s on the wire
    /// (default 1G); the rate adapts below it to what receivers report.
    #[arg(long, env = "SOMCAST_RATE", value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// The least the representative's rate control goes down to (default
    /// 1M); equal to --rate for a fixed rate.
    #[arg(long, env = "SOMCAST_RATE_MIN", value_parser = parse_rate)]
    pub rate_min: Option<u64>,
    /// How the representative shares the network (default background:
    /// yields to other traffic).
    #[arg(long, env = "SOMCAST_RATE_MODE", value_enum)]
    pub rate_mode: Option<RateMode>,
    /// Lab fault injection: flip a bit in every repair symbol this agent
    /// serves, to see peers detect and bypass it. Never in production.
    #[arg(long, hide = true, env = "SOMCAST_LAB_CORRUPT_REPAIR")]
    pub lab_corrupt_repair: bool,
    /// Lab fault injection: drop this share (0..=1) of the multicast data
    /// this agent receives (1 = a network where multicast does not reach).
    #[arg(long, hide = true, env = "SOMCAST_LAB_DROP_RATE", value_parser = parse_probability)]
    pub lab_drop_rate: Option<f64>,
    /// Upload cap of peer repair, bit/s (default: none; 0 = none).
    #[arg(long, env = "SOMCAST_REPAIR_RATE", value_parser = parse_rate)]
    pub repair_rate: Option<u64>,
    /// Cache size cap for eviction (default 20G).
    #[arg(long, env = "SOMCAST_CACHE_MAX", value_parser = parse_size)]
    pub cache_max: Option<u64>,
    /// Free disk the cache leaves (default 2G).
    #[arg(long, env = "SOMCAST_CACHE_MIN_FREE", value_parser = parse_size)]
    pub cache_min_free: Option<u64>,
    /// Publisher public key file (NAME.pub) whose signed tasks this agent
    /// acts on; repeat for more (SOMCAST_TRUST: comma-separated).
    #[arg(long = "trust", env = "SOMCAST_TRUST", value_delimiter = ',')]
    pub trust: Vec<PathBuf>,
    /// Lab only: act on unsigned tasks too (the API token then guards
    /// writes). Said loudly at start, in the log and in status.
    #[arg(long, env = "SOMCAST_INSECURE_UNSIGNED")]
    pub insecure_unsigned: bool,
    /// Fleet key file (NAME.fleet): seal every datagram and authenticate
    /// every repair connection with it. Give two (the first seals, both
    /// open) to roll the fleet's key (SOMCAST_FLEET_KEY: comma-separated).
    #[arg(long = "fleet-key", env = "SOMCAST_FLEET_KEY", value_delimiter = ',')]
    pub fleet_key: Vec<PathBuf>,
    /// Encrypt the packages this agent multicasts, as representative, for
    /// every task (a task can ask for it too); needs --fleet-key.
    #[arg(long, env = "SOMCAST_ENCRYPT")]
    pub encrypt: bool,
    /// Finished tasks are forgotten after this long (default 30d); at most
    /// the newest 1000 are kept in any case.
    #[arg(long, env = "SOMCAST_TASK_RETENTION", value_parser = parse_duration)]
    pub task_retention: Option<Duration>,
    /// Also serve GET /metrics (Prometheus) on this address, without a
    /// token: a scraper needs no rights to the API (0.0.0.0:9480). The API
    /// serves /metrics too, behind the token.
    #[arg(long, env = "SOMCAST_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// A task channel to poll (http://origin/somcast/channel, where `task
    /// publish --channel DIR` writes): signed tasks for this agent start
    /// without anyone reaching its API.
    #[arg(long, env = "SOMCAST_CHANNEL")]
    pub channel: Option<String>,
    /// How often the channel is polled (default 5m), with 10% jitter; an
    /// unchanged channel costs one conditional request.
    #[arg(long, env = "SOMCAST_POLL", value_parser = parse_duration)]
    pub poll: Option<Duration>,
    /// A tag tasks can target (repeat; SOMCAST_TAGS: comma-separated).
    #[arg(long = "tag", env = "SOMCAST_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// The signed topology (`somcast topology sign` writes it): which site
    /// this agent is in, and the rendezvous points it fetches from before
    /// the origin. A channel that carries one replaces it.
    #[arg(long, env = "SOMCAST_TOPOLOGY")]
    pub topology: Option<PathBuf>,
}

fn parse_probability(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not between 0 and 1"));
    }
    Ok(v)
}

/// A multicast group and port: a unicast address is bad usage, caught
/// here (exit 2) rather than when the socket is set up.
fn parse_group(s: &str) -> Result<SocketAddrV4, String> {
    let group: SocketAddrV4 = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address and port, e.g. 239.192.0.1:7400"))?;
    if !group.ip().is_multicast() {
        return Err(format!(
            "{} is not an IPv4 multicast address (use 224.0.0.0/4, e.g. 239.192.0.1:{})",
            group.ip(),
            group.port()
        ));
    }
    Ok(group)
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!(
            "{v} is not between 0 (inclusive) and 1 (exclusive)"
        ));
    }
    Ok(v)
}

/// How a sender shares the network (`multicast::rate::Mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateMode {
    Foreground,
    Background,
}

impl From<RateMode> for multicast::rate::Mode {
    fn from(m: RateMode) -> Self {
        match m {
            RateMode::Foreground => Self::Foreground,
            RateMode::Background => Self::Background,
        }
    }
}

/// What a sender does about a far slower receiver
/// (`multicast::rate::SlowReceivers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SlowPolicy {
    Wait,
    Leave,
}

impl From<SlowPolicy> for multicast::rate::SlowReceivers {
    fn from(p: SlowPolicy) -> Self {
        match p {
            SlowPolicy::Wait => Self::Wait,
            SlowPolicy::Leave => Self::Leave,
        }
    }
}
