//! Stream stages as verbs on one extension trait: `.backoff(policy)`, `.debounce(quiet, max)`.

pub mod backoff;
pub mod debounce;
pub mod rate;

use std::time::Duration;

use futures::Stream;

pub use backoff::{Backoff, BackoffPolicy};
pub use debounce::Debounce;

pub trait StreamStages: Stream + Sized {
    /// After every `Err` item, waits a capped, jittered, exponentially growing delay before
    /// polling the source again; the delay resets after a healthy period.
    fn backoff<T, E>(self, policy: BackoffPolicy) -> Backoff<Self>
    where
        Self: Stream<Item = Result<T, E>>,
    {
        Backoff::new(self, policy)
    }

    /// Batches items: flushes once no item came for `quiet`, or `max_delay` after the first
    /// item of the batch, whichever is sooner. Nothing is dropped.
    fn debounce(self, quiet: Duration, max_delay: Duration) -> Debounce<Self> {
        Debounce::new(self, quiet, max_delay)
    }
}

impl<S: Stream> StreamStages for S {}
