//! One attempt loop for every path (the fast path, hyper's, WebSocket upgrades): pick a
//! server not tried yet, try it, and on failure try another while the rules allow — a
//! request that never reached a server, or an idempotent one, within `retries` and the
//! retry budget, with a short growing pause between tries.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::balancer::Target;
use super::route::Kind;
use super::Gateway;

/// Why one attempt at a server failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AttemptError {
    /// The request never reached the server (it could not be connected to): safe to send
    /// elsewhere; counts against the server's health.
    NotSent(String),
    /// It may have reached the server: only an idempotent request is sent elsewhere.
    Sent(String),
    /// The server is up and said no (a WebSocket upgrade refused: full, cordoned,
    /// shedding): sent elsewhere, and not held against the server's health.
    Refused(String),
    /// The server answered what the gateway will not relay (a response head over
    /// `max_response_header_bytes`): another would likely answer the same, so it is sent
    /// nowhere else; the client gets 502. Not held against the server's health either: it
    /// is one response, not the server.
    Unrelayable(String),
}

impl AttemptError {
    pub(super) fn message(&self) -> &str {
        match self {
            AttemptError::NotSent(m)
            | AttemptError::Sent(m)
            | AttemptError::Refused(m)
            | AttemptError::Unrelayable(m) => m,
        }
    }

    fn may_go_elsewhere(&self, idempotent: bool) -> bool {
        match self {
            AttemptError::NotSent(_) | AttemptError::Refused(_) => true,
            AttemptError::Sent(_) => idempotent,
            AttemptError::Unrelayable(_) => false,
        }
    }
}

/// What the attempts are for.
pub(super) struct Ask<'a> {
    pub kind: Kind,
    /// With shared accounting: the requests every gateway has in flight, by server.
    pub inflight: Option<&'a HashMap<String, f64>>,
    /// An idempotent request may be sent again after it may have reached a server.
    pub idempotent: bool,
}

/// The last attempt failed and no other is allowed.
pub(super) struct Failed {
    pub server: Arc<str>,
    pub error: AttemptError,
}

/// The attempts of one request or upgrade: which servers were tried, and whether another
/// may be. Every path drives it the same way:
///
/// ```text
/// let mut tries = Tries::new(&g, ask);
/// let answer = loop {
///     let target = tries.next()?;                        // 503: no server (the reason)
///     match try_once(&target).await {
///         Ok(a) => break (target, a),
///         Err(e) => tries.after_failure(target, e).await?, // 502: the last failure
///     }
/// };
/// ```
pub(super) struct Tries<'a> {
    g: &'a Gateway,
    ask: Ask<'a>,
    tried: Vec<Arc<str>>,
}

impl<'a> Tries<'a> {
    pub(super) fn new(g: &'a Gateway, ask: Ask<'a>) -> Tries<'a> {
        Tries {
            g,
            ask,
            tried: Vec::new(),
        }
    }

    /// A server not tried yet, its slot reserved; else why there is none (for a 503).
    pub(super) fn next(&mut self) -> Result<Target, &'static str> {
        let picked = self
            .g
            .pick_with(&self.tried, self.ask.kind, self.ask.inflight);
        picked.ok_or_else(|| {
            self.g.0.no_backend.fetch_add(1, Ordering::Relaxed);
            if self.tried.is_empty() {
                "no live server"
            } else {
                "every server tried failed or refused"
            }
        })
    }

    /// After `target` failed with `error`: counts it against the server (unless it only
    /// refused), and returns once another server may be tried, after a short pause growing
    /// with the tries; or the failure, when the request may not go elsewhere, `retries` are
    /// used up or the retry budget is spent.
    pub(super) async fn after_failure(
        &mut self,
        target: Target,
        error: AttemptError,
    ) -> Result<(), Failed> {
        if matches!(error, AttemptError::NotSent(_) | AttemptError::Sent(_)) {
            self.g.outcome(&target, false);
        }
        self.tried.push(target.id.clone());
        if !error.may_go_elsewhere(self.ask.idempotent)
            || self.tried.len() > self.g.0.cfg.retries as usize
            || !self.g.spend_retry()
        {
            target.backend.counts.error.fetch_add(1, Ordering::Relaxed);
            return Err(Failed {
                server: target.id.clone(),
                error,
            });
        }
        drop(target); // its reservation and in-flight count end with the attempt
        tokio::time::sleep(Duration::from_millis(20 * self.tried.len() as u64)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_may_be_sent_again_follows_whether_it_reached_the_server() {
        let not_sent = AttemptError::NotSent("connect refused".into());
        let sent = AttemptError::Sent("reset".into());
        let refused = AttemptError::Refused("503".into());
        assert!(not_sent.may_go_elsewhere(false));
        assert!(refused.may_go_elsewhere(false));
        assert!(!sent.may_go_elsewhere(false));
        assert!(sent.may_go_elsewhere(true));
        assert!(!AttemptError::Unrelayable("head".into()).may_go_elsewhere(true));
        assert_eq!(sent.message(), "reset");
    }
}
