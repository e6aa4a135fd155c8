//! Accepting client connections: the listening socket each event loop has, the wait for a
//! first complete view of the fleet, and the accept loop that admits each connection
//! (`limits::Admission`) and hands it to the fast path (`forward`) or hyper's.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{conn, forward, limits, rewind, serve_connection, tls, Gateway, LOOP};
use crate::fleet::topology::Topology;

/// Accepted connections inherit `TCP_NODELAY` from the listening socket on Linux: set once
/// there, it saves a system call per connection.
const NODELAY_INHERITED: bool = cfg!(target_os = "linux");

/// The client listener: `SO_REUSEADDR` (a restart does not wait out `TIME_WAIT`), Nagle off
/// for every accepted connection, delayed acknowledgements from the first request on (its
/// answer carries the ACK: one packet fewer per connection, as `HAProxy` does for HTTP), a
/// backlog of 1,024.
pub(super) fn client_listener(
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Every event loop listens on the address (see `run`).
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(&listener).set_tcp_quickack(false)?;
    Ok(listener)
}

/// Raises the soft open-file limit to the hard one: each client connection holds a socket,
/// and one to its server. Says so when even that is too few for `max_connections`.
pub(super) fn raise_open_files(max_connections: usize) {
    let needed = max_connections as u64 * 2 + 256;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < needed => tracing::warn!(
            open_files = n,
            max_connections,
            "the open-file limit is too low for max_connections: raise the hard limit \
             (ulimit -Hn, LimitNOFILE=) or lower gateway.max_connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// How long a starting gateway waits for its first complete view of the fleet (health,
/// states and counts all read) before it serves on what it has.
const FLEET_WAIT: Duration = Duration::from_secs(5);

/// Waits, `FLEET_WAIT` at most, for a snapshot with every source read. Past it (Redis or
/// Consul down at start), the gateway serves anyway, routing by health and weights while
/// counts are unknown, and says which source it lacks.
pub(super) async fn first_view(mut topology: tokio::sync::watch::Receiver<Arc<Topology>>) {
    let known = tokio::time::timeout(FLEET_WAIT, topology.wait_for(|t| t.sources.all()))
        .await
        .is_ok();
    if !known {
        tracing::warn!(
            missing = ?topology.borrow().sources.missing(),
            waited = ?FLEET_WAIT,
            "serving before the fleet is fully read: servers with unknown counts look empty \
             until their counts come"
        );
    }
}

/// Waits once behind the tasks already queued on this loop. Unlike `tokio::task::yield_now`,
/// which has the loop ask the OS for events first (an `epoll_wait` per accepted connection),
/// the task goes straight to the back of the loop's queue.
async fn behind_spawned() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return std::task::Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// Accepts and serves connections on one event loop (`index`) until `shutdown`, then waits
/// for those in progress (up to `request_timeout`).
pub(super) async fn accept_loop(
    gateway: Gateway,
    index: usize,
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    tls: Option<Arc<tls::Tls>>,
    shutdown: CancellationToken,
) {
    LOOP.set(index);
    let connections = tokio_util::task::TaskTracker::new();
    let admission = &gateway.0.admission;
    // Registered with the token once, not at every accept.
    let mut stopped = std::pin::pin!(shutdown.cancelled());
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(%addr, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Then a slot for it: with every one taken, this loop accepts nothing more until
        // one frees or the queue timeout passes (`Admission::slot`), and the connections
        // behind wait in the kernel's backlog. Taken after accepting, so that no loop holds
        // a slot for a connection the kernel gives to another.
        let slot = tokio::select! {
            biased;
            () = &mut stopped => break,
            slot = admission.slot() => slot,
        };
        if !NODELAY_INHERITED {
            let _ = stream.set_nodelay(true);
        }
        let admitted = match slot.map(|s| admission.admit(s, peer.ip())) {
            Some(Ok(a)) => a,
            refused => {
                let limit = match refused {
                    Some(Err(limit)) => limit,
                    _ => limits::Limit::MaxConnections,
                };
                gateway.0.bitten.count(limit);
                if tls.is_none() {
                    admission.refuse(stream, limit);
                } // over TLS, no answer before a handshake it would cost: closed
                continue;
            }
        };
        let (g, stop) = (gateway.clone(), shutdown.clone());
        let tls = tls.as_ref().map(|t| t.config.clone());
        connections.spawn(async move {
            let _admitted = admitted;
            // The handshake and hyper's path boxed: their futures are large, and a task's
            // size is its largest path's, held by every connection.
            let client = match tls {
                None => conn::Conn::Tcp(stream),
                Some(tls) => match Box::pin(g.tls_conn(stream, tls)).await {
                    Some(c) => c,
                    None => return,
                },
            };
            if g.0.accounting.is_some() {
                // Shared accounting holds a slot in Redis per request: hyper's path does that.
                Box::pin(serve_connection(g, rewind::Rewind::new(client), peer, stop)).await;
            } else {
                forward::serve(g, client, peer, stop).await;
            }
        });
        // Let the connection start before accepting the next: in a burst, connections
        // accepted but not yet served would pile up, each with its buffers, and the heap
        // keeps its high-water mark.
        behind_spawned().await;
    }
    // Requests in progress finish (each connection closes after its current one).
    connections.close();
    if tokio::time::timeout(gateway.0.cfg.request_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "stopping with requests still in progress"
        );
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_connections_have_nagle_off_and_delayed_acks() {
        let listener = super::client_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        if super::NODELAY_INHERITED {
            assert!(accepted.nodelay().unwrap(), "inherited from the listener");
        }
        #[cfg(target_os = "linux")]
        assert!(
            !accepted.quickack().unwrap(),
            "the first request's ACK waits for its answer (a new socket acknowledges at once)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_starting_gateway_waits_for_counts_then_no_longer_than_fleet_wait() {
        use crate::fleet::topology::{SourcesSynced, Topology};
        use std::sync::Arc;
        let partial = Topology {
            sources: SourcesSynced {
                health: true,
                states: true,
                sessions: false,
            },
            ..Topology::default()
        };
        // Counts read 2 s in: served then.
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(partial.clone()));
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn(super::first_view(rx));
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!waiting.is_finished(), "served before the counts were read");
        let mut full = partial.clone();
        full.sources.sessions = true;
        tx.send(Arc::new(full)).unwrap();
        waiting.await.unwrap();
        assert!(started.elapsed() < super::FLEET_WAIT);
        // Redis down at start: served after FLEET_WAIT anyway.
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(partial));
        let started = tokio::time::Instant::now();
        super::first_view(rx).await;
        assert_eq!(started.elapsed(), super::FLEET_WAIT);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn behind_spawned_lets_queued_tasks_run_first() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let task = tokio::spawn(async move { r.store(true, std::sync::atomic::Ordering::SeqCst) });
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        super::behind_spawned().await;
        assert!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            "the spawned task ran"
        );
        task.await.unwrap();
    }
}
