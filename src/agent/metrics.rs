//! `GET /metrics`: the agent in the Prometheus (OpenMetrics) text format,
//! through prometheus-client. Everything is read from the agent's state at
//! each scrape (tasks, presence, elections, the cache, the counters below),
//! so nothing is kept twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::Agent;
use super::task::State;
use crate::election::Role;

/// Counts kept only for the metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Data symbols the multicast delivered to this agent as a receiver.
    pub multicast_symbols: AtomicU64,
    /// Data symbols the senders sent for the blocks it tracked (the loss is
    /// one minus received over sent).
    pub multicast_symbols_sent: AtomicU64,
    /// Peer repair: symbol bytes and blocks this agent served.
    pub repair_bytes_served: AtomicU64,
    pub repair_blocks_served: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The agent's metrics, as a scrape returns them. Reads the cache
/// directory: call it off the async runtime.
pub fn render(agent: &Arc<Agent>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(agent.clone())));
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

struct Scrape(Arc<Agent>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrape({:016x})", self.0.node)
    }
}

const STATES: [State; 11] = [
    State::Queued,
    State::Electing,
    State::Fetching,
    State::Waiting,
    State::Sending,
    State::Receiving,
    State::Repairing,
    State::Installing,
    State::Done,
    State::Failed,
    State::Cancelled,
];

fn state_name(s: State) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Discovering => "discovering",
        Role::Claiming => "claiming",
        Role::Deferring => "deferring",
        Role::Representative => "representative",
        Role::Receiver => "receiver",
    }
}

/// One metric family with one label, a sample per `(value, label)`.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: Vec<(String, M)>,
) -> std::fmt::Result {
    let Some(first) = samples.first() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (value, metric) in &samples {
        let labels = [(label, value.as_str())];
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> std::fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let a = &self.0;
        encode_tasks(a, &mut enc)?;
        encode_elections(a, &mut enc)?;
        encode_traffic(a, &mut enc)?;
        encode_drops(a, &mut enc)?;
        encode_peers_and_cache(a, &mut enc)
    }
}

/// The tasks on record: by state, bytes by source, the multicasts running now.
fn encode_tasks(a: &Agent, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let (by_state, bytes, sending) = {
        let tasks = a.tasks();
        let mut by_state = [0i64; STATES.len()];
        let mut bytes = [0u64; 4];
        // Rate and receivers left behind of the multicasts running now.
        let mut sending = (0u64, 0u64);
        for t in tasks.values() {
            if let (State::Sending, Some(m)) = (t.status.state, &t.status.multicast) {
                sending.0 += m.rate_bps;
                sending.1 += u64::from(m.receivers_left);
            }
            if let Some(i) = STATES.iter().position(|s| *s == t.status.state) {
                by_state[i] += 1;
            }
            bytes[0] += t.status.bytes.multicast;
            bytes[1] += t.status.bytes.peers;
            bytes[2] += t.status.bytes.origin;
            bytes[3] += t.status.bytes.rendezvous;
        }
        (by_state, bytes, sending)
    };
    one(
        enc,
        "somcast_multicast_rate_bps",
        "The rate this agent multicasts at now as representative, bits per second on the wire (the status tells why)",
        ConstGauge::new(sending.0 as i64),
    )?;
    one(
        enc,
        "somcast_multicast_receivers_left_behind",
        "Receivers of this agent's running multicasts left to finish from peers as far slower than the rest",
        ConstGauge::new(sending.1 as i64),
    )?;
    family(
        enc,
        "somcast_tasks",
        "Tasks on record, by state",
        "state",
        STATES
            .iter()
            .zip(by_state)
            .map(|(s, n)| (state_name(*s), ConstGauge::new(n)))
            .collect(),
    )?;
    family(
        enc,
        "somcast_task_bytes",
        "Package bytes of the tasks on record, by where they came from",
        "source",
        ["multicast", "peers", "origin", "rendezvous"]
            .iter()
            .zip(bytes)
            .map(|(s, n)| (s.to_string(), ConstGauge::new(n as i64)))
            .collect(),
    )?;
    Ok(())
}

/// The running elections, by this agent's role.
fn encode_elections(a: &Agent, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let mut roles = [0i64; 5];
    for slot in a.elections().values() {
        roles[slot.election.role() as usize] += 1;
    }
    family(
        enc,
        "somcast_elections",
        "Running elections, by this agent's role in them",
        "role",
        [
            Role::Discovering,
            Role::Claiming,
            Role::Deferring,
            Role::Representative,
            Role::Receiver,
        ]
        .iter()
        .map(|r| {
            (
                role_name(*r).to_string(),
                ConstGauge::new(roles[*r as usize]),
            )
        })
        .collect(),
    )?;
    Ok(())
}

/// What the multicast and peer repair carried.
fn encode_traffic(a: &Agent, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let c = &a.counters;
    let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
    one(
        enc,
        "somcast_multicast_symbols_received",
        "Data symbols the multicast delivered to this agent",
        ConstCounter::new(load(&c.multicast_symbols)),
    )?;
    one(
        enc,
        "somcast_multicast_symbols_sent",
        "Data symbols the senders sent for the blocks this agent tracked (loss: 1 - received/sent)",
        ConstCounter::new(load(&c.multicast_symbols_sent)),
    )?;
    one(
        enc,
        "somcast_repair_served_bytes",
        "Symbol bytes this agent served to peers",
        ConstCounter::new(load(&c.repair_bytes_served)),
    )?;
    one(
        enc,
        "somcast_repair_served_blocks",
        "Blocks this agent served to peers",
        ConstCounter::new(load(&c.repair_blocks_served)),
    )?;
    Ok(())
}

/// What was dropped, by reason.
fn encode_drops(a: &Agent, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let presence = a.presence().stats();
    let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let mut drops: Vec<(String, ConstCounter)> = vec![
        ("malformed".into(), ConstCounter::new(presence.malformed)),
        ("table_full".into(), ConstCounter::new(presence.table_full)),
        (
            "source_limited".into(),
            ConstCounter::new(presence.source_limited),
        ),
        (
            "offer_refused".into(),
            ConstCounter::new(load(&a.offers_refused)),
        ),
    ];
    drops.extend(
        a.auth
            .snapshot()
            .into_iter()
            .filter(|(k, _)| *k != "accepted")
            .map(|(k, v)| (format!("lan_{k}"), ConstCounter::new(v))),
    );
    family(
        enc,
        "somcast_dropped",
        "Datagrams and connections dropped, by reason",
        "reason",
        drops,
    )?;
    Ok(())
}

/// Peers, the cache, uptime.
fn encode_peers_and_cache(a: &Agent, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let (peers, foreign) = {
        let p = a.presence();
        (p.peers().count(), p.foreign_peers().count())
    };
    one(
        enc,
        "somcast_peers",
        "Agents present on this agent's subnet",
        ConstGauge::new(peers as i64),
    )?;
    one(
        enc,
        "somcast_foreign_peers",
        "Agents heard from outside this agent's subnet",
        ConstGauge::new(foreign as i64),
    )?;
    let objects = a.cache.objects();
    one(
        enc,
        "somcast_cache_objects",
        "Complete packages in the cache",
        ConstGauge::new(objects.len() as i64),
    )?;
    one(
        enc,
        "somcast_cache_bytes",
        "Bytes of complete packages in the cache",
        ConstGauge::new(objects.iter().map(|(_, m)| m.size as i64).sum::<i64>()),
    )?;
    one(
        enc,
        "somcast_uptime_seconds",
        "Seconds since the agent started",
        ConstGauge::new(a.started.elapsed().as_secs() as i64),
    )?;
    Ok(())
}
