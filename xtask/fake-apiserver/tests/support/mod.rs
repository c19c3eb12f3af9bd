//! What the API server's test binaries share: waiting for the next item of
//! a watch stream, and the names of listed objects.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::time::Duration;

use futures::{Stream, TryStreamExt};
use kube::Resource;

/// How long a step (a watch event) may take.
pub const STEP: Duration = Duration::from_secs(10);

/// The next item of `stream`, which must come within [`STEP`] and be no error.
pub async fn next_item<T, E: std::fmt::Debug>(
    stream: &mut (impl Stream<Item = Result<T, E>> + Unpin),
) -> T {
    tokio::time::timeout(STEP, stream.try_next())
        .await
        .expect("an item within the timeout")
        .expect("no error")
        .expect("the stream does not end")
}

/// The names of `objects`, in their order.
pub fn object_names<K: Resource>(objects: &[K]) -> Vec<String> {
    objects
        .iter()
        .map(|object| object.meta().name.clone().unwrap())
        .collect()
}
