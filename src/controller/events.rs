//! The controller's named events: decisions, actions and leadership, each logged and
//! counted in one place (the fleet's own events are in [`crate::fleet::events`]).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::contract::protocol::Ack;
use crate::controller::act::execute::ActResult;
use crate::controller::decide::history::AckSeen;
use crate::controller::decide::{Action, ActionKind, Plan};
use crate::fleet::events::Events;
use crate::telemetry::{
    ACTIONS, ACTION_DURATION, DECISIONS, DECISION_DURATION, EPOCH, EVENT_TO_ACTION, LEADER,
    REFUSED, SHED_ACKED, SHED_REQUESTED, SHORTFALL, UNACKED, UNHEARD, UNREAPED,
};

/// A refusal reason as a bounded label: the agent's own reasons, anything else `other`.
fn refusal_label(reason: &str) -> &'static str {
    match reason {
        "stale_epoch" => "stale_epoch",
        "expired" => "expired",
        "unknown_version" => "unknown_version",
        "unsigned" => "unsigned",
        "unknown_key" => "unknown_key",
        "bad_signature" => "bad_signature",
        "issued_in_future" => "issued_in_future",
        "lives_too_long" => "lives_too_long",
        "count_too_large" => "count_too_large",
        "not_cordoned" => "not_cordoned",
        _ => "other",
    }
}

impl Events {
    pub fn decision(&self, plan: &Plan, took: Duration, version: u64, changed: bool) {
        let outcome = if plan.halted.is_some() {
            "halted"
        } else if plan.is_empty() {
            "idle"
        } else {
            "act"
        };
        counter!(DECISIONS, "pipeline" => self.p(), "outcome" => outcome).increment(1);
        histogram!(DECISION_DURATION, "pipeline" => self.p()).record(took.as_secs_f64());
        gauge!(SHORTFALL, "pipeline" => self.p()).set(f64::from(plan.shortfall));
        gauge!(UNREAPED, "pipeline" => self.p()).set(f64::from(plan.unreaped));
        if changed {
            if let Some(h) = &plan.halted {
                tracing::warn!(pipeline = %self.pipeline, version, reason = %h, "halted");
            }
            for w in &plan.withheld {
                tracing::info!(pipeline = %self.pipeline, version, reason = %w, "withheld");
            }
        }
    }

    pub fn action(
        &self,
        a: &Action,
        result: ActResult,
        took: Duration,
        version: u64,
        error: Option<&str>,
    ) {
        let kind = a.kind.label();
        if result == ActResult::Unheard {
            counter!(UNHEARD, "pipeline" => self.p(), "kind" => kind).increment(1);
        }
        let result = result.as_str();
        counter!(ACTIONS, "pipeline" => self.p(), "kind" => kind, "result" => result).increment(1);
        histogram!(ACTION_DURATION, "pipeline" => self.p(), "kind" => kind)
            .record(took.as_secs_f64());
        if result == "ok" {
            if let ActionKind::Shed { count, .. } | ActionKind::Drain { count, .. } = a.kind {
                counter!(SHED_REQUESTED, "pipeline" => self.p(), "kind" => kind).increment(count);
            }
        }
        match error {
            Some(e) => {
                tracing::warn!(pipeline = %self.pipeline, version, action = %a, error = e, "action failed");
            }
            None => {
                tracing::info!(pipeline = %self.pipeline, version, result, action = %a, "action");
            }
        }
    }

    /// An ack read from the acks stream, as the history saw it.
    pub fn ack(&self, ack: &Ack, seen: AckSeen) {
        match (seen, ack.refused.as_deref()) {
            (AckSeen::Obeyed, _) => {
                counter!(SHED_ACKED, "pipeline" => self.p()).increment(ack.shed);
                if ack.shed < ack.requested {
                    tracing::info!(pipeline = %self.pipeline, id = %ack.id, server = %ack.server, requested = ack.requested, shed = ack.shed, "command acked: fewer sessions closed than asked");
                }
            }
            (AckSeen::Refused, Some(reason)) => {
                let reason = refusal_label(reason);
                counter!(REFUSED, "pipeline" => self.p(), "reason" => reason).increment(1);
                if matches!(reason, "unsigned" | "unknown_key" | "bad_signature") {
                    tracing::error!(pipeline = %self.pipeline, id = %ack.id, server = %ack.server, reason, "a server refused this controller's signature: give the controller and every server the same REBALANCER_COMMAND_KEYS");
                } else if reason == "stale_epoch" {
                    tracing::error!(pipeline = %self.pipeline, id = %ack.id, server = %ack.server, epoch = ack.epoch, "a server refused this controller's epoch as stale: another leader has spoken since, or epochs went backwards");
                } else {
                    tracing::warn!(pipeline = %self.pipeline, id = %ack.id, server = %ack.server, reason, "command refused by its server");
                }
            }
            (AckSeen::Foreign, _) => {
                tracing::info!(pipeline = %self.pipeline, id = %ack.id, server = %ack.server, shed = ack.shed, epoch = ack.epoch, "another controller's shed, remembered");
            }
            _ => {}
        }
    }

    /// A command past its deadline without an ack.
    pub fn unacked(&self, server: &str) {
        counter!(UNACKED, "pipeline" => self.p()).increment(1);
        tracing::warn!(pipeline = %self.pipeline, server, "command unacked past its deadline; that server is not shed again until its count moves");
    }

    pub fn event_to_action(&self, latency: Duration) {
        histogram!(EVENT_TO_ACTION, "pipeline" => self.p()).record(latency.as_secs_f64());
    }

    pub fn leadership(&self, epoch: Option<u64>) {
        gauge!(LEADER, "pipeline" => self.p()).set(if epoch.is_some() { 1.0 } else { 0.0 });
        gauge!(EPOCH, "pipeline" => self.p()).set(epoch.unwrap_or(0) as f64);
        if let Some(e) = epoch {
            tracing::info!(pipeline = %self.pipeline, epoch = e, "leader lock held");
        } else {
            tracing::info!(pipeline = %self.pipeline, "not the leader");
        }
    }
}
