//! Scaling with Docker against a real engine: containers running the demo server (an image
//! built locally with `docker import`) on host networking and loopback ports only.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::*;

const LONG: Duration = Duration::from_secs(90);

/// A pipeline with container scaling; `extra_cmd` is appended to the demo-server command.
fn docker_pipeline(
    name: &str,
    redis: &Redis,
    consul: &ConsulAgent,
    metrics: u16,
    ports: &str,
    image: &str,
    extra_cmd: &str,
) -> String {
    let cmd = format!(
        r#"["demo-server", "--service", "ws", "--id", "{{id}}", "--listen", "127.0.0.1:{{port}}", "--max-sessions", "100", "--consul", "{}", "--redis", "{}", "--shed-window", "1s"{extra_cmd}]"#,
        consul.address(),
        redis.url()
    );
    pipeline_toml(
        name,
        redis,
        consul,
        metrics,
        "",
        &format!(
            "[rebalance]\ntolerance = 0.05\nround_interval = \"2s\"\n\
             [scale]\nscale_in_after = \"4s\"\ncooldown = \"3s\"\nreap_after = \"2s\"\nmin_servers = 2\nmax_servers = 10\n\
             [scale.docker]\nimage = \"{image}\"\ncommand = {cmd}\nport_range = \"{ports}\"\nname_prefix = \"{name}-\"\n\
             provision_timeout = \"20s\"\n"
        ),
    )
}

fn owned(pipeline: &str) -> Vec<(String, String)> {
    containers_labelled("rebalancer.pipeline", pipeline)
}

/// A controller of pipeline `name` whose containers' servers never register (a start delay
/// of an hour) with a 4 s provision timeout, once it has started some.
async fn stuck_containers(
    name: &str,
    redis: &Redis,
    consul: &ConsulAgent,
    ports: &str,
    image: &str,
) -> Controller {
    let port = free_port();
    let toml = docker_pipeline(
        name,
        redis,
        consul,
        port,
        ports,
        image,
        r#", "--start-delay", "1h""#,
    )
    .replace("provision_timeout = \"20s\"", "provision_timeout = \"4s\"");
    let ctl = Controller::start(&temp_dir(name), &toml, port);
    eventually("containers that never pass", LONG, || async {
        (!owned(name).is_empty()).then_some(())
    })
    .await;
    ctl
}

fn unique(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_fleet_reactivates_then_starts_containers_and_a_cold_one_reaps_them() {
    // The containers take 5 s to stop, longer than one action attempt used to be allowed
    // (3 s): with the default stop_grace (10 s) the reap must succeed the first time.
    let image = docker_image();
    let name = unique("dkout");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers: Vec<DemoServer> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| DemoServer::start(id, 100, &redis, &consul))
        .collect();
    consul
        .kv_put(
            "rebalancer/ws/servers/s3",
            r#"{"state":"cordoned","reason":"spare"}"#,
        )
        .await;
    eventually("three servers passing", WAIT, || async {
        (consul.passing("ws").await.len() == 3).then_some(())
    })
    .await;
    let mut load = Loadgen::start(&[
        "--connections",
        "170",
        "--duration",
        "300s",
        "--consul",
        &consul.address(),
        "--service",
        "ws",
        "--backoff-max",
        "1s",
    ]);
    eventually(
        "170 clients on s1 and s2 (s3 is cordoned)",
        LONG,
        || async {
            let c = redis.counts("ws").await;
            (c.get("s1").unwrap_or(&0) + c.get("s2").unwrap_or(&0) == 170).then_some(())
        },
    )
    .await;

    let port = free_port();
    let ctl = Controller::start(
        &temp_dir("dk-out"),
        &docker_pipeline(
            &name,
            &redis,
            &consul,
            port,
            "21000-21049",
            image,
            r#", "--stop-delay", "5s""#,
        ),
        port,
    );
    // U = 0.85: 4 servers needed; s3 comes back first, one container makes the fourth.
    eventually("s3 reactivated", LONG, || async {
        (consul.server_state("ws", "s3").await.as_deref() == Some("active")).then_some(())
    })
    .await;
    let container = eventually(
        "one container of ours, its server passing",
        LONG,
        || async {
            let cs = owned(&name);
            let passing = consul.passing("ws").await;
            (cs.len() == 1 && passing.contains(&cs[0].0)).then(|| cs[0].0.clone())
        },
    )
    .await;
    let during = eventually(
        "the container's server taking sessions, the fleet between the thresholds",
        LONG,
        || async {
            let c = redis.counts("ws").await;
            let total: u64 = c.values().sum();
            let u = total as f64 / 400.0;
            (c.get(&container).copied().unwrap_or(0) > 0
                && total == 170
                && (0.40..=0.70).contains(&u))
            .then_some(c)
        },
    )
    .await;
    assert_eq!(owned(&name).len(), 1, "no more containers than needed");

    // The load goes away: the emptiest are cordoned (ours first), ours is reaped.
    let summary = load.finish();
    let mut small = Loadgen::start(&[
        "--connections",
        "20",
        "--duration",
        "300s",
        "--url",
        &servers[1].url(),
    ]);
    eventually("our container stopped and removed", LONG, || async {
        owned(&name).is_empty().then_some(())
    })
    .await;
    let states = eventually(
        "two servers cordoned, two active (min_servers)",
        LONG,
        || async {
            let mut cordoned = Vec::new();
            for id in ["s1", "s2", "s3"] {
                if consul.server_state("ws", id).await.as_deref() == Some("cordoned") {
                    cordoned.push(id);
                }
            }
            (cordoned == vec!["s1"]).then_some(cordoned)
        },
    )
    .await;
    assert_eq!(
        consul.server_state("ws", &container).await,
        None,
        "the reaped server's state was cleared"
    );
    assert!(
        ctl.metric(
            "rebalancer_actions_total",
            &[("kind", "reap"), ("result", "ok")]
        )
        .await
            >= Some(1.0)
    );
    assert_eq!(
        ctl.metric(
            "rebalancer_actions_total",
            &[("kind", "reap"), ("result", "error")]
        )
        .await,
        None,
        "every reap succeeded at its first attempt: {}",
        ctl.log()
    );
    assert!(
        !ctl.log().contains("timed out"),
        "no attempt timed out: {}",
        ctl.log()
    );
    small.until_connected(20).await;
    let small_summary = small.finish();
    println!("docker scale: during {during:?} first load {summary} cordoned {states:?} small load {small_summary}");
    // The scale-in cordons empty servers and reaps them once empty: it closes no session
    // (a drain would close with 1012). A rebalancing shed (1013) may move a few of the 20
    // clients piled on s2 before the cordons raise U (seen once: 6); none may be lost.
    assert_eq!(
        small_summary["close_codes"].get("1012"),
        None,
        "no session dropped by the scale-in: {small_summary}"
    );
    assert_eq!(
        small_summary["connected_at_end"], 20,
        "no client lost: {small_summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_mid_scale_out_adopts_pending_containers_and_starts_no_duplicates() {
    let image = docker_image();
    let name = unique("dkrst");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    for (id, n) in [("s1", "90"), ("s2", "90")] {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, n).await;
    }
    // Slow servers: they register 40 s after their container starts (within a provision
    // timeout of 60 s), so they are still pending when the killed controller's lock has
    // lapsed (about 20 s) and the new one leads.
    let toml = docker_pipeline(
        &name,
        &redis,
        &consul,
        0,
        "21050-21099",
        image,
        r#", "--start-delay", "40s""#,
    )
    .replace("provision_timeout = \"20s\"", "provision_timeout = \"60s\"");
    let port = free_port();
    let toml1 = toml.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let first = Controller::start(&temp_dir("dk-rst1"), &toml1, port);
    eventually("two containers started", LONG, || async {
        (owned(&name).len() == 2).then_some(())
    })
    .await;
    drop(first); // killed in the middle of the scale-out: its lock lapses with its session

    let port2 = free_port();
    let toml2 = toml.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port2}\""),
    );
    let second = Controller::start(&temp_dir("dk-rst2"), &toml2, port2);
    let started = || async {
        second
            .metric(
                "rebalancer_actions_total",
                &[("kind", "start"), ("result", "ok")],
            )
            .await
    };
    eventually("the new controller leads", LONG, || async {
        (second.metric("rebalancer_leader", &[]).await == Some(1.0)).then_some(())
    })
    .await;
    // A leader decides on taking over and then every round (1 s): watch three rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        consul.passing("ws").await.len() < 4,
        "the containers' servers are still pending while it leads"
    );
    assert_eq!(
        second
            .metric("rebalancer_containers", &[("state", "pending")])
            .await,
        Some(2.0),
        "it counts the two pending containers as coming capacity"
    );
    assert_eq!(
        started().await,
        None,
        "it started nothing while they were pending"
    );
    eventually("both servers passing", LONG, || async {
        (consul.passing("ws").await.len() == 4).then_some(())
    })
    .await;
    // With the new capacity in, U is 0.45 and s1 and s2 (0.90) are shed. They are servers
    // with no process: their counts never move, so nothing they were told to shed is in
    // transit, and U stays 0.45 through the next rounds (round_interval 2 s): no scale-out.
    eventually("s1 and s2 shed", LONG, || async {
        second
            .metric(
                "rebalancer_actions_total",
                &[("kind", "shed"), ("result", "ok")],
            )
            .await
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(owned(&name).len(), 2, "no duplicate containers");
    assert_eq!(
        started().await,
        None,
        "the restarted controller started nothing: it adopted the pending ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_faults_are_counted_and_backed_off_and_never_block_other_actions() {
    let image = docker_image();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    // Hot and unbalanced: a scale-out is wanted and s1 should shed.
    for (id, n) in [("s1", "100"), ("s2", "60")] {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, n).await;
    }
    let mut commands = {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut ps = client.get_async_pubsub().await.unwrap();
        ps.subscribe("rebalancer:ws:commands").await.unwrap();
        ps.into_on_message()
    };

    // 1. No engine at all.
    let name = unique("dkgone");
    let port = free_port();
    let toml = docker_pipeline(&name, &redis, &consul, port, "21100-21119", image, "").replace(
        "[scale.docker]",
        "[scale.docker]\nhost = \"unix:///tmp/no-docker-here.sock\"",
    );
    let ctl = Controller::start(&temp_dir("dk-gone"), &toml, port);
    let m = tokio::time::timeout(LONG, commands.next())
        .await
        .expect("a shed despite the missing engine")
        .unwrap();
    assert!(m
        .get_payload::<String>()
        .unwrap()
        .contains("\"server\":\"s1\""));
    assert!(
        ctl.metric("rebalancer_source_errors_total", &[("source", "docker")])
            .await
            >= Some(1.0)
    );
    assert!(
        ctl.metric("rebalancer_scale_shortfall_servers", &[]).await >= Some(1.0),
        "the shortfall is reported"
    );
    drop(ctl);

    // 2. An engine that refuses the create (no such image).
    let name = unique("dkrefuse");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let port = free_port();
    let toml = docker_pipeline(
        &name,
        &redis,
        &consul,
        port,
        "21120-21139",
        "rebalancer:no-such-image",
        "",
    );
    let ctl = Controller::start(&temp_dir("dk-refuse"), &toml, port);
    eventually("a refused start, counted", LONG, || async {
        (ctl.metric(
            "rebalancer_actions_total",
            &[("kind", "start"), ("result", "error")],
        )
        .await
            >= Some(1.0))
        .then_some(())
    })
    .await;
    let errors_then = ctl
        .metric(
            "rebalancer_actions_total",
            &[("kind", "start"), ("result", "error")],
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ctl.metric(
            "rebalancer_actions_total",
            &[("kind", "start"), ("result", "error")]
        )
        .await,
        errors_then,
        "backing off, not retrying every round"
    );
    assert!(
        ctl.log().contains("no-such-image"),
        "the error names what failed"
    );
    drop(ctl);

    // 3. A container whose server never turns healthy is removed after provision_timeout.
    let name = unique("dkstuck");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let ctl = stuck_containers(&name, &redis, &consul, "21140-21159", image).await;
    eventually(
        "them discarded after the provision timeout",
        LONG,
        || async {
            (ctl.metric(
                "rebalancer_actions_total",
                &[("kind", "discard"), ("result", "ok")],
            )
            .await
                >= Some(1.0)
                && owned(&name).is_empty())
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_without_the_pipeline_labels_is_never_stopped_even_with_a_matching_name() {
    let image = docker_image();
    let name = unique("dkown");
    let imposter = format!("{name}-imposter");
    let ours = format!("{name}-ours");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![imposter.clone()],
    };
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _s1 = DemoServer::start("s1", 100, &redis, &consul);
    let run = |id: &str, labels: bool| {
        let port = free_port().to_string();
        let mut args = vec!["run", "-d", "--network", "host", "--name", id];
        let (l1, l2) = (
            format!("rebalancer.pipeline={name}"),
            format!("rebalancer.server={id}"),
        );
        if labels {
            args.extend(["--label", &l1, "--label", &l2]);
        }
        let listen = format!("127.0.0.1:{port}");
        let (c, r) = (consul.address(), redis.url());
        args.extend([
            image,
            "demo-server",
            "--service",
            "ws",
            "--id",
            id,
            "--listen",
            &listen,
            "--consul",
            &c,
            "--redis",
            &r,
        ]);
        docker(&args);
    };
    run(&ours, true);
    run(&imposter, false);
    for id in [&ours, &imposter] {
        consul
            .kv_put(
                &format!("rebalancer/ws/servers/{id}"),
                r#"{"state":"cordoned","reason":"test"}"#,
            )
            .await;
    }
    eventually("three servers passing", LONG, || async {
        (consul.passing("ws").await.len() == 3).then_some(())
    })
    .await;
    let port = free_port();
    let ctl = Controller::start(
        &temp_dir("dk-own"),
        &docker_pipeline(&name, &redis, &consul, port, "21160-21179", image, "")
            .replace("min_servers = 2", "min_servers = 1"),
        port,
    );
    eventually("ours reaped", LONG, || async {
        (!docker(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .any(|l| l == ours))
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let running = docker(&["ps", "--format", "{{.Names}}"]);
    assert!(
        running.lines().any(|l| l == imposter),
        "the look-alike was touched:\n{running}\n{}",
        ctl.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_start_adopts_what_an_earlier_attempt_created() {
    use rebalancer::controller::act::docker::DockerScaler;
    use rebalancer::controller::act::Scaler;

    let image = docker_image();
    let name = unique("dkretry");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let port = free_port();
    let toml = docker_pipeline(&name, &redis, &consul, port, "21180-21199", image, "");
    let cfg = rebalancer::config::parse(std::path::Path::new("p.toml"), &toml, &|_| None)
        .expect("a valid pipeline");
    let scaler = DockerScaler::new(cfg.docker.clone().unwrap(), &cfg.name, &cfg.service);
    // One action, its ids chosen once; the first attempt's answer is lost (a timeout), and
    // the action is tried again with the same ids.
    let ids = scaler.new_ids(2);
    scaler.start(&ids).await.expect("the first attempt");
    scaler.start(&ids).await.expect("the retry");
    let mut servers: Vec<String> = owned(&name).into_iter().map(|(n, _)| n).collect();
    servers.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(servers, want, "one container per id, none duplicated");
}

fn discards(text: &str) -> f64 {
    sample(
        text,
        "rebalancer_actions_total",
        &[("kind", "discard"), ("result", "ok")],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_passed_then_fails_past_the_provision_timeout_is_kept() {
    let image = docker_image();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    for (id, n) in [("s1", "100"), ("s2", "90")] {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, n).await;
    }
    let name = unique("dkfails");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    let port = free_port();
    let toml = docker_pipeline(&name, &redis, &consul, port, "21160-21179", image, "")
        .replace("provision_timeout = \"20s\"", "provision_timeout = \"4s\"");
    let ctl = Controller::start(&temp_dir("dk-fails"), &toml, port);
    // The hot fleet starts a container; its server registers and passes.
    let started = eventually("a started container's server passing", LONG, || async {
        consul
            .passing("ws")
            .await
            .into_iter()
            .find(|id| id != "s1" && id != "s2")
    })
    .await;
    eventually("the controller to see it pass", WAIT, || async {
        ctl.log()
            .contains(&format!(
                "container's server passing pipeline={name} server=\"{started}\""
            ))
            .then_some(())
    })
    .await;
    // Then it fails (maintenance: critical in every health answer) for longer than the
    // provision timeout, several rounds over.
    consul.maintenance(&started, true).await;
    eventually("it to fail", WAIT, || async {
        (!consul.passing("ws").await.contains(&started)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let running: Vec<_> = owned(&name)
        .into_iter()
        .filter(|(_, state)| state == "running")
        .collect();
    assert!(
        running
            .iter()
            .any(|(n, _)| n.contains(&started) || started.contains(n.as_str())),
        "{started} kept: {running:?}; log:\n{}",
        ctl.log()
    );
    assert_eq!(discards(&ctl.metrics().await), 0.0, "log:\n{}", ctl.log());
    consul.maintenance(&started, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_health_answer_while_a_container_runs_stops_nothing_until_servers_are_listed_again(
) {
    let image = docker_image();
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    for (id, n) in [("s1", "100"), ("s2", "90")] {
        consul.register_capacity("ws", id, 100).await;
        redis.report("ws", id, n).await;
    }
    let name = unique("dkempty");
    let _janitor = ContainerJanitor {
        pipeline: name.clone(),
        names: vec![],
    };
    // Its server never registers: past the provision timeout it is due for discarding.
    let ctl = stuck_containers(&name, &redis, &consul, "21180-21199", image).await;
    // Consul lists no server at all (as an ACL-filtered token or a catalog restore would
    // answer): not a reason to remove what runs.
    consul.deregister("s1").await;
    consul.deregister("s2").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!owned(&name).is_empty(), "log:\n{}", ctl.log());
    assert_eq!(discards(&ctl.metrics().await), 0.0, "log:\n{}", ctl.log());
    assert!(
        ctl.log().contains("Consul lists no server while"),
        "the log says why; log:\n{}",
        ctl.log()
    );
    // Servers listed again: the container that never passed is discarded as before.
    for id in ["s1", "s2"] {
        consul.register_capacity("ws", id, 100).await;
    }
    eventually("the discard once servers are listed", LONG, || async {
        (discards(&ctl.metrics().await) >= 1.0).then_some(())
    })
    .await;
}
