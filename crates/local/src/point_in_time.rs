//! What `branch create --at` accepts (both backends): a time with its zone,
//! a time relative to now, or a WAL position.
//!
//! - RFC 3339 with `Z` or an offset: `2026-11-28T10:15:00Z`,
//!   `2026-11-28T10:15:00.5+01:00`; a space for the `T`, `+0100`, `+01`
//!   (PostgreSQL's `now()` prints that) and ` UTC` are taken too.
//! - Relative: `now`, `now-10m`, `now - 1h30m`, `10 minutes ago`, `2h ago`
//!   (units as in `history_retention`: s, m/min/minutes, h/hours, d/days …).
//! - An LSN: `0/3000060`.
//!
//! A time without a zone is refused with the spelling to use: silently
//! reading it as UTC put branches hours off. A time in the future is
//! refused too (nothing can be branched from there).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A WAL position (`0/3000060`), comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hex = |p: &str| {
            (!p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(p, 16).ok())
                .flatten()
        };
        Some(Lsn(hex(hi)? << 32 | hex(lo)?))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Where the target of a point-in-time branch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Time(SystemTime),
    Lsn(Lsn),
}

const FORMS: &str = "2026-11-28T10:15:00Z, 2026-11-28T10:15:00+01:00, now-10m, \"10 minutes ago\", or an LSN such as 0/3000060";

impl Target {
    /// Parse `--at` (see the module notes), relative to now.
    pub fn parse(s: &str) -> Result<Target, String> {
        Target::parse_at(s, SystemTime::now())
    }

    /// [`parse`](Self::parse) with "now" given.
    pub fn parse_at(s: &str, now: SystemTime) -> Result<Target, String> {
        let text = s.trim();
        if let Some(lsn) = Lsn::parse(text) {
            return Ok(Target::Lsn(lsn));
        }
        let t = if let Some(ago) = relative(text) {
            let d = ago.map_err(|e| format!("--at \"{s}\": {e}; write it like {FORMS}"))?;
            now.checked_sub(d)
                .ok_or_else(|| format!("--at \"{s}\" is before 1970"))?
        } else {
            absolute(text, s)?
        };
        if t > now + Duration::from_secs(1) {
            return Err(format!(
                "--at \"{s}\" ({}) is in the future; the latest point available is now ({})",
                format_utc(t),
                format_utc(now)
            ));
        }
        Ok(Target::Time(t.min(now)))
    }

    /// For messages: the time in UTC, or the LSN.
    pub fn describe(&self) -> String {
        match self {
            Target::Time(t) => format_utc(*t),
            Target::Lsn(l) => format!("LSN {l}"),
        }
    }
}

/// `2026-11-28T10:15:00.123Z` (what this crate prints times as).
pub fn format_utc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `Some(duration before now)` when `s` is written relative to now.
fn relative(s: &str) -> Option<Result<Duration, String>> {
    let lower = s.to_ascii_lowercase();
    if lower == "now" {
        return Some(Ok(Duration::ZERO));
    }
    let amount = if let Some(rest) = lower.strip_prefix("now") {
        let rest = rest.trim_start();
        match rest.strip_prefix('-') {
            Some(d) => d.trim(),
            None if rest.starts_with('+') => {
                return Some(Err("a point after now is in the future".into()))
            }
            None => return None,
        }
    } else if let Some(d) = lower.strip_suffix("ago") {
        d.trim()
    } else {
        return None;
    };
    Some(
        humantime::parse_duration(amount)
            .map_err(|e| format!("\"{amount}\" is not a duration ({e})")),
    )
}

/// An RFC 3339 time with a zone; `original` for messages.
fn absolute(text: &str, original: &str) -> Result<SystemTime, String> {
    let neither =
        || format!("--at \"{original}\" is neither a time nor an LSN; write it like {FORMS}");
    let b = text.as_bytes();
    if b.len() < 19 || !b[..19].iter().all(u8::is_ascii) {
        return Err(neither());
    }
    // The local part: date, time, optional fraction; the rest is the zone.
    let mut end = 19;
    if b.get(19) == Some(&b'.') {
        end = 20;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
    }
    let (local, zone) = text.split_at(end);
    let as_utc = humantime::parse_rfc3339_weak(local).map_err(|_| neither())?;
    let zone = zone.trim();
    let offset_secs: i64 = match zone {
        "" => return Err(zoneless(local, as_utc)),
        "Z" | "z" | "UTC" | "utc" => 0,
        _ => parse_offset(zone).ok_or_else(|| {
            format!(
                "--at \"{original}\": the zone \"{zone}\" is not Z or an offset such as +01:00; write it like {FORMS}"
            )
        })?,
    };
    // local = utc + offset, so utc = local - offset.
    let shifted = if offset_secs >= 0 {
        as_utc.checked_sub(Duration::from_secs(offset_secs as u64))
    } else {
        as_utc.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))
    };
    shifted.ok_or_else(neither)
}

/// `+01:00`, `-0530`, `+01` in seconds east of UTC.
fn parse_offset(zone: &str) -> Option<i64> {
    let (sign, rest) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit())
        || !matches!(digits.len(), 2 | 4)
        || (rest.contains(':') && rest.len() != 5)
    {
        return None;
    }
    let hours: i64 = digits[..2].parse().ok()?;
    let minutes: i64 = if digits.len() == 4 {
        digits[2..].parse().ok()?
    } else {
        0
    };
    (hours <= 23 && minutes <= 59).then_some(sign * (hours * 3600 + minutes * 60))
}

/// The refusal of a zone-less time, showing it in UTC and in this
/// machine's zone.
fn zoneless(local: &str, as_utc: SystemTime) -> String {
    let iso = local.replacen(' ', "T", 1);
    let here = local_offset(as_utc)
        .filter(|o| *o != 0)
        .map(|o| format!(", or {iso}{} in this machine's time zone", format_offset(o)))
        .unwrap_or_default();
    format!(
        "--at \"{local}\" has no time zone, so it could mean several times; write it with one: {iso}Z for UTC{here}"
    )
}

fn format_offset(secs: i64) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.unsigned_abs();
    format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
}

/// This machine's UTC offset around `t` (seconds east), from the C library.
fn local_offset(t: SystemTime) -> Option<i64> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs() as nix::libc::time_t;
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r only writes the tm we own.
    let ok = unsafe { !nix::libc::localtime_r(&secs, &mut tm).is_null() };
    ok.then_some(tm.tm_gmtoff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn now() -> SystemTime {
        at("2026-12-02T12:00:00Z")
    }

    fn time(s: &str) -> SystemTime {
        match Target::parse_at(s, now()) {
            Ok(Target::Time(t)) => t,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn refused(s: &str) -> String {
        Target::parse_at(s, now()).unwrap_err()
    }

    #[test]
    fn times_with_a_zone() {
        assert_eq!(time("2026-11-28T10:15:00Z"), at("2026-11-28T10:15:00Z"));
        assert_eq!(
            time("2026-11-28T10:15:00+01:00"),
            at("2026-11-28T09:15:00Z")
        );
        assert_eq!(
            time("2026-11-28T10:15:00-05:30"),
            at("2026-11-28T15:45:00Z")
        );
        assert_eq!(time("2026-11-28 10:15:00+0100"), at("2026-11-28T09:15:00Z"));
        assert_eq!(
            time("2026-11-28 10:15:00.123456+00"),
            at("2026-11-28T10:15:00.123456Z")
        );
        assert_eq!(time("2026-11-28 10:15:00 UTC"), at("2026-11-28T10:15:00Z"));
        assert_eq!(
            time("2026-11-28T10:15:00.5+01:00"),
            at("2026-11-28T09:15:00.5Z")
        );
    }

    #[test]
    fn relative_times() {
        let m10 = now() - Duration::from_secs(600);
        assert_eq!(time("now-10m"), m10);
        assert_eq!(time("now - 10 minutes"), m10);
        assert_eq!(time("10 minutes ago"), m10);
        assert_eq!(time("10m ago"), m10);
        assert_eq!(time("NOW-1h 30m"), now() - Duration::from_secs(5400));
        assert_eq!(time("now"), now());
        assert!(refused("now-10 parsecs").contains("not a duration"));
        assert!(refused("now+5m").contains("future"));
    }

    #[test]
    fn lsns() {
        assert_eq!(
            Target::parse_at("0/3000060", now()),
            Ok(Target::Lsn(Lsn(0x3000060)))
        );
        assert_eq!(Lsn::parse("1A/FF").unwrap().to_string(), "1A/FF");
        assert!(Lsn(0x1_0000_0000) > Lsn(0xffff_ffff));
        assert!(Lsn::parse("0/").is_none());
        assert!(Lsn::parse("g/1").is_none());
    }

    #[test]
    fn a_time_without_a_zone_is_refused_with_how_to_write_it() {
        let e = refused("2026-11-28T10:15:00");
        assert!(e.contains("has no time zone"), "{e}");
        assert!(e.contains("2026-11-28T10:15:00Z for UTC"), "{e}");
        let e = refused("2026-11-28 10:15:00");
        assert!(e.contains("2026-11-28T10:15:00Z"), "{e}");
    }

    #[test]
    fn the_future_and_nonsense_are_refused() {
        let e = refused("2026-12-03T00:00:00Z");
        assert!(e.contains("in the future"), "{e}");
        assert!(
            e.contains("the latest point available is now (2026-12-02T12:00:00.000Z)"),
            "{e}"
        );
        assert!(refused("yesterday-ish").contains("neither a time nor an LSN"));
        assert!(refused("2026-11-28T10:15:00+25:00").contains("not Z or an offset"));
        assert!(refused("2026-11-28T10:15:00 CET").contains("not Z or an offset"));
    }

    #[test]
    fn offsets_are_formatted_for_the_hint() {
        assert_eq!(format_offset(3600), "+01:00");
        assert_eq!(format_offset(-19800), "-05:30");
    }
}
