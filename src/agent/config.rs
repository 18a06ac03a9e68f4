//! The agent's settings: defaults, then the config file, then SOMCAST_*
//! variables, then flags (clap merges the last two).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::cli::{AgentArgs, DEFAULT_CONTROL_GROUP};
use crate::trust::TrustedKey;
use crate::trust::keys::read_public;
use crate::units::{parse_duration, parse_rate, parse_size};

/// The most a representative multicasts when neither task nor agent says:
/// a gigabit link. The rate control finds what the subnet takes below it.
pub const DEFAULT_RATE: u64 = 1_000_000_000;
/// The least the rate control goes down to by default.
pub const DEFAULT_RATE_MIN: u64 = multicast::sender::DEFAULT_RATE_MIN;
/// Peer repair upload cap: none. A peer's upload is one TCP flow per
/// requester, which TCP's congestion control shares fairly with the
/// endpoint's own traffic; a cap (`--repair-rate`) slowed every rendezvous
/// and peer transfer below the link (0.85x of one HTTP stream at 800M on a
/// gigabit link) for no gain on a switched LAN.
pub const DEFAULT_REPAIR_RATE: u64 = 0;

/// Where the control API listens unless told otherwise: this host only, so
/// a fresh install exposes nothing.
pub const DEFAULT_API: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7480));
/// Finished tasks kept this long by default: a month of rollout history.
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Default presence interval: at 5 s an agent sends about 17 B/s.
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(5);

/// The config file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    iface: Option<String>,
    cache: Option<PathBuf>,
    api: Option<SocketAddr>,
    token: Option<String>,
    control_group: Option<SocketAddrV4>,
    presence_interval: Option<String>,
    preference: Option<u8>,
    rate: Option<String>,
    rate_min: Option<String>,
    rate_mode: Option<crate::cli::RateMode>,
    repair_rate: Option<String>,
    cache_max: Option<String>,
    cache_min_free: Option<String>,
    /// Publisher keys: paths of .pub files, or the keys themselves.
    trusted_keys: Option<Vec<String>>,
    insecure_unsigned: Option<bool>,
    /// Fleet key files: the first seals, every one opens.
    fleet_keys: Option<Vec<PathBuf>>,
    encrypt: Option<bool>,
    task_retention: Option<String>,
    metrics: Option<SocketAddr>,
    channel: Option<String>,
    poll: Option<String>,
    tags: Option<Vec<String>>,
    topology: Option<PathBuf>,
}

/// Settings the agent runs with, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Interface spec (name or address); `None` = the default route's.
    pub iface: Option<String>,
    pub cache: PathBuf,
    pub api: SocketAddr,
    /// `None`: generate one and keep it in the cache directory.
    pub token: Option<String>,
    pub control_group: SocketAddrV4,
    pub presence_interval: Duration,
    pub preference: u8,
    /// The most a representative multicasts for tasks that do not set a
    /// rate, bit/s on the wire.
    pub rate_bps: u64,
    /// Whether the rate was given (flag, variable or file), not the
    /// default: only a rate given caps unicast (origin fetches, downloads
    /// from peers) too. The default is the multicast's ceiling; held to it,
    /// a TCP download on a gigabit LAN could never make up a stall.
    pub rate_set: bool,
    /// The least its rate control goes down to.
    pub rate_min_bps: u64,
    pub rate_mode: multicast::rate::Mode,
    /// Upload cap of peer repair, bit/s (0 = none).
    pub repair_rate_bps: u64,
    /// Lab fault injection: serve corrupted repair symbols.
    pub lab_corrupt_repair: bool,
    /// Lab fault injection: share of received multicast data dropped.
    pub lab_drop_rate: f64,
    /// Cache size cap and free-disk floor for eviction.
    pub cache_max: u64,
    pub cache_min_free: u64,
    /// Publisher keys whose signed orders this agent acts on.
    pub trusted_keys: Vec<TrustedKey>,
    /// Lab mode: unsigned orders are taken too.
    pub insecure_unsigned: bool,
    /// The fleet key(s): `None`, the LAN traffic is not authenticated.
    pub fleet: Option<multicast::auth::FleetKeys>,
    /// Encrypt every package this agent multicasts.
    pub encrypt: bool,
    /// How long finished tasks are kept.
    pub task_retention: Duration,
    /// Where GET /metrics is served without a token, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The task channel polled, if any: its base URL.
    pub channel: Option<reqwest::Url>,
    pub poll: Duration,
    /// Tags tasks can target.
    pub tags: Vec<String>,
    /// The signed topology file, if any.
    pub topology: Option<PathBuf>,
}

/// How often a channel is polled unless told.
pub const DEFAULT_POLL: Duration = Duration::from_secs(300);

impl AgentConfig {
    pub fn load(args: &AgentArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let presence_interval = presence_interval(args, &file)?;
        let control_group = control_group(args, &file)?;
        let token = api_token(args, &file)?;
        let rate_bps = number_setting(args.rate, &file.rate, "rate", parse_rate, DEFAULT_RATE)?;
        let rate_min_bps = number_setting(
            args.rate_min,
            &file.rate_min,
            "rate_min",
            parse_rate,
            DEFAULT_RATE_MIN,
        )?;
        let rate_mode = args
            .rate_mode
            .or(file.rate_mode)
            .unwrap_or(crate::cli::RateMode::Background)
            .into();
        let repair_rate_bps = number_setting(
            args.repair_rate,
            &file.repair_rate,
            "repair_rate",
            parse_rate,
            DEFAULT_REPAIR_RATE,
        )?;
        let (cache_max, cache_min_free) = cache_limits(args, &file)?;
        let trusted_keys = trusted_keys(&args.trust, file.trusted_keys.as_deref())?;
        let insecure_unsigned = args.insecure_unsigned || file.insecure_unsigned.unwrap_or(false);
        let fleet = fleet_keys(args, &file)?;
        let encrypt = args.encrypt || file.encrypt.unwrap_or(false);
        let task_retention = duration_setting(
            args.task_retention,
            &file.task_retention,
            "task_retention",
            DEFAULT_TASK_RETENTION,
        )?;
        let (channel, poll) = channel(args, &file)?;
        let tags = tags(args, &file)?;
        if encrypt && fleet.is_none() {
            bail!("--encrypt needs a fleet key to encrypt with: give --fleet-key NAME.fleet");
        }
        if args.lab_corrupt_repair {
            tracing::warn!("lab fault injection: this agent serves corrupted repair symbols");
        }
        Ok(Self {
            trusted_keys,
            insecure_unsigned,
            fleet,
            encrypt,
            task_retention,
            metrics: args.metrics.or(file.metrics),
            channel,
            poll,
            tags,
            topology: args.topology.clone().or(file.topology),
            rate_bps,
            rate_set: args.rate.is_some() || file.rate.is_some(),
            rate_min_bps,
            rate_mode,
            repair_rate_bps,
            lab_corrupt_repair: args.lab_corrupt_repair,
            lab_drop_rate: args.lab_drop_rate.unwrap_or(0.0),
            cache_max,
            cache_min_free,
            iface: args.iface.clone().or(file.iface),
            cache: args
                .cache
                .clone()
                .or(file.cache)
                .unwrap_or_else(default_cache_dir),
            api: args.api.or(file.api).unwrap_or(DEFAULT_API),
            token,
            control_group,
            presence_interval,
            preference: args.preference.or(file.preference).unwrap_or(0),
        })
    }
}

/// The cache's size cap and the free disk it leaves.
fn cache_limits(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<(u64, u64)> {
    let max = number_setting(
        args.cache_max,
        &file.cache_max,
        "cache_max",
        parse_size,
        20 << 30,
    )?;
    let min_free = number_setting(
        args.cache_min_free,
        &file.cache_min_free,
        "cache_min_free",
        parse_size,
        2 << 30,
    )?;
    Ok((max, min_free))
}

/// The fleet keys: the flags' files, else the file's.
fn fleet_keys(
    args: &AgentArgs,
    file: &FileConfig,
) -> anyhow::Result<Option<multicast::auth::FleetKeys>> {
    let files = if args.fleet_key.is_empty() {
        file.fleet_keys.clone().unwrap_or_default()
    } else {
        args.fleet_key.clone()
    };
    Ok(crate::trust::keys::read_fleet_keys(&files)?)
}

/// How often presence is announced: within what the wire allows.
fn presence_interval(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<Duration> {
    let interval = duration_setting(
        args.presence_interval,
        &file.presence_interval,
        "presence_interval",
        DEFAULT_PRESENCE_INTERVAL,
    )?;
    let min = Duration::from_millis(u64::from(multicast::wire::MIN_INTERVAL_MS));
    let max = Duration::from_millis(u64::from(multicast::wire::MAX_INTERVAL_MS));
    if !(min..=max).contains(&interval) {
        bail!("presence interval {interval:?} is outside {min:?}..={max:?}");
    }
    Ok(interval)
}

/// The subnet's control group: a multicast address.
fn control_group(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<SocketAddrV4> {
    let group = args
        .control_group
        .or(file.control_group)
        .unwrap_or_else(|| DEFAULT_CONTROL_GROUP.parse().expect("constant parses"));
    if !group.ip().is_multicast() {
        bail!(
            "control group {group} is not a multicast address (use 224.0.0.0/4, e.g. {DEFAULT_CONTROL_GROUP})"
        );
    }
    Ok(group)
}

/// The API token, if given: 8 or more printable characters.
fn api_token(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<Option<String>> {
    let token = args.token.clone().or_else(|| file.token.clone());
    if let Some(t) = &token
        && (t.len() < 8 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        bail!("the API token must be at least 8 printable characters without spaces");
    }
    Ok(token)
}

/// The task channel, if any, and how often it is polled (1 s or more).
fn channel(
    args: &AgentArgs,
    file: &FileConfig,
) -> anyhow::Result<(Option<reqwest::Url>, Duration)> {
    let channel = args
        .channel
        .clone()
        .or_else(|| file.channel.clone())
        .map(|c| channel_url(&c))
        .transpose()?;
    let poll = duration_setting(args.poll, &file.poll, "poll", DEFAULT_POLL)?;
    if poll < Duration::from_secs(1) {
        bail!("--poll {poll:?}: at least 1s");
    }
    Ok((channel, poll))
}

/// The agent's tags: the flags', else the file's; 1-255 characters each.
fn tags(args: &AgentArgs, file: &FileConfig) -> anyhow::Result<Vec<String>> {
    let tags = if args.tags.is_empty() {
        file.tags.clone().unwrap_or_default()
    } else {
        args.tags.clone()
    };
    if let Some(t) = tags.iter().find(|t| t.is_empty() || t.len() > 255) {
        bail!("tag {t:?}: 1-255 characters");
    }
    Ok(tags)
}

/// The trusted keys: from the flags (or SOMCAST_TRUST) if any, else from
/// the file, where each entry is a .pub file or a base64 key itself. Two
/// entries for one key id count once.
fn trusted_keys(flags: &[PathBuf], file: Option<&[String]>) -> anyhow::Result<Vec<TrustedKey>> {
    let mut keys = Vec::new();
    if !flags.is_empty() {
        for p in flags {
            keys.extend(read_public(p).context("--trust")?);
        }
    } else {
        for entry in file.unwrap_or_default() {
            match TrustedKey::parse(entry) {
                Ok(k) => keys.push(k),
                Err(_) => keys.extend(
                    read_public(Path::new(entry)).context("trusted_keys in the config file")?,
                ),
            }
        }
    }
    keys.sort_by_key(|k| k.id);
    keys.dedup_by_key(|k| k.id);
    Ok(keys)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// The platform's place for a machine-wide cache, or the user's when not
/// running as a service account.
fn default_cache_dir() -> PathBuf {
    #[cfg(windows)]
    {
        let base = std::env::var_os("ProgramData").unwrap_or_else(|| "C:\\ProgramData".into());
        PathBuf::from(base).join("somcast")
    }
    #[cfg(target_os = "macos")]
    {
        PathBuf::from("/Library/Caches/somcast")
    }
    #[cfg(not(any(windows, target_os = "macos")))]
    {
        if Path::new("/var/cache").is_dir() && is_root() {
            PathBuf::from("/var/cache/somcast")
        } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(x).join("somcast")
        } else if let Some(h) = std::env::var_os("HOME") {
            PathBuf::from(h).join(".cache").join("somcast")
        } else {
            PathBuf::from("somcast-cache")
        }
    }
}

#[cfg(not(any(windows, target_os = "macos")))]
fn is_root() -> bool {
    // /proc/self/status carries the real uid; no libc call needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// For tests of config files the project ships: loads `text` as the
/// agent's config file (written into `dir`).
#[cfg(test)]
pub(crate) fn load_text(text: &str, dir: &Path) -> anyhow::Result<AgentConfig> {
    use clap::Parser;
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    let cli = crate::cli::Cli::try_parse_from([
        "somcast".as_ref(),
        "agent".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ])?;
    let crate::cli::Command::Agent(args) = &cli.command else {
        anyhow::bail!("not the agent command");
    };
    AgentConfig::load(args)
}

/// For tests of shipped config files: the `# key = value` lines made live
/// (but the key files, which must exist), each without its trailing comment.
#[cfg(test)]
pub(crate) fn uncomment_keys(text: &str) -> String {
    text.lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
        .filter(|l| !l.starts_with("trusted_keys") && !l.starts_with("fleet_keys"))
        .map(|l| format!("{}\n", l.split(" #").next().unwrap_or(l)))
        .collect()
}

/// A duration from the command line, else the config file, else `default`.
fn duration_setting(
    arg: Option<Duration>,
    file: &Option<String>,
    name: &str,
    default: Duration,
) -> anyhow::Result<Duration> {
    match (arg, file) {
        (Some(d), _) => Ok(d),
        (None, Some(s)) => {
            parse_duration(s).map_err(|e| anyhow::anyhow!("{name} in the config file: {e}"))
        }
        (None, None) => Ok(default),
    }
}

/// A rate or size from the command line, else the config file (parsed by
/// `parse`), else `default`.
fn number_setting(
    arg: Option<u64>,
    file: &Option<String>,
    name: &str,
    parse: fn(&str) -> Result<u64, String>,
    default: u64,
) -> anyhow::Result<u64> {
    match (arg, file) {
        (Some(n), _) => Ok(n),
        (None, Some(s)) => parse(s).map_err(|e| anyhow::anyhow!("{name} in the config file: {e}")),
        (None, None) => Ok(default),
    }
}

/// The task channel's URL: http or https.
fn channel_url(c: &str) -> anyhow::Result<reqwest::Url> {
    let url = reqwest::Url::parse(c.trim_end_matches('/'))
        .map_err(|e| anyhow::anyhow!("channel {c:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("channel {c:?}: an http or https URL");
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> AgentArgs {
        let mut argv = vec!["somcast", "agent"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Agent(a) => a,
            _ => unreachable!("parsed an agent command"),
        }
    }

    #[test]
    fn flags_beat_the_file_which_beats_the_defaults() {
        let dir = std::env::temp_dir().join(format!("somcast-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("somcast.toml");
        std::fs::write(
            &file,
            "iface = \"eth7\"\ncache = \"/srv/c\"\npresence_interval = \"2s\"\npreference = 9\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = AgentConfig::load(&args(&["--config", f, "--iface", "lo"])).unwrap();
        assert_eq!(c.iface.as_deref(), Some("lo"));
        assert_eq!(c.cache, PathBuf::from("/srv/c"));
        assert_eq!(c.presence_interval, Duration::from_secs(2));
        assert_eq!(c.preference, 9);
        assert_eq!(c.api, DEFAULT_API);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_rate_given_caps_unicast() {
        let c = AgentConfig::load(&args(&[])).unwrap();
        assert_eq!(c.rate_bps, DEFAULT_RATE);
        assert!(
            !c.rate_set,
            "the default rate is the multicast's ceiling only"
        );
        let c = AgentConfig::load(&args(&["--rate", "200M"])).unwrap();
        assert_eq!(c.rate_bps, 200_000_000);
        assert!(c.rate_set);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("somcast.toml");
        std::fs::write(&file, "rate = \"300M\"\n").unwrap();
        let c = AgentConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!((c.rate_bps, c.rate_set), (300_000_000, true));
    }

    #[test]
    fn trust_and_fleet_keys_come_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let signer = crate::trust::Signer::generate().unwrap();
        let pubfile = dir.path().join("p.pub");
        std::fs::write(&pubfile, format!("{}\n", signer.public.to_line())).unwrap();
        let (fleet, id) = crate::trust::keys::generate_fleet_file(&dir.path().join("lan")).unwrap();
        let other = crate::trust::Signer::generate().unwrap();
        let file = dir.path().join("somcast.toml");
        std::fs::write(
            &file,
            format!(
                "trusted_keys = [{:?}, {:?}]\nfleet_keys = [{:?}]\nencrypt = true\n",
                pubfile.display().to_string(),
                other.public.to_line(),
                fleet.display().to_string()
            ),
        )
        .unwrap();
        let c = AgentConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap();
        let mut ids: Vec<_> = c.trusted_keys.iter().map(|k| k.id).collect();
        ids.sort();
        let mut want = vec![signer.public.id, other.public.id];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(c.fleet.unwrap().ids(), vec![id]);
        assert!(c.encrypt && !c.insecure_unsigned);
        // --encrypt without a fleet key is refused.
        std::fs::write(&file, "encrypt = true\n").unwrap();
        let e = AgentConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("needs a fleet key"), "{e:#}");
    }

    #[test]
    fn a_bad_config_file_is_refused_with_its_reason() {
        let dir = std::env::temp_dir().join(format!("somcast-badcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("somcast.toml");
        std::fs::write(&file, "ifcae = \"eth0\"\n").unwrap();
        let err = AgentConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `ifcae`"),
            "{err:#}"
        );
        let err = AgentConfig::load(&args(&["--token", "short"])).unwrap_err();
        assert!(err.to_string().contains("at least 8"));
        // A unicast control group: from a flag it is bad usage, refused as
        // the arguments are parsed; from the file, when they are merged.
        let err = crate::cli::Cli::try_parse_from([
            "somcast",
            "agent",
            "--control-group",
            "10.0.0.1:7479",
        ])
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("not an IPv4 multicast address"),
            "{err}"
        );
        std::fs::write(&file, "control_group = \"10.0.0.1:7479\"\n").unwrap();
        let err = AgentConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(
            err.to_string().contains("not a multicast address"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_debian_packages_config_loads_as_shipped_and_uncommented() {
        let text = include_str!("../../scripts/deb/agent.toml");
        let dir = tempfile::tempdir().unwrap();
        load_text(text, dir.path()).unwrap();
        let live = uncomment_keys(text);
        for key in ["channel", "poll", "tags", "metrics", "cache_max", "rate"] {
            assert!(live.contains(&format!("{key} = ")), "{key} missing: {live}");
        }
        let c = load_text(&live.replace("\"eth0\"", "\"127.0.0.1\""), dir.path()).unwrap();
        assert_eq!(c.cache, Path::new("/var/cache/somcast"));
        assert_eq!(c.poll, Duration::from_secs(300));
        assert_eq!(c.metrics.map(|m| m.port()), Some(9480));
    }
}
