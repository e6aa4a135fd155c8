//! The sources and the fold against a real Redis and a real Consul: what reaches the
//! snapshot, what is refused, and what happens when either restarts.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rebalancer::config::{self, PipelineConfig};
use rebalancer::contract::consul::{Consul, ConsulError};
use rebalancer::contract::consul_watch::{consul_fetch, Restarts, RESTART_PROBE_EVERY};
use rebalancer::controller::act::Recording;
use rebalancer::controller::decide::ActionKind;
use rebalancer::fleet::events::Events;
use rebalancer::fleet::topology::{Admin, Count, Topology};
use serde_json::json;
use support::*;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn cfg(
    name: &str,
    redis: &Redis,
    consul: &ConsulAgent,
    top: &str,
    sections: &str,
) -> PipelineConfig {
    let text = pipeline_toml(name, redis, consul, free_port(), top, sections);
    config::parse(Path::new("test.toml"), &text, &|_| None).expect("valid test pipeline")
}

struct Running {
    rx: watch::Receiver<Arc<Topology>>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn topology(c: &PipelineConfig) -> Running {
    let stop = CancellationToken::new();
    let (rx, _task) = rebalancer::fleet::view::spawn(
        c,
        rebalancer::fleet::view::Pacing::Debounced,
        Events::new(&c.name),
        stop.clone(),
    )
    .unwrap();
    Running { rx, stop }
}

async fn until(r: &Running, what: &str, f: impl Fn(&Topology) -> bool) -> Arc<Topology> {
    let rx = r.rx.clone();
    eventually(what, WAIT, || {
        let t = rx.borrow().clone();
        let ok = f(&t);
        async move { ok.then_some(t) }
    })
    .await
}

/// Three servers of 100 at 10 sessions each (counts that outlive any pause) and a
/// pipeline `name` that would cordon them after 4 s of trustworthy low utilization.
async fn cold_fleet(name: &str, redis: &Redis, consul: &ConsulAgent) -> PipelineConfig {
    for id in ["s1", "s2", "s3"] {
        consul.register_capacity("ws", id, 100).await;
        redis
            .set(&format!("rebalancer:ws:sessions:{id}"), "10", 3600)
            .await;
    }
    cfg(
        name,
        redis,
        consul,
        "",
        "[rebalance]\nenabled = false\n[scale]\nscale_in_after = \"4s\"\ncooldown = \"1s\"\nmin_servers = 1\n",
    )
}

/// Waits for `rec`'s first action, which must be a cordon (a cold fleet's scale-in).
async fn a_cordon_follows(
    rec: &Recording,
    what: &str,
) -> Vec<(
    rebalancer::controller::decide::Action,
    rebalancer::controller::act::ActContext,
)> {
    let done = eventually(what, WAIT, || {
        let d = rec.actions();
        async move { (!d.is_empty()).then_some(d) }
    })
    .await;
    assert!(
        matches!(done[0].0.kind, ActionKind::Cordon { .. }),
        "{done:?}"
    );
    done
}

fn count(t: &Topology, id: &str) -> Option<Count> {
    t.get(id).map(|s| s.sessions)
}

#[tokio::test]
async fn registrations_states_and_count_changes_reach_the_snapshot() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&cfg("reach", &redis, &consul, "", ""));
    let t = until(&r, "a synced, empty snapshot", |t| !t.is_stale()).await;
    assert!(t.servers.is_empty());

    consul.register_capacity("ws", "s1", 100).await;
    redis.report("ws", "s1", "10").await;
    let t = until(&r, "s1 with 10 sessions", |t| {
        count(t, "s1") == Some(Count::Known(10))
    })
    .await;
    let s1 = t.get("s1").unwrap();
    assert_eq!(
        (s1.capacity, s1.passing, s1.admin),
        (100, true, Admin::Active)
    );

    redis.report("ws", "s1", "20").await;
    until(&r, "s1 with 20 sessions", |t| {
        count(t, "s1") == Some(Count::Known(20))
    })
    .await;

    consul.set_passing("s1", false).await;
    until(&r, "s1 failing", |t| {
        t.get("s1").is_some_and(|s| !s.passing)
    })
    .await;

    consul
        .kv_put(
            "rebalancer/ws/servers/s1",
            r#"{"state":"cordoned","since_ms":5,"reason":"test"}"#,
        )
        .await;
    until(&r, "s1 cordoned", |t| {
        t.get("s1").is_some_and(|s| {
            s.admin
                == Admin::Cordoned {
                    since_ms: 5,
                    by_operator: false,
                }
        })
    })
    .await;

    consul.deregister("s1").await;
    let t = until(&r, "s1 gone, its count a ghost", |t| {
        t.servers.is_empty() && t.ghosts == 1
    })
    .await;
    assert!(!t.is_stale());
}

#[tokio::test]
async fn garbage_in_meta_counts_and_states_is_ignored_and_counted() {
    let handle = metrics();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&cfg("garbage", &redis, &consul, "", ""));
    consul.register_capacity("ws", "good", 100).await;
    consul.register("ws", "no-meta", json!({})).await;
    consul
        .register("ws", "bad-meta", json!({"max_sessions": "lots"}))
        .await;
    consul
        .register(
            "ws",
            "bad-weight",
            json!({"max_sessions": "10", "weight": "-1"}),
        )
        .await;
    redis.report("ws", "good", "many").await;
    consul
        .kv_put("rebalancer/ws/servers/good", "cordon it please")
        .await;

    let t = until(&r, "three invalid instances and the good one", |t| {
        t.invalid_instances == 3
            && t.servers.len() == 1
            && t.get("good").is_some_and(|s| s.admin == Admin::Unknown)
    })
    .await;
    assert_eq!(
        count(&t, "good"),
        Some(Count::Unknown),
        "a garbage count is unknown, never 0"
    );
    assert!(t.totals().unknown == 1);

    let text = handle.render();
    let labels = [("pipeline", "garbage")];
    assert_eq!(
        sample(&text, "rebalancer_invalid_meta_total", &labels),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "rebalancer_invalid_counts_total", &labels),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "rebalancer_invalid_states_total", &labels),
        Some(1.0)
    );

    // Fixing the inputs brings the server back as known.
    redis.report("ws", "good", "7").await;
    consul
        .kv_put("rebalancer/ws/servers/good", r#"{"state":"active"}"#)
        .await;
    until(&r, "the good server known again", |t| {
        t.get("good")
            .is_some_and(rebalancer::fleet::topology::Server::is_live)
    })
    .await;
}

#[tokio::test]
async fn a_garbage_count_among_good_ones_makes_only_that_server_unknown() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&cfg("one-bad", &redis, &consul, "", ""));
    for id in ["s1", "s2", "s3", "s4", "s5", "s6"] {
        consul.register_capacity("ws", id, 100).await;
    }
    redis.report("ws", "s1", "10").await;
    redis.report("ws", "s2", "20").await;
    redis.report("ws", "s3", "18446744073709551615").await;
    redis.report("ws", "s4", "1000000000000000").await;
    redis.report("ws", "s5", "-4").await;
    // Bytes that are not UTF-8: before, they failed the whole MGET and the source with it.
    let mut c = redis.conn().await;
    redis::cmd("SET")
        .arg("rebalancer:ws:sessions:s6")
        .arg(&b"\xff\xfe\x01"[..])
        .arg("EX")
        .arg(300)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    // Bytes that break the batch would leave the sessions source stale for good.
    let t = until(&r, "six servers, two known, every source synced", |t| {
        t.servers.len() == 6 && t.totals().unknown == 4 && !t.is_stale()
    })
    .await;
    assert_eq!(count(&t, "s1"), Some(Count::Known(10)));
    assert_eq!(count(&t, "s2"), Some(Count::Known(20)));
    for id in ["s3", "s4", "s5", "s6"] {
        assert_eq!(count(&t, id), Some(Count::Unknown), "{id}");
    }
    assert_eq!(t.totals().sessions, 30, "the rest of the batch is used");

    // A notification for the bad key is read on its own and breaks nothing either.
    redis::cmd("SET")
        .arg("rebalancer:ws:sessions:s6")
        .arg(&b"\xc3\x28"[..])
        .arg("EX")
        .arg(300)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis.report("ws", "s1", "11").await;
    let t = until(&r, "s1's change read after the bad one", |t| {
        count(t, "s1") == Some(Count::Known(11))
    })
    .await;
    assert!(!t.is_stale());
    assert_eq!(count(&t, "s6"), Some(Count::Unknown));
}

/// A pipeline whose full resync is ten minutes apart: what it learns sooner, it learns from
/// notifications or from noticing they stopped.
fn slow_reconcile(name: &str, redis: &Redis, consul: &ConsulAgent) -> PipelineConfig {
    let text = pipeline_toml(name, redis, consul, free_port(), "", "");
    let env = |k: &str| (k == "REBALANCER_REDIS_RECONCILE").then(|| "10m".to_string());
    config::parse(Path::new("test.toml"), &text, &env).expect("valid test pipeline")
}

async fn notify_flags(redis: &Redis) -> String {
    let mut c = redis.conn().await;
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(&mut c)
        .await
        .unwrap();
    v.get(1).cloned().unwrap_or_default()
}

#[tokio::test]
async fn notifications_turned_off_by_someone_else_are_noticed_turned_back_on_and_caught_up() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&slow_reconcile("frozen", &redis, &consul));
    consul.register_capacity("ws", "s1", 100).await;
    redis.report("ws", "s1", "10").await;
    until(&r, "s1 with 10", |t| {
        count(t, "s1") == Some(Count::Known(10))
    })
    .await;
    assert!(notify_flags(&redis).await.contains('K'));

    // Another tenant's CONFIG SET: from now on counts would freeze unnoticed.
    let mut c = redis.conn().await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis.report("ws", "s1", "20").await;
    // The heartbeat's notification does not come back: the source reconnects, turns them on
    // again, and its resync reads the count the notification was not sent for.
    until(
        &r,
        "s1's new count, without waiting for the 10-minute resync",
        |t| count(t, "s1") == Some(Count::Known(20)),
    )
    .await;
    assert!(notify_flags(&redis).await.contains('K'), "turned back on");
    redis.report("ws", "s1", "30").await;
    until(&r, "notifications working again", |t| {
        count(t, "s1") == Some(Count::Known(30))
    })
    .await;
}

#[tokio::test]
async fn a_killed_subscription_is_noticed_and_counts_resume() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&slow_reconcile("killed", &redis, &consul));
    consul.register_capacity("ws", "s1", 100).await;
    redis.report("ws", "s1", "10").await;
    until(&r, "s1 with 10", |t| {
        count(t, "s1") == Some(Count::Known(10))
    })
    .await;
    let mut c = redis.conn().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(killed >= 1, "the source's subscription was there to kill");
    redis.report("ws", "s1", "25").await;
    until(&r, "s1's count after the subscription came back", |t| {
        count(t, "s1") == Some(Count::Known(25))
    })
    .await;
}

#[tokio::test]
async fn a_redis_restart_is_survived_with_a_full_resync() {
    let (mut redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let r = topology(&cfg("redis-restart", &redis, &consul, "", ""));
    consul.register_capacity("ws", "s1", 100).await;
    redis.report("ws", "s1", "10").await;
    until(&r, "s1 with 10", |t| {
        count(t, "s1") == Some(Count::Known(10))
    })
    .await;

    redis.restart().await; // comes back empty, notifications off
    until(&r, "a resynced snapshot without the lost count", |t| {
        !t.is_stale() && count(t, "s1") == Some(Count::Unknown)
    })
    .await;
    // The subscription was renewed and notifications turned back on: new reports arrive.
    redis.report("ws", "s1", "15").await;
    until(&r, "s1 with 15 after the restart", |t| {
        count(t, "s1") == Some(Count::Known(15))
    })
    .await;
}

#[tokio::test]
async fn a_consul_restart_mid_query_is_survived_with_a_full_resync_though_the_index_goes_backwards()
{
    let (redis, mut consul) = (Redis::start().await, ConsulAgent::start().await);
    // The default wait (5 min): a watch that missed the restart would hang that long.
    let mut c = cfg("consul-restart", &redis, &consul, "", "");
    c.consul.wait = config::parse(Path::new("default.toml"), "", &|_| None)
        .unwrap()
        .consul
        .wait;
    assert_eq!(c.consul.wait, Duration::from_secs(300));
    let r = topology(&c);
    consul.register_capacity("ws", "s1", 100).await;
    redis.report("ws", "s1", "10").await;
    // Indexes well above where a fresh agent starts.
    for i in 0..30 {
        let state = if i % 2 == 0 { "active" } else { "cordoned" };
        consul
            .kv_put(
                "rebalancer/ws/servers/s1",
                &format!(r#"{{"state":"{state}"}}"#),
            )
            .await;
        consul.set_passing("s1", i % 2 == 0).await;
    }
    consul.set_passing("s1", true).await;
    let (health, states) = ("/v1/health/service/ws", "/v1/kv/rebalancer/ws/?recurse");
    let before = (consul.index(health).await, consul.index(states).await);
    until(&r, "s1 cordoned with 10", |t| {
        t.get("s1").is_some_and(|s| s.is_live() && s.is_cordoned())
    })
    .await;
    // Both watches are now blocked in a query at those indexes, and the restart probe has
    // read its index since (a running controller's has always read it within 2 s).
    tokio::time::sleep(RESTART_PROBE_EVERY + Duration::from_millis(500)).await;

    consul.restart().await; // a dev agent comes back empty, with its indexes reset
    let restarted = std::time::Instant::now();
    until(&r, "the empty fleet after the restart", |t| {
        !t.is_stale() && t.servers.is_empty()
    })
    .await;
    let resynced = restarted.elapsed();
    consul.register_capacity("ws", "s1", 100).await;
    let t = until(&r, "s1 registered again", |t| t.get("s1").is_some()).await;
    let after = (consul.index(health).await, consul.index(states).await);
    println!(
        "consul restart mid-query: resynced {resynced:?} after; indexes {before:?} then {after:?}"
    );
    assert!(
        after.0 < before.0 && after.1 < before.1,
        "the indexes went backwards: {before:?} then {after:?}"
    );
    assert_eq!(
        t.get("s1").unwrap().admin,
        Admin::Active,
        "the KV state went with the agent"
    );
    assert_eq!(count(&t, "s1"), Some(Count::Known(10)));
}

#[tokio::test]
async fn nothing_destructive_happens_while_redis_is_down_and_it_resumes_after() {
    let handle = metrics();
    let (mut redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let c = cold_fleet("gap", &redis, &consul).await;
    let rec = Arc::new(Recording::default());
    let stop = CancellationToken::new();
    let task = rebalancer::controller::app::spawn_pipeline(c, rec.clone(), None, &stop).unwrap();
    let labels = [("pipeline", "gap")];
    eventually("a synced snapshot of 30 sessions", WAIT, || {
        let text = handle.render();
        async move {
            (sample(&text, "rebalancer_sessions", &labels) == Some(30.0)
                && sample(&text, "rebalancer_snapshot_stale", &labels) == Some(0.0))
            .then_some(())
        }
    })
    .await;

    redis.stop();
    eventually("the snapshot to go stale", WAIT, || {
        let text = handle.render();
        async move { (sample(&text, "rebalancer_snapshot_stale", &labels) == Some(1.0)).then_some(()) }
    })
    .await;
    // Past the counts' TTL (3 s) the last readings are not believed: every server unknown.
    eventually("the counts to age out", WAIT, || {
        let text = handle.render();
        async move {
            (sample(
                &text,
                "rebalancer_servers",
                &[("pipeline", "gap"), ("state", "unknown")],
            ) == Some(3.0)
                && sample(&text, "rebalancer_sessions", &labels) == Some(0.0))
            .then_some(())
        }
    })
    .await;
    // Longer than scale_in_after: on stale data nothing may be cordoned.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        rec.done.lock().unwrap().is_empty(),
        "acted on stale data: {:?}",
        rec.done.lock().unwrap()
    );

    redis.restart().await;
    for id in ["s1", "s2", "s3"] {
        redis.report("ws", id, "10").await;
    }
    let done = a_cordon_follows(&rec, "a cordon once the data is trustworthy again").await;
    assert!(done[0].1.epoch >= 1, "acted under a held lock");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_storm_is_coalesced_into_few_reads_and_ends_on_the_last_values() {
    use futures::StreamExt;
    use rebalancer::fleet::source::SessionsUpdate;
    let redis = Redis::start().await;
    let source = rebalancer::fleet::source::redis_sessions::stream(
        redis::Client::open(redis.url()).unwrap(),
        "ws",
        Duration::from_secs(600),
    );
    let mut source = std::pin::pin!(source);
    let first = tokio::time::timeout(WAIT, source.next()).await.unwrap();
    assert!(
        matches!(first, Some(Ok(SessionsUpdate::Resync(_)))),
        "{first:?}"
    );

    // 50 servers, 2,000 changes each, pipelined as fast as Redis takes them.
    let (servers, rounds) = (50u64, 2_000u64);
    let mut c = redis.conn().await;
    for round in 0..rounds {
        let mut p = redis::pipe();
        for s in 0..servers {
            p.cmd("SET")
                .arg(format!("rebalancer:ws:sessions:s{s}"))
                .arg(round * 100 + s)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.unwrap();
    }
    // Notifications come in order: once this one is read, every earlier one was counted.
    redis::cmd("SET")
        .arg("rebalancer:ws:sessions:end")
        .arg(1)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let last = |s: u64| (rounds - 1) * 100 + s;
    let (mut notifications, mut read, mut latest) =
        (0u64, 0usize, std::collections::HashMap::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while !latest.contains_key("end") {
        let next = tokio::time::timeout_at(deadline, source.next())
            .await
            .expect("every server's last value read before the deadline")
            .unwrap();
        match next {
            Ok(SessionsUpdate::Patch {
                changes,
                notifications: n,
                ..
            }) => {
                notifications += n;
                read += changes.len();
                for (id, r) in changes {
                    if let Some(Ok(v)) = r {
                        latest.insert(id.to_string(), v);
                    }
                }
            }
            other => panic!("only reads of changed counts expected: {other:?}"),
        }
    }
    println!("storm: {notifications} notifications, {read} keys read");
    for s in 0..servers {
        assert_eq!(latest.get(&format!("s{s}")), Some(&last(s)), "s{s}");
    }
    assert_eq!(
        notifications,
        servers * rounds + 1,
        "every notification counted, none lost"
    );
    assert!(
        (read as u64) * 10 < notifications,
        "a key changed many times before it is read is read once: {read} keys read for {notifications} notifications"
    );
}

#[tokio::test]
async fn a_paused_redis_makes_the_snapshot_stale_and_nothing_is_done_until_it_resumes() {
    let handle = metrics();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let c = cold_fleet("paused", &redis, &consul).await;
    let rec = Arc::new(Recording::default());
    let stop = CancellationToken::new();
    let task = rebalancer::controller::app::spawn_pipeline(c, rec.clone(), None, &stop).unwrap();
    let labels = [("pipeline", "paused")];
    let stale = || sample(&handle.render(), "rebalancer_snapshot_stale", &labels);
    eventually("a synced snapshot of 30 sessions", WAIT, || async {
        (sample(&handle.render(), "rebalancer_sessions", &labels) == Some(30.0)
            && stale() == Some(0.0))
        .then_some(())
    })
    .await;

    // Paused for 10 s: connections stay open, nothing answers.
    redis.signal("STOP");
    let paused = tokio::time::Instant::now();
    eventually(
        "the snapshot to go stale while Redis is paused",
        WAIT,
        || async { (stale() == Some(1.0)).then_some(()) },
    )
    .await;
    let noticed = paused.elapsed();
    tokio::time::sleep_until(paused + Duration::from_secs(10)).await;
    assert!(
        rec.actions().is_empty(),
        "acted while Redis was paused: {:?}",
        rec.actions()
    );
    redis.signal("CONT");
    let resumed = tokio::time::Instant::now();
    eventually("a synced snapshot again", WAIT, || async {
        (stale() == Some(0.0)
            && sample(&handle.render(), "rebalancer_sessions", &labels) == Some(30.0))
        .then_some(())
    })
    .await;
    println!(
        "redis paused: stale after {noticed:?}, synced {:?} after it resumed",
        resumed.elapsed()
    );
    assert!(
        noticed <= Duration::from_secs(3),
        "a paused Redis is noticed by the heartbeat within about a second, not after {noticed:?}"
    );
    // Trustworthy again: the cold fleet is cordoned after scale_in_after, as before the pause.
    a_cordon_follows(&rec, "a cordon once the data is trustworthy again").await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_read_at_an_index_a_restarted_agent_never_reached_is_cut_short() {
    // A watch between two reads when the agent restarts empty: its next read carries the
    // old index, which Consul would hold for the whole wait (5 min by default).
    let mut consul = ConsulAgent::start().await;
    for i in 0..30 {
        consul
            .kv_put("rebalancer/ws/servers/s1", &i.to_string())
            .await;
    }
    let path = "/v1/kv/rebalancer/ws/servers/?recurse=true".to_string();
    let old = consul.index(&path).await;
    let client = Consul::new(&consul.address(), None);
    let stop = CancellationToken::new();
    let restarts = Restarts::probe(
        client.clone(),
        "/v1/kv/rebalancer/ws/leader".into(),
        Duration::from_millis(200),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // the probe has read the index
                                                          // Made before the restart, as a watch's is: made after, it would take a restart the
                                                          // probe had already noticed as the one it started with (a race clean-clone CI lost).
    let fetch = consul_fetch(client, path.clone(), Duration::from_secs(300), restarts);
    consul.restart().await;
    let asked = std::time::Instant::now();
    let answer = tokio::time::timeout(WAIT, fetch(old))
        .await
        .expect("a read at an index the new agent never reached is cut short");
    println!("cut short after {:?}: {answer:?}", asked.elapsed());
    assert!(
        matches!(answer, Err(ConsulError::DataLost { .. })),
        "{answer:?}"
    );
    assert!(consul.index(&path).await < old);
    stop.cancel();
}

#[tokio::test]
async fn consul_answering_500_or_429_is_backed_off_destroys_nothing_and_resyncs_after() {
    let handle = metrics();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let proxy = FaultyProxy::start(consul.http_port).await;
    // A cold fleet, reached through the proxy.
    let mut c = cold_fleet("consul-5xx", &redis, &consul).await;
    c.consul.address = proxy.address();
    let labels = [("pipeline", "consul-5xx")];
    let stale = |want: f64| {
        move || {
            let text = handle.render();
            async move {
                (sample(&text, "rebalancer_snapshot_stale", &labels) == Some(want)).then_some(())
            }
        }
    };
    let rec = Arc::new(Recording::default());
    let stop = CancellationToken::new();
    let task = rebalancer::controller::app::spawn_pipeline(c, rec.clone(), None, &stop).unwrap();
    eventually("a synced snapshot", WAIT, stale(0.0)).await;

    let mut answered = Vec::new();
    for code in [500, 429] {
        let from = proxy.faults();
        proxy.fail_with(code);
        let failing = std::time::Instant::now();
        eventually(&format!("stale on {code}"), WAIT, stale(1.0)).await;
        let went_stale = failing.elapsed();
        // Longer than scale_in_after: nothing may be cordoned on what is left.
        tokio::time::sleep(Duration::from_secs(8)).await;
        answered.push((code, went_stale, proxy.faults() - from));
        assert!(
            rec.done.lock().unwrap().is_empty(),
            "acted while Consul answered {code}: {:?}",
            rec.done.lock().unwrap()
        );
        proxy.pass();
        eventually(
            &format!("synced after {code}"),
            Duration::from_secs(30),
            stale(0.0),
        )
        .await;
    }
    // Meanwhile a server joined: the resync reads it.
    proxy.fail_with(500);
    consul.register_capacity("ws", "s4", 100).await;
    redis.report("ws", "s4", "10").await;
    eventually("stale again", WAIT, stale(1.0)).await;
    proxy.pass();
    let resumed = std::time::Instant::now();
    eventually("s4 read by the resync", Duration::from_secs(30), || {
        let text = handle.render();
        async move { (sample(&text, "rebalancer_sessions", &labels) == Some(40.0)).then_some(()) }
    })
    .await;
    println!(
        "consul 5xx: (status, stale after, error answers in 8 s): {answered:?}; s4 read {:?} after",
        resumed.elapsed()
    );
    for (code, _, n) in &answered {
        // Two watches and the election, each backed off (200 ms doubling, with jitter): a
        // loop paced only by its rate limit would make 80 requests in these 8 s.
        assert!(
            *n <= 30,
            "{n} requests answered {code} in 8 s: not backed off"
        );
    }
    a_cordon_follows(&rec, "a cordon once Consul answers again").await;
    stop.cancel();
    task.await.unwrap();
}
