//! Watching the command from outside: the clone's server log and a lock-sampling connection.
//!
//! Why the server log rather than event triggers: the clone's server is pgtwig's own, so
//! `log_min_duration_statement = 0` records every statement of every session (the command's
//! and any children it starts) with its duration and end time, in order, without a single
//! object in the app's database — nothing for the migration tool to see, nothing to drop
//! afterwards, and nothing lost when a migration's transaction rolls back (event triggers
//! writing into a table would be). Rewrites need no trigger either: a rewritten table or
//! index has a new relfilenode, compared before and after (see `catalog`). Rows affected come
//! from pg_stat_statements when the server binaries ship it (preloaded on the clone only,
//! its view made in the clone's `postgres` database, never the app's), matched to log lines
//! by query id (`%Q`).
//!
//! Locks: PostgreSQL logs only lock *waits*, and on a clone nobody waits. A sampling
//! connection (to the `postgres` database, so it holds nothing in the app's) polls
//! `pg_locks` every `lock_sample_interval` (default 10 ms) for locks that block writers
//! (SHARE and stronger) on relations of the app's database. A lock is seen from its first
//! sample to its last: the reported duration is short by up to one interval at each end,
//! and a lock held for less than one interval may not be seen at all — the report says so.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

pub const APP_NAME: &str = "pgtwig check";
const PREFIX: &str = "@@pgtwig|";

/// Server settings for the clone; `preload` is the clone's own shared_preload_libraries
/// (kept), None when pg_stat_statements is not available.
pub fn server_settings(preload: Option<&str>) -> Vec<String> {
    let mut s: Vec<String> = [
        "log_min_duration_statement=0",
        "log_statement=none",
        "log_duration=off",
        "log_timezone=UTC",
        "log_parameter_max_length=0",
        "log_min_error_statement=error",
        "compute_query_id=on",
        "log_line_prefix=@@pgtwig|%m|%p|%d|%Q|%a|",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(existing) = preload {
        let libs = if existing.trim().is_empty() {
            "pg_stat_statements".to_string()
        } else if existing.contains("pg_stat_statements") {
            existing.to_string()
        } else {
            format!("{existing},pg_stat_statements")
        };
        s.push(format!("shared_preload_libraries={libs}"));
        s.push("pg_stat_statements.track=all".into());
        s.push("pg_stat_statements.track_utility=on".into());
    }
    s
}

/// One statement the server logged as finished (or failed).
#[derive(Debug, Clone)]
pub struct LoggedStatement {
    pub pid: i32,
    pub start: SystemTime,
    pub end: SystemTime,
    pub duration: Duration,
    pub text: String,
    pub query_id: i64,
    /// The error it failed with.
    pub error: Option<String>,
}

struct Entry {
    time: SystemTime,
    pid: i32,
    database: String,
    query_id: i64,
    app: String,
    severity: String,
    message: String,
}

fn parse_time(text: &str) -> Option<SystemTime> {
    // "2026-12-02 01:23:45.678 UTC" (log_timezone=UTC)
    let iso = text.strip_suffix(" UTC")?.replacen(' ', "T", 1) + "Z";
    humantime::parse_rfc3339(&iso).ok()
}

fn parse_entry(line: &str) -> Option<Entry> {
    let rest = line.strip_prefix(PREFIX)?;
    let mut fields = rest.splitn(5, '|');
    let time = parse_time(fields.next()?)?;
    let pid = fields.next()?.parse().ok()?;
    let database = fields.next()?.to_string();
    let query_id = fields.next()?.parse().unwrap_or(0);
    let rest = fields.next()?;
    // "<application_name>|SEVERITY:  message"; the name itself may hold '|'.
    let (app, tail) = rest
        .match_indices('|')
        .map(|(i, _)| (&rest[..i], &rest[i + 1..]))
        .find(|(_, tail)| {
            tail.split_once(":  ")
                .is_some_and(|(s, _)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase()))
        })?;
    let (severity, message) = tail.split_once(":  ")?;
    Some(Entry {
        time,
        pid,
        database,
        query_id,
        app: app.to_string(),
        severity: severity.to_string(),
        message: message.to_string(),
    })
}

/// The statements of sessions in `database` (pgtwig's own left out) in the log text.
pub fn statements(log: &str, database: &str) -> Vec<LoggedStatement> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in log.lines() {
        match parse_entry(line) {
            Some(e) => entries.push(e),
            None => {
                // A continuation of a multi-line message (a statement's later lines).
                if let Some(last) = entries.last_mut() {
                    if !line.starts_with(PREFIX) {
                        last.message.push('\n');
                        last.message.push_str(line);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut pending_error: HashMap<i32, (String, SystemTime)> = HashMap::new();
    for e in entries {
        if e.database != database || e.app == APP_NAME {
            continue;
        }
        match e.severity.as_str() {
            "LOG" => {
                let Some(rest) = e.message.strip_prefix("duration: ") else {
                    continue;
                };
                let Some((ms, rest)) = rest.split_once(" ms  ") else {
                    continue;
                };
                let text = if let Some(t) = rest.strip_prefix("statement: ") {
                    t
                } else if let Some(t) = rest.strip_prefix("execute ") {
                    // "execute <unnamed>: SELECT ..." / "execute S_1: ..."
                    t.split_once(": ").map_or(t, |(_, t)| t)
                } else {
                    continue; // parse and bind steps: their execute follows
                };
                let duration = Duration::from_secs_f64(ms.parse::<f64>().unwrap_or(0.0) / 1000.0);
                out.push(LoggedStatement {
                    pid: e.pid,
                    start: e.time.checked_sub(duration).unwrap_or(e.time),
                    end: e.time,
                    duration,
                    text: text.trim().to_string(),
                    query_id: e.query_id,
                    error: None,
                });
            }
            "ERROR" => {
                pending_error.insert(e.pid, (e.message.clone(), e.time));
            }
            "STATEMENT" => {
                if let Some((error, time)) = pending_error.remove(&e.pid) {
                    out.push(LoggedStatement {
                        pid: e.pid,
                        start: time,
                        end: time,
                        duration: Duration::ZERO,
                        text: e.message.trim().to_string(),
                        query_id: e.query_id,
                        error: Some(error),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// A lock seen held by a session, from its first sample to its last.
#[derive(Debug, Clone)]
pub struct HeldLock {
    pub pid: i32,
    pub relation: u32,
    /// As pg_locks says it: "AccessExclusiveLock", "ShareLock", ...
    pub mode: String,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

impl HeldLock {
    pub fn held(&self) -> Duration {
        self.last_seen
            .duration_since(self.first_seen)
            .unwrap_or_default()
    }
}

/// What the sampler saw, and how finely.
#[derive(Debug, Clone, Default)]
pub struct LockSamples {
    pub locks: Vec<HeldLock>,
    pub samples: u64,
    /// The longest gap between two samples: the real resolution.
    pub worst_gap: Duration,
}

pub struct LockSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<LockSamples, String>>,
}

impl LockSampler {
    /// Start sampling locks on relations of database `database_oid`, through a connection
    /// to the `postgres` database at `socket_dir`.
    pub fn start(
        socket_dir: &Path,
        database_oid: u32,
        interval: Duration,
    ) -> Result<LockSampler, String> {
        let mut client = pgtwig_local::cluster::client_config(socket_dir, "postgres", APP_NAME)
            .connect(postgres::NoTls)
            .map_err(|e| format!("connecting the lock sampler: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let query = client
                .prepare(
                    // xact_start tells two transactions of one session apart (a lock
                    // released and taken again between two samples).
                    "SELECT l.pid, l.relation, l.mode, coalesce(extract(epoch FROM a.xact_start)::float8, 0) \
                     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'relation' AND l.granted AND l.database = $1 \
                       AND l.pid <> pg_backend_pid() \
                       AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')",
                )
                .map_err(|e| format!("preparing the lock sampler's query: {e}"))?;
            let mut open: HashMap<(i32, u32, String, u64), HeldLock> = HashMap::new();
            let mut out = LockSamples::default();
            let mut last = Instant::now();
            loop {
                let done = flag.load(Ordering::Relaxed);
                let rows = client
                    .query(&query, &[&database_oid])
                    .map_err(|e| format!("sampling pg_locks: {e}"))?;
                let now = SystemTime::now();
                let gap = last.elapsed();
                last = Instant::now();
                if out.samples > 0 {
                    out.worst_gap = out.worst_gap.max(gap);
                }
                out.samples += 1;
                let mut seen = std::collections::HashSet::new();
                for row in rows {
                    let xact: f64 = row.get(3);
                    let key: (i32, u32, String, u64) =
                        (row.get(0), row.get(1), row.get(2), (xact * 1e6) as u64);
                    seen.insert(key.clone());
                    open.entry(key.clone())
                        .or_insert_with(|| HeldLock {
                            pid: key.0,
                            relation: key.1,
                            mode: key.2.clone(),
                            first_seen: now,
                            last_seen: now,
                        })
                        .last_seen = now;
                }
                let gone: Vec<_> = open
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    out.locks.extend(open.remove(&k));
                }
                if done {
                    break;
                }
                std::thread::sleep(interval.saturating_sub(last.elapsed()));
            }
            out.locks.extend(open.into_values());
            out.locks.sort_by_key(|l| l.first_seen);
            Ok(out)
        });
        Ok(LockSampler { stop, thread })
    }

    /// Take one last sample and return what was seen.
    pub fn finish(self) -> Result<LockSamples, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the lock sampler panicked".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_statements_errors_and_continuations() {
        let log = "\
@@pgtwig|2026-12-02 01:00:00.100 UTC|42|app|7|psql|LOG:  duration: 100.000 ms  statement: ALTER TABLE t
\tADD COLUMN x int
@@pgtwig|2026-12-02 01:00:00.200 UTC|42|app|0|psql|LOG:  duration: 0.100 ms  parse <unnamed>: SELECT 1
@@pgtwig|2026-12-02 01:00:00.300 UTC|42|app|9|a|b|LOG:  duration: 1.000 ms  execute <unnamed>: SELECT 1
@@pgtwig|2026-12-02 01:00:00.400 UTC|43|app|0|pgtwig check|LOG:  duration: 1.000 ms  statement: ANALYZE
@@pgtwig|2026-12-02 01:00:00.500 UTC|42|app|0|psql|ERROR:  relation \"nope\" does not exist at character 15
@@pgtwig|2026-12-02 01:00:00.500 UTC|42|app|0|psql|STATEMENT:  SELECT * FROM nope
@@pgtwig|2026-12-02 01:00:00.600 UTC|44|other|0|psql|LOG:  duration: 1.000 ms  statement: DROP TABLE x
";
        let s = statements(log, "app");
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].text, "ALTER TABLE t\n\tADD COLUMN x int");
        assert_eq!(s[0].duration, Duration::from_millis(100));
        assert_eq!(s[0].query_id, 7);
        assert_eq!(
            s[0].end.duration_since(s[0].start).unwrap(),
            Duration::from_millis(100)
        );
        assert_eq!(s[1].text, "SELECT 1");
        assert_eq!(s[1].query_id, 9);
        assert_eq!(s[2].text, "SELECT * FROM nope");
        assert!(s[2].error.as_deref().unwrap().contains("nope"));
    }

    #[test]
    fn preload_keeps_the_branchs_own_libraries() {
        let with = |p| {
            server_settings(p)
                .into_iter()
                .find(|s| s.starts_with("shared_preload"))
        };
        assert_eq!(with(None), None);
        assert_eq!(
            with(Some("")).unwrap(),
            "shared_preload_libraries=pg_stat_statements"
        );
        assert_eq!(
            with(Some("auto_explain")).unwrap(),
            "shared_preload_libraries=auto_explain,pg_stat_statements"
        );
    }
}
