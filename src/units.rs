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
        "d" => n * 86_400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// A point in time as unix seconds: `1767225600`, an RFC 3339 UTC time
/// (`2026-12-24T18:00:00Z`), or a duration from `now` (`7d`, `12h`).
pub fn parse_time(s: &str, now: u64) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    if let Some(at) = parse_rfc3339_utc(t) {
        return Ok(at);
    }
    parse_duration(t)
        .ok()
        .and_then(|d| now.checked_add(d.as_secs()))
        .ok_or_else(|| {
            format!("{s:?} is not a time (examples: 2026-12-24T18:00:00Z, 1767225600, 7d, 12h)")
        })
}

/// `YYYY-MM-DDTHH:MM:SSZ` as unix seconds (UTC only: an order must mean
/// the same instant on every agent, whatever its time zone).
fn parse_rfc3339_utc(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' || !matches!(b[19], b'Z' | b'z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<u64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from 1970-01-01 to the date (the civil-from-days inverse).
    let (y, mo) = if mo <= 2 { (y - 1, mo + 12) } else { (y, mo) };
    let era_days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (mo - 3) + 2) / 5 + d;
    let days = era_days.checked_sub(719_469)?;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec)
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
    fn times_take_three_forms() {
        assert_eq!(parse_time("1767225600", 5).unwrap(), 1_767_225_600);
        assert_eq!(parse_time("1970-01-01T00:00:00Z", 5).unwrap(), 0);
        assert_eq!(parse_time("2000-03-01T00:00:00Z", 5).unwrap(), 951_868_800);
        assert_eq!(
            parse_time("2026-12-24T18:30:15Z", 5).unwrap(),
            1_798_137_015
        );
        assert_eq!(parse_time("7d", 1000).unwrap(), 1000 + 7 * 86_400);
        assert_eq!(parse_time("12h", 0).unwrap(), 43_200);
        assert!(parse_time("2026-13-01T00:00:00Z", 0).is_err());
        assert!(parse_time("2026-12-24T18:00:00+01:00", 0).is_err());
        assert!(parse_time("tomorrow", 0).is_err());
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
