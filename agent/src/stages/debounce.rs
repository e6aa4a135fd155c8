//! Debounce: batch a stream's items by a quiet window, with a maximum delay so that a
//! constant trickle still flushes.
//!
//! Hand-written because no combinator does both: `tokio_stream::StreamExt::chunks_timeout`
//! flushes a batch a fixed time after its first item (our maximum delay) or when it is full,
//! but has no quiet window, so a burst would always wait out the whole maximum delay.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    pub struct Debounce<S: Stream> {
        #[pin]
        inner: S,
        quiet: Duration,
        max_delay: Duration,
        batch: Vec<S::Item>,
        #[pin]
        quiet_timer: Sleep,
        deadline: Instant,
        #[pin]
        deadline_timer: Sleep,
        done: bool,
    }
}

impl<S: Stream> Debounce<S> {
    pub fn new(inner: S, quiet: Duration, max_delay: Duration) -> Self {
        let now = Instant::now();
        Debounce {
            inner,
            quiet,
            max_delay,
            batch: Vec::new(),
            quiet_timer: tokio::time::sleep_until(now),
            deadline: now,
            deadline_timer: tokio::time::sleep_until(now),
            done: false,
        }
    }
}

impl<S: Stream> Stream for Debounce<S> {
    type Item = Vec<S::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        while !*this.done {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let now = Instant::now();
                    if this.batch.is_empty() {
                        *this.deadline = now + *this.max_delay;
                        this.deadline_timer.as_mut().reset(*this.deadline);
                    }
                    this.batch.push(item);
                    this.quiet_timer.as_mut().reset(now + *this.quiet);
                    if now >= *this.deadline {
                        return Poll::Ready(Some(std::mem::take(this.batch)));
                    }
                }
                Poll::Ready(None) => *this.done = true,
                Poll::Pending => break,
            }
        }
        if this.batch.is_empty() {
            return if *this.done {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        if *this.done
            || this.quiet_timer.as_mut().poll(cx).is_ready()
            || this.deadline_timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(std::mem::take(this.batch)));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::stages::StreamStages;

    #[tokio::test(start_paused = true)]
    async fn a_burst_flushes_once_after_the_quiet_window() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut s = std::pin::pin!(rx.debounce(Duration::from_millis(200), Duration::from_secs(1)));
        let t0 = Instant::now();
        for i in 0..5 {
            tx.unbounded_send(i).unwrap();
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.unbounded_send(5).unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        assert_eq!(s.next().await.unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(t0.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_constant_trickle_still_flushes_at_the_maximum_delay() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut s = std::pin::pin!(rx.debounce(Duration::from_millis(200), Duration::from_secs(1)));
        tokio::spawn(async move {
            for i in 0.. {
                if tx.unbounded_send(i).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        let t0 = Instant::now();
        let first = s.next().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        assert_eq!(first, vec![0, 1, 2, 3, 4, 5, 6]);
        let second = s.next().await.unwrap();
        assert_eq!(second.first(), Some(&7), "nothing is lost between batches");
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_batch_is_flushed_when_the_input_ends() {
        let s = futures::stream::iter(vec![1, 2, 3])
            .debounce(Duration::from_secs(5), Duration::from_secs(9));
        assert_eq!(s.collect::<Vec<_>>().await, vec![vec![1, 2, 3]]);
    }
}
