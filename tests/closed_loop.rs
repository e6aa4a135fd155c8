//! The closed loop with real WebSocket clients: demo servers embedding the agent, the load
//! generator, the controller, real Consul and Redis. Each test prints its figures.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use support::*;

const CAPACITY: u64 = 100;

/// The controller for these tests: a tolerance of 0.05 guarantees max − min ≤ 0.15 once no
/// server is over (every u ≤ U + 0.05 around U = 0.5), and short rounds keep the tests quick.
fn controller(redis: &Redis, consul: &ConsulAgent) -> Controller {
    let port = free_port();
    Controller::start(
        &temp_dir("loop-ctl"),
        &controller_toml(redis, consul, port),
        port,
    )
}

fn controller_toml(redis: &Redis, consul: &ConsulAgent, port: u16) -> String {
    pipeline_toml(
        "ws",
        redis,
        consul,
        port,
        "",
        "[rebalance]\ntolerance = 0.05\nround_interval = \"3s\"\n[scale]\nenabled = false\n",
    )
}

/// Three demo servers, `s1` to `s3`, each of capacity 100, passing their checks.
async fn three_servers(redis: &Redis, consul: &ConsulAgent) -> Vec<DemoServer> {
    let servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start(id, 100, redis, consul))
        .collect();
    servers_passing(consul, 3).await;
    servers
}

/// 150 clients piled on `servers[0]` until it is full: the load and the counts then.
async fn pile_on(
    redis: &Redis,
    consul: &ConsulAgent,
    servers: &[DemoServer],
) -> (Loadgen, BTreeMap<String, u64>) {
    pile_on_with(redis, consul, servers, &[], &[]).await
}

/// [`pile_on`] with `extra` arguments and `env` for the load generator.
async fn pile_on_with(
    redis: &Redis,
    consul: &ConsulAgent,
    servers: &[DemoServer],
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Loadgen, BTreeMap<String, u64>) {
    let pile = servers[0].url();
    let consul_addr = consul.address();
    let mut args = vec![
        "--connections",
        "150",
        "--duration",
        "180s",
        "--pile-on",
        &pile,
        "--consul",
        &consul_addr,
        "--service",
        "ws",
        "--backoff-max",
        "1s",
    ];
    args.extend_from_slice(extra);
    let load = Loadgen::start_with_env(&args, env);
    let before = counts_where(redis, "150 clients, s1 full", |c| {
        total(c) == 150 && c.get("s1") == Some(&100)
    })
    .await;
    (load, before)
}

/// Three demo servers and 150 clients piled on the first until it is full: the servers,
/// the load and the counts then.
async fn piled_up(
    redis: &Redis,
    consul: &ConsulAgent,
) -> (Vec<DemoServer>, Loadgen, BTreeMap<String, u64>) {
    let servers = three_servers(redis, consul).await;
    let (load, before) = pile_on(redis, consul, &servers).await;
    (servers, load, before)
}

fn spread(counts: &BTreeMap<String, u64>) -> f64 {
    let max = counts.values().max().copied().unwrap_or(0);
    let min = counts.values().min().copied().unwrap_or(0);
    (max - min) as f64 / CAPACITY as f64
}

/// Σ max(0, sessions − ceil(capacity × U)): what any rebalancer must move at least.
fn minimum_moves(counts: &BTreeMap<String, u64>) -> u64 {
    let total: u64 = counts.values().sum();
    let cap = CAPACITY * counts.len() as u64;
    let target = (CAPACITY * total).div_ceil(cap);
    counts.values().map(|s| s.saturating_sub(target)).sum()
}

async fn servers_passing(consul: &ConsulAgent, n: usize) {
    eventually("the demo servers to pass their checks", WAIT, || async {
        (consul.passing("ws").await.len() == n).then_some(())
    })
    .await;
}

fn total(c: &BTreeMap<String, u64>) -> u64 {
    c.values().sum()
}

fn shed_in_acks(acks: &[std::collections::HashMap<String, String>]) -> u64 {
    acks.iter().map(|a| a["shed"].parse::<u64>().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piled_up_fleet_converges_moving_close_to_the_minimum_and_losing_no_client() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let (_servers, mut load, before) = piled_up(&redis, &consul).await;
    let minimum = minimum_moves(&before);

    let ctl = controller(&redis, &consul);
    let after = counts_where(&redis, "the fleet within 0.15 of utilization", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    sheds_settled(&ctl, &redis, 150).await;
    load.until_connected(150).await;
    let summary = load.finish();
    let acks = redis.acks("ws").await;
    let moved = shed_in_acks(&acks);
    println!(
        "closed loop (random reconnects): before {before:?} after {after:?} spread {:.2} \
         moved {moved} minimum {minimum} ratio {:.2} rounds {} loadgen {summary}",
        spread(&after),
        moved as f64 / minimum as f64,
        acks.len()
    );
    assert!(
        !acks.is_empty(),
        "the acks stream shows what was shed; log:\n{}",
        ctl.log()
    );
    for a in &acks {
        assert!(a.contains_key("id") && a.contains_key("requested") && a.contains_key("at_ms"));
        assert!(a["server"].starts_with('s'));
    }
    assert!(moved >= minimum, "moved {moved} < the minimum {minimum}?");
    assert!(
        moved as f64 <= 1.5 * minimum as f64,
        "moved {moved}, more than 1.5 × {minimum}"
    );
    assert_eq!(
        summary["connected_at_end"], 150,
        "every client connected at the end: {summary}"
    );
    assert_eq!(
        summary["reconnects"].as_u64(),
        Some(moved),
        "only commanded closes: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_moves_clients_away_and_the_fleet_rebalances_onto_the_new_server() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let mut servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start(id, 100, &redis, &consul))
        .collect();
    servers_passing(&consul, 3).await;
    let mut load = Loadgen::start(&[
        "--connections",
        "150",
        "--duration",
        "180s",
        "--consul",
        &consul.address(),
        "--service",
        "ws",
        "--backoff-max",
        "1s",
    ]);
    let _ctl = controller(&redis, &consul);
    counts_where(&redis, "a balanced start", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;

    servers[1].stop();
    let during = counts_where(&redis, "s2's clients on s1 and s3", |c| {
        !c.contains_key("s2") && c.get("s1").unwrap_or(&0) + c.get("s3").unwrap_or(&0) == 150
    })
    .await;
    servers[1].restart();
    let after = counts_where(&redis, "s2 back and the fleet balanced", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    load.until_connected(150).await;
    let summary = load.finish();
    println!("rolling restart: during {during:?} after {after:?} loadgen {summary}");
    assert!(
        after["s2"] >= 35,
        "the restarted server took sessions: {after:?}"
    );
    assert_eq!(summary["connected_at_end"], 150, "none lost: {summary}");
    let codes = &summary["close_codes"];
    assert!(
        codes["1012"].as_u64().unwrap_or(0) >= 1,
        "the restart drained with 1012: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_drops_no_client_and_reports_resume() {
    let (mut redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start(id, 100, &redis, &consul))
        .collect();
    servers_passing(&consul, 3).await;
    let mut load = Loadgen::start(&[
        "--connections",
        "120",
        "--duration",
        "180s",
        "--consul",
        &consul.address(),
        "--service",
        "ws",
        "--backoff-max",
        "1s",
    ]);
    let ctl = controller(&redis, &consul);
    counts_where(&redis, "a balanced loop", |c| {
        c.len() == 3 && total(c) == 120 && spread(c) <= 0.15
    })
    .await;
    // Quiet: past the controller's settle time (5 s) and its first rounds, and every client
    // a shed of theirs moved back on a server.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = counts_where(&redis, "every client counted", |c| {
        c.len() == 3 && total(c) == 120
    })
    .await;

    redis.restart().await; // empty, notifications off
    let after = counts_where(&redis, "every server reporting again", |c| {
        c.len() == 3 && total(c) == 120
    })
    .await;
    eventually("the controller to resync Redis", WAIT, || async {
        (ctl.metric(
            "rebalancer_source_resyncs_total",
            &[("source", "redis-sessions")],
        )
        .await
            >= Some(1.0)
            && ctl.metric("rebalancer_snapshot_stale", &[]).await == Some(0.0))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let summary = load.finish();
    println!("redis restart: before {before:?} after {after:?} loadgen {summary}");
    assert_eq!(
        redis.acks("ws").await.len(),
        0,
        "nothing was shed after the restart"
    );
    assert_eq!(summary["connected_at_end"], 120);
    // No client was dropped: every reconnect of the run was a shed the controller commanded
    // (close code 1013), none a connection lost. (A shed of the last rounds before the
    // restart may still move a client after `before` was read, so the counts are compared
    // by their total.)
    assert_eq!(
        summary["reconnects"].as_u64(),
        summary["close_codes"]["1013"].as_u64().or(Some(0)),
        "a client was dropped: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_made_of_raw_redis_and_consul_calls_is_treated_like_an_agent_backed_one() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let agent_backed = DemoServer::start("agent-1", 100, &redis, &consul);
    // The raw server: a Consul registration with a TTL check, and a SET with a TTL.
    consul.register_capacity("ws", "raw-1", 100).await;
    redis.report("ws", "raw-1", "90").await;
    servers_passing(&consul, 2).await;
    let mut load = Loadgen::start(&[
        "--connections",
        "10",
        "--duration",
        "120s",
        "--url",
        &agent_backed.url(),
    ]);
    counts_where(&redis, "10 sessions on the agent-backed server", |c| {
        c.get("agent-1") == Some(&10)
    })
    .await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("rebalancer:ws:commands").await.unwrap();
    let mut msgs = ps.into_on_message();
    let ctl = controller(&redis, &consul);
    eventually(
        "both servers active in the controller's snapshot",
        WAIT,
        || async {
            (ctl.metric("rebalancer_servers", &[("state", "active")])
                .await
                == Some(2.0)
                && ctl.metric("rebalancer_sessions", &[]).await == Some(100.0))
            .then_some(())
        },
    )
    .await;
    let m = tokio::time::timeout(WAIT, msgs.next())
        .await
        .expect("a command")
        .unwrap();
    let cmd: rebalancer::contract::protocol::Command =
        serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
    assert_eq!((cmd.server.as_str(), cmd.count), ("raw-1", 40));
    // The raw server obeys: fewer sessions, and an ack on the stream.
    redis.report("ws", "raw-1", "50").await;
    let mut c = redis.conn().await;
    redis::cmd("XADD")
        .arg("rebalancer:ws:acks")
        .arg("*")
        .arg("id")
        .arg(&cmd.id)
        .arg("server")
        .arg("raw-1")
        .arg("requested")
        .arg(cmd.count)
        .arg("shed")
        .arg(40)
        .arg("at_ms")
        .arg(1)
        .query_async::<String>(&mut c)
        .await
        .unwrap();
    eventually(
        "the controller to see the raw server at 50 and take in its ack",
        WAIT,
        || async {
            (ctl.metric("rebalancer_sessions", &[]).await == Some(60.0)
                && ctl
                    .metric("rebalancer_sessions_shed_acked_total", &[])
                    .await
                    == Some(40.0))
            .then_some(())
        },
    )
    .await;
    let summary = load.finish();
    assert_eq!(
        summary["reconnects"].as_u64(),
        Some(0),
        "the agent-backed server was not shed: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_right_after_its_first_shed_and_restarted_sheds_no_excess_twice() {
    // SIGTERM right after the first shed, a new process 0.2 s later: it takes the lock at
    // once, and must learn from the acks stream that the excess is already on its way.
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let (_servers, mut load, before) = piled_up(&redis, &consul).await;
    let minimum = minimum_moves(&before);

    let client = redis::Client::open(redis.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("rebalancer:ws:commands").await.unwrap();
    let mut msgs = ps.into_on_message();
    let port = free_port();
    let toml = controller_toml(&redis, &consul, port);
    let mut first = Controller::start(&temp_dir("restart-ctl"), &toml, port);
    let m = tokio::time::timeout(WAIT, msgs.next())
        .await
        .unwrap_or_else(|_| panic!("a first shed; log:\n{}", first.log()))
        .unwrap();
    first.terminate();
    let first_log = first.log();
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = Controller::start(&temp_dir("restart-ctl-2"), &toml, port);
    let cmd: rebalancer::contract::protocol::Command =
        serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();

    let after = counts_where(&redis, "the fleet within 0.15 of utilization", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    // Past the new leader's settle and several of its rounds: nothing more to move.
    second.until_synced(150.0).await;
    second.rounds(8).await;
    // Stopped before the clients are counted: a shed in between would leave one of them
    // reconnecting at the count (seen: 149 of 150 at the finish).
    let mut second = second;
    second.terminate();
    // Every shed it published carried out and acked (a server acks after its shed window).
    let acks = acks_settled(&redis).await;
    load.until_connected(150).await;
    let summary = load.finish();
    let moved = shed_in_acks(&acks);
    println!(
        "restart after the first shed ({} of {}): before {before:?} after {after:?} moved {moved} \
         minimum {minimum} acks {acks:?} loadgen {summary}",
        cmd.count, cmd.server,
    );
    // Shed twice shows on the server shed first: its excess taken again by the new leader.
    // The clients it shed reconnect at random, so rounds that even out where they landed
    // may move a few more elsewhere (the piled-up test allows 1.5 × for that).
    let from_first: u64 = acks
        .iter()
        .filter(|a| a["server"] == cmd.server)
        .map(|a| a["shed"].parse::<u64>().unwrap())
        .sum();
    assert!(
        from_first as f64 <= 1.1 * minimum as f64 && moved as f64 <= 1.5 * minimum as f64,
        "moved {from_first} from {} ({moved} in all) for a minimum of {minimum}: shed twice; \
         first log:\n{first_log}\nsecond log:\n{}",
        cmd.server,
        second.log()
    );
    assert!(
        second
            .log()
            .contains("another controller's shed, remembered"),
        "the new process read the first one's ack; log:\n{}",
        second.log()
    );
    assert_eq!(summary["connected_at_end"], 150, "none lost: {summary}");
    assert_eq!(summary["reconnects"].as_u64(), Some(moved), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_twice_its_ttl_never_acts_on_its_old_lease_when_resumed() {
    // The leader is SIGSTOPped (a frozen VM, a long pause) past 2 × TTL: the standby takes
    // over. The fleet piles up while it is away, and it is resumed as the pile completes,
    // with its cached lease and a snapshot that catches up at once: it must not publish.
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers = three_servers(&redis, &consul).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.subscribe("rebalancer:ws:commands").await.unwrap();
    let mut msgs = ps.into_on_message();
    let ctls = [controller(&redis, &consul), controller(&redis, &consul)];
    let refs = [&ctls[0], &ctls[1]];
    let l = eventually("exactly one leader", WAIT, || the_leader(&refs)).await;
    let (old, new) = (&ctls[l], &ctls[1 - l]);
    let old_epoch = old.metric("rebalancer_leader_epoch", &[]).await.unwrap() as u64;

    old.signal("STOP");
    let paused = std::time::Instant::now();
    // Consul keeps a session up to 2 × TTL (10 s here), then the lock delay (1 s).
    eventually(
        "the standby to lead",
        Duration::from_secs(2 * 10 + 1 + 5),
        || async { (new.metric("rebalancer_leader", &[]).await == Some(1.0)).then_some(()) },
    )
    .await;
    let took_over = paused.elapsed();
    let new_epoch = new.metric("rebalancer_leader_epoch", &[]).await.unwrap() as u64;
    assert!(new_epoch > old_epoch, "{old_epoch} then {new_epoch}");

    let (mut load, before) = pile_on(&redis, &consul, &servers).await;
    old.signal("CONT");
    let after = counts_where(&redis, "the fleet within 0.15 of utilization", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    new.rounds(5).await;
    old.rounds(5).await;
    let (old_leader, old_log) = (old.metric("rebalancer_leader", &[]).await, old.log());
    drop(ctls); // no shed while the clients are counted
    load.until_connected(150).await;
    let summary = load.finish();

    let mut epochs = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), msgs.next()).await {
        let c: rebalancer::contract::protocol::Command =
            serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
        epochs.push(c.epoch);
    }
    let acks = redis.acks("ws").await;
    println!(
        "paused leader: took over in {took_over:?}; before {before:?} after {after:?} \
         command epochs {epochs:?} (old {old_epoch}, new {new_epoch}) acks {acks:?} \
         loadgen {summary}"
    );
    assert!(!epochs.is_empty(), "the new leader shed the pile");
    assert!(
        epochs.iter().all(|e| *e == new_epoch),
        "a command under another epoch than the new leader's {new_epoch}: {epochs:?}; \
         resumed leader's log:\n{old_log}"
    );
    assert!(
        acks.iter()
            .all(|a| a["epoch"] == new_epoch.to_string() && !a.contains_key("refused")),
        "{acks:?}"
    );
    assert_eq!(old_leader, Some(0.0));
    assert!(
        old_log.contains("not the leader"),
        "the resumed leader said it gave up; log:\n{old_log}"
    );
    assert_eq!(summary["connected_at_end"], 150, "none lost: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_command_keys_servers_obey_only_signed_commands_and_forgeries_pin_nothing() {
    const KEY: &str = "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const WRONG: &str = "k1:ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let env = [("REBALANCER_COMMAND_KEYS", KEY)];
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start_with_env(id, 100, &redis, &consul, &env))
        .collect();
    servers_passing(&consul, 3).await;
    let (mut load, before) = pile_on(&redis, &consul, &servers).await;

    // Forgeries for the full s1: unsigned with the highest epoch (it would refuse every
    // later command if it were learned), and signed under the right id with a wrong secret.
    let now = rebalancer::contract::protocol::unix_ms(std::time::SystemTime::now());
    let forged = |id: &str| rebalancer::contract::protocol::Command {
        v: 1,
        id: id.into(),
        kind: rebalancer::contract::protocol::CommandKind::Shed,
        server: "s1".into(),
        count: 100,
        epoch: u64::MAX,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        kid: None,
        sig: None,
    };
    let unsigned = forged("forged-unsigned");
    let mut wrong = forged("forged-wrong-key");
    rebalancer::contract::signing::CommandKeys::parse("test", WRONG)
        .unwrap()
        .sign(&mut wrong);
    let mut c = redis.conn().await;
    for cmd in [&unsigned, &wrong] {
        let heard: i64 = redis::cmd("PUBLISH")
            .arg("rebalancer:ws:commands")
            .arg(serde_json::to_string(cmd).unwrap())
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(heard, 3);
    }
    eventually(
        "both forgeries refused on the acks stream",
        WAIT,
        || async {
            let a = redis.acks("ws").await;
            (a.len() >= 2).then_some(a)
        },
    )
    .await;
    // Every server saw them; only the one addressed says so on the acks stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acks = redis.acks("ws").await;
    assert!(
        acks.len() == 2 && acks.iter().all(|a| a["server"] == "s1"),
        "acked by the server addressed only: {acks:?}"
    );
    let reason = |id: &str| {
        acks.iter()
            .find(|a| a["id"] == id)
            .and_then(|a| a.get("refused").cloned())
    };
    assert_eq!(
        reason("forged-unsigned").as_deref(),
        Some("unsigned"),
        "{acks:?}"
    );
    assert_eq!(
        reason("forged-wrong-key").as_deref(),
        Some("bad_signature"),
        "{acks:?}"
    );
    assert_eq!(
        redis.counts("ws").await.get("s1"),
        Some(&100),
        "nothing shed"
    );
    // Every server counted both (and logged each reason once: once a minute at most).
    let text = get(format!("http://127.0.0.1:{}/metrics", servers[1].port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["unsigned", "bad_signature"] {
        assert_eq!(
            sample(
                &text,
                "rebalancer_agent_commands_refused_total",
                &[("reason", reason)]
            ),
            Some(1.0),
            "{text}"
        );
    }

    // The controller signs: its commands are obeyed, under its own epoch, and the fleet
    // evens out.
    let port = free_port();
    let mut ctl = Controller::start_with_env(
        &temp_dir("signed-ctl"),
        &controller_toml(&redis, &consul, port),
        port,
        &env,
    );
    let after = counts_where(&redis, "the fleet within 0.15 of utilization", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    ctl.terminate(); // no shed while the clients are counted
    load.until_connected(150).await;
    let summary = load.finish();
    let acks = redis.acks("ws").await;
    println!("signed commands: before {before:?} after {after:?} acks {acks:?}");
    assert!(
        acks.iter()
            .filter(|a| !a["id"].starts_with("forged"))
            .all(|a| !a.contains_key("refused")),
        "{acks:?}"
    );
    assert!(ctl.log().contains("commands are signed"), "{}", ctl.log());
    assert!(
        servers[0].log().contains("obeying only signed commands"),
        "{}",
        servers[0].log()
    );
    assert_eq!(summary["connected_at_end"], 150, "none lost: {summary}");
}

/// The fenced block (of language `lang`) of `role`'s section (`### <role>`) in
/// docs/security.md.
fn documented(role: &str, lang: &str) -> String {
    let doc = std::fs::read_to_string(repo().join("docs/security.md")).unwrap();
    let at = doc
        .find(&format!("### {role}\n"))
        .unwrap_or_else(|| panic!("docs/security.md has no section for {role}"));
    let block = &doc[at..];
    let fence = format!("```{lang}\n");
    let start = block.find(&fence).unwrap() + fence.len();
    let end = start + block[start..].find("```").unwrap();
    block[start..end].to_string()
}

/// The Consul ACL rules docs/security.md gives `role`.
fn documented_rules(role: &str) -> String {
    documented(role, "hcl")
}

/// The Redis ACL user docs/security.md gives `role`, as one ACL file line with `password`.
fn documented_redis_user(role: &str, password: &str) -> String {
    documented(&format!("{role} (Redis)"), "acl")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("<password>", password)
}

/// The variables that give a role its Consul token and Redis user, and point both clients
/// at the test's certificates.
fn role_env(certs: &Certs, token: &str, redis_user: &str) -> Vec<(String, String)> {
    let mut env = certs.env("CONSUL");
    env.extend(certs.env("REDIS"));
    env.extend([
        ("CONSUL_HTTP_TOKEN".to_string(), token.to_string()),
        ("REDIS_USERNAME".to_string(), redis_user.to_string()),
        ("REDIS_PASSWORD".to_string(), format!("{redis_user}-secret")),
    ]);
    env
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_works_over_tls_on_its_own_least_privilege_credentials_and_too_little_is_named()
{
    let certs = Certs::generate();
    let master = format!("master-{}", std::process::id());
    let users: Vec<String> = ["controller", "gateway", "agent"]
        .iter()
        .map(|role| documented_redis_user(role, &format!("rebalancer-{role}-secret")))
        .chain([
            // The controller's user without CONFIG SET, on a Redis whose notifications are off.
            documented_redis_user("controller", "rebalancer-noconfig-secret")
                .replace("user rebalancer-controller ", "user rebalancer-noconfig ")
                .replace(" +config|set", ""),
        ])
        .collect();
    let (redis, consul) = (
        Redis::start_secure(&certs, &users.join("\n")).await,
        ConsulAgent::start_secure(&master, &certs).await,
    );
    assert!(consul.address().starts_with("https://") && redis.url().starts_with("rediss://"));
    let mut tokens = std::collections::HashMap::new();
    for role in ["controller", "gateway", "agent", "loadgen"] {
        let mut rules = documented_rules(role);
        if role == "gateway" {
            // The test gateway's pipeline is named `gw`: the rule the page says to add.
            rules += "key_prefix \"rebalancer/gw/\" { policy = \"read\" }\n";
        }
        let t = consul.token_with_rules(role, &rules).await;
        tokens.insert(role, t);
    }
    let env = |role: &str, redis_role: &str| {
        role_env(&certs, &tokens[role], &format!("rebalancer-{redis_role}"))
    };

    // Without CONFIG SET, and notifications off: the controller names the setting to make.
    let port0 = free_port();
    let noconfig_env = env("controller", "noconfig");
    let noconfig = Controller::start_with_env(
        &temp_dir("tls-noconfig"),
        &controller_toml(&redis, &consul, port0),
        port0,
        &as_refs(&noconfig_env),
    );
    eventually("the controller to name the setting", WAIT, || async {
        let log = noconfig.log();
        log.contains("set notify-keyspace-events to include K$gxe")
            .then_some(())
    })
    .await;
    drop(noconfig);

    let agent_env = env("agent", "agent");
    let servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start_with_env(id, 100, &redis, &consul, &as_refs(&agent_env)))
        .collect();
    servers_passing(&consul, 3).await;
    let loadgen_env = certs.env("CONSUL");
    let (mut load, _) = pile_on_with(
        &redis,
        &consul,
        &servers,
        &["--consul-token", &tokens["loadgen"]],
        &as_refs(&loadgen_env),
    )
    .await;
    let port = free_port();
    let ctl_env = env("controller", "controller");
    let mut ctl = Controller::start_with_env(
        &temp_dir("tls-ctl"),
        &controller_toml(&redis, &consul, port),
        port,
        &as_refs(&ctl_env),
    );
    let after = counts_where(&redis, "the fleet within 0.15 of utilization", |c| {
        c.len() == 3 && total(c) == 150 && spread(c) <= 0.15
    })
    .await;
    assert_eq!(
        ctl.metric("rebalancer_leader", &[]).await,
        Some(1.0),
        "{}",
        ctl.log()
    );
    // The gateway follows the fleet and its counts on its own token and user, and routes.
    let gw_env = env("gateway", "gateway");
    let gateway = GatewayProc::start_with_env(
        &redis,
        &consul,
        "shared_accounting = true\n",
        &as_refs(&gw_env),
    )
    .await;
    let hello = gateway.http_url("/hello");
    eventually("a request routed by the gateway", WAIT, || async {
        let r = get(&hello).await.ok()?;
        let body = r.text().await.ok()?;
        body.contains("\"server\"").then_some(())
    })
    .await;

    // A controller on the agent's token: it cannot hold a session, and says what it lacks.
    let port2 = free_port();
    let weak_env = env("agent", "controller");
    let weak = Controller::start_with_env(
        &temp_dir("acl-weak"),
        &controller_toml(&redis, &consul, port2).replace("name = \"ws\"", "name = \"weak\""),
        port2,
        &as_refs(&weak_env),
    );
    eventually(
        "the weak controller to name what it lacks",
        WAIT,
        || async {
            weak.log()
                .contains(r#"the ACL token lacks session_prefix "" { policy = "write" }"#)
                .then_some(())
        },
    )
    .await;
    ctl.terminate();
    load.until_connected(150).await;
    let summary = load.finish();
    println!("tls closed loop: after {after:?} loadgen {summary}");
    assert_eq!(summary["connected_at_end"], 150, "none lost: {summary}");
    for (what, log) in [("gateway", gateway.log()), ("controller", ctl.log())] {
        assert!(
            !log.contains("403 Forbidden") && !log.contains("NOPERM"),
            "{what} was refused something:\n{log}"
        );
    }
    for s in &servers {
        let log = s.log();
        assert!(
            !log.contains("NOPERM"),
            "{} was refused something:\n{log}",
            s.id
        );
    }
    // Nothing any role tried was refused, even where a refusal is not an error (the
    // controller without CONFIG SET excepted).
    let denied: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let denied = format!("{denied:?}");
    println!("ACL LOG: {denied}");
    assert!(denied.contains("rebalancer-noconfig"), "{denied}");
    for user in [
        "rebalancer-controller",
        "rebalancer-gateway",
        "rebalancer-agent",
    ] {
        assert!(!denied.contains(user), "{user} was refused: {denied}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_acks_each_command_it_refuses_with_the_reason() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _s1 = DemoServer::start("s1", 100, &redis, &consul);
    servers_passing(&consul, 1).await;
    let now = rebalancer::contract::protocol::unix_ms(std::time::SystemTime::now());
    let cmd = |id: &str, server: &str, epoch: u64, expires_at_ms: u64| {
        serde_json::json!({"v": 1, "id": id, "kind": "shed", "server": server, "count": 1,
            "epoch": epoch, "issued_at_ms": now, "expires_at_ms": expires_at_ms})
        .to_string()
    };
    let mut c = redis.conn().await;
    let sent = [
        cmd("ok", "s1", 5, now + 60_000),
        cmd("old-leader", "s1", 4, now + 60_000),
        cmd("late", "s1", 5, now - 1),
        cmd("not-mine", "s2", 5, now + 60_000),
        cmd("ok", "s1", 5, now + 60_000), // a retry: already done, not acked again
        cmd("marker", "s1", 5, now - 1),  // acked after the retry was dropped
    ];
    eventually("s1 to listen for commands", WAIT, || async {
        let heard: i64 = redis::cmd("PUBLISH")
            .arg("rebalancer:ws:commands")
            .arg(&sent[0])
            .query_async(&mut c.clone())
            .await
            .unwrap();
        (heard == 1).then_some(())
    })
    .await;
    for payload in &sent[1..] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("rebalancer:ws:commands")
            .arg(payload)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Each ack is written by a task of its own: they may land in any order.
    let acks = eventually("an ack of each command for s1", WAIT, || async {
        let a = redis.acks("ws").await;
        ["ok", "old-leader", "late", "marker"]
            .iter()
            .all(|id| a.iter().any(|a| a["id"] == *id))
            .then_some(a)
    })
    .await;
    let by_id = |id: &str| acks.iter().find(|a| a["id"] == id).cloned();
    let refused = |id: &str| by_id(id).and_then(|a| a.get("refused").cloned());
    assert_eq!(
        refused("old-leader").as_deref(),
        Some("stale_epoch"),
        "{acks:?}"
    );
    assert_eq!(refused("late").as_deref(), Some("expired"), "{acks:?}");
    let ok = by_id("ok").expect("the obeyed command is acked");
    assert_eq!((ok.get("refused"), ok["epoch"].as_str()), (None, "5"));
    assert_eq!(by_id("not-mine"), None, "{acks:?}");
    assert_eq!(acks.len(), 4, "one ack per command id: {acks:?}");
}

#[test]
fn a_demo_server_stops_on_sigterm_even_when_redis_and_consul_are_gone() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (dead_consul, dead_redis) = (
        format!("http://127.0.0.1:{}", free_port()),
        format!("redis://127.0.0.1:{}/0", free_port()),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rebalancer"))
        .args([
            "demo-server",
            "--id",
            "lonely",
            "--listen",
            &listen,
            "--consul",
            &dead_consul,
            "--redis",
            &dead_redis,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2)); // its loops are now retrying
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the demo server did not stop within 15 s of SIGTERM");
}
