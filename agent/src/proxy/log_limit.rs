//! A bound on log lines that peers can cause: a flood of bad handshakes or
//! stray connections must not become a flood of log lines (disk, log
//! shipping, the operator's attention).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Lets at most `burst` lines through per `window`; the rest are counted and
/// the count is reported with the next line let through.
pub(crate) struct LogLimiter {
    window: Duration,
    burst: u32,
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    admitted: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst,
            state: Mutex::new(Window {
                started: Instant::now(),
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines suppressed since the last one let through)` when this
    /// line may be logged, `None` when it must be dropped.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().expect("log limiter lock poisoned");
        let now = Instant::now();
        if now.duration_since(state.started) >= self.window {
            state.started = now;
            state.admitted = 0;
        }
        if state.admitted >= self.burst {
            state.suppressed += 1;
            return None;
        }
        state.admitted += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_a_burst_through_per_window_and_reports_what_it_dropped() {
        let limiter = LogLimiter::new(Duration::from_millis(200), 3);
        let first: Vec<_> = (0..10).map(|_| limiter.admit()).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            limiter.admit(),
            Some(7),
            "the next window reports the 7 dropped"
        );
        assert_eq!(limiter.admit(), Some(0));
    }
}
