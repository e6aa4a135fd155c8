//! The gateway's limits, each against real demo servers behind real Consul and Redis, and
//! with the defaults as shipped wherever a test can wait for them: what a client is
//! answered when one bites, that it is counted in `rebalancer_gateway_limited_total`, and
//! that 2,000 slow clients are closed at their deadlines while others are served.

mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Writes `bytes` (a refused request may be cut off: write errors are not the test's) and
/// reads until the gateway closes.
async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> String {
    let _ = s.write_all(bytes).await;
    read_all(s).await
}

async fn read_all(s: &mut TcpStream) -> String {
    let (all, _) = read_until_closed(s, Duration::from_secs(15)).await;
    String::from_utf8_lossy(&all).into_owned()
}

/// Reads one response head (and what came with it).
async fn read_head(s: &mut TcpStream) -> String {
    String::from_utf8_lossy(&read_head_bytes(s).await).into_owned()
}

fn fields(n: usize) -> String {
    (0..n).fold(String::new(), |mut out, i| {
        let _ = write!(out, "X-Field-{i}: v\r\n");
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_a_limit_are_answered_with_its_status_and_counted() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    let port = gw.port;
    let conn = || TcpStream::connect(("127.0.0.1", port));

    // A head over 16 KiB: 431, counted.
    let big = format!(
        "GET /hello HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17_000)
    );
    let answer = exchange(&mut conn().await.unwrap(), big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert!(answer.contains("max_header_bytes"), "{answer}");
    assert_eq!(gw.limited("max_header_bytes").await, 1.0);

    // 101 header fields: 431; 80, within the default 100: served.
    let many = format!("GET /hello HTTP/1.1\r\nHost: gw\r\n{}\r\n", fields(101));
    let answer = exchange(&mut conn().await.unwrap(), many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(gw.limited("max_headers").await, 1.0);
    let within = format!(
        "GET /hello HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{}\r\n",
        fields(80)
    );
    let answer = exchange(&mut conn().await.unwrap(), within.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    // A body declared over 1 MiB: 413 before any of it is read.
    let answer = exchange(
        &mut conn().await.unwrap(),
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000000\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert_eq!(gw.limited("max_body_bytes").await, 1.0);
    // A chunked body (hyper's path) that grows past 1 MiB: 413 too.
    let mut s = conn().await.unwrap();
    let mut chunked =
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..24 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend(std::iter::repeat_n(b'b', 64 * 1024));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(&mut s, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert_eq!(gw.limited("max_body_bytes").await, 2.0);
    // Exactly 1 MiB is within the limit.
    let body = vec![b'c'; 1 << 20];
    let echoed = http()
        .post(gw.http_url("/echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    assert!(echoed
        .text()
        .await
        .unwrap()
        .starts_with("POST 1048576 bytes"));

    // A server's response head over 64 KiB: the client gets 502, counted.
    let r = get(gw.http_url("/large-head?bytes=70000")).await.unwrap();
    assert_eq!(r.status(), 502, "{:?}", r.text().await);
    assert!(gw.limited("max_response_header_bytes").await >= 1.0);
    let r = get(gw.http_url("/large-head?bytes=60000")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-filler"].len(), 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_then_get_503_and_one_address_gets_429_past_its_share() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    // The default cap (10,000) is more than a test should open; the queue keeps its default.
    let gw = GatewayProc::start_with(
        &redis,
        &consul,
        "max_connections = 4\nmax_connections_per_ip = 3\n",
    )
    .await;
    gw.serving().await;
    eventually("the checks' connections gone", WAIT, || async {
        let open = gw
            .metric("rebalancer_gateway_client_connections", &[])
            .await?;
        (open == 0.0).then_some(())
    })
    .await;
    let port = gw.port;
    let hello = b"GET /hello HTTP/1.1\r\nHost: gw\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from([127, 0, 0, 2], port).await;
        s.write_all(hello).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        held.push(s);
    }
    // A fourth from the same address: 429 at once.
    let mut s = connect_from([127, 0, 0, 2], port).await;
    let answer = exchange(&mut s, hello).await;
    assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
    assert_eq!(gw.limited("max_connections_per_ip").await, 1.0);
    // Another address takes the last slot.
    let mut s = connect_from([127, 0, 0, 3], port).await;
    s.write_all(hello).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200 "));
    held.push(s);
    assert_eq!(
        gw.metric("rebalancer_gateway_client_connections", &[])
            .await,
        Some(4.0)
    );

    // All taken: the next waits for the queue timeout (1 s), then 503 with Retry-After.
    let started = Instant::now();
    let mut s = connect_from([127, 0, 0, 4], port).await;
    let answer = exchange(&mut s, hello).await;
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900),
        "answered before the queue timeout: {waited:?}"
    );
    assert_eq!(gw.limited("max_connections").await, 1.0);

    // One closes: a new connection is served again.
    drop(held.pop());
    eventually("a slot freed", WAIT, || async {
        let mut s = connect_from([127, 0, 0, 4], port).await;
        s.write_all(hello).await.ok()?;
        read_head(&mut s)
            .await
            .starts_with("HTTP/1.1 200 ")
            .then_some(())
    })
    .await;
}

/// What became of one slow client: how long after its first byte (a slow head) or after its
/// head (a slow body) it was closed, and the answer it got.
async fn slow_client(port: u16, body: bool, pace: Duration) -> (Duration, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = Instant::now();
    if body {
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
    } else {
        s.write_all(b"G").await.unwrap();
    }
    let drip = b"ET /hello HTTP/1.1\r\nX-Slow: ";
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    for i in 0usize..100 {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            },
            () = tokio::time::sleep(pace) => {
                let byte = if body { b'x' } else { drip.get(i).copied().unwrap_or(b'z') };
                let _ = s.write_all(&[byte]).await;
            }
        }
    }
    (
        started.elapsed(),
        String::from_utf8_lossy(&got).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_slow_clients_are_closed_at_their_deadlines_while_others_are_served() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    let before = gw.rss_kib();
    let port = gw.port;
    let pace = Duration::from_secs(2);
    let slow: Vec<_> = (0..2000)
        .map(|i| {
            tokio::spawn(async move {
                // Spread over 2 s, as a real attack's connections arrive.
                tokio::time::sleep(Duration::from_millis(i)).await;
                (i % 2 == 1, slow_client(port, i % 2 == 1, pace).await)
            })
        })
        .collect();

    // Normal requests go on being served meanwhile.
    let (mut served, mut failed, mut peak) = (0, Vec::new(), before);
    let until = Instant::now() + Duration::from_secs(36);
    while Instant::now() < until {
        match get(gw.http_url("/hello")).await {
            Ok(r) if r.status() == 200 => served += 1,
            Ok(r) => failed.push(r.status().to_string()),
            Err(e) => failed.push(e.to_string()),
        }
        peak = peak.max(gw.rss_kib());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut heads, mut bodies) = (Vec::new(), Vec::new());
    for t in slow {
        let (body, (after, answer)) = t.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 "),
            "a slow client got {answer:?}"
        );
        if body {
            bodies.push(after);
        } else {
            heads.push(after);
        }
    }
    let range = |v: &[Duration]| (v.iter().min().copied(), v.iter().max().copied());
    println!(
        "slow heads closed after {:?}, slow bodies after {:?}; {served} requests served; \
         RSS {before} KiB before, {peak} KiB at most",
        range(&heads),
        range(&bodies)
    );
    // The defaults: a head within 10 s of its first byte, a body within 30 s of its head.
    for (v, deadline) in [(&heads, 10.0), (&bodies, 30.0)] {
        let (min, max) = range(v);
        assert!(
            min.unwrap().as_secs_f64() >= deadline - 0.2,
            "closed before the deadline: {min:?}"
        );
        assert!(
            max.unwrap().as_secs_f64() <= deadline + 5.0,
            "closed long after the deadline: {max:?}"
        );
    }
    assert_eq!(heads.len(), 1000);
    assert!(failed.is_empty(), "normal requests failed: {failed:?}");
    assert!(served >= 100, "only {served} normal requests served");
    assert_eq!(gw.limited("header_timeout").await, 1000.0);
    assert_eq!(gw.limited("body_timeout").await, 1000.0);
    // Each slow client costs the gateway a few KiB, not a buffer of its own size.
    let per_client = (peak.saturating_sub(before)) as f64 / 2000.0;
    assert!(
        per_client < 12.0,
        "{per_client:.1} KiB of RSS per slow client ({before} KiB before, {peak} KiB at most)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_and_messages_past_1_mib_close_1009_and_silent_peers_are_pinged_then_closed(
) {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _servers = demo_fleet(&redis, &consul, 1).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    let port = gw.port;

    // A keep-alive connection that asks once, then nothing: closed at the default 60 s.
    let mut keep_alive = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    keep_alive
        .write_all(b"GET /hello HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut keep_alive)
        .await
        .starts_with("HTTP/1.1 200 "));
    let idle_since = Instant::now();
    let keep_alive = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(120), keep_alive.read_to_end(&mut rest)).await;
        idle_since.elapsed()
    });
    // A session whose client never answers the gateway's pings: closed 1001 at the first
    // ping after 60 s of silence (pings every 20 s).
    let mut silent = RawWs::open(port).await;
    let silent_since = Instant::now();
    let silent = tokio::spawn(async move {
        let (code, before) = silent.close_code().await;
        (code, before, silent_since.elapsed())
    });
    // A session whose client answers them (tungstenite answers pings as it reads).
    let (live, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .expect("a session through the gateway");
    let (mut live_tx, mut live_rx) = futures::StreamExt::split(live);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = futures::StreamExt::next(&mut live_rx).await {
            let _ = seen_tx.send(m);
        }
    });

    // Within the limits, a 900 KiB message is relayed both ways.
    let mut ws = RawWs::open(port).await;
    let big = vec![b'm'; 900 * 1024];
    ws.send(true, 2, &big).await.unwrap();
    let (op, echoed) = ws.frame().await.expect("the echo");
    assert_eq!((op, echoed.len()), (2, big.len()));
    // A frame over 1 MiB: close 1009 to its sender, counted.
    ws.send(true, 2, &vec![b'f'; (1 << 20) + 1]).await.unwrap();
    assert_eq!(ws.close_code().await.0, 1009);
    assert_eq!(gw.limited("ws_max_frame_bytes").await, 1.0);
    // A message of three 400 KiB fragments: each frame fits, the message does not.
    let mut ws = RawWs::open(port).await;
    let part = vec![b'p'; 400 * 1024];
    for (fin, op) in [(false, 2), (false, 0), (true, 0)] {
        if ws.send(fin, op, &part).await.is_err() {
            break;
        }
    }
    assert_eq!(ws.close_code().await.0, 1009);
    assert_eq!(gw.limited("ws_max_message_bytes").await, 1.0);

    // The silent session is pinged and then closed; the live one lives on.
    let (code, before, after) = silent.await.unwrap();
    println!("silent session closed {code} after {after:?}, having been sent {before:?}");
    assert_eq!(code, 1001);
    let pings = before
        .iter()
        .filter(|op| **op == 9)
        .map(|_| 1)
        .sum::<usize>();
    assert!(pings >= 2, "{before:?}");
    assert!(
        after >= Duration::from_secs(59) && after <= Duration::from_secs(85),
        "closed after {after:?}, not at the first ping after 60 s"
    );
    assert!(gw.limited("ws_idle_timeout").await >= 1.0);
    futures::SinkExt::send(
        &mut live_tx,
        tokio_tungstenite::tungstenite::Message::Text("still here".into()),
    )
    .await
    .expect("the live session is open");
    eventually("the live session's echo", WAIT, || {
        let m = seen.try_recv().ok();
        async move {
            matches!(m, Some(tokio_tungstenite::tungstenite::Message::Text(t)) if t.as_str() == "still here")
                .then_some(())
        }
    })
    .await;

    let after = keep_alive.await.unwrap();
    assert!(
        after >= Duration::from_secs(59) && after <= Duration::from_secs(66),
        "the idle keep-alive connection closed after {after:?}, not 60 s"
    );
    assert!(gw.limited("idle_timeout").await >= 1.0);
}
