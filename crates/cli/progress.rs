//! Progress bars that tell the truth: the count never passes the total (an estimate that
//! proves low grows instead), and the ETA is the remaining share of the work at the pace so
//! far, not indicatif's short-window rate, which reads "0s" when work arrives in bursts.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// Work done so far against an estimated total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub done: u64,
    pub total: u64,
    /// The total first given: past it, `total` is only "one more to come".
    estimate: u64,
}

impl Count {
    /// A total of 0 is "at least one step": the bar must have something to fill.
    pub fn new(total: u64) -> Count {
        Count {
            done: 0,
            total: total.max(1),
            estimate: total.max(1),
        }
    }

    /// One more step done. Past the estimate, the total grows so that at least one step
    /// is still to come: only [`Count::finish`] fills the bar.
    pub fn step(&mut self, n: u64) {
        self.done = self.done.saturating_add(n);
        if self.done >= self.total {
            self.total = self.done + 1;
        }
    }

    /// All done: past the estimate the count is the total; short of it (the estimate
    /// was high, e.g. partitioned parents without data) the bar fills.
    pub fn finish(&mut self) {
        if self.done >= self.estimate {
            self.total = self.done;
        } else {
            self.done = self.total;
        }
    }
}

/// Time left when `done` of `total` steps took `elapsed`: the same pace for the rest.
/// `None` before the first step (nothing to go by).
pub fn eta(elapsed: Duration, done: u64, total: u64) -> Option<Duration> {
    if done == 0 {
        return None;
    }
    let left = total.saturating_sub(done);
    let nanos = elapsed.as_nanos().saturating_mul(u128::from(left)) / u128::from(done);
    Some(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

/// "1m 05s", "12s", "?" (no estimate yet).
pub fn eta_text(eta: Option<Duration>) -> String {
    match eta {
        None => "?".into(),
        Some(d) if d.as_secs() >= 60 => format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60),
        Some(d) => format!("{}s", d.as_secs()),
    }
}

/// A terminal bar over a [`Count`]: `prefix [=====>   ] done/total msg (eta 12s)`.
pub struct Bar {
    bar: ProgressBar,
    count: Count,
}

impl Bar {
    pub fn new(total: u64, prefix: &str) -> Bar {
        let count = Count::new(total);
        let bar = ProgressBar::new(count.total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} {msg} (eta {truthful_eta})",
            )
            .expect("valid template")
            .with_key(
                "truthful_eta",
                |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&eta_text(eta(s.elapsed(), s.pos(), s.len().unwrap_or(0))));
                },
            )
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar, count }
    }

    pub fn step(&mut self) {
        self.count.step(1);
        self.bar.set_length(self.count.total);
        self.bar.set_position(self.count.done);
    }

    pub fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn finish_and_clear(&mut self) {
        self.count.finish();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_never_passes_the_total() {
        let mut c = Count::new(3);
        for _ in 0..10 {
            c.step(1);
            assert!(c.done < c.total, "{c:?}: only finish fills the bar");
        }
        assert_eq!((c.done, c.total), (10, 11));
        c.finish();
        assert_eq!((c.done, c.total), (10, 10));
    }

    #[test]
    fn an_estimate_that_was_high_finishes_full() {
        let mut c = Count::new(17);
        for _ in 0..12 {
            c.step(1);
        }
        assert_eq!((c.done, c.total), (12, 17));
        c.finish();
        assert_eq!((c.done, c.total), (17, 17));
    }

    #[test]
    fn an_empty_total_still_has_a_step() {
        let mut c = Count::new(0);
        assert_eq!(c.total, 1);
        c.finish();
        assert_eq!((c.done, c.total), (1, 1));
    }

    #[test]
    fn eta_is_the_rest_at_the_pace_so_far() {
        assert_eq!(eta(Duration::from_secs(10), 0, 20), None);
        assert_eq!(
            eta(Duration::from_secs(10), 5, 20),
            Some(Duration::from_secs(30))
        );
        assert_eq!(eta(Duration::from_secs(10), 20, 20), Some(Duration::ZERO));
        assert_eq!(eta(Duration::from_secs(10), 25, 20), Some(Duration::ZERO));
        assert_eq!(
            eta(Duration::from_millis(1500), 1, 3),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn eta_text_reads_as_minutes_and_seconds() {
        assert_eq!(eta_text(None), "?");
        assert_eq!(eta_text(Some(Duration::from_secs(12))), "12s");
        assert_eq!(eta_text(Some(Duration::from_secs(65))), "1m 05s");
    }
}
