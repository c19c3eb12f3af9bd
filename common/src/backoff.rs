//! Retry delays for every retry loop of the agent and the CLI: capped
//! exponential back-off with jitter, computed by `backon`.

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tokio::time::Instant;

/// Delays that start at `first` and double per failure up to `cap`, each a
/// random 50–100 % of its step, so agents that failed together do not retry
/// in lockstep. Every delay lies within `[first / 2, cap]`; the sequence never
/// ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CappedBackoff {
    pub first: Duration,
    pub cap: Duration,
}

impl CappedBackoff {
    pub fn delays(self) -> impl backon::Backoff {
        let cap = self.cap.max(self.first);
        // backon's jitter adds up to 100 % of its step: half steps give
        // 50–100 % of ours. The final `min` absorbs its f32 rounding.
        ExponentialBuilder::new()
            .with_min_delay(self.first / 2)
            .with_max_delay(cap / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |delay| delay.min(cap))
    }

    /// Calls `call` until it succeeds, fails with an error `retryable`
    /// refuses, or the next attempt would start after `deadline`; `notify`
    /// hears of each failure that is retried, with the delay before the retry.
    pub async fn retry_until<T, E, Fut>(
        self,
        deadline: Instant,
        call: impl FnMut() -> Fut,
        retryable: impl FnMut(&E) -> bool,
        notify: impl FnMut(&E, Duration),
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        call.retry(self.delays())
            .when(retryable)
            .adjust(move |_, delay| delay.filter(|delay| Instant::now() + *delay < deadline))
            .notify(notify)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        let backoff = CappedBackoff {
            first: Duration::from_secs(1),
            cap: Duration::from_secs(8),
        };
        let mut below_step = 0;
        for _ in 0..50 {
            let delays: Vec<Duration> = backoff.delays().take(8).collect();
            for (delay, step) in delays.iter().zip([1, 2, 4, 8, 8, 8, 8, 8]) {
                let step = Duration::from_secs(step);
                assert!(
                    *delay >= step / 2 && *delay <= step,
                    "{delay:?} for a {step:?} step: {delays:?}"
                );
                if *delay < step.mul_f64(0.95) {
                    below_step += 1;
                }
            }
        }
        // Jittered: most delays fall well below their step.
        assert!(below_step > 200, "{below_step} of 400 delays were jittered");
    }

    #[test]
    fn a_cap_below_the_first_delay_is_the_first_delay() {
        let backoff = CappedBackoff {
            first: Duration::from_secs(4),
            cap: Duration::from_secs(1),
        };
        for delay in backoff.delays().take(20) {
            assert!(
                delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4),
                "{delay:?}"
            );
        }
    }

    const STARTUP: CappedBackoff = CappedBackoff {
        first: Duration::from_millis(200),
        cap: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_deadline_or_a_final_error() {
        let start = Instant::now();
        let calls = Arc::new(AtomicU32::new(0));
        let result: Result<(), &str> = STARTUP
            .retry_until(
                start + Duration::from_secs(20),
                || {
                    calls.fetch_add(1, Ordering::Relaxed);
                    async { Err("unreachable") }
                },
                |_| true,
                |_, delay| assert!(delay <= STARTUP.cap),
            )
            .await;
        assert_eq!(result, Err("unreachable"));
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
        // 0.1–0.2 + 0.2–0.4 + 0.4–0.8 + 0.8–1.6 + 1.6–3.2 s, then 2.5–5 s steps.
        let made = calls.load(Ordering::Relaxed);
        assert!((7..=13).contains(&made), "{made} calls");

        calls.store(0, Ordering::Relaxed);
        let result: Result<(), &str> = STARTUP
            .retry_until(
                Instant::now() + Duration::from_secs(20),
                || {
                    let n = calls.fetch_add(1, Ordering::Relaxed);
                    async move {
                        if n < 2 {
                            Err("transient")
                        } else {
                            Err("final")
                        }
                    }
                },
                |error| *error == "transient",
                |_, _| {},
            )
            .await;
        assert_eq!(result, Err("final"));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }
}
