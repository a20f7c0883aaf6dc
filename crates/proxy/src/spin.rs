//! Optional busy-polling after activity ([`crate::ProxyConfig::busy_poll`]).
//!
//! On a small (virtual) machine a relay's cost is dominated by sleeping and being woken up:
//! every message wakes the proxy thread, and waking an idle vCPU is slow. With busy-polling,
//! after any session did work the runtime keeps polling its I/O driver (a task that yields
//! in a loop; tokio polls the driver without blocking between yields) for a short window, so
//! the next message is usually picked up without a wake-up. When nothing happens for the
//! window the task sleeps until the next activity, so an idle proxy costs nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Shared between the relays (which report activity) and the spinner task.
#[derive(Default)]
pub struct Activity {
    count: AtomicU64,
    spinning: AtomicBool,
    notify: Notify,
}

impl Activity {
    /// Records that a session did something.
    #[inline]
    pub fn touch(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if !self.spinning.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// Runs forever: after each activity, keeps the runtime polling for `window` past the
    /// last activity.
    pub async fn spin(&self, window: Duration) {
        loop {
            self.notify.notified().await;
            self.spinning.store(true, Ordering::Relaxed);
            let mut seen = self.count.load(Ordering::Relaxed);
            let mut deadline = Instant::now() + window;
            loop {
                tokio::task::yield_now().await;
                let now = Instant::now();
                let c = self.count.load(Ordering::Relaxed);
                if c != seen {
                    seen = c;
                    deadline = now + window;
                } else if now >= deadline {
                    break;
                }
            }
            self.spinning.store(false, Ordering::Relaxed);
        }
    }
}
