//! What the gateway passes on, byte by byte, with raw sockets against real demo servers:
//! hop-by-hop headers out, forwarding headers from the peer (a client's own believed only
//! from a trusted proxy), WebSocket upgrades with the client's end-to-end headers, and
//! request-smuggling probes refused or normalized, never forwarded ambiguously.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::*;

/// Writes `bytes` and reads until the gateway closes (within 10 s).
async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> String {
    String::from_utf8_lossy(&exchange_bytes(s, bytes).await).into_owned()
}

async fn exchange_bytes(s: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes).await;
    let (all, closed) = read_until_closed(s, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the gateway kept the connection open after {:?}",
        String::from_utf8_lossy(&all)
    );
    all
}

/// The headers the server saw, from a `/request-headers` answer's body (the JSON after the
/// head; chunked framing, if any, stripped by taking the outermost braces).
fn seen(answer: &str) -> (Vec<(String, String)>, serde_json::Value) {
    let start = answer
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {answer}"));
    let end = answer.rfind('}').unwrap();
    let v: serde_json::Value = serde_json::from_str(&answer[start..=end]).unwrap();
    let fields = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (fields, v)
}

fn values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

const SPOOFED: &str = "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\
    X-Forwarded-Host: spoofed.example\r\nForwarded: for=203.0.113.9\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_see_the_peer_in_the_forwarding_headers_and_never_a_hop_by_hop_one() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    let trusting =
        GatewayProc::start_with(&redis, &consul, "trusted_proxies = [\"127.0.0.2\"]\n").await;
    gw.serving().await;
    trusting.serving().await;

    // The plain path, then hyper's (a chunked body): the same headers reach the server.
    let plain = format!(
        "GET /request-headers HTTP/1.1\r\nHost: app.example\r\nConnection: close, x-secret\r\n\
         X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n{SPOOFED}\r\n"
    );
    let chunked = format!(
        "POST /request-headers HTTP/1.1\r\nHost: app.example\r\nConnection: close, x-secret\r\n\
         X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n{SPOOFED}\
         Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    );
    for (path, request) in [("plain", &plain), ("hyper", &chunked)] {
        let mut s = connect_from([127, 0, 0, 3], gw.port).await;
        let answer = exchange(&mut s, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{path}: {answer}");
        let (fields, _) = seen(&answer);
        let one = |name: &str| values(&fields, name).join(" | ");
        assert_eq!(one("x-forwarded-for"), "127.0.0.3", "{path}: {fields:?}");
        assert_eq!(one("x-forwarded-proto"), "http", "{path}");
        assert_eq!(one("x-forwarded-host"), "app.example", "{path}");
        assert_eq!(
            one("forwarded"),
            "for=127.0.0.3;host=\"app.example\";proto=http",
            "{path}"
        );
        assert_eq!(one("x-kept"), "yes", "{path}");
        for gone in ["x-secret", "keep-alive", "connection"] {
            assert!(
                values(&fields, gone).is_empty(),
                "{path}: {gone} in {fields:?}"
            );
        }
    }

    // Through a trusted proxy the chain goes on; from anyone else it is replaced.
    let request = format!(
        "GET /request-headers HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n{SPOOFED}\r\n"
    );
    let mut s = connect_from([127, 0, 0, 2], trusting.port).await;
    let (fields, _) = seen(&exchange(&mut s, request.as_bytes()).await);
    let one = |name: &str| values(&fields, name).join(" | ");
    assert_eq!(one("x-forwarded-for"), "203.0.113.9, 127.0.0.2");
    assert_eq!(one("x-forwarded-proto"), "https");
    assert_eq!(one("x-forwarded-host"), "spoofed.example");
    assert_eq!(
        one("forwarded"),
        "for=203.0.113.9, for=127.0.0.2;host=\"app.example\";proto=http"
    );
    let mut s = connect_from([127, 0, 0, 4], trusting.port).await;
    let (fields, _) = seen(&exchange(&mut s, request.as_bytes()).await);
    assert_eq!(values(&fields, "x-forwarded-for"), vec!["127.0.0.4"]);

    // A WebSocket upgrade carries the client's end-to-end headers, and the forwarding ones;
    // the server's chosen subprotocol comes back in the 101.
    let upgrade = format!(
        "GET /request-headers HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n\
         Origin: https://app.example\r\nCookie: session=abc\r\nAuthorization: Bearer t0k\r\n{SPOOFED}\r\n"
    );
    let mut s = connect_from([127, 0, 0, 3], gw.port).await;
    let raw = exchange_bytes(&mut s, upgrade.as_bytes()).await;
    let answer = String::from_utf8_lossy(&raw);
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-protocol: chat\r\n"),
        "{answer}"
    );
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{answer}"
    );
    let (fields, v) = seen(&answer);
    let one = |name: &str| values(&fields, name).join(" | ");
    assert_eq!(v["method"], "GET");
    assert_eq!(one("origin"), "https://app.example");
    assert_eq!(one("cookie"), "session=abc");
    assert_eq!(one("authorization"), "Bearer t0k");
    assert_eq!(one("sec-websocket-protocol"), "chat, superchat");
    assert_eq!(one("x-forwarded-for"), "127.0.0.3");
    assert_eq!(one("x-forwarded-host"), "app.example");
    assert!(one("forwarded").starts_with("for=127.0.0.3;"), "{fields:?}");
    // The session then ends with the server's close frame (1000) relayed whole.
    let close = [0x88, 6, 0x03, 0xe8, b'd', b'o', b'n', b'e'];
    assert!(raw.ends_with(&close), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_probes_and_bad_upgrades_are_refused_or_normalized_never_passed_on_ambiguously() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    let port = gw.port;
    let conn = || TcpStream::connect(("127.0.0.1", port));

    // Content-Length and Transfer-Encoding both: the chunked framing wins, Content-Length
    // is dropped, and the connection closes after the answer, so what follows the chunked
    // body (a request smuggled behind it) is never read as a request.
    let mut s = conn().await.unwrap();
    let answer = exchange(
        &mut s,
        b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /hello HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("POST 5 bytes from s1"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "smuggled: {answer}");

    // Refused with 400, each on its own connection.
    let refused: &[(&str, &[u8])] = &[
        (
            "two different Content-Lengths",
            b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        ),
        (
            "a Content-Length with a sign",
            b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: +3\r\n\r\nabc",
        ),
        (
            "a chunk size that is not hex",
            b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunked not the last coding",
            b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /echo HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "an obs-fold",
            b"GET /hello HTTP/1.1\r\nHost: gw\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "a WebSocket key that is not 16 bytes of base64",
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: not-a-key\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
        (
            "a WebSocket version other than 13",
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        ),
        (
            "a bad WebSocket key on a connection hyper serves",
            b"POST /echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
    ];
    for (what, probe) in refused {
        let mut s = conn().await.unwrap();
        let answer = exchange(&mut s, probe).await;
        let last = answer
            .rfind("HTTP/1.1 ")
            .map_or(answer.as_str(), |at| &answer[at..]);
        assert!(
            last.starts_with("HTTP/1.1 400 "),
            "{what}: answered {answer:?}"
        );
    }
    let after = get(gw.http_url("/hello")).await.unwrap();
    assert_eq!(after.status(), 200, "the gateway serves on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_never_serves_one_clients_response_to_another_and_stays_within_its_bytes() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    let fetch = |path: &str, headers: &[(&str, &str)]| {
        let mut r = http().get(gw.http_url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let hit = r.headers().contains_key("x-cache");
            (hit, r.text().await.unwrap())
        }
    };
    let twice = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let fetch = &fetch;
        async move {
            fetch(path, headers).await;
            fetch(path, headers).await.0
        }
    };
    assert!(
        twice("/static/plain", &[]).await,
        "a public response is cached"
    );
    assert!(
        !twice("/static/cookie?set_cookie=1", &[]).await,
        "a response with Set-Cookie is never stored"
    );
    assert!(
        !twice(
            "/static/mine?cache_control=max-age%3D60",
            &[("cookie", "s=1")]
        )
        .await,
        "an answer to a request with a Cookie is not stored unless public"
    );
    assert!(
        !twice(
            "/static/token?cache_control=max-age%3D60",
            &[("authorization", "Bearer t")]
        )
        .await,
        "nor one to a request with Authorization"
    );
    assert!(
        twice("/static/shared", &[("authorization", "Bearer t")]).await,
        "unless the server says public"
    );
    // Vary: a stored French answer is never served to a German request.
    let fr = [("accept-language", "fr")];
    let path = "/static/v?vary=accept-language";
    assert!(!fetch(path, &fr).await.0);
    let (hit, body) = fetch(path, &fr).await;
    assert!(hit && body.contains("accept-language: fr"), "{body}");
    let (hit, body) = fetch(path, &[("accept-language", "de")]).await;
    assert!(!hit && body.contains("accept-language: de"), "{body}");
    // Over the per-entry limit (1 MiB): streamed whole, not stored.
    let (hit, body) = fetch("/static/big?bytes=2000000", &[]).await;
    assert!(!hit && body.len() == 2_000_000);
    let (hit, body) = fetch("/static/big?bytes=2000000", &[]).await;
    assert!(!hit && body.len() == 2_000_000, "not stored");
    // 80 entries of 1,000,000 bytes: the cache holds at most its 64 MiB.
    for i in 0..80 {
        fetch(&format!("/static/fill-{i}?bytes=1000000"), &[]).await;
    }
    let bytes = gw
        .metric("rebalancer_gateway_cache_bytes", &[])
        .await
        .unwrap();
    println!("the cache holds {bytes} bytes after 80 MB of responses");
    assert!(bytes <= f64::from(64u32 << 20), "{bytes} bytes");
    assert!(
        bytes >= f64::from(32u32 << 20),
        "{bytes} bytes: it does hold some"
    );
}

/// The connection ends (EOF) within 5 s, with no frame before it.
async fn ends(ws: &mut RawWs, what: &str) {
    let next = tokio::time::timeout(Duration::from_secs(5), ws.frame())
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection stays open after the close handshake"));
    assert!(next.is_none(), "{what}: a frame after the close: {next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_handshake_completes_directly_and_through_the_gateway() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let server = one_server(&redis, &consul).await;
    let gw = GatewayProc::start(&redis, &consul).await;
    gw.serving().await;
    for (via, port) in [("directly", server.port), ("through the gateway", gw.port)] {
        // The client closes: the server answers with its close frame, then the connection
        // ends.
        let mut ws = RawWs::open(port).await;
        ws.send(true, 8, &[0x03, 0xe8, b'b', b'y', b'e'])
            .await
            .unwrap();
        assert_eq!(ws.close_code().await.0, 1000, "{via}: the close answered");
        ends(&mut ws, via).await;
        // The server closes (after its first message): the client answers, and the
        // connection ends.
        let mut ws = RawWs::open_at(port, "/request-headers").await;
        assert_eq!(ws.close_code().await.0, 1000, "{via}");
        ws.send(true, 8, &[0x03, 0xe8]).await.unwrap();
        ends(&mut ws, via).await;
    }
    // The gateway closes (a frame over its limit): 1009, and once answered, the end.
    let mut ws = RawWs::open(gw.port).await;
    ws.send_oversized_header().await;
    assert_eq!(ws.close_code().await.0, 1009);
    ws.send(true, 8, &[0x03, 0xf1]).await.unwrap();
    ends(&mut ws, "the gateway's close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_hypers_path_is_relayed_like_one_through_the_fast_path() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    // With shared accounting every connection is hyper's, upgrades included.
    let gw = GatewayProc::start_with(&redis, &consul, "shared_accounting = true\n").await;
    gw.serving().await;
    let mut ws = RawWs::open(gw.port).await;
    ws.send(true, 1, b"through hyper").await.unwrap();
    let (op, echoed) = ws.frame().await.expect("the echo");
    assert_eq!((op, echoed.as_slice()), (1, &b"through hyper"[..]));
    // Its limits hold there too.
    ws.send_oversized_header().await;
    assert_eq!(ws.close_code().await.0, 1009);
    ws.send(true, 8, &[0x03, 0xf1]).await.unwrap();
    ends(&mut ws, "hyper's path").await;
    assert_eq!(gw.limited("ws_max_frame_bytes").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_and_per_session() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    let gw = GatewayProc::start_with(&redis, &consul, "access_log = true\n").await;
    gw.serving().await;
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    exchange(
        &mut s,
        b"GET /hello?from=fast HTTP/1.1\r\nHost: gw\r\n\r\n\
          POST /echo?from=hyper HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /static/x.js HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /static/x.js HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    let mut ws = RawWs::open_at(gw.port, "/ws?from=session").await;
    ws.send(true, 8, &[0x0f, 0xa1]).await.unwrap(); // 4001
    ws.close_code().await;
    let lines = eventually("the session's line", WAIT, || async {
        let log = gw.log();
        log.contains("from=session").then(|| {
            log.lines()
                .filter(|l| l.contains("rebalancer::access"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
    })
    .await;
    let line = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no access line with {needle:?} in {lines:#?}"))
            .clone()
    };
    let fast = line("from=fast");
    for field in [
        "kind=\"http\"",
        "method=\"GET\"",
        "status=200",
        "backend=\"s1\"",
        "client=127.0.0.1",
        "bytes=",
    ] {
        assert!(fast.contains(field), "{field} in {fast}");
    }
    let hyper = line("from=hyper");
    assert!(
        hyper.contains("method=\"POST\"") && hyper.contains("backend=\"s1\""),
        "{hyper}"
    );
    assert!(line("backend=\"cache\"").contains("/static/x.js"));
    let session = line("from=session");
    for field in [
        "kind=\"ws\"",
        "status=101",
        "client_close=4001",
        "server_close=",
        "ended_by=\"peers\"",
        "bytes_up=",
    ] {
        assert!(session.contains(field), "{field} in {session}");
    }
}
