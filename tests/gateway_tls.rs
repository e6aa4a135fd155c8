//! TLS termination at the gateway (`tls_cert`, `tls_key`) in front of real demo servers,
//! with certificates made by openssl in the test: HTTPS and wss on the fast path and on
//! hyper's, the forwarding headers saying https, a renewed certificate served without a
//! restart while sessions on the old one carry on, a bad renewal changing nothing, and
//! handshakes that fail or never come counted and closed.

mod support;

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use support::*;

/// Redis, Consul, one demo server, and a gateway serving TLS with fresh certificates.
async fn tls_gateway() -> (Redis, ConsulAgent, DemoServer, Certs, GatewayProc) {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let server = one_server(&redis, &consul).await;
    let certs = Certs::generate();
    let gw = GatewayProc::start_with(
        &redis,
        &consul,
        &tls_keys(&certs.server_cert, &certs.server_key),
    )
    .await;
    (redis, consul, server, certs, gw)
}

fn tls_keys(cert: &Path, key: &Path) -> String {
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// Waits until `client` gets a 200 for `/hello` from the gateway.
async fn https_serving(gw: &GatewayProc, client: &reqwest::Client) {
    let url = format!("https://127.0.0.1:{}/hello", gw.port);
    eventually("the gateway serving HTTPS", WAIT, || async {
        let r = client.get(&url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// One response read off `s`: its head, and a body framed by `Content-Length`.
async fn response<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let raw = read_head_bytes(s).await;
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..at]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = raw[at..].to_vec();
    while body.len() < len {
        let mut buf = vec![0u8; len - body.len()];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&buf[..n]);
    }
    (head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_are_served_on_the_fast_path_and_on_hypers() {
    let (_redis, _consul, _server, certs, gw) = tls_gateway().await;
    let client = certs.http_builder().build().unwrap();
    https_serving(&gw, &client).await;
    let base = format!("https://127.0.0.1:{}", gw.port);

    // Keep-alive requests, a body up and one down larger than a TLS record (16 KiB).
    for i in 0..20 {
        let r = client.get(format!("{base}/hello")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = client
        .post(format!("{base}/echo"))
        .body(up.clone())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let prefix = b"POST 300000 bytes from s1\n";
    assert!(echoed.starts_with(prefix), "{:?}", &echoed[..40]);
    assert_eq!(&echoed[prefix.len()..prefix.len() + up.len()], &up[..]);
    let down = client
        .get(format!("{base}/static/big.bin?bytes=2000000"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(down.len(), 2_000_000);

    // The server is told the client came over https.
    let seen: serde_json::Value = client
        .get(format!("{base}/request-headers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fields = seen["headers"].as_array().unwrap();
    let value = |name: &str| {
        fields
            .iter()
            .find(|p| p[0] == name)
            .and_then(|p| p[1].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(value("x-forwarded-proto"), "https", "{seen}");
    assert!(value("forwarded").ends_with("proto=https"), "{seen}");

    // wss on the fast path: echo, a message of several records, and the close handshake.
    let tls = certs.connect(gw.port).await.expect("a TLS connection");
    let mut ws = RawWs::open_on(tls, "/ws").await;
    ws.send(true, 1, b"over tls").await.unwrap();
    assert_eq!(ws.frame().await, Some((1, b"over tls".to_vec())));
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(true, 2, &big).await.unwrap();
    assert_eq!(ws.frame().await, Some((2, big.clone())));
    ws.send(true, 8, &[0x03, 0xe8]).await.unwrap();
    assert_eq!(ws.close_code().await.0, 1000);
    assert!(
        ws.frame().await.is_none(),
        "the connection ends after the close"
    );

    // hyper's path (a chunked body sends the connection there), then wss on it.
    let mut tls = certs.connect(gw.port).await.expect("a TLS connection");
    tls.write_all(
        b"POST /request-headers HTTP/1.1\r\nHost: app.example\r\n\
          Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let (head, body) = response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["method"], "POST");
    assert!(
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p[0] == "x-forwarded-proto" && p[1] == "https"),
        "{seen}"
    );
    let mut ws = RawWs::open_on(tls, "/ws").await;
    ws.send(true, 2, &big).await.unwrap();
    assert_eq!(ws.frame().await, Some((2, big)));
    ws.send(true, 8, &[0x03, 0xe8]).await.unwrap();
    assert_eq!(ws.close_code().await.0, 1000);
    assert!(
        ws.frame().await.is_none(),
        "the connection ends after the close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_bad_one_changes_nothing() {
    let (redis, consul) = (Redis::start().await, ConsulAgent::start().await);
    let _server = one_server(&redis, &consul).await;
    let (old, new) = (Certs::generate(), Certs::generate());
    let dir = temp_dir("gw-tls-files");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::copy(&old.server_cert, &cert).unwrap();
    std::fs::copy(&old.server_key, &key).unwrap();
    let gw = GatewayProc::start_with(&redis, &consul, &tls_keys(&cert, &key)).await;
    https_serving(&gw, &old.fresh_https()).await;
    let url = format!("https://127.0.0.1:{}/hello", gw.port);
    let reloads = |result: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "rebalancer_gateway_tls_reloads_total",
                &[("result", result)],
            )
            .await
            .unwrap_or(0.0)
        }
    };
    // A session opened on the old certificate.
    let mut session = RawWs::open_on(old.connect(gw.port).await.unwrap(), "/ws").await;

    // Half a renewal: a file that is not PEM, then a certificate whose key is not there yet.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    eventually("the bad file refused", WAIT, || async {
        (reloads("error").await >= 1.0).then_some(())
    })
    .await;
    let refused = reloads("error").await;
    assert!(
        old.fresh_https().get(&url).send().await.is_ok(),
        "the old certificate still served"
    );
    std::fs::copy(&new.server_cert, &cert).unwrap();
    eventually("the mismatched pair refused", WAIT, || async {
        (reloads("error").await > refused).then_some(())
    })
    .await;
    assert!(
        old.fresh_https().get(&url).send().await.is_ok(),
        "the old certificate still served"
    );
    let log = gw.log();
    assert!(
        log.contains("does not belong to the certificate"),
        "the log says why: {log}"
    );

    // The key comes: the new pair is served to new connections, the old one no more.
    std::fs::copy(&new.server_key, &key).unwrap();
    eventually("the new certificate served", WAIT, || async {
        new.fresh_https().get(&url).send().await.ok().map(|_| ())
    })
    .await;
    assert_eq!(reloads("ok").await, 1.0);
    assert!(
        old.fresh_https().get(&url).send().await.is_err(),
        "a client trusting only the old CA no longer connects"
    );
    // The session opened before the renewal carries on.
    session.send(true, 1, b"still here").await.unwrap();
    assert_eq!(session.frame().await, Some((1, b"still here".to_vec())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_silent_handshakes_are_counted_and_closed_and_bad_files_stop_the_start() {
    let (_redis, _consul, _server, certs, gw) = tls_gateway().await;
    https_serving(&gw, &certs.fresh_https()).await;
    let failed = || async {
        gw.metric("rebalancer_gateway_tls_handshake_errors_total", &[])
            .await
            .unwrap_or(0.0)
    };

    // Plain HTTP on the TLS port: closed, counted.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    plain
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut plain, Duration::from_secs(5)).await;
    assert!(closed, "a plain request on the TLS port is closed");
    assert!(
        !got.starts_with(b"HTTP/"),
        "no plain answer on the TLS port: {got:?}"
    );
    eventually("the failed handshake counted", WAIT, || async {
        (failed().await == 1.0).then_some(())
    })
    .await;

    // A connection that never says hello is closed at header_timeout (10 s by default).
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let opened = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "closed: {closed:?}");
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
        "closed at the header timeout: {waited:?}"
    );
    eventually("the silent handshake counted", WAIT, || async {
        (failed().await == 2.0 && gw.limited("header_timeout").await == 1.0).then_some(())
    })
    .await;

    // A key file that is not there: the gateway does not start, and says which file.
    let toml = std::fs::read_to_string(gw.pipeline_file())
        .unwrap()
        .replace(
            &certs.server_key.display().to_string(),
            "/nonexistent/tls.key",
        );
    let file = temp_dir("gw-tls-bad").join("p.toml");
    std::fs::write(&file, toml).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rebalancer"))
            .args(["gateway", "--pipeline"])
            .arg(&file)
            .output(),
    )
    .await
    .expect("the gateway stops at once")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the TLS key /nonexistent/tls.key"),
        "{err}"
    );
}
