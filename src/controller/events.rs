//! The controller's named events: decisions, actions and leadership, each logged and
//! counted in one place (the fleet's own events are in [`crate::fleet::events`]).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::controller::act::execute::ActResult;
use crate::controller::decide::{Action, ActionKind, Plan};
use crate::fleet::events::Events;
use crate::telemetry::{
    ACTIONS, ACTION_DURATION, DECISIONS, DECISION_DURATION, EPOCH, EVENT_TO_ACTION, LEADER,
    SHED_REQUESTED, SHORTFALL, UNHEARD, UNREAPED,
};

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
