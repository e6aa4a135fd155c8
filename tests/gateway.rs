//! The gateway in front of real demo servers, with real Consul and Redis: where new
//! connections go, WebSocket relaying in the closed loop, health and circuit breaking, and
//! the static cache.

mod support;

use std::time::Duration;

use support::*;

fn per_server(summary: &serde_json::Value, id: &str) -> u64 {
    summary["per_server"][id].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_go_to_the_least_utilized_and_a_burst_spreads_and_cordoned_servers_get_none(
) {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers = demo_fleet(&redis, &consul, 3).await;
    let mut on_s1 = Loadgen::start(&[
        "--connections",
        "60",
        "--duration",
        "120s",
        "--url",
        &servers[0].url(),
    ]);
    let mut on_s2 = Loadgen::start(&[
        "--connections",
        "30",
        "--duration",
        "120s",
        "--url",
        &servers[1].url(),
    ]);
    counts_where(&redis, "60 / 30 / 0", |c| {
        c.get("s1") == Some(&60) && c.get("s2") == Some(&30) && c.get("s3") == Some(&0)
    })
    .await;
    let gw = GatewayProc::start(&redis, &consul).await;
    eventually("the gateway to see the fleet", WAIT, || async {
        (get(gw.http_url("/hello")).await.ok()?.status().is_success()).then_some(())
    })
    .await;

    // A burst of 60 at once: never to the busiest; not all to the emptiest.
    let mut burst = Loadgen::start(&[
        "--connections",
        "60",
        "--duration",
        "120s",
        "--ramp",
        "2000",
        "--url",
        &gw.ws_url(),
    ]);
    let after = counts_where(&redis, "150 sessions", |c| c.values().sum::<u64>() == 150).await;
    let summary = burst.finish();
    println!("burst through the gateway: {after:?} new {summary}");
    assert_eq!(
        per_server(&summary, "s1"),
        0,
        "the busiest server got new connections: {summary}"
    );
    assert!(
        per_server(&summary, "s3") > per_server(&summary, "s2"),
        "{summary}"
    );
    assert!(
        per_server(&summary, "s2") > 0,
        "the whole burst landed on one server: {summary}"
    );

    // A cordoned server gets nothing.
    consul
        .kv_put("rebalancer/ws/servers/s3", r#"{"state":"cordoned"}"#)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut more = Loadgen::start(&[
        "--connections",
        "20",
        "--duration",
        "120s",
        "--url",
        &gw.ws_url(),
    ]);
    counts_where(&redis, "the 20 placed", |c| c.values().sum::<u64>() == 110).await;
    let s = more.finish();
    assert_eq!(
        per_server(&s, "s3"),
        0,
        "a cordoned server got connections: {s}"
    );
    on_s1.finish();
    on_s2.finish();
}

/// The closed loop of the agent issue, with reconnects through `reconnect` ("gateway" or
/// "consul" for random): returns (sessions moved, rounds).
async fn closed_loop(reconnect: &str) -> (u64, usize) {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers = demo_fleet(&redis, &consul, 3).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    let pile = servers[0].url();
    let gw_url = gw.ws_url();
    let consul_addr = consul.address();
    let mut args = vec![
        "--connections",
        "150",
        "--duration",
        "180s",
        "--pile-on",
        &pile,
        "--backoff-max",
        "1s",
    ];
    if reconnect == "gateway" {
        args.extend(["--url", &gw_url]);
    } else {
        args.extend(["--consul", &consul_addr, "--service", "ws"]);
    }
    let mut load = Loadgen::start(&args);
    counts_where(&redis, "150 clients, s1 full", |c| {
        c.values().sum::<u64>() == 150 && c.get("s1") == Some(&100)
    })
    .await;
    // Let the first 150 settle: the overflow's spread is not the experiment.
    let before = redis.counts("ws").await;
    let port = free_port();
    let toml = pipeline_toml(
        "ws",
        &redis,
        &consul,
        port,
        "",
        "[rebalance]\ntolerance = 0.05\nround_interval = \"3s\"\n[scale]\nenabled = false\n",
    );
    let ctl = Controller::start(&temp_dir("gw-loop"), &toml, port);
    let after = counts_where(&redis, "the fleet balanced", |c| {
        c.len() == 3 && c.values().sum::<u64>() == 150 && {
            let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
            (hi - lo) as f64 / 100.0 <= 0.15
        }
    })
    .await;
    sheds_settled(&ctl, &redis, 150).await;
    load.until_connected(150).await;
    let summary = load.finish();
    let acks = redis.acks("ws").await;
    let moved: u64 = acks.iter().map(|a| a["shed"].parse::<u64>().unwrap()).sum();
    println!("closed loop via {reconnect}: before {before:?} after {after:?} moved {moved} rounds {} loadgen {summary}", acks.len());
    assert_eq!(summary["connected_at_end"], 150, "{summary}");
    (moved, acks.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closed_loop_through_the_gateway_moves_no_more_than_with_random_reconnects() {
    let (gw_moved, gw_rounds) = closed_loop("gateway").await;
    let (rnd_moved, rnd_rounds) = closed_loop("consul").await;
    println!("through the gateway: moved {gw_moved} in {gw_rounds} commands; random: moved {rnd_moved} in {rnd_rounds}");
    assert!(
        gw_moved <= rnd_moved,
        "gateway {gw_moved} > random {rnd_moved}"
    );
    assert!(gw_rounds <= rnd_rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_routed_around_and_restored_when_it_returns() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let mut servers = demo_fleet(&redis, &consul, 2).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    let client = http();
    let hello = |c: reqwest::Client, url: String| async move {
        let r = c.get(url).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: serde_json::Value = r.json().await.ok()?;
        v["server"].as_str().map(str::to_string)
    };
    eventually(
        "both servers answering through the gateway",
        WAIT,
        || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..20 {
                seen.insert(hello(client.clone(), gw.http_url("/hello")).await?);
            }
            (seen.len() == 2).then_some(())
        },
    )
    .await;

    servers[1].stop();
    // Every request keeps succeeding (connect failures are retried elsewhere), on s1.
    let mut answered = Vec::new();
    for _ in 0..40 {
        answered.push(
            hello(client.clone(), gw.http_url("/hello"))
                .await
                .expect("a request failed while a backend was down"),
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(answered[20..].iter().all(|s| s == "s1"), "{answered:?}");
    // Stopped, s2 deregistered and left the fleet: its series went with it.
    eventually("s2 no longer reported up", WAIT, || async {
        (gw.metric("rebalancer_gateway_backend_up", &[("backend", "s2")])
            .await
            != Some(1.0))
        .then_some(())
    })
    .await;
    servers[1].restart();
    eventually("s2 restored", LOOP_WAIT, || async {
        for _ in 0..20 {
            if hello(client.clone(), gw.http_url("/hello"))
                .await
                .as_deref()
                == Some("s2")
            {
                return Some(());
            }
        }
        None
    })
    .await;
    // The gauge follows at the next check.
    until_reported_up(&gw, "s2", true).await;
}

/// Waits for the gateway's `backend_up` gauge of `backend` to say `up`.
async fn until_reported_up(gw: &GatewayProc, backend: &str, up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    eventually(
        &format!("the gateway to report {backend} up={up}"),
        WAIT,
        || async {
            (gw.metric("rebalancer_gateway_backend_up", &[("backend", backend)])
                .await
                == Some(want))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_clients_are_closed_and_servers_learn_who_the_client_was() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start_with(
        &redis,
        &consul,
        "idle_timeout = \"1s\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let hello = eventually("the gateway serving", WAIT, || async {
        let r = http()
            .get(gw.http_url("/hello"))
            .header("x-forwarded-for", "203.0.113.9")
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(r)
    })
    .await;
    let body: serde_json::Value = hello.json().await.unwrap();
    // The test is a trusted proxy here: its chain goes on (tests/gateway_proxying.rs checks
    // that an untrusted client's is replaced).
    assert_eq!(body["forwarded_for"], "203.0.113.9, 127.0.0.1", "{body}");

    // One request on a raw keep-alive connection, then silence: closed after about 1 s.
    let request = format!("GET /hello HTTP/1.1\r\nhost: 127.0.0.1:{}\r\n\r\n", gw.port);
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    idle.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the idle connection is closed within 10 s");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "closed, not answered: {closed:?}"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );

    // A connection that keeps asking stays open past the idle timeout.
    let mut busy = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    for _ in 0..6 {
        busy.write_all(request.as_bytes()).await.unwrap();
        let n = busy.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "a busy connection is served: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    drop(busy);

    // Clients that open a connection per request still reuse the gateway's connections to
    // the server: each ended client connection leaves its idle one in the shared pool.
    let metric = |source: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "rebalancer_gateway_server_connections_total",
                &[("source", source)],
            )
            .await
            .unwrap_or(0.0)
        }
    };
    let (opened, pooled) = (metric("opened").await, metric("pool").await);
    let one_shot = http_builder().pool_max_idle_per_host(0).build().unwrap();
    for _ in 0..20 {
        let r = one_shot.get(gw.http_url("/hello")).send().await.unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (opened, pooled) = (
        metric("opened").await - opened,
        metric("pool").await - pooled,
    );
    println!("20 one-request clients: {opened} server connections opened, {pooled} from the pool");
    assert!(
        pooled >= 15.0 && opened <= 5.0,
        "server connections reused across client connections: {opened} opened, {pooled} pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_responses_are_cached_and_served_without_the_backend() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    let first = eventually("a first response", WAIT, || async {
        let r = get(gw.http_url("/static/app.js")).await.ok()?;
        r.status().is_success().then_some(r)
    })
    .await;
    assert!(first.headers().get("x-cache").is_none());
    let body = first.text().await.unwrap();
    let second = get(gw.http_url("/static/app.js")).await.unwrap();
    assert_eq!(
        second.headers().get("x-cache").map(|v| v.to_str().unwrap()),
        Some("hit")
    );
    assert_eq!(second.text().await.unwrap(), body);
    assert!(
        gw.metric("rebalancer_gateway_cache_total", &[("result", "hit")])
            .await
            >= Some(1.0)
    );
    let api = get(gw.http_url("/hello")).await.unwrap();
    assert!(
        api.headers().get("x-cache").is_none(),
        "only configured paths are cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_keep_the_shared_in_flight_counts_exact_even_for_aborted_requests() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 2).await;
    let shared = "shared_accounting = true\nredis_timeout = \"200ms\"\n";
    let gws = [
        GatewayProc::start_with(&redis, &consul, shared).await,
        GatewayProc::start_with(&redis, &consul, shared).await,
    ];
    for gw in &gws {
        eventually("the gateway serving", WAIT, || async {
            get(gw.http_url("/hello"))
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        })
        .await;
    }
    let urls: Vec<String> = gws.iter().map(|g| g.http_url("/slow?ms=150")).collect();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (url, peak) = (redis.url(), peak.clone());
        tokio::spawn(async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            for _ in 0..60 {
                let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg("rebalancer:ws:inflight")
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                let total = v.iter().map(|x| x.1).sum::<f64>() as u64;
                peak.fetch_max(total, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // 40 clients, 20 requests each at most, for about 3 s; half give up after 50 ms.
    let mut clients = Vec::new();
    for k in 0..40 {
        let url = urls[k % 2].clone();
        let timeout = if k % 2 == 0 {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(5)
        };
        clients.push(tokio::spawn(async move {
            let c = http_builder().timeout(timeout).build().unwrap();
            let (mut ok, mut aborted) = (0, 0);
            for _ in 0..20 {
                match c.get(&url).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => panic!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default().trim()
                    ),
                    Err(_) => aborted += 1,
                }
            }
            (ok, aborted)
        }));
    }
    let (mut ok, mut aborted) = (0, 0);
    for c in clients {
        let (o, a) = c.await.unwrap();
        ok += o;
        aborted += a;
    }
    sampler.await.unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "shared accounting: {ok} answered, {aborted} aborted by the client, peak in flight {peak}"
    );
    assert!(
        aborted > 100 && ok > 100,
        "both kinds happened: {ok} ok, {aborted} aborted"
    );
    assert_eq!(
        ok + aborted,
        800,
        "every request answered, or aborted by its client"
    );
    assert!(
        peak > 5,
        "the sorted set counted requests in flight: peak {peak}"
    );
    let mut c = redis.conn().await;
    eventually("the in-flight set back to empty", WAIT, || {
        let mut c = c.clone();
        async move {
            let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg("rebalancer:ws:inflight")
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await
                .ok()?;
            v.is_empty().then_some(())
        }
    })
    .await;
    let left: i64 = redis::cmd("EXISTS")
        .arg("rebalancer:ws:inflight")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// Which servers answered `n` plain requests through the gateway.
async fn answered_by(gw: &GatewayProc, n: usize) -> std::collections::BTreeSet<String> {
    let client = http();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let r = client.get(gw.http_url("/hello")).send().await.unwrap();
        assert!(r.status().is_success(), "routed: {}", r.status());
        let body: serde_json::Value = r.json().await.unwrap();
        seen.insert(body["server"].as_str().unwrap().to_string());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_the_controllers_feed_and_routes_on_while_the_controller_restarts() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 2).await;
    let port = free_port();
    // The gateway's pipeline file names the same pipeline ("gw") as the controller's.
    let toml = pipeline_toml("gw", &redis, &consul, port, "dry_run = true", "");
    let dir = temp_dir("feed-ctl");
    let ctl = Controller::start(&dir, &toml, port);
    let doc = eventually(
        "the controller's snapshot on /v1/topology",
        WAIT,
        || async {
            let url = format!("http://127.0.0.1:{port}/v1/topology");
            let doc: serde_json::Value = get(url).await.ok()?.json().await.ok()?;
            (doc["servers"].as_array()?.len() == 2 && doc["stale"] == false).then_some(doc)
        },
    )
    .await;
    assert_eq!(doc["pipeline"], "gw");
    assert_eq!(doc["servers"][0]["state"], "active", "{doc}");
    let unknown = get(format!("http://127.0.0.1:{port}/v1/topology?pipeline=nope"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let feed = format!("topology_feed = \"http://127.0.0.1:{port}\"\n");
    let gw = GatewayProc::start_with(&redis, &consul, &feed).await;
    eventually("the gateway following the feed", WAIT, || async {
        (gw.metric("rebalancer_gateway_feed_connected", &[]).await == Some(1.0)).then_some(())
    })
    .await;
    eventually(
        "both servers answering through the gateway",
        WAIT,
        || async { (answered_by(&gw, 20).await.len() == 2).then_some(()) },
    )
    .await;

    // A cordon reaches the gateway only through the controller's feed.
    let cordoned = r#"{"state":"cordoned","since_ms":1,"reason":"test"}"#;
    consul.kv_put("rebalancer/ws/servers/s1", cordoned).await;
    eventually("the cordoned server getting nothing", WAIT, || async {
        let seen = answered_by(&gw, 20).await;
        (seen.len() == 1 && seen.contains("s2")).then_some(())
    })
    .await;

    // The controller goes away: the gateway keeps routing on the last snapshot.
    drop(ctl);
    eventually("the gateway noticing the feed is gone", WAIT, || async {
        (gw.metric("rebalancer_gateway_feed_connected", &[]).await == Some(0.0)).then_some(())
    })
    .await;
    consul
        .kv_put("rebalancer/ws/servers/s1", r#"{"state":"active"}"#)
        .await;
    let meanwhile = answered_by(&gw, 40).await;
    assert_eq!(
        meanwhile.into_iter().collect::<Vec<_>>(),
        vec!["s2".to_string()],
        "with the controller away, the gateway routes on its last snapshot"
    );

    // Back on the same address: the gateway reconnects and sees s1 active again.
    let _ctl = Controller::start(&dir, &toml, port);
    eventually(
        "the gateway following the restarted controller",
        WAIT,
        || async {
            (gw.metric("rebalancer_gateway_feed_connected", &[]).await == Some(1.0)).then_some(())
        },
    )
    .await;
    eventually("the uncordoned server routed to again", WAIT, || async {
        (answered_by(&gw, 20).await.len() == 2).then_some(())
    })
    .await;
    assert!(
        gw.log()
            .contains("topology feed lost; routing on the last snapshot"),
        "the gateway says why it routes on an old snapshot"
    );
}

/// Reads from `s` until the server closes (10 s at most).
async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("the gateway closes the connection within 10 s")
        .expect("reading from the gateway");
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_are_relayed_whole_pipelined_chunked_and_closed_when_asked() {
    use tokio::io::AsyncWriteExt;
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    eventually("the gateway serving", WAIT, || async {
        let r = get(gw.http_url("/hello")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    // Four requests in one write: answered in order, the chunked one relayed as chunks, the
    // HEAD without a body, and the connection closed after the one that asks for it.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let pipelined = "GET /hello HTTP/1.1\r\nHost: gw\r\n\r\n\
         POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n\r\nhello world\
         HEAD /hello HTTP/1.1\r\nHost: gw\r\n\r\n\
         GET /hello HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    s.write_all(pipelined.as_bytes()).await.unwrap();
    let all = read_to_close(&mut s).await;
    assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{all}");
    let echo = all.split("HTTP/1.1 200 OK\r\n").nth(2).unwrap();
    assert!(
        echo.to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{echo}"
    );
    assert!(echo.contains("POST 11 bytes from s1\n"), "{echo}");
    assert!(
        echo.contains("hello world") && echo.contains("\r\n0\r\n\r\n"),
        "{echo}"
    );
    let head = all.split("HTTP/1.1 200 OK\r\n").nth(3).unwrap();
    assert!(
        head.ends_with("\r\n\r\n") && !head.contains('{'),
        "a HEAD answer has no body: {head}"
    );
    let last = all.split("HTTP/1.1 200 OK\r\n").nth(4).unwrap();
    assert!(
        last.to_ascii_lowercase().contains("connection: close\r\n"),
        "{last}"
    );
    assert!(last.contains("\"server\":\"s1\""), "{last}");

    // A body larger than one read, both ways.
    let big: String = (0..200_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let echoed = http()
        .post(gw.http_url("/echo"))
        .body(big.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(echoed, format!("POST 200000 bytes from s1\n{big}\nend\n"));

    // A plain request, then one this path leaves to hyper (a chunked request body), then a
    // plain one again: one connection, three answers.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let mixed = "GET /hello HTTP/1.1\r\nHost: gw\r\n\r\n\
         POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n\
         GET /hello HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    s.write_all(mixed.as_bytes()).await.unwrap();
    let all = read_to_close(&mut s).await;
    assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{all}");
    assert!(
        all.contains("POST 5 bytes from s1\n") && all.contains("\r\nchunk\r\n"),
        "{all}"
    );

    // No live server: a clear 503 at once, on the plain path too.
    drop(servers);
    eventually("a 503 once the server is gone", LOOP_WAIT, || async {
        let r = get(gw.http_url("/hello")).await.ok()?;
        let status = r.status();
        let text = r.text().await.ok()?;
        (status == 503 && text.contains("no server can take this request")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_on_every_change_not_after_the_controllers_debounce() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 2).await;
    // A debounce the controller would wait out (counts change every second, so the quiet
    // never comes and only max_delay would end it): the gateway does not wait for it.
    let gw = GatewayProc::start_with_env(
        &redis,
        &consul,
        "",
        &[
            ("REBALANCER_DEBOUNCE_QUIET", "30s"),
            ("REBALANCER_DEBOUNCE_MAX_DELAY", "60s"),
        ],
    )
    .await;
    let both = eventually("both servers answering", WAIT, || async {
        let seen = answered_by(&gw, 20).await;
        (seen.len() == 2).then_some(seen)
    })
    .await;
    println!("answered by {both:?}");
    consul
        .kv_put("rebalancer/ws/servers/s2", r#"{"state":"cordoned"}"#)
        .await;
    // Within WAIT (20 s), well before the 30 s quiet or the 60 s max_delay.
    eventually("only s1 answering once s2 is cordoned", WAIT, || async {
        let seen = answered_by(&gw, 20).await;
        (seen.len() == 1 && seen.contains("s1")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_series_are_counted_while_it_serves_and_gone_once_it_leaves() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let mut servers = demo_fleet(&redis, &consul, 2).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    eventually("both servers answering", WAIT, || async {
        (answered_by(&gw, 20).await.len() == 2).then_some(())
    })
    .await;
    let ok = |id: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "rebalancer_gateway_requests_total",
                &[("backend", id), ("outcome", "ok")],
            )
            .await
        }
    };
    let (s1, s2) = (ok("s1").await, ok("s2").await);
    assert!(s1 > Some(0.0) && s2 > Some(0.0), "{}", gw.metrics().await);
    assert_eq!(
        gw.metric("rebalancer_gateway_backend_up", &[("backend", "s2")])
            .await,
        Some(1.0)
    );
    // s2 stops: it deregisters, leaves the fleet, and its series go with it.
    servers[1].stop();
    eventually("s2's series gone", WAIT, || async {
        let page = gw.metrics().await;
        (!page.is_empty() && !page.contains("backend=\"s2\"")).then_some(page)
    })
    .await;
    assert!(ok("s1").await >= s1, "s1's count stays");
    let page = gw.metrics().await;
    for family in [
        "rebalancer_gateway_requests_total",
        "rebalancer_gateway_backend_up",
        "rebalancer_gateway_circuit_state",
        "rebalancer_gateway_websockets_open",
    ] {
        assert_eq!(
            page.matches(&format!("# TYPE {family} ")).count(),
            1,
            "one family {family}:\n{page}"
        );
    }
}
