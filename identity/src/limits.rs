//! What keeps one caller from starving the others or the Kubernetes API:
//! a per-caller rate limit (by source address: an agent's node, a pod),
//! checked before any token is reviewed; a limit on requests in flight and
//! a deadline per request (tower layers on the gRPC server).
//!
//! A caller over its rate gets `RESOURCE_EXHAUSTED` at once, without a
//! TokenReview or pod lookup; agents back off and retry. Refused tokens are
//! also remembered briefly (`kube::tokens`), so a flood of bogus tokens costs
//! the API one review per distinct token.

use std::{net::IpAddr, num::NonZeroU32, sync::Mutex, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::Status;

/// Requests served at once; more wait (up to their deadline).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 256;
/// How long one request may take, waiting included.
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Sustained Certify calls per second and caller address. An agent asks
/// once per local ServiceAccount and renewal period, far below this.
pub const DEFAULT_CALLER_RATE: u32 = 20;
/// Calls a caller may make at once beyond its rate: an agent starting on a
/// node with many ServiceAccounts asks for all of them together.
pub const CALLER_BURST_PER_RATE: u32 = 10;
/// Remembered callers beyond which idle ones are forgotten.
const TRACKED_CALLERS: usize = 10_000;

/// The service's request limits (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_concurrent: usize,
    pub deadline: Duration,
    /// Certify calls per second per caller address; `None`: unlimited (the
    /// identity benchmark, one client measuring the CA's own throughput).
    pub caller_rate: Option<NonZeroU32>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_concurrent: DEFAULT_MAX_CONCURRENT_REQUESTS,
            deadline: DEFAULT_REQUEST_DEADLINE,
            caller_rate: NonZeroU32::new(DEFAULT_CALLER_RATE),
        }
    }
}

/// The per-caller token buckets.
pub struct CallerLimiter {
    rate: NonZeroU32,
    buckets: DefaultKeyedRateLimiter<IpAddr>,
    /// Serialises the occasional clean-up of idle callers.
    cleanup: Mutex<()>,
}

impl std::fmt::Debug for CallerLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerLimiter")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl CallerLimiter {
    pub fn new(rate: NonZeroU32) -> Self {
        let burst = rate.saturating_mul(NonZeroU32::new(CALLER_BURST_PER_RATE).expect("non-zero"));
        Self {
            rate,
            buckets: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            cleanup: Mutex::new(()),
        }
    }

    /// Admits one call of `caller`, or says why not.
    pub fn admit(&self, caller: IpAddr) -> Result<(), Status> {
        if self.buckets.len() > TRACKED_CALLERS
            && let Ok(_only_one) = self.cleanup.try_lock()
        {
            self.buckets.retain_recent();
        }
        self.buckets.check_key(&caller).map_err(|_| {
            Status::resource_exhausted(format!(
                "caller {caller} exceeded {} certificate requests per second; retry with back-off",
                self.rate
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_over_its_rate_is_refused_and_others_are_not() {
        let limiter = CallerLimiter::new(NonZeroU32::new(2).unwrap());
        let flooding: IpAddr = "10.244.0.9".parse().unwrap();
        let burst = 2 * CALLER_BURST_PER_RATE;
        for call in 0..burst {
            assert!(limiter.admit(flooding).is_ok(), "call {call} of the burst");
        }
        let refused = limiter.admit(flooding).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            "caller 10.244.0.9 exceeded 2 certificate requests per second; retry with back-off"
        );
        assert!(limiter.admit("172.18.0.2".parse().unwrap()).is_ok());
    }
}
