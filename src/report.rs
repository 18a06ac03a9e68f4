//! Task reports on the collecting side: reading what agents POSTed (the
//! directory `somcast serve --reports DIR` fills, or its URL) and summing it
//! up for `somcast task status ID --reports`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use crate::agent::report::Report;

/// Reports read for one task at most.
pub const MAX_REPORTS: usize = 200_000;
/// Agents listed as the slowest.
const SLOWEST: usize = 5;

/// Every report file in `dir` that parses as JSON (others are skipped).
pub fn read_dir(dir: &Path) -> Vec<Value> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .take(MAX_REPORTS)
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// The reports of `task` from a reports directory or URL.
pub async fn load(src: &str, task: &str) -> anyhow::Result<Vec<Report>> {
    if !crate::trust::document::valid_id(task) {
        bail!("{task:?} is not a task id");
    }
    let values: Vec<Value> = if src.starts_with("http://") || src.starts_with("https://") {
        let url = format!("{}/{task}", src.trim_end_matches('/'));
        let mut resp = crate::fetch::client()
            .get(&url)
            .timeout(std::time::Duration::from_secs(60))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("GET {url}: HTTP {}", resp.status());
        }
        // A collector's answer is read to a bound, like anything from the
        // network: every report at its largest.
        let max = MAX_REPORTS * 8 * 1024;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.with_context(|| format!("GET {url}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > max {
                bail!("GET {url}: longer than {max} bytes");
            }
        }
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a list of reports"))?
    } else {
        let dir = Path::new(src).join(task);
        if !Path::new(src).is_dir() {
            bail!("{src} is not a reports directory");
        }
        read_dir(&dir)
    };
    Ok(values
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Report>(v).ok())
        .filter(|r| r.task == task)
        .collect())
}

/// One agent among the slowest.
#[derive(Debug, Serialize)]
pub struct Slow {
    pub node: String,
    pub hostname: String,
    pub subnet: Option<String>,
    pub seconds: f64,
}

/// Origin bytes of one subnet, and over the package size.
#[derive(Debug, Serialize)]
pub struct Origin {
    pub bytes: u64,
    pub per_package: f64,
}

/// What `task status --reports` shows.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub task: String,
    pub agents: usize,
    pub by_state: BTreeMap<String, usize>,
    /// Subnet -> state -> agents.
    pub by_subnet: BTreeMap<String, BTreeMap<String, usize>>,
    /// Error text (numbers as N) -> agents.
    pub failures: BTreeMap<String, usize>,
    pub origin_by_subnet: BTreeMap<String, Origin>,
    /// Site -> its agents, states and bytes (agents in a topology only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_site: BTreeMap<String, SiteSummary>,
    pub slowest: Vec<Slow>,
}

/// One site's share of a task.
#[derive(Debug, Default, Serialize)]
pub struct SiteSummary {
    pub agents: usize,
    pub by_state: BTreeMap<String, usize>,
    /// Origin bytes over the package size: one download per site is 1.0.
    pub origin_per_package: f64,
    pub bytes_origin: u64,
    pub bytes_rendezvous: u64,
}

/// `text` with every run of digits as `N`, so errors that differ only in a
/// number count together.
fn reason(text: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

pub fn summarize(task: &str, reports: &[Report]) -> Summary {
    let subnet = |r: &Report| r.subnet.clone().unwrap_or_else(|| "?".into());
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_subnet: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut origin: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports {
        *by_state.entry(r.state.clone()).or_default() += 1;
        *by_subnet
            .entry(subnet(r))
            .or_default()
            .entry(r.state.clone())
            .or_default() += 1;
        if r.state == "failed" {
            let e = r.error.as_deref().unwrap_or("no reason given");
            *failures.entry(reason(e)).or_default() += 1;
        }
        *origin.entry(subnet(r)).or_default() += r.bytes_origin;
    }
    let size = reports.iter().map(|r| r.size).max().unwrap_or(0).max(1);
    let mut by_site: BTreeMap<String, SiteSummary> = BTreeMap::new();
    for r in reports {
        let Some(name) = &r.site else { continue };
        let site = by_site.entry(name.clone()).or_default();
        site.agents += 1;
        *site.by_state.entry(r.state.clone()).or_default() += 1;
        site.bytes_origin += r.bytes_origin;
        site.bytes_rendezvous += r.bytes_rendezvous;
        site.origin_per_package = site.bytes_origin as f64 / size as f64;
    }
    let mut slow: Vec<&Report> = reports.iter().filter(|r| r.seconds.is_some()).collect();
    slow.sort_by(|a, b| {
        b.seconds
            .partial_cmp(&a.seconds)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Summary {
        task: task.into(),
        agents: reports.len(),
        by_state,
        by_subnet,
        failures,
        origin_by_subnet: origin
            .into_iter()
            .map(|(s, b)| {
                (
                    s,
                    Origin {
                        bytes: b,
                        per_package: b as f64 / size as f64,
                    },
                )
            })
            .collect(),
        by_site,
        slowest: slow
            .into_iter()
            .take(SLOWEST)
            .map(|r| Slow {
                node: r.node.clone(),
                hostname: r.hostname.clone(),
                subnet: r.subnet.clone(),
                seconds: r.seconds.unwrap_or(0.0),
            })
            .collect(),
    }
}

/// The summary as text.
pub fn print(s: &Summary) {
    let states = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "task {}: {} agents reported: {}",
        s.task,
        s.agents,
        states(&s.by_state)
    );
    println!("{:<20} {:>12} {:>8}  states", "subnet", "origin", "x pkg");
    for (subnet, st) in &s.by_subnet {
        let o = &s.origin_by_subnet[subnet];
        println!(
            "{subnet:<20} {:>12} {:>8.2}  {}",
            o.bytes,
            o.per_package,
            states(st)
        );
    }
    if !s.by_site.is_empty() {
        println!(
            "{:<20} {:>12} {:>8} {:>12}  states",
            "site", "origin", "x pkg", "rendezvous"
        );
        for (name, site) in &s.by_site {
            println!(
                "{name:<20} {:>12} {:>8.2} {:>12}  {}",
                site.bytes_origin,
                site.origin_per_package,
                site.bytes_rendezvous,
                states(&site.by_state)
            );
        }
    }
    if !s.failures.is_empty() {
        println!("failures:");
        for (why, n) in &s.failures {
            println!("  {n:>6}  {why}");
        }
    }
    if !s.slowest.is_empty() {
        println!("slowest:");
        for a in &s.slowest {
            println!(
                "  {:>8.1}s  {} {} {}",
                a.seconds,
                a.node,
                a.hostname,
                a.subnet.as_deref().unwrap_or("?")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        node: &str,
        subnet: &str,
        state: &str,
        origin: u64,
        secs: f64,
        err: Option<&str>,
    ) -> Report {
        Report {
            task: "t".into(),
            node: node.into(),
            hostname: format!("h-{node}"),
            subnet: Some(subnet.into()),
            // Two subnets, one site.
            site: Some("office".into()),
            version: "x".into(),
            role: None,
            state: state.into(),
            size: 100,
            bytes_multicast: 0,
            bytes_peers: 0,
            bytes_origin: origin,
            bytes_rendezvous: 7,
            seconds: Some(secs),
            error: err.map(str::to_string),
            install: None,
            finished: None,
        }
    }

    #[test]
    fn a_summary_counts_states_subnets_failures_and_origin_bytes() {
        let r = [
            report("1", "10.0.0.0/24", "done", 100, 5.0, None),
            report("2", "10.0.0.0/24", "done", 0, 9.0, None),
            report(
                "3",
                "10.0.1.0/24",
                "failed",
                50,
                2.0,
                Some("exited with status 3"),
            ),
            report(
                "4",
                "10.0.1.0/24",
                "failed",
                60,
                1.0,
                Some("exited with status 4"),
            ),
        ];
        let s = summarize("t", &r);
        assert_eq!(s.agents, 4);
        assert_eq!(s.by_state["done"], 2);
        assert_eq!(s.by_subnet["10.0.1.0/24"]["failed"], 2);
        assert_eq!(s.failures["exited with status N"], 2);
        assert_eq!(s.origin_by_subnet["10.0.0.0/24"].bytes, 100);
        assert!((s.origin_by_subnet["10.0.1.0/24"].per_package - 1.1).abs() < 1e-9);
        assert_eq!(s.slowest[0].node, "2");
        let office = &s.by_site["office"];
        assert_eq!((office.agents, office.by_state["failed"]), (4, 2));
        assert_eq!((office.bytes_origin, office.bytes_rendezvous), (210, 28));
        assert!((office.origin_per_package - 2.1).abs() < 1e-9);
    }
}
