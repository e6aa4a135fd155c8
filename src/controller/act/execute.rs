//! The act half of a round: a plan carried out through an actuator, every action at once,
//! each counted, timed and logged with the snapshot version and its reason.

use std::fmt;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::{ActContext, ActError, Actuator};
use crate::contract::protocol::Command;
use crate::controller::decide::{Action, Plan};
use crate::fleet::events::Events;

/// How one action went (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActResult {
    /// Done by the actuator.
    Ok,
    /// The actuator failed, after its retries.
    Error,
    /// A command was published and no server was subscribed to hear it.
    Unheard,
    /// The state record stopped it: an operator's cordon, a newer leader's record, or a
    /// write that lost its check-and-set.
    Fenced,
    /// Decided but not done: the pipeline is a dry run.
    DryRun,
    /// Decided but not done: another controller holds the leader lock.
    NotLeader,
}

impl ActResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ActResult::Ok => "ok",
            ActResult::Error => "error",
            ActResult::Unheard => "unheard",
            ActResult::Fenced => "fenced",
            ActResult::DryRun => "dry_run",
            ActResult::NotLeader => "not_leader",
        }
    }
}

impl fmt::Display for ActResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a plan is carried out, and under which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    DryRun,
    /// Leadership as last known: the epoch while the lock is held.
    Live {
        epoch: Option<u64>,
    },
}

/// What became of one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// One result per action, in the plan's order.
    pub results: Vec<ActResult>,
    /// When the first action completed, if any was attempted.
    pub first_done: Option<Instant>,
    /// The commands published, each awaiting its ack.
    pub commands: Vec<Command>,
}

impl Executed {
    /// The actuator was asked to act (not a dry run, and the leader).
    pub fn attempted(&self) -> bool {
        self.first_done.is_some()
    }

    /// Whether an action matching `f` failed.
    pub fn failed(&self, plan: &Plan, f: impl Fn(&Action) -> bool) -> bool {
        plan.actions
            .iter()
            .zip(&self.results)
            .any(|(a, r)| matches!(r, ActResult::Error | ActResult::Unheard) && f(a))
    }
}

/// Carries out `plan` (made from snapshot `version`) through `actuator` in `mode`.
pub async fn execute(
    plan: &Plan,
    mode: Mode,
    actuator: &dyn Actuator,
    version: u64,
    events: &Events,
) -> Executed {
    let epoch = match mode {
        Mode::DryRun => return skipped(plan, ActResult::DryRun, version, events),
        Mode::Live { epoch: None } => return skipped(plan, ActResult::NotLeader, version, events),
        Mode::Live { epoch: Some(e) } => e,
    };
    let ctx = ActContext { epoch, version };
    let mut running: FuturesUnordered<_> = plan
        .actions
        .iter()
        .enumerate()
        .map(|(i, a)| async move {
            let t0 = Instant::now();
            let r = actuator.execute(a, ctx).await;
            (i, a, t0, r)
        })
        .collect();
    let mut results = vec![ActResult::Error; plan.actions.len()];
    let mut first_done = None;
    let mut commands = Vec::new();
    // Completions arrive in the order they happen: the first is the earliest.
    while let Some((i, a, t0, r)) = running.next().await {
        let done = Instant::now();
        first_done.get_or_insert(done);
        results[i] = match r {
            Ok(command) => {
                events.action(a, ActResult::Ok, done - t0, version, None);
                commands.extend(command);
                ActResult::Ok
            }
            Err(e) => {
                let result = match e {
                    ActError::NoReceivers { .. } => ActResult::Unheard,
                    ref e if e.fenced() => ActResult::Fenced,
                    _ => ActResult::Error,
                };
                events.action(a, result, done - t0, version, Some(&e.to_string()));
                result
            }
        };
    }
    Executed {
        results,
        first_done,
        commands,
    }
}

fn skipped(plan: &Plan, result: ActResult, version: u64, events: &Events) -> Executed {
    for a in &plan.actions {
        events.action(a, result, std::time::Duration::ZERO, version, None);
    }
    Executed {
        results: vec![result; plan.actions.len()],
        first_done: None,
        commands: Vec::new(),
    }
}
