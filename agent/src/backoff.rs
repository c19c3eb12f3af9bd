//! The agent's retry delays (the back-off itself lives in
//! `sealmesh_common::backoff`, shared with the CLI).

use std::time::Duration;

pub use sealmesh_common::backoff::CappedBackoff;

/// Retries at start-up (resolving the identity service, the first calls to
/// the Kubernetes API): a quick first retry, then at most every 5 s until the
/// start-up deadline.
pub const STARTUP: CappedBackoff = CappedBackoff {
    first: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};
