//! Reporting the session count: on change, coalesced to at most one report per `coalesce`,
//! and as a heartbeat every `interval` (the key's TTL is three intervals).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Calls `sink(count)` on every change (coalesced) and every `interval`, until `shutdown`.
/// A failing sink is logged and retried at the next change or heartbeat: never fatal.
pub async fn run<F, Fut, E>(
    mut counts: watch::Receiver<u64>,
    interval: Duration,
    coalesce: Duration,
    mut sink: F,
    shutdown: CancellationToken,
) where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut failing = false;
    loop {
        let value = *counts.borrow_and_update();
        let sent_at = Instant::now();
        // A report stuck on an unreachable Redis must not hold up shutdown.
        let sent = tokio::select! {
            () = shutdown.cancelled() => return,
            r = sink(value) => r,
        };
        match sent {
            Ok(()) => {
                if failing {
                    tracing::info!(count = value, "session count reports resumed");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot report the session count; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = counts.changed() => {
                if changed.is_err() {
                    return;
                }
                // Coalesce: report the latest value once the window since the last report ends.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(sent_at + coalesce) => {}
                }
            }
            () = tokio::time::sleep_until(sent_at + interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    type Log = Arc<Mutex<Vec<(u64, Duration)>>>;

    fn recorder(
        t0: Instant,
    ) -> (
        Log,
        impl FnMut(u64) -> futures::future::Ready<Result<(), String>>,
    ) {
        let log: Log = Arc::default();
        let l2 = log.clone();
        (log, move |v| {
            l2.lock().unwrap().push((v, t0.elapsed()));
            futures::future::ready(Ok(()))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_reported_once_per_coalesce_window() {
        let (tx, rx) = watch::channel(0u64);
        let t0 = Instant::now();
        let (log, sink) = recorder(t0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            Duration::from_secs(1),
            Duration::from_millis(100),
            sink,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        for v in 1..=50 {
            tx.send_replace(v);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        task.await.unwrap();
        let log = log.lock().unwrap().clone();
        let ms: Vec<(u64, u128)> = log.iter().map(|(v, d)| (*v, d.as_millis())).collect();
        // The first report at 0, then the latest value once, when the 100 ms window ends.
        assert_eq!(ms, vec![(0, 0), (50, 100)], "{ms:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_count_is_still_reported_every_interval() {
        let (_tx, rx) = watch::channel(7u64);
        let (log, sink) = recorder(Instant::now());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            Duration::from_secs(1),
            Duration::from_millis(100),
            sink,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        stop.cancel();
        task.await.unwrap();
        let secs: Vec<u64> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.as_secs())
            .collect();
        assert_eq!(secs, vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_sink_does_not_stop_reporting() {
        let (_tx, rx) = watch::channel(1u64);
        let calls = Arc::new(Mutex::new(0));
        let c2 = calls.clone();
        let sink = move |_| {
            *c2.lock().unwrap() += 1;
            futures::future::ready(Err::<(), _>("redis is down"))
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            rx,
            Duration::from_secs(1),
            Duration::from_millis(100),
            sink,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(*calls.lock().unwrap(), 3);
    }
}
