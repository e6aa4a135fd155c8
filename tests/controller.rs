//! End to end: the built `rebalancer` binary against a real Redis and Consul, with servers
//! faked by nothing but plain Redis and Consul HTTP calls (no agent code).

mod support;

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use rebalancer::contract::protocol::{Command as Cmd, CommandKind};
use support::*;
use tokio::sync::mpsc;

/// Every command published on the service's channel, parsed.
async fn subscribe(redis: &Redis) -> mpsc::UnboundedReceiver<Cmd> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("rebalancer:ws:commands").await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut msgs = pubsub.into_on_message();
        while let Some(m) = msgs.next().await {
            let payload: String = m.get_payload().unwrap();
            let cmd: Cmd = serde_json::from_str(&payload)
                .unwrap_or_else(|e| panic!("bad command {payload}: {e}"));
            if tx.send(cmd).is_err() {
                break;
            }
        }
    });
    rx
}

async fn fleet(consul: &ConsulAgent, redis: &Redis, counts: &[(&str, &str)]) {
    for (id, n) in counts {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, n).await;
    }
}

#[tokio::test]
async fn a_count_change_publishes_the_expected_shed_command() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "50"), ("s2", "50"), ("s3", "50")]).await;
    // A ghost: a count with no registration, ignored.
    redis.report("ws", "ghost", "1000").await;
    let port = free_port();
    // Reconcile only hourly: the change must arrive through keyspace notifications.
    let toml = pipeline_toml("ws", &redis, &consul, port, "", "")
        .replace("reconcile = \"5s\"", "reconcile = \"1h\"");
    let ctl = Controller::start(&temp_dir("e2e-shed"), &toml, port);
    ctl.until_synced(150.0).await;
    let mut commands = subscribe(&redis).await;

    let t0 = std::time::Instant::now();
    redis.report("ws", "s1", "90").await;
    redis.report("ws", "s3", "10").await;
    let cmd = tokio::time::timeout(WAIT, commands.recv())
        .await
        .unwrap_or_else(|_| panic!("no command published; controller log:\n{}", ctl.log()))
        .unwrap();
    println!(
        "count change to published command: {:?} (debounce quiet 50ms, max 300ms)",
        t0.elapsed()
    );
    assert_eq!(
        (cmd.v, cmd.kind, cmd.server.as_str(), cmd.count),
        (1, CommandKind::Shed, "s1", 40)
    );
    assert!(cmd.epoch >= 1, "carries the leader's epoch");
    assert_eq!(
        cmd.expires_at_ms - cmd.issued_at_ms,
        10_000,
        "default command_ttl"
    );
    assert_eq!(cmd.id.len(), 32);

    // Exactly one: s1 is not shed again within round_interval, nobody else is over.
    let more = tokio::time::timeout(Duration::from_secs(2), commands.recv()).await;
    assert!(more.is_err(), "unexpected second command: {more:?}");
    let shed = ctl
        .metric(
            "rebalancer_sessions_shed_requested_total",
            &[("kind", "shed")],
        )
        .await;
    assert_eq!(shed, Some(40.0));
    assert!(
        ctl.metric("rebalancer_event_to_action_seconds_count", &[])
            .await
            >= Some(1.0)
    );
}

#[tokio::test]
async fn sustained_low_load_cordons_down_to_min_servers_and_high_load_reactivates() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "4"), ("s2", "5"), ("s3", "6")]).await;
    let ctl = Controller::with_sections("e2e-scale", &redis, &consul, "[rebalance]\nenabled = false\n[scale]\nscale_in_after = \"2s\"\ncooldown = \"1s\"\nmin_servers = 2\n");
    ctl.until_synced(15.0).await;

    eventually("s1, the emptiest, to be cordoned", WAIT, || async {
        (consul.server_state("ws", "s1").await.as_deref() == Some("cordoned")).then_some(())
    })
    .await;
    let raw = consul.kv_get("rebalancer/ws/servers/s1").await.unwrap();
    assert!(
        raw.contains("scale_in_at"),
        "the record carries the reason: {raw}"
    );
    // Held low for several more cooldowns: min_servers = 2 keeps s2 and s3 active.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(consul.server_state("ws", "s2").await, None);
    assert_eq!(consul.server_state("ws", "s3").await, None);

    // Load rises above scale_out_at on the two active servers: s1 comes back first.
    redis.report("ws", "s2", "90").await;
    redis.report("ws", "s3", "90").await;
    eventually("s1 to be reactivated", WAIT, || async {
        (consul.server_state("ws", "s1").await.as_deref() == Some("active")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_operators_cordon_survives_a_hot_fleet_and_the_shortfall_is_reported() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(
        &consul,
        &redis,
        &[("s1", "120"), ("s2", "120"), ("op", "0"), ("ctl", "0")],
    )
    .await;
    let operator = r#"{"state":"cordoned","since_ms":1,"reason":"maintenance","by":"operator"}"#;
    consul.kv_put("rebalancer/ws/servers/op", operator).await;
    consul
        .kv_put(
            "rebalancer/ws/servers/ctl",
            r#"{"state":"cordoned","since_ms":1,"reason":"scale-in","by":"controller"}"#,
        )
        .await;
    let ctl = Controller::with_sections(
        "e2e-operator",
        &redis,
        &consul,
        "[rebalance]\nenabled = false\n[scale]\ncooldown = \"1s\"\n",
    );
    ctl.until_synced(240.0).await;
    // U = 240 / 200 = 1.2: ceil(240 / 55) = 5 needed, 2 active. Only the controller's own
    // cordon comes back; what the operator holds is reported as shortfall instead, and
    // stays so: with ctl back, U = 240 / 300 = 0.8 is still above scale_out_at (0.7), and
    // 5 needed, 3 active leaves a shortfall of two.
    eventually("ctl reactivated", WAIT, || async {
        (consul.server_state("ws", "ctl").await.as_deref() == Some("active")).then_some(())
    })
    .await;
    // Past the cooldown of the reactivation, the shortfall is what is left.
    eventually("a shortfall of two", WAIT, || async {
        let n = ctl
            .metric("rebalancer_scale_shortfall_servers", &[])
            .await?;
        (n == 2.0).then_some(())
    })
    .await;
    // Several more rounds: still the operator's record, word for word, and the shortfall.
    ctl.rounds(3).await;
    assert_eq!(
        ctl.metric("rebalancer_scale_shortfall_servers", &[]).await,
        Some(2.0)
    );
    assert_eq!(
        consul.kv_get("rebalancer/ws/servers/op").await.as_deref(),
        Some(operator)
    );
    let reactivated = ctl
        .metric(
            "rebalancer_actions_total",
            &[("kind", "reactivate"), ("result", "ok")],
        )
        .await;
    assert_eq!(reactivated, Some(1.0), "{}", ctl.log());
    assert!(
        ctl.log()
            .contains("cordoned by an operator are left cordoned"),
        "the log says why: {}",
        ctl.log()
    );
}

/// Scale actions made so far (every kind, carried out).
async fn scale_actions(ctl: &Controller) -> f64 {
    let text = ctl.metrics().await;
    ["reactivate", "cordon", "start", "reap"]
        .iter()
        .filter_map(|k| {
            sample(
                &text,
                "rebalancer_actions_total",
                &[("kind", k), ("result", "ok")],
            )
        })
        .sum()
}

#[tokio::test]
async fn load_oscillating_around_the_scale_out_threshold_makes_at_most_one_scale_action_per_cooldown(
) {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    // One active server, seven cordoned by the controller: room for many scale-outs.
    let ids: Vec<String> = (1..=8).map(|i| format!("s{i}")).collect();
    for id in &ids {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, "0").await;
        if id != "s1" {
            consul
                .kv_put(
                    &format!("rebalancer/ws/servers/{id}"),
                    r#"{"state":"cordoned","since_ms":1,"reason":"scale-in","by":"controller"}"#,
                )
                .await;
        }
    }
    let cooldown = Duration::from_secs(3);
    let ctl = Controller::with_sections(
        "e2e-oscillate",
        &redis,
        &consul,
        "[rebalance]\nenabled = false\n[scale]\ncooldown = \"3s\"\n",
    );
    ctl.until_synced(0.0).await;

    // U on the active servers flips between 0.65 and 0.75 around scale_out_at (0.70)
    // every 400 ms, for five cooldowns.
    let began = std::time::Instant::now();
    let (mut seen, mut acted_at) = (0.0, Vec::new());
    let mut tick = 0u32;
    while began.elapsed() < 5 * cooldown {
        if tick.is_multiple_of(4) {
            let per_server = if (tick / 4).is_multiple_of(2) {
                "75"
            } else {
                "65"
            };
            for id in &ids {
                let cordoned = consul.server_state("ws", id).await.as_deref() == Some("cordoned");
                redis
                    .report("ws", id, if cordoned { "0" } else { per_server })
                    .await;
            }
        }
        let n = scale_actions(&ctl).await;
        if n > seen {
            acted_at.push(began.elapsed());
            seen = n;
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("oscillating load: scale actions at {acted_at:?} ({seen} servers)");
    assert!(
        acted_at.len() >= 2,
        "the hot phases scaled out more than once: {acted_at:?}; log:\n{}",
        ctl.log()
    );
    for pair in acted_at.windows(2) {
        // Seen by polling every 100 ms (plus a scrape): allow that much.
        assert!(
            pair[1].saturating_sub(pair[0]) >= cooldown.saturating_sub(Duration::from_millis(300)),
            "two scale actions within one cooldown: {acted_at:?}; log:\n{}",
            ctl.log()
        );
    }
    assert!(acted_at.len() <= 6, "{acted_at:?}");
}

#[tokio::test]
async fn with_a_fifth_of_the_counts_missing_nothing_is_shed_or_cordoned_but_scale_out_goes_on() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let mut commands = subscribe(&redis).await;
    // Ten live servers, two of them (s9, s10) with no count at all; two cordoned spares.
    for i in 1..=12 {
        consul.register_capacity("ws", &format!("s{i}"), 100).await;
    }
    for id in ["s11", "s12"] {
        redis.report("ws", id, "0").await;
        consul
            .kv_put(
                &format!("rebalancer/ws/servers/{id}"),
                r#"{"state":"cordoned","since_ms":1,"reason":"scale-in","by":"controller"}"#,
            )
            .await;
    }
    // Cold and uneven: scale-in (after 4 s) and a shed from s1 would both be due.
    redis.report("ws", "s1", "60").await;
    for i in 2..=8 {
        redis.report("ws", &format!("s{i}"), "5").await;
    }
    let ctl = Controller::with_sections(
        "e2e-missing",
        &redis,
        &consul,
        "[scale]\nscale_in_after = \"4s\"\ncooldown = \"1s\"\n",
    );
    ctl.until_synced(95.0).await;
    // Past scale_in_after, the settle and a cooldown, in decision rounds.
    tokio::time::sleep(Duration::from_secs(7)).await;
    ctl.rounds(3).await;
    for i in 1..=10 {
        assert_eq!(
            consul.server_state("ws", &format!("s{i}")).await,
            None,
            "s{i} cordoned"
        );
    }
    assert!(commands.try_recv().is_err(), "a shed with counts missing");

    // Hot and uneven: U ≥ 0.76 on what is known. Scale-out is not destructive: it goes on.
    redis.report("ws", "s1", "100").await;
    for i in 2..=8 {
        redis.report("ws", &format!("s{i}"), "95").await;
    }
    eventually("a spare reactivated", WAIT, || async {
        let mut any = false;
        for id in ["s11", "s12"] {
            any |= consul.server_state("ws", id).await.as_deref() == Some("active");
        }
        any.then_some(())
    })
    .await;
    ctl.rounds(3).await;
    assert!(commands.try_recv().is_err(), "a shed with counts missing");
    for i in 1..=10 {
        assert_eq!(
            consul.server_state("ws", &format!("s{i}")).await,
            None,
            "s{i} cordoned"
        );
    }
    assert_eq!(
        ctl.metric("rebalancer_servers", &[("state", "unknown")])
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn with_more_than_45_percent_of_the_servers_failing_everything_halts_until_they_recover() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    // Uneven and cold: a shed from s1 and a scale-in are both due, but three of five
    // servers fail their checks (an outage, not five bad servers).
    fleet(
        &consul,
        &redis,
        &[
            ("s1", "90"),
            ("s2", "10"),
            ("s3", "10"),
            ("s4", "10"),
            ("s5", "10"),
        ],
    )
    .await;
    for id in ["s3", "s4", "s5"] {
        consul.set_passing(id, false).await;
    }
    let mut commands = subscribe(&redis).await;
    let ctl = Controller::with_sections(
        "e2e-halt",
        &redis,
        &consul,
        "[scale]\nscale_in_after = \"2s\"\ncooldown = \"1s\"\n",
    );
    eventually("halted rounds", WAIT, || async {
        (ctl.metric("rebalancer_decisions_total", &[("outcome", "halted")])
            .await
            >= Some(3.0))
        .then_some(())
    })
    .await;
    // Past the settle (5 s) and scale_in_after, in rounds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ctl.rounds(3).await;
    assert!(commands.try_recv().is_err(), "a shed while halted");
    for id in ["s1", "s2", "s3", "s4", "s5"] {
        assert_eq!(
            consul.server_state("ws", id).await,
            None,
            "{id} cordoned while halted"
        );
    }
    // Healthy again: the shed that was due follows.
    for id in ["s3", "s4", "s5"] {
        consul.set_passing(id, true).await;
    }
    let shed = tokio::time::timeout(Duration::from_secs(20), commands.recv())
        .await
        .unwrap_or_else(|_| panic!("a shed once the servers recover; log:\n{}", ctl.log()))
        .unwrap();
    assert_eq!(shed.server, "s1");
}

#[tokio::test]
async fn ids_that_are_not_tokens_are_excluded_and_nothing_is_written_outside_the_prefix() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    // A cold fleet: scale-in would cordon the emptiest, and these are the emptiest.
    fleet(&consul, &redis, &[("s1", "20"), ("s2", "20"), ("s3", "20")]).await;
    for bad in ["ws-2#", "../../x", "..", "a b"] {
        consul.register_capacity("ws", bad, 100).await;
        redis.report("ws", bad, "0").await;
    }
    // An address that is a URL: where checks and proxied traffic would be sent.
    consul
        .put(
            "/v1/agent/service/register",
            serde_json::json!({"ID": "s4", "Name": "ws", "Address": "http://127.0.0.9/x",
                "Port": 9000, "Meta": {"max_sessions": "100"},
                "Check": {"CheckID": "service:s4", "TTL": "600s", "Status": "passing"}}),
        )
        .await;
    redis.report("ws", "s4", "0").await;
    let ctl = Controller::with_sections(
        "e2e-ids",
        &redis,
        &consul,
        "[scale]\nscale_in_after = \"2s\"\ncooldown = \"1s\"\nmin_servers = 1\n",
    );
    ctl.until_synced(60.0).await;
    assert_eq!(
        ctl.metric("rebalancer_servers", &[("state", "invalid")])
            .await,
        Some(5.0),
        "{}",
        ctl.log()
    );
    // Cordons happen (the fleet is cold), on good servers only.
    eventually("a cordon", WAIT, || async {
        (consul
            .kv_keys()
            .await
            .iter()
            .any(|k| k.starts_with("rebalancer/ws/servers/")))
        .then_some(())
    })
    .await;
    ctl.rounds(5).await;
    let keys = consul.kv_keys().await;
    for k in &keys {
        assert!(
            k == "rebalancer/ws/leader"
                || ["s1", "s2", "s3"]
                    .iter()
                    .any(|s| *k == format!("rebalancer/ws/servers/{s}")),
            "a key outside what the controller may write: {k:?} in {keys:?}"
        );
    }
}

#[tokio::test]
async fn dry_run_decides_and_counts_but_touches_nothing() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "90"), ("s2", "50"), ("s3", "10")]).await;
    let mut commands = subscribe(&redis).await;
    let port = free_port();
    let toml = pipeline_toml(
        "ws",
        &redis,
        &consul,
        port,
        "dry_run = true",
        "[scale]\nscale_in_after = \"1s\"\n",
    );
    let ctl = Controller::start(&temp_dir("e2e-dry"), &toml, port);
    ctl.until_synced(150.0).await;
    eventually("a dry-run shed decision", WAIT, || async {
        (ctl.metric(
            "rebalancer_actions_total",
            &[("kind", "shed"), ("result", "dry_run")],
        )
        .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(commands.try_recv().is_err(), "dry run published a command");
    for id in ["s1", "s2", "s3"] {
        assert_eq!(
            consul.server_state("ws", id).await,
            None,
            "dry run wrote the state of {id}"
        );
    }
    assert!(
        ctl.log().contains("dry_run"),
        "the log says what it would have done"
    );
}

#[tokio::test]
async fn an_unknown_count_holds_every_shed_until_it_is_known() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(
        &consul,
        &redis,
        &[("s1", "90"), ("s2", "50"), ("s3", "not-a-number")],
    )
    .await;
    let mut commands = subscribe(&redis).await;
    let port = free_port();
    let ctl = Controller::start(
        &temp_dir("e2e-unknown"),
        &pipeline_toml("ws", &redis, &consul, port, "", ""),
        port,
    );
    eventually("the garbage count to be counted", WAIT, || async {
        (ctl.metric("rebalancer_invalid_counts_total", &[]).await == Some(1.0)
            && ctl
                .metric("rebalancer_servers", &[("state", "unknown")])
                .await
                == Some(1.0)
            && ctl.metric("rebalancer_leader", &[]).await == Some(1.0))
        .then_some(())
    })
    .await;
    let early = tokio::time::timeout(Duration::from_secs(2), commands.recv()).await;
    assert!(early.is_err(), "shed with a count unknown: {early:?}");

    redis.report("ws", "s3", "10").await;
    let cmd = tokio::time::timeout(WAIT, commands.recv())
        .await
        .expect("a shed once known")
        .unwrap();
    assert_eq!((cmd.server.as_str(), cmd.count), ("s1", 40));
}

#[test]
fn check_accepts_good_files_and_lists_every_error_of_bad_ones() {
    let bin = env!("CARGO_BIN_EXE_rebalancer");
    // Every shipped pipeline file is valid.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines");
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 2);
    let good = Command::new(bin)
        .arg("check")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );

    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "nmae = \"x\"\n[scale]\nscale_in_at = 0.9\n[debounce]\nquiet = \"soon\"\n",
    )
    .unwrap();
    let out = Command::new(bin).arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "nmae: unknown key",
        "scale.scale_in_at: 0.9 must be below",
        "debounce.quiet: \"soon\" is not a duration",
    ] {
        assert!(
            err.contains(&format!("{}: {key}", bad.display())),
            "missing {key:?} in:\n{err}"
        );
    }
    // `run` refuses the same file before connecting to anything.
    let out = Command::new(bin)
        .args(["run", "--pipeline"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_reads_the_tls_files_a_pipeline_names_and_names_the_one_that_fails() {
    let bin = env!("CARGO_BIN_EXE_rebalancer");
    let dir = temp_dir("check-tls");
    let not_pem = dir.join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let file = dir.join("tls.toml");
    std::fs::write(
        &file,
        format!(
            "[consul]\naddress = \"https://127.0.0.1:8501\"\nca_file = \"{0}\"\n\
             [redis]\nurl = \"redis://127.0.0.1:6379/0\"\n\
             [gateway]\ntls_cert = \"{0}\"\ntls_key = \"{0}\"\n",
            not_pem.display()
        ),
    )
    .unwrap();
    for cmd in [&["check"][..], &["run", "--pipeline"][..]] {
        let out = Command::new(bin)
            .args(cmd)
            .arg(&file)
            // A CA for Redis with a plain redis:// URL: named, not ignored.
            .env("REDIS_CACERT", &not_pem)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for want in [
            format!(
                "Consul: the CA file {} holds no usable PEM",
                not_pem.display()
            ),
            "Redis: REDIS_CACERT is set but redis://127.0.0.1:6379/0 is not a TLS address"
                .to_string(),
            format!(
                "gateway: the TLS certificate {} holds no usable PEM",
                not_pem.display()
            ),
        ] {
            assert!(err.contains(&want), "{cmd:?}: missing {want:?} in:\n{err}");
        }
    }
}

#[tokio::test]
async fn of_two_controllers_one_acts_and_after_it_dies_the_other_acts_under_a_newer_epoch() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "90"), ("s2", "10"), ("s3", "50")]).await;
    let mut commands = subscribe(&redis).await;
    let (pa, pb) = (free_port(), free_port());
    let sections = "[scale]\nenabled = false\n";
    let a = Controller::start(
        &temp_dir("e2e-ha-a"),
        &pipeline_toml("ws", &redis, &consul, pa, "", sections),
        pa,
    );
    let b = Controller::start(
        &temp_dir("e2e-ha-b"),
        &pipeline_toml("ws", &redis, &consul, pb, "", sections),
        pb,
    );
    let first = tokio::time::timeout(Duration::from_secs(30), commands.recv())
        .await
        .expect("a shed from one of them")
        .unwrap();
    let leader = eventually("exactly one leader", WAIT, || async {
        the_leader(&[&a, &b]).await
    })
    .await;
    // A few more rounds: every command carries the one leader's epoch.
    let lead = if leader == 0 { &a } else { &b };
    lead.rounds(3).await;
    while let Ok(c) = commands.try_recv() {
        assert_eq!(c.epoch, first.epoch, "two controllers acted");
    }
    let shed_ok = [("kind", "shed"), ("result", "ok")];
    let pa_n = a
        .metric("rebalancer_actions_total", &shed_ok)
        .await
        .unwrap_or(0.0);
    let pb_n = b
        .metric("rebalancer_actions_total", &shed_ok)
        .await
        .unwrap_or(0.0);
    assert!(
        (pa_n > 0.0) != (pb_n > 0.0),
        "exactly one published: {pa_n} and {pb_n}"
    );

    // SIGKILL the leader: the other takes over within 2 × TTL (10 s) + lock delay + 2 s,
    // and its epoch is newer, so servers that heard the old leader obey the new one.
    let (dead, alive) = if leader == 0 { (a, b) } else { (b, a) };
    drop(dead);
    let killed = std::time::Instant::now();
    let next = loop {
        let c = tokio::time::timeout(Duration::from_secs(40), commands.recv())
            .await
            .expect("a shed from the survivor")
            .unwrap();
        if c.epoch != first.epoch {
            break c;
        }
    };
    let took = killed.elapsed();
    assert!(
        next.epoch > first.epoch,
        "{} then {}",
        first.epoch,
        next.epoch
    );
    assert!(
        took <= Duration::from_secs(2 * 10 + 1 + 2) + Duration::from_secs(5),
        "took over after {took:?} (settle included)"
    );
    assert_eq!(alive.metric("rebalancer_leader", &[]).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_graceful_stop_the_standby_leads_within_a_second() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "50"), ("s2", "50")]).await;
    let sections = "[scale]\nenabled = false\n";
    let start = |tag: &str| {
        let port = free_port();
        let toml = pipeline_toml("ws", &redis, &consul, port, "", sections);
        Controller::start(&temp_dir(tag), &toml, port)
    };
    let mut ctls = vec![start("handover-0"), start("handover-1")];
    // Three handovers: a standby that only polled (every third of the TTL, 3.3 s here)
    // would make all three within a second by luck about once in forty.
    for round in 0..3 {
        let refs: Vec<&Controller> = ctls.iter().collect();
        let leader = eventually("exactly one leader", WAIT, || the_leader(&refs)).await;
        let mut old = ctls.remove(leader);
        let stopped = std::time::Instant::now();
        old.terminate();
        let standby = &ctls[0];
        eventually("the standby to lead", WAIT, || async {
            (standby.metric("rebalancer_leader", &[]).await == Some(1.0)).then_some(())
        })
        .await;
        let took = stopped.elapsed();
        eprintln!("handover {round}: {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "handover {round} took {took:?}; standby log:\n{}",
            standby.log()
        );
        ctls.push(start(&format!("handover-{}", round + 2)));
    }
}

#[tokio::test]
async fn epochs_never_go_backwards_when_consul_comes_back_empty() {
    let (redis, mut consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "90"), ("s2", "10"), ("s3", "50")]).await;
    let mut commands = subscribe(&redis).await;
    let ctl = Controller::with_sections("e2e-epoch", &redis, &consul, "[scale]\nenabled = false\n");
    let before = tokio::time::timeout(Duration::from_secs(30), commands.recv())
        .await
        .expect("a first shed")
        .unwrap();

    // A dev agent restarted comes back with no sessions, no keys, LockIndex from 1 again.
    consul.restart().await;
    // s1's count moves too: a server whose command went unacked (nobody acks here) is not
    // shed again until it does.
    fleet(&consul, &redis, &[("s1", "91"), ("s2", "10"), ("s3", "50")]).await;
    let after = loop {
        let c = tokio::time::timeout(Duration::from_secs(60), commands.recv())
            .await
            .unwrap_or_else(|_| panic!("a shed after the restart; log:\n{}", ctl.log()))
            .unwrap();
        if c.epoch != before.epoch {
            break c;
        }
    };
    assert!(
        after.epoch > before.epoch,
        "the epoch went from {} to {}: servers would refuse the leader",
        before.epoch,
        after.epoch
    );
}

#[tokio::test]
async fn state_writes_are_check_and_set_and_never_overwrite_a_newer_leader_or_an_operator() {
    use rebalancer::contract::consul::Consul;
    use rebalancer::controller::act::{ActContext, Actuator, LiveActuator};
    use rebalancer::controller::decide::{Action, ActionKind};
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let client = Consul::new(&consul.address(), None);
    let act = LiveActuator::new(
        "ws",
        Duration::from_secs(10),
        redis::Client::open(redis.url()).unwrap(),
        client.clone(),
        None,
        None,
    );
    let cordon = |s: &str| Action {
        kind: ActionKind::Cordon { server: s.into() },
        reason: "test".into(),
    };
    let reactivate = |s: &str| Action {
        kind: ActionKind::Reactivate { server: s.into() },
        reason: "test".into(),
    };
    let under = |epoch| ActContext { epoch, version: 1 };
    let record = |id: &'static str| {
        let consul = &consul;
        async move {
            let raw = consul.kv_get(&format!("rebalancer/ws/servers/{id}")).await;
            raw.map(|r| serde_json::from_str::<serde_json::Value>(&r).unwrap())
        }
    };

    act.execute(&cordon("s1"), under(10)).await.unwrap();
    let written = record("s1").await.expect("a record");
    assert_eq!(
        (&written["state"], &written["by"], &written["epoch"]),
        (&"cordoned".into(), &"controller".into(), &10.into())
    );
    // A deposed leader (epoch 9) cannot undo a newer one's cordon.
    let err = act
        .execute(&reactivate("s1"), under(9))
        .await
        .expect_err("a write under an older epoch");
    assert!(err.fenced(), "{err}");
    assert!(
        err.to_string().contains("newer leader (epoch 10 > 9)"),
        "{err}"
    );
    assert_eq!(record("s1").await, Some(written), "kept word for word");
    act.execute(&reactivate("s1"), under(11)).await.unwrap();
    assert_eq!(record("s1").await.unwrap()["state"], "active");

    // An operator's cordon is never overwritten, whoever leads.
    let operator = r#"{"state":"cordoned","reason":"maintenance","by":"operator"}"#;
    consul.kv_put("rebalancer/ws/servers/s2", operator).await;
    let err = act.execute(&reactivate("s2"), under(12)).await.unwrap_err();
    assert!(err.to_string().contains("an operator cordoned it"), "{err}");
    assert_eq!(
        consul.kv_get("rebalancer/ws/servers/s2").await.as_deref(),
        Some(operator)
    );

    // Check-and-set: a write that lands between the read and the put wins.
    let key = "rebalancer/ws/servers/s3";
    assert_eq!(client.kv_get(key).await.unwrap(), None);
    consul.kv_put(key, r#"{"state":"active"}"#).await;
    assert!(
        !client.kv_cas(key, b"x".to_vec(), 0).await.unwrap(),
        "0: only if absent"
    );
    let at = client.kv_get(key).await.unwrap().unwrap().modify_index;
    consul
        .kv_put(key, r#"{"state":"cordoned","by":"operator"}"#)
        .await;
    assert!(!client.kv_cas(key, b"x".to_vec(), at).await.unwrap());
    assert!(!client.kv_delete_cas(key, at).await.unwrap());
    let now = client.kv_get(key).await.unwrap().unwrap();
    assert_eq!(now.value, br#"{"state":"cordoned","by":"operator"}"#);
    assert!(client.kv_delete_cas(key, now.modify_index).await.unwrap());
}

/// Runs the binary with `args` and `env` (at debug level) for at most `secs`, then kills
/// it: everything it wrote.
fn output_of(args: &[&str], env: &[(&str, &str)], secs: u64) -> String {
    let dir = temp_dir("secrets-out");
    let (out, err) = (dir.join("out"), dir.join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_rebalancer"))
        .args(args)
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(out).unwrap() + &std::fs::read_to_string(err).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_at_debug_level_even_through_a_bad_url() {
    const TOKEN: &str = "tok-SEKRET-71a3";
    const PASS: &str = "pw-SEKRET-93b1";
    const KEY: &str = "5ec4e75ec4e75ec4e75ec4e75ec4e7aa";
    // Through the environment, which wins over the URL's.
    const ENV_PASS: &str = "envpw-SEKRET-5d20";
    const ENV_TOKEN: &str = "envtok-SEKRET-0c9e";
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    fleet(&consul, &redis, &[("s1", "90"), ("s2", "10")]).await;
    let keys = format!("k1:{KEY}");
    let env = [
        ("REBALANCER_COMMAND_KEYS", keys.as_str()),
        ("REDIS_USERNAME", "default"),
        ("REDIS_PASSWORD", ENV_PASS),
        ("CONSUL_HTTP_TOKEN", ENV_TOKEN),
    ];
    let with_password = redis
        .url()
        .replace("redis://", &format!("redis://:{PASS}@"));
    let bad = format!("redis://:{PASS}@[::1");
    let dir = temp_dir("secrets");
    let pipeline = |url: &str| {
        let file = dir.join(format!("p{}.toml", free_port()));
        let text = pipeline_toml("ws", &redis, &consul, free_port(), "", "")
            .replace(&redis.url(), url)
            .replace("[consul]\n", &format!("[consul]\ntoken = \"{TOKEN}\"\n"));
        std::fs::write(&file, text).unwrap();
        file.to_string_lossy().into_owned()
    };
    let (good_file, bad_file) = (pipeline(&with_password), pipeline(&bad));
    let consul_addr = consul.address();
    let demo = |url: &str| {
        vec![
            "demo-server".to_string(),
            "--id".into(),
            "d1".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--consul".into(),
            consul_addr.clone(),
            "--redis".into(),
            url.to_string(),
        ]
    };
    let (demo_good, demo_bad) = (demo(&with_password), demo(&bad));
    let gw = format!("127.0.0.1:{}", free_port());
    let runs: Vec<(&str, Vec<String>)> = vec![
        (
            "run",
            vec!["run".into(), "--pipeline".into(), good_file.clone()],
        ),
        (
            "run, bad url",
            vec!["run".into(), "--pipeline".into(), bad_file.clone()],
        ),
        ("check, bad url", vec!["check".into(), bad_file.clone()]),
        ("demo-server", demo_good),
        ("demo-server, bad url", demo_bad),
        (
            "gateway",
            vec![
                "gateway".into(),
                "--pipeline".into(),
                good_file,
                "--listen".into(),
                gw,
            ],
        ),
    ];
    for (what, args) in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| (*s).to_string()).collect();
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect();
            move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let e: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                output_of(&a, &e, 4)
            }
        })
        .await
        .unwrap();
        assert!(out.len() > 40, "{what} said something: {out}");
        for secret in [TOKEN, PASS, KEY, ENV_PASS, ENV_TOKEN] {
            assert!(!out.contains(secret), "{what} leaked {secret}:\n{out}");
        }
    }
}
