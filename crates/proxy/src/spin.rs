//! Optional busy-polling after activity ([`crate::ProxyConfig::busy_poll`]).
//!
//! On a small (virtual) machine a relay's cost is dominated by sleeping and being woken up:
//! every message wakes the proxy thread, and waking an idle vCPU is slow. With busy-polling,
//! after any session did work the runtime keeps polling its I/O driver (a task that yields
//! in a loop; tokio polls the driver without blocking between yields) for a short window, so
//! the next message is usually picked up without a wake-up. When nothing happens for the
//! window the task sleeps until the next activity, so an idle proxy costs nothing.
//!
//! Spinning only pays while the proxy thread has a CPU to itself. On a saturated machine
//! (many busy sessions on few cores) it takes CPU time from the servers and clients: measured
//! at `pgbench -S -c 8` on 2 vCPUs, it raised the proxy's CPU per transaction from ~18 µs to
//! ~30 µs, and there the spinning thread got only ~65 % of the wall-clock time it spun
//! (the kernel kept running other tasks in its place), against ~98 % with one session. So
//! the spinner compares the thread's CPU time with the wall-clock time it spent spinning,
//! [`SAMPLE`] at a time; below [`MIN_CPU_SHARE`] it stops spinning for a back-off period
//! (doubling while the contention lasts, [`MIN_BACKOFF`] to [`MAX_BACKOFF`]).
//!
//! Spinning must also *pay*: lower latency enough to be worth its CPU. Whether it does
//! depends on the machine (on one 2-vCPU VM it made `pgbench -S -c 1` 1.3× faster than
//! direct TCP; on another it lost against not spinning, at three times the CPU), so the
//! spinner measures it where it runs: before it spins at all, and every [`TRIAL_EVERY`]
//! while it does, it runs a trial of [`TRIAL_ROUNDS`] alternating phases without and with
//! spinning, [`TRIAL_PHASE`] each, and counts session activity in each. Clients that wait
//! for each answer (an app, a test suite, pgbench) do more per second when answers come
//! sooner, so spinning pays when the spinning phases saw at least [`MIN_GAIN`] more
//! activity. When it does not, or when there was too little traffic to tell
//! ([`MIN_TRIAL_ACTIVITY`]: a lightly used proxy would pay a spin window per query), it
//! stops for [`MIN_PAUSE`], doubling to [`MAX_PAUSE`] while trials keep failing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Spinning time over which the CPU share is judged.
const SAMPLE: Duration = Duration::from_millis(5);
/// The share of wall-clock time the spinning thread must get on a CPU to keep spinning.
const MIN_CPU_SHARE: f64 = 0.85;
/// First pause in spinning after contention was seen.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
/// Longest pause: contention is re-checked at least this often.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often spinning proves again that it pays, while it is in use.
const TRIAL_EVERY: Duration = Duration::from_secs(10);
/// One phase of a trial (without spinning, or with).
const TRIAL_PHASE: Duration = Duration::from_millis(100);
/// Pairs of phases in a trial.
const TRIAL_ROUNDS: u32 = 3;
/// How much more activity the spinning phases must see.
const MIN_GAIN: f64 = 0.10;
/// Less activity than this in a whole trial cannot tell: no spinning.
const MIN_TRIAL_ACTIVITY: u64 = 200;
/// First pause after a trial found that spinning does not pay.
const MIN_PAUSE: Duration = Duration::from_secs(30);
/// Longest such pause.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// Shared between the relays (which report activity) and the spinner task.
#[derive(Default)]
pub struct Activity {
    count: AtomicU64,
    /// Spinning, or backing off from it: either way `touch` need not wake the spinner.
    busy: AtomicBool,
    notify: Notify,
}

impl Activity {
    /// Records that a session did something.
    #[inline]
    pub fn touch(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if !self.busy.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// Runs forever: after each activity, keeps the runtime polling for `window` past the
    /// last activity, unless spinning was found to take CPU others need (module docs).
    pub async fn spin(&self, window: Duration) {
        let mut share = CpuShare::default();
        let mut backoff = MIN_BACKOFF;
        let mut gain = GainCheck::default();
        loop {
            self.notify.notified().await;
            self.busy.store(true, Ordering::Relaxed);
            if gain.trial_due(Instant::now()) {
                let (without, with) = self.trial().await;
                if let Some(pause) = gain.judge(without, with, Instant::now()) {
                    tracing::debug!(
                        "busy-poll off for {pause:?}: activity {without} without spinning, \
                         {with} with (needs {MIN_TRIAL_ACTIVITY} in all and {:.0} % more)",
                        MIN_GAIN * 100.0
                    );
                    // `busy` stays set, so `touch` does not wake this task meanwhile.
                    tokio::time::sleep(pause).await;
                }
                self.busy.store(false, Ordering::Relaxed);
                continue;
            }
            if self.spin_once(window, &mut share).await {
                tracing::trace!("busy-poll paused for {backoff:?}: CPUs are saturated");
                // `busy` stays set, so `touch` does not wake this task meanwhile.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                share = CpuShare::default();
            } else if share.judged {
                backoff = MIN_BACKOFF;
                share.judged = false;
            }
            self.busy.store(false, Ordering::Relaxed);
        }
    }

    /// Counts activity in alternating phases without and with spinning (module docs);
    /// returns the two sums.
    async fn trial(&self) -> (u64, u64) {
        let (mut without, mut with) = (0, 0);
        for _ in 0..TRIAL_ROUNDS {
            let c0 = self.count.load(Ordering::Relaxed);
            tokio::time::sleep(TRIAL_PHASE).await;
            let c1 = self.count.load(Ordering::Relaxed);
            let end = Instant::now() + TRIAL_PHASE;
            while Instant::now() < end {
                tokio::task::yield_now().await;
            }
            let c2 = self.count.load(Ordering::Relaxed);
            without += c1.wrapping_sub(c0);
            with += c2.wrapping_sub(c1);
        }
        (without, with)
    }

    /// Spins until `window` passes with no activity. True if it stopped early because the
    /// thread did not get enough of the CPU.
    async fn spin_once(&self, window: Duration, share: &mut CpuShare) -> bool {
        let mut seen = self.count.load(Ordering::Relaxed);
        let mut deadline = Instant::now() + window;
        share.start();
        loop {
            tokio::task::yield_now().await;
            let now = Instant::now();
            let c = self.count.load(Ordering::Relaxed);
            if c != seen {
                seen = c;
                deadline = now + window;
            } else if now >= deadline {
                return share.stop(now) == Some(false);
            }
            if share.due(now) && share.stop(now) == Some(false) {
                return true;
            }
        }
    }
}

/// When spinning last proved to pay, and how long it stays off after it did not.
#[derive(Debug)]
struct GainCheck {
    /// The next trial is due at this time (`None`: before the first).
    next_trial: Option<Instant>,
    /// The pause after the next failed trial.
    pause: Duration,
}

impl Default for GainCheck {
    fn default() -> Self {
        GainCheck {
            next_trial: None,
            pause: MIN_PAUSE,
        }
    }
}

impl GainCheck {
    fn trial_due(&self, now: Instant) -> bool {
        self.next_trial.is_none_or(|at| now >= at)
    }

    /// Judges a trial's activity `without` and `with` spinning: `None` when spinning pays
    /// (next trial in [`TRIAL_EVERY`]), else how long to stay off.
    fn judge(&mut self, without: u64, with: u64, now: Instant) -> Option<Duration> {
        let enough = without + with >= MIN_TRIAL_ACTIVITY;
        if enough && with as f64 >= without as f64 * (1.0 + MIN_GAIN) {
            self.pause = MIN_PAUSE;
            self.next_trial = Some(now + TRIAL_EVERY);
            return None;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        self.next_trial = Some(now + pause);
        Some(pause)
    }
}

/// The spinning thread's CPU time against the wall-clock time it spun, summed over spins
/// until [`SAMPLE`] of spinning is reached, then judged.
#[derive(Default)]
struct CpuShare {
    wall: Duration,
    cpu: Duration,
    /// Where the current stretch of spinning began (wall, thread CPU).
    started: Option<(Instant, Duration)>,
    /// A sample was judged (and found fine) since the last back-off.
    judged: bool,
}

impl CpuShare {
    fn start(&mut self) {
        self.started = thread_cpu_time().map(|cpu| (Instant::now(), cpu));
    }

    fn due(&self, now: Instant) -> bool {
        self.started
            .is_some_and(|(wall, _)| self.wall + now.duration_since(wall) >= SAMPLE)
    }

    /// Ends the current stretch; once a whole sample is in, returns whether the thread got
    /// its share (and starts the next sample, and the next stretch).
    fn stop(&mut self, now: Instant) -> Option<bool> {
        let (wall0, cpu0) = self.started.take()?;
        let cpu = thread_cpu_time()?;
        self.started = Some((now, cpu));
        self.record(now.duration_since(wall0), cpu.saturating_sub(cpu0))
    }

    /// Adds a stretch of spinning that took `wall` and got `cpu`; judges the sample once it
    /// is complete.
    fn record(&mut self, wall: Duration, cpu: Duration) -> Option<bool> {
        self.wall += wall;
        self.cpu += cpu;
        if self.wall < SAMPLE {
            return None;
        }
        let fine = self.cpu.as_secs_f64() >= MIN_CPU_SHARE * self.wall.as_secs_f64();
        self.wall = Duration::ZERO;
        self.cpu = Duration::ZERO;
        self.judged = true;
        Some(fine)
    }
}

/// CPU time the calling thread has used; `None` where not measured (spinning then never
/// backs off, as before this check existed).
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Option<Duration> {
    // SAFETY: a timespec is plain integers (zero is valid), and clock_gettime only writes
    // the one it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    #[test]
    fn spinning_runs_only_after_a_trial_shows_it_pays() {
        let t0 = Instant::now();
        let mut gain = GainCheck::default();
        assert!(gain.trial_due(t0), "no spinning before the first trial");
        // One client waiting for each answer, answers 30 % sooner with spinning.
        assert_eq!(gain.judge(1000, 1300, t0), None);
        assert!(!gain.trial_due(t0 + Duration::from_secs(9)));
        assert!(
            gain.trial_due(t0 + TRIAL_EVERY),
            "proved again while in use"
        );
    }

    #[test]
    fn spinning_that_does_not_pay_stops_for_longer_each_time() {
        let t0 = Instant::now();
        let mut gain = GainCheck::default();
        // 5 % more is within noise: not worth its CPU.
        assert_eq!(gain.judge(1000, 1050, t0), Some(MIN_PAUSE));
        assert!(!gain.trial_due(t0 + MIN_PAUSE / 2));
        let t1 = t0 + MIN_PAUSE;
        assert!(gain.trial_due(t1));
        // Slower with spinning (it took CPU the servers needed).
        assert_eq!(gain.judge(1000, 800, t1), Some(MIN_PAUSE * 2));
        for _ in 0..10 {
            gain.judge(1000, 800, t1);
        }
        assert_eq!(gain.judge(1000, 800, t1), Some(MAX_PAUSE));
        // Once it pays again the pauses start over.
        assert_eq!(gain.judge(1000, 2000, t1), None);
        assert_eq!(gain.judge(1000, 1000, t1), Some(MIN_PAUSE));
    }

    #[test]
    fn too_little_traffic_means_no_spinning() {
        let mut gain = GainCheck::default();
        // A lightly used proxy: even a large relative gain is a handful of queries, and
        // each would pay a whole spin window of CPU.
        assert_eq!(gain.judge(20, 60, Instant::now()), Some(MIN_PAUSE));
    }

    #[test]
    fn judges_only_whole_samples() {
        let mut share = CpuShare::default();
        assert_eq!(
            share.record(ms(2.0), ms(0.1)),
            None,
            "2 ms is not a sample yet"
        );
        assert_eq!(share.record(ms(2.0), ms(0.1)), None);
        // 5 ms spun, 1.2 ms on a CPU: the kernel ran others in the proxy's place.
        assert_eq!(share.record(ms(1.0), ms(1.0)), Some(false));
        assert!(share.judged);
    }

    #[test]
    fn a_thread_with_its_own_cpu_keeps_spinning() {
        let mut share = CpuShare::default();
        // ~98 % of the wall time on a CPU, as measured with one session on 2 vCPUs.
        assert_eq!(share.record(ms(5.0), ms(4.9)), Some(true));
        // Each sample is judged on its own.
        assert_eq!(
            share.record(ms(6.0), ms(3.9)),
            Some(false),
            "65 %, as at -c 8"
        );
        assert_eq!(share.record(ms(5.0), ms(4.3)), Some(true), "86 %");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn thread_cpu_time_advances_with_work() {
        let t0 = thread_cpu_time().expect("CLOCK_THREAD_CPUTIME_ID");
        let start = Instant::now();
        while start.elapsed() < ms(20.0) {
            std::hint::spin_loop();
        }
        let used = thread_cpu_time().unwrap() - t0;
        assert!(used > ms(1.0), "20 ms of spinning used {used:?} of CPU");
        std::thread::sleep(ms(20.0));
        let slept = thread_cpu_time().unwrap() - t0 - used;
        assert!(slept < ms(5.0), "sleeping 20 ms used {slept:?} of CPU");
    }
}
