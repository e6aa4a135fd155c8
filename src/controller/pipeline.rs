//! One controller pipeline's decision loop: each new snapshot (and a steady tick) is judged
//! by the pure decisions, and the plan is carried out while this controller leads. Its
//! inputs, the snapshot view, the leadership and the actuator, are handed in by the
//! composer ([`crate::controller::app`]), so a test can drive it with paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::contract::protocol::{unix_ms, Ack};
use crate::controller::act::execute::{execute, Mode};
use crate::controller::act::Actuator;
use crate::controller::decide::{decide, ActionKind, Halt, History, Withheld};
use crate::controller::leader::{Lease, LockCheck};
use crate::fleet::events::Events;
use crate::fleet::topology::Topology;

/// How often decisions are re-made without a new snapshot: conditions that must hold for a
/// while (scale-in, reap, round intervals) are judged on time as well as on change.
pub const DECISION_TICK: Duration = Duration::from_secs(1);

/// What a pipeline reads and writes through.
pub struct Inputs {
    /// The fleet's snapshots; version 0 until the first fold.
    pub snapshots: watch::Receiver<Arc<Topology>>,
    /// The leader lock's lease while this controller holds it.
    pub leadership: watch::Receiver<Option<Lease>>,
    /// Asked right before every batch with a destructive action.
    pub lock: Arc<dyn LockCheck>,
    pub actuator: Arc<dyn Actuator>,
    /// The acks stream, as read by [`crate::controller::acks`]: what servers did.
    pub acks: mpsc::Receiver<Ack>,
}

/// Runs the decision loop of one pipeline until `shutdown` or until its snapshots end.
pub async fn run(cfg: PipelineConfig, inputs: Inputs, events: Events, shutdown: CancellationToken) {
    let Inputs {
        mut snapshots,
        leadership,
        lock,
        actuator,
        mut acks,
    } = inputs;
    let mut acks_open = true;
    let can = actuator.capabilities();
    tracing::info!(pipeline = %cfg.name, service = %cfg.service, dry_run = cfg.dry_run, file = %cfg.file.display(), "pipeline started");

    let started_s = crate::contract::protocol::unix_ms(std::time::SystemTime::now()) / 1000;
    let mut history = History::watching_from(i64::try_from(started_s).unwrap_or(i64::MAX));
    let mut tick = tokio::time::interval(DECISION_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<(Option<Halt>, Vec<Withheld>)> = None;
    let mut measured_version = 0;
    let mut leading = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = snapshots.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
            ack = acks.recv(), if acks_open => {
                match ack {
                    Some(ack) => {
                        let seen = history.acked(&ack, Instant::now(), unix_ms(std::time::SystemTime::now()));
                        events.ack(&ack, seen);
                    }
                    None => acks_open = false,
                }
                continue;
            }
        }
        let t = snapshots.borrow_and_update().clone();
        if t.version == 0 {
            continue; // nothing folded yet
        }
        let now = Instant::now();
        let lease = leadership.borrow().clone();
        let epoch = Lease::epoch_at(lease.as_ref(), now);
        let leads = epoch.is_some();
        if leads && !leading {
            history.restart_settle(); // a new leader judges the fleet afresh
        }
        leading = leads;
        history.observe(&t, &cfg.decide, now);
        for server in history.expire_unacked(now) {
            events.unacked(&server);
        }
        let started = std::time::Instant::now();
        let plan = decide(&t, &cfg.decide, can, now, &history);
        let report = (plan.halted.clone(), plan.withheld.clone());
        let changed = last_report.as_ref() != Some(&report);
        events.decision(&plan, started.elapsed(), t.version, changed);
        last_report = Some(report);
        if plan.is_empty() {
            continue;
        }
        let mut mode = if cfg.dry_run {
            Mode::DryRun
        } else {
            Mode::Live { epoch }
        };
        // Nothing destructive on a lock merely believed held: ask Consul once more.
        if let (Mode::Live { epoch: Some(e) }, Some(l)) = (mode, &lease) {
            let destructive = plan.actions.iter().any(|a| a.kind.is_destructive());
            if destructive && !lock.still_held(l).await {
                tracing::warn!(pipeline = %cfg.name, epoch = e, "the leader lock is no longer ours: not acting");
                mode = Mode::Live { epoch: None };
            }
        }
        // Remember the plan before acting: a slow or failed action must not be repeated
        // before its round interval or cooldown anyway. A dry run decides as if it had acted,
        // so its log reads true; a follower remembers nothing it did not do.
        if mode != (Mode::Live { epoch: None }) {
            history.record(&plan, &t, now);
        }
        let done = execute(&plan, mode, actuator.as_ref(), t.version, &events).await;
        // An ack is due once the command has expired and its sessions have had their window.
        let ack_due = Instant::now() + cfg.command_ttl + cfg.decide.rebalance.in_transit;
        for c in &done.commands {
            let count = t.get(&c.server).and_then(|s| s.sessions.known());
            history.sent(&c.id, &c.server, count, ack_due);
        }
        if done.failed(&plan, |a| matches!(a.kind, ActionKind::Start { .. })) {
            history.failed(Instant::now()); // the engine refused: back off, do not wait on it
        }
        if let (Some(changed_at), Some(acted)) = (t.changed_at, done.first_done) {
            if t.version != measured_version {
                measured_version = t.version;
                events.event_to_action(acted.saturating_duration_since(changed_at));
            }
        }
    }
    tracing::info!(pipeline = %cfg.name, "pipeline stopped");
}

#[cfg(test)]
mod tests {
    //! A whole pipeline driven with paused time: snapshots sent by hand, leadership as a
    //! channel, and a recording actuator.
    use std::path::Path;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

    use super::*;
    use crate::controller::act::Recording;
    use crate::controller::leader::AlwaysHeld;
    use crate::fleet::topology::fixtures::{fleet, server};

    struct Harness {
        snapshots: watch::Sender<Arc<Topology>>,
        leadership: watch::Sender<Option<Lease>>,
        actuator: Arc<Recording>,
        acks: mpsc::Sender<Ack>,
        metrics: PrometheusHandle,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn recorder() -> PrometheusRecorder {
        PrometheusBuilder::new().build_recorder()
    }

    /// Starts a pipeline named `name` from a file of `toml`; the caller keeps `recorder` as
    /// the thread's default (the paused runtime runs every task on this thread).
    fn start(name: &str, toml: &str, delay: Duration, recorder: &PrometheusRecorder) -> Harness {
        start_with(name, toml, delay, recorder, Arc::new(AlwaysHeld))
    }

    fn start_with(
        name: &str,
        toml: &str,
        delay: Duration,
        recorder: &PrometheusRecorder,
        lock: Arc<dyn LockCheck>,
    ) -> Harness {
        let text = format!("name = \"{name}\"\n{toml}");
        let cfg = crate::config::parse(Path::new("p.toml"), &text, &|_| None).expect("valid");
        let (snapshots, snapshots_rx) = watch::channel(Arc::new(Topology::default()));
        let (leadership, leadership_rx) = watch::channel(None);
        let actuator = Arc::new(Recording {
            delay,
            ..Recording::default()
        });
        let stop = CancellationToken::new();
        let (acks, acks_rx) = mpsc::channel(16);
        let inputs = Inputs {
            snapshots: snapshots_rx,
            leadership: leadership_rx,
            lock,
            actuator: actuator.clone(),
            acks: acks_rx,
        };
        let task = tokio::spawn(run(cfg, inputs, Events::new(name), stop.clone()));
        Harness {
            snapshots,
            leadership,
            actuator,
            acks,
            metrics: recorder.handle(),
            stop,
            task,
        }
    }

    /// A lease on `epoch` valid for an hour.
    fn lease(epoch: u64) -> Lease {
        Lease {
            epoch,
            valid_until: Instant::now() + Duration::from_secs(3600),
            session: "s".into(),
        }
    }

    impl Harness {
        fn send(&self, mut t: Topology, version: u64) {
            t.version = version;
            t.changed_at = Some(Instant::now());
            self.snapshots.send_replace(Arc::new(t));
        }

        /// The value of `name` with `labels` in the exporter's text, if present.
        fn sample(&self, name: &str, labels: &str) -> Option<f64> {
            let text = self.metrics.render();
            let want = format!("{name}{{{labels}}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(want.as_str()))
                .map(|v| v.trim().parse().expect("a number"))
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.expect("the pipeline ends cleanly");
        }
    }

    /// 90 and 10 sessions on two servers of 100: the first is over `U + tolerance`.
    fn unbalanced() -> Topology {
        fleet(vec![server("a", 100, 90), server("b", 100, 10)])
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_snapshot_is_acted_on_and_the_time_from_change_to_action_is_measured() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("e2a", "", Duration::from_millis(250), &rec);
        h.leadership.send_replace(Some(lease(3)));
        // A balanced fleet first, held past the settle time (5 s), then the change.
        h.send(fleet(vec![server("a", 100, 50), server("b", 100, 50)]), 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        h.send(unbalanced(), 2);
        tokio::time::sleep(Duration::from_millis(500)).await;

        let done = h.actuator.actions();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            done[0].0.kind,
            ActionKind::Shed {
                server: "a".into(),
                count: 40
            }
        );
        assert_eq!((done[0].1.epoch, done[0].1.version), (3, 2));
        let labels = "pipeline=\"e2a\"";
        assert_eq!(
            h.sample("rebalancer_event_to_action_seconds_sum", labels),
            Some(0.25),
            "from the change to the action's completion, on the paused clock"
        );
        assert_eq!(
            h.sample(
                "rebalancer_actions_total",
                "pipeline=\"e2a\",kind=\"shed\",result=\"ok\""
            ),
            Some(1.0)
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_decides_but_acts_only_once_it_holds_the_lock() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("follower", "", Duration::ZERO, &rec);
        h.send(unbalanced(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(h.actuator.actions().is_empty(), "acted without the lock");
        let not_leader = h.sample(
            "rebalancer_actions_total",
            "pipeline=\"follower\",kind=\"shed\",result=\"not_leader\"",
        );
        assert!(not_leader >= Some(5.0), "one per tick: {not_leader:?}");

        // No new snapshot: the decision tick brings the plan back once the lock is held, after
        // the new leader has settled on it.
        h.leadership.send_replace(Some(lease(9)));
        tokio::time::sleep(DECISION_TICK + Duration::from_millis(10)).await;
        assert!(
            h.actuator.actions().is_empty(),
            "a new leader settles first"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let done = h.actuator.actions();
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].1.epoch, 9);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dry_run_decides_and_reports_but_never_acts() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("dry", "dry_run = true\n", Duration::ZERO, &rec);
        h.leadership.send_replace(Some(lease(1)));
        h.send(unbalanced(), 1);
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert!(h.actuator.actions().is_empty(), "a dry run acted");
        // It remembers what it would have done: one shed per round interval (15 s), the first
        // once settled (5 s).
        assert_eq!(
            h.sample(
                "rebalancer_actions_total",
                "pipeline=\"dry\",kind=\"shed\",result=\"dry_run\""
            ),
            Some(2.0)
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_tick_cordons_a_cold_fleet_once_scale_in_after_has_passed_with_no_new_snapshot() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("cold", "", Duration::ZERO, &rec);
        h.leadership.send_replace(Some(lease(1)));
        // U = 0.2, below scale_in_at (0.40), held for the default scale_in_after (60 s).
        h.send(fleet(vec![server("a", 100, 20), server("b", 100, 20)]), 1);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(h.actuator.actions().is_empty(), "cordoned before 60 s");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let done = h.actuator.actions();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(
            matches!(done[0].0.kind, ActionKind::Cordon { .. }),
            "{done:?}"
        );
        h.stop().await;
    }

    /// A lock that Consul says is someone else's.
    struct Lost;

    impl LockCheck for Lost {
        fn still_held<'a>(&'a self, _: &'a Lease) -> futures::future::BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_past_its_validity_is_not_acted_on() {
        // As a leader paused (SIGSTOP) past its session TTL sees it when it resumes.
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("paused", "", Duration::ZERO, &rec);
        h.leadership.send_replace(Some(Lease {
            epoch: 5,
            valid_until: Instant::now() + Duration::from_secs(2),
            session: "s".into(),
        }));
        h.send(unbalanced(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(h.actuator.actions().is_empty(), "acted on an expired lease");
        let not_leader = h.sample(
            "rebalancer_actions_total",
            "pipeline=\"paused\",kind=\"shed\",result=\"not_leader\"",
        );
        assert!(not_leader >= Some(1.0), "{not_leader:?}");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_found_lost_right_before_a_shed_stops_it() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start_with("lost", "", Duration::ZERO, &rec, Arc::new(Lost));
        h.leadership.send_replace(Some(lease(7)));
        h.send(unbalanced(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(h.actuator.actions().is_empty(), "shed on a lost lock");
        assert!(
            h.sample(
                "rebalancer_actions_total",
                "pipeline=\"lost\",kind=\"shed\",result=\"not_leader\""
            ) >= Some(1.0)
        );
        h.stop().await;
    }

    /// An ack of `shed` sessions from `server` for command `id`, just now.
    fn ack(id: &str, server: &str, shed: u64, refused: Option<&str>) -> Ack {
        Ack {
            id: id.into(),
            server: server.into(),
            requested: 40,
            shed,
            at_ms: unix_ms(std::time::SystemTime::now()),
            epoch: 1,
            refused: refused.map(Into::into),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_another_controller_made_is_read_from_the_acks_and_not_made_again() {
        // A standby (or a restarted leader) reads the old leader's ack: that excess is
        // already on its way, so `a` is not shed again within round_interval of it.
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("foreign", "", Duration::ZERO, &rec);
        h.send(unbalanced(), 1);
        h.acks.send(ack("old-leader", "a", 40, None)).await.unwrap();
        h.leadership.send_replace(Some(lease(2)));
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert!(
            h.actuator.actions().is_empty(),
            "shed the same excess twice"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            h.actuator.actions().len(),
            1,
            "shed once round_interval has passed"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacked_command_holds_its_server_until_its_count_moves() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("unacked", "", Duration::ZERO, &rec);
        h.leadership.send_replace(Some(lease(1)));
        h.send(unbalanced(), 1);
        // Shed after the settle (5 s); no ack by the command's TTL (10 s) + in_transit (5 s).
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(h.actuator.actions().len(), 1, "shed again with no ack");
        let labels = "pipeline=\"unacked\"";
        assert_eq!(
            h.sample("rebalancer_commands_unacked_total", labels),
            Some(1.0)
        );
        // The count moves: the server is judged again.
        h.send(fleet(vec![server("a", 100, 85), server("b", 100, 15)]), 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(h.actuator.actions().len(), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn acks_are_counted_and_a_refusal_is_counted_by_its_reason_not_as_shed() {
        let rec = recorder();
        let _default = metrics::set_default_local_recorder(&rec);
        let h = start("acked", "", Duration::ZERO, &rec);
        h.leadership.send_replace(Some(lease(1)));
        h.send(
            fleet(vec![
                server("a", 100, 90),
                server("b", 100, 90),
                server("c", 100, 0),
                server("d", 100, 0),
            ]),
            1,
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        let sent = h.actuator.commands();
        assert_eq!(sent.len(), 2, "{sent:?}");
        h.acks
            .send(ack(&sent[0].id, &sent[0].server, 0, Some("stale_epoch")))
            .await
            .unwrap();
        h.acks
            .send(ack(&sent[1].id, &sent[1].server, 17, None))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let p = "pipeline=\"acked\"";
        assert_eq!(
            h.sample(
                "rebalancer_commands_refused_total",
                &format!("{p},reason=\"stale_epoch\"")
            ),
            Some(1.0)
        );
        assert_eq!(
            h.sample("rebalancer_sessions_shed_acked_total", p),
            Some(17.0)
        );
        // Both answered: neither is counted unacked later.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(h.sample("rebalancer_commands_unacked_total", p), None);
        h.stop().await;
    }
}
