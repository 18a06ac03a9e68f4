//! Sizes, rates and durations as people type them: `4M`, `200M`, `60s`.

use std::time::Duration;

/// A byte count with an optional binary suffix: `1400`, `64K`, `4M`, `2G`
/// (K = 1024). A trailing `B` or `iB` is accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = split_suffix(t, 1024)?;
    scale(num, mult).ok_or_else(|| format!("{s:?} is not a size (examples: 1400, 64K, 4M, 2G)"))
}

/// A rate in bits per second with an optional decimal suffix: `100M` is
/// 100 Mbit/s, `1G` 1 Gbit/s (K = 1000). A trailing `bit/s`, `bps` or `b`
/// is accepted. `0` means unpaced.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = ["bit/s", "bps", "b"]
        .iter()
        .find_map(|suf| t.strip_suffix(suf))
        .unwrap_or(t);
    let (num, mult) = split_suffix(t, 1000)?;
    scale(num, mult).ok_or_else(|| format!("{s:?} is not a rate (examples: 50M, 200M, 1G)"))
}

/// A duration: `250ms`, `60s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration (examples: 500ms, 60s, 2m)");
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn split_suffix(t: &str, base: u64) -> Result<(&str, u64), String> {
    let Some(last) = t.chars().last() else {
        return Err("empty value".into());
    };
    let mult = match last.to_ascii_uppercase() {
        'K' => base,
        'M' => base * base,
        'G' => base * base * base,
        'T' => base * base * base * base,
        _ => return Ok((t, 1)),
    };
    Ok((&t[..t.len() - 1], mult))
}

fn scale(num: &str, mult: u64) -> Option<u64> {
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    let v = f * mult as f64;
    (f.is_finite() && f >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// Human form of a byte count: `64.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_size("1400").unwrap(), 1400);
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn rates_are_decimal_bits() {
        assert_eq!(parse_rate("200M").unwrap(), 200_000_000);
        assert_eq!(parse_rate("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("190Mbit/s").unwrap(), 190_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
