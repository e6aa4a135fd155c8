//! Consul blocking queries as a stream of changed results, following Consul's rules:
//! reset the index when it goes backwards, never block on an index below 1, rate-limit the
//! loop with a token bucket, bound each poll (in [`Consul::blocking_get`]), and drop answers
//! that change nothing. One implementation serves both the health and the KV source.
//!
//! One hazard Consul's rules leave open: an agent restarted without its data (a dev agent,
//! a lost raft store) between two of our reads. The next read carries an index the new
//! agent has not reached, and Consul holds it for the whole wait (5 minutes by default)
//! while the old answer still looks current. [`Restarts`] probes an index that only grows
//! and cuts every watch short when it goes backwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::Stream;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use crate::contract::consul::{Consul, ConsulError, Fetched};
use crate::stages::rate::TokenBucket;

/// The index to send with the next request, given the previous one and the one returned.
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        // The index went backwards (a snapshot restore, a new leader): start over with a
        // non-blocking read.
        0
    } else {
        // An index of 0 would make the next read return at once, forever: never go below 1.
        returned.max(1)
    }
}

/// Fetches `path` at an index; in production a Consul blocking read.
pub type Fetch = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<Fetched, ConsulError>> + Send + Sync>;

/// How often [`Restarts::probe`] reads its index.
pub const RESTART_PROBE_EVERY: Duration = Duration::from_secs(2);

/// The generations of a Consul agent: bumped each time it is seen to have lost its data.
#[derive(Clone, Debug)]
pub struct Restarts(signal::Receiver<u64>);

impl Restarts {
    /// Never bumped: for watches whose wait is short enough to bound the hang.
    pub fn none() -> Restarts {
        Restarts(signal::channel(0).1)
    }

    /// Reads `path` (a KV key: its index, or the KV table's when it is missing, only grows
    /// while Consul keeps its data) every `every` until `shutdown`, and bumps the generation
    /// when the index goes backwards.
    pub fn probe(
        consul: Consul,
        path: String,
        every: Duration,
        shutdown: CancellationToken,
    ) -> Restarts {
        let (tx, rx) = signal::channel(0u64);
        tokio::spawn(async move {
            let (mut last, mut warned) = (0u64, false);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let f = match consul.blocking_get(&path, 0, every).await {
                    Ok(f) => f,
                    Err(e) => {
                        if !warned
                            && matches!(&e, ConsulError::Status { status, .. } if status.as_u16() == 403)
                        {
                            warned = true;
                            tracing::warn!(error = %e, "the restart probe may not read its key: a Consul that loses its data is noticed only when each watch's wait runs out");
                        }
                        continue; // unreachable: the watches see that themselves
                    }
                };
                if f.index < last {
                    tracing::warn!(
                        consul = consul.base(),
                        from = last,
                        to = f.index,
                        "Consul's index went backwards: it lost its data; every watch resyncs"
                    );
                    tx.send_modify(|g| *g += 1);
                }
                last = f.index;
            }
        });
        Restarts(rx)
    }
}

/// A blocking read of `path` against `consul`, for [`watch`]; cut short with an error when
/// `restarts` moves on (and failing at once when it moved between two reads).
pub fn consul_fetch(consul: Consul, path: String, wait: Duration, restarts: Restarts) -> Fetch {
    let acted = Arc::new(AtomicU64::new(*restarts.0.borrow()));
    Arc::new(move |index| {
        let consul = consul.clone();
        let path = path.clone();
        let mut rx = restarts.0.clone();
        let acted = acted.clone();
        Box::pin(async move {
            let lost = |url: &str| ConsulError::DataLost {
                url: url.to_string(),
            };
            let generation = *rx.borrow_and_update();
            if acted.swap(generation, Ordering::SeqCst) != generation && index > 0 {
                return Err(lost(&path));
            }
            tokio::select! {
                r = consul.blocking_get(&path, index, wait) => r,
                Ok(()) = rx.changed() => {
                    acted.store(*rx.borrow(), Ordering::SeqCst);
                    Err(lost(&path))
                }
            }
        })
    })
}

struct State<T> {
    fetch: Fetch,
    index: u64,
    last: Option<T>,
    bucket: TokenBucket,
}

/// Streams `parse(answer)` each time it changes. Errors are yielded (and the next read starts
/// over from index 0, so a reconnect always resyncs in full); pace retries with `.backoff()`.
pub fn watch<T, P>(fetch: Fetch, parse: P) -> impl Stream<Item = Result<T, ConsulError>>
where
    T: PartialEq + Clone + Send + 'static,
    P: Fn(&Fetched) -> Result<T, ConsulError> + Send + Sync + 'static,
{
    let state = State {
        fetch,
        index: 0,
        last: None,
        bucket: TokenBucket::new(5.0, 5),
    };
    let parse = Arc::new(parse);
    futures::stream::unfold(state, move |mut st| {
        let parse = parse.clone();
        async move {
            loop {
                st.bucket.take().await;
                let fetched = match (st.fetch)(st.index).await {
                    Ok(f) => f,
                    Err(e) => {
                        st.index = 0;
                        st.last = None;
                        return Some((Err(e), st));
                    }
                };
                let unchanged_index = st.index != 0 && fetched.index == st.index;
                st.index = next_index(st.index, fetched.index);
                if unchanged_index && st.last.is_some() {
                    continue; // the wait elapsed with no change
                }
                let value = match parse(&fetched) {
                    Ok(v) => v,
                    Err(e) => {
                        st.index = 0;
                        st.last = None;
                        return Some((Err(e), st));
                    }
                };
                if st.last.as_ref() == Some(&value) {
                    continue; // a change elsewhere in Consul that does not touch us
                }
                st.last = Some(value.clone());
                return Some((Ok(value), st));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use futures::StreamExt;

    use super::*;

    #[test]
    fn the_index_resets_when_it_goes_backwards_and_never_drops_below_one() {
        assert_eq!(next_index(0, 10), 10);
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(12, 5), 0);
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(7, 7), 7);
    }

    /// A scripted Consul: answers in order, recording the index each request carried.
    fn scripted(answers: Vec<Result<(u64, &'static str), ()>>) -> (Fetch, Arc<Mutex<Vec<u64>>>) {
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let fetch: Fetch = Arc::new(move |index| {
            s2.lock().unwrap().push(index);
            let next = answers.lock().unwrap().pop_front();
            Box::pin(async move {
                match next {
                    Some(Ok((i, body))) => Ok(Fetched {
                        index: i,
                        found: true,
                        body: bytes::Bytes::from_static(body.as_bytes()),
                    }),
                    Some(Err(())) => Err(ConsulError::NoIndex { url: "test".into() }),
                    None => futures::future::pending().await,
                }
            })
        });
        (fetch, seen)
    }

    #[allow(clippy::unnecessary_wraps)] // the shape watch() asks of a parser
    fn body(f: &Fetched) -> Result<String, ConsulError> {
        Ok(String::from_utf8_lossy(&f.body).into_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_change_nothing_are_dropped() {
        let (fetch, seen) = scripted(vec![
            Ok((5, "a")),
            Ok((5, "a")), // wait elapsed, same index
            Ok((6, "a")), // index moved, same content
            Ok((9, "b")),
        ]);
        let mut s = Box::pin(watch(fetch, body));
        assert_eq!(s.next().await.unwrap().unwrap(), "a");
        assert_eq!(s.next().await.unwrap().unwrap(), "b");
        assert_eq!(*seen.lock().unwrap(), vec![0, 5, 5, 6]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_going_backwards_or_an_error_restarts_with_a_full_read() {
        let (fetch, seen) = scripted(vec![
            Ok((50, "a")),
            Ok((3, "b")), // went backwards: yielded (content changed), next read from 0
            Ok((4, "b")),
            Err(()),
            Ok((4, "b")), // after an error the same content is yielded again: a resync
            Ok((0, "c")),
        ]);
        let mut s = Box::pin(watch(fetch, body));
        assert_eq!(s.next().await.unwrap().unwrap(), "a");
        assert_eq!(s.next().await.unwrap().unwrap(), "b");
        assert!(s.next().await.unwrap().is_err());
        assert_eq!(s.next().await.unwrap().unwrap(), "b");
        assert_eq!(s.next().await.unwrap().unwrap(), "c");
        assert_eq!(*seen.lock().unwrap(), vec![0, 50, 0, 4, 0, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_is_rate_limited() {
        let answers: Vec<_> = (1..=25)
            .map(|i| Ok((i, if i % 2 == 0 { "x" } else { "y" })))
            .collect();
        let (fetch, _) = scripted(answers);
        let s = Box::pin(watch(fetch, body));
        let t0 = tokio::time::Instant::now();
        let n = s.take(25).count().await;
        assert_eq!(n, 25);
        // 5 at once, then 5 per second.
        assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    }
}
