//! The balancer: per-backend state (health, breaker, reservations, in-flight requests) and
//! picking a server for each new connection or request, and the retry budget.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{counter, gauge};
use tokio::time::Instant;

use crate::fleet::topology::Admin;
use crate::telemetry::GW_CIRCUIT as CIRCUIT;
use crate::telemetry::GW_REQUESTS as REQUESTS;
use crate::telemetry::GW_RETRIES as RETRIES;

use super::health::{Active, Breaker};
use super::route::{choose, ramp, Candidate, Kind};
use super::Gateway;

#[derive(Default)]
pub(super) struct Backend {
    pub(super) first_seen: Option<Instant>,
    pub(super) active: Active,
    pub(super) breaker: Breaker,
    pub(super) reservations: VecDeque<Instant>,
    /// `requests_total{backend, outcome="ok"}`, looked up once instead of per request.
    pub(super) ok: Option<metrics::Counter>,
    /// `address:port` as last formatted, with the address and port it came from.
    pub(super) host: Option<(Arc<str>, u16, Arc<str>)>,
    /// Plain requests this gateway has in flight there.
    pub(super) inflight: Arc<AtomicU64>,
}

/// One plain request in flight at a server, counted until dropped (whatever way the request
/// ends: answered, failed, or its client gone).
pub(super) struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A routable server as of one request.
pub(super) struct Target {
    pub(super) id: Arc<str>,
    pub(super) host: Arc<str>,
    pub(super) ok: metrics::Counter,
    pub(super) _inflight: Option<InFlight>,
}

impl Gateway {
    pub(super) fn host_of(&self, s: &crate::fleet::topology::Server) -> String {
        format!("{}:{}", s.address, self.0.cfg.target_port.unwrap_or(s.port))
    }

    /// Picks a server for a new connection or request, other than those in `tried`, and
    /// reserves a slot on it; with shared accounting, `inflight` requests stand for session
    /// counts.
    pub(super) fn pick_with(
        &self,
        tried: &[Arc<str>],
        kind: Kind,
        inflight: Option<&HashMap<String, f64>>,
    ) -> Option<Target> {
        let t = self.0.topology.borrow().clone();
        let now = Instant::now();
        let cfg = &self.0.cfg;
        let mut backends = self.0.backends.lock().expect("not poisoned");
        let mut ids = Vec::new();
        let mut cands = Vec::new();
        let mut exclude = Vec::new();
        for s in &t.servers {
            if !s.passing || s.admin != Admin::Active {
                continue;
            }
            let b = backends.entry(s.id.clone()).or_default();
            let first = *b.first_seen.get_or_insert(now);
            if !b.active.up()
                || b.breaker.state(now, cfg.breaker_open) == super::health::BreakerState::Open
            {
                continue;
            }
            while b
                .reservations
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) > cfg.reservation_ttl)
            {
                b.reservations.pop_front();
            }
            if tried.iter().any(|x| **x == *s.id) {
                exclude.push(cands.len());
            }
            ids.push(s);
            let sessions = match inflight {
                Some(m) => m.get(&*s.id).copied().unwrap_or(0.0).max(0.0) as u64,
                None => s.sessions.known().unwrap_or(0),
            };
            cands.push(Candidate {
                sessions,
                reserved: b.reservations.len() as u64,
                // With shared accounting, `sessions` are every gateway's requests already.
                inflight: match inflight {
                    Some(_) => 0,
                    None => b.inflight.load(Ordering::Relaxed),
                },
                capacity: s.capacity,
                weight: s.weight,
                ramp: ramp(
                    now.saturating_duration_since(first).as_secs_f64(),
                    cfg.slow_start.as_secs_f64(),
                ),
            });
        }
        let i = choose(&cands, &exclude, kind, &mut rand::rng())?;
        let s = ids[i];
        let b = backends.get_mut(&s.id).expect("present");
        if !b.breaker.allow(now, cfg.breaker_open) {
            return None;
        }
        if kind == Kind::Session {
            b.reservations.push_back(now);
        }
        let ok =
            b.ok.get_or_insert_with(|| {
                let id = metrics::SharedString::from_shared(s.id.clone());
                counter!(REQUESTS, "backend" => id, "outcome" => "ok")
            })
            .clone();
        let port = self.0.cfg.target_port.unwrap_or(s.port);
        let host = match &b.host {
            Some((a, p, h)) if *a == s.address && *p == port => h.clone(),
            _ => {
                let h: Arc<str> = self.host_of(s).into();
                b.host = Some((s.address.clone(), port, h.clone()));
                h
            }
        };
        let inflight = (kind == Kind::Request).then(|| {
            b.inflight.fetch_add(1, Ordering::Relaxed);
            InFlight(b.inflight.clone())
        });
        Some(Target {
            id: s.id.clone(),
            host,
            ok,
            _inflight: inflight,
        })
    }

    pub(super) fn outcome(&self, target: &Target, ok: bool) {
        let now = Instant::now();
        let mut backends = self.0.backends.lock().expect("not poisoned");
        let Some(b) = backends.get_mut(&target.id) else {
            return;
        };
        let before = b.breaker.state(now, self.0.cfg.breaker_open);
        if ok {
            b.breaker.success();
        } else if b.breaker.failure(now, self.0.cfg.breaker_failures) {
            tracing::warn!(backend = %target.id, "circuit breaker opened");
        }
        // Set the gauge when the state changes, not on every request (it is on the hot path).
        let after = b.breaker.state(now, self.0.cfg.breaker_open);
        if after != before {
            gauge!(CIRCUIT, "backend" => target.id.to_string()).set(after.as_f64());
        }
    }

    /// Spends one retry from the budget (a share of requests, plus 10 spare); `false` when
    /// it is spent.
    pub(super) fn spend_retry(&self) -> bool {
        let req = self.0.requests.load(Ordering::Relaxed) as f64;
        let ret = self.0.retries.load(Ordering::Relaxed) as f64;
        if ret < req * self.0.cfg.retry_budget + 10.0 {
            self.0.retries.fetch_add(1, Ordering::Relaxed);
            counter!(RETRIES).increment(1);
            true
        } else {
            false
        }
    }
}
