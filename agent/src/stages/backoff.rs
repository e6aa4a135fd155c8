//! Retry pacing for sources that yield errors: capped exponential backoff with jitter,
//! reset after the source has been healthy for a while.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::Stream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    pub min: Duration,
    pub max: Duration,
    /// Healthy this long (no error since the first success) and the delay starts over.
    pub reset_after: Duration,
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            min: Duration::from_millis(200),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl BackoffPolicy {
    /// The delays this policy waits, in order; for loops that pace themselves.
    pub fn delays(&self) -> ExponentialBackoff {
        let b = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times();
        // backon's jitter adds a random share of the current delay, in [0, delay).
        if self.jitter { b.with_jitter() } else { b }.build()
    }
}

pin_project! {
    /// The stream of [`super::StreamStages::backoff`].
    pub struct Backoff<S> {
        #[pin]
        inner: S,
        policy: BackoffPolicy,
        delays: ExponentialBackoff,
        #[pin]
        sleep: Option<Sleep>,
        healthy_since: Option<Instant>,
    }
}

impl<S> Backoff<S> {
    pub fn new(inner: S, policy: BackoffPolicy) -> Self {
        Backoff {
            inner,
            delays: policy.delays(),
            policy,
            sleep: None,
            healthy_since: None,
        }
    }
}

impl<S, T, E> Stream for Backoff<S>
where
    S: Stream<Item = Result<T, E>>,
{
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            ready!(sleep.poll(cx));
            this.sleep.set(None);
        }
        let item = ready!(this.inner.poll_next(cx));
        let now = Instant::now();
        match &item {
            Some(Ok(_)) => {
                this.healthy_since.get_or_insert(now);
            }
            Some(Err(_)) => {
                if this
                    .healthy_since
                    .is_some_and(|at| now.saturating_duration_since(at) >= this.policy.reset_after)
                {
                    *this.delays = this.policy.delays();
                }
                *this.healthy_since = None;
                let delay = this.delays.next().unwrap_or(this.policy.max);
                this.sleep.set(Some(tokio::time::sleep(delay)));
            }
            None => {}
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::stages::StreamStages;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_millis(800),
            reset_after: Duration::from_secs(5),
            jitter: false,
        }
    }

    /// Polls until the next item, returning it and how much (virtual) time passed.
    async fn timed<S: Stream + Unpin>(s: &mut S) -> (S::Item, Duration) {
        let t0 = Instant::now();
        let item = s.next().await.unwrap();
        (item, t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_exponentially_up_to_the_cap_after_each_error() {
        let mut s = std::pin::pin!(
            futures::stream::iter((0..6).map(|_| Err::<(), _>("down"))).backoff(policy())
        );
        let mut gaps = Vec::new();
        for _ in 0..6 {
            gaps.push(timed(&mut s).await.1.as_millis());
        }
        // backon multiplies in f32 and tokio's timer rounds up to the millisecond.
        let want = [0, 100, 200, 400, 800, 800];
        assert!(
            gaps.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 1),
            "{gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_period_resets_the_delay() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<u32, &str>>();
        let mut s = std::pin::pin!(rx.backoff(policy()));
        for _ in 0..3 {
            tx.unbounded_send(Err("down")).unwrap();
            s.next().await;
        }
        // Next error would wait 400ms; be healthy for longer than reset_after first.
        tx.unbounded_send(Ok(1)).unwrap();
        assert!(timed(&mut s).await.1.as_millis().abs_diff(400) <= 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        tx.unbounded_send(Err("down")).unwrap();
        s.next().await;
        tx.unbounded_send(Ok(2)).unwrap();
        assert!(timed(&mut s).await.1.as_millis().abs_diff(100) <= 1);
    }
}
