//! A TCP proxy in front of the test's real Consul that can answer every new request with an
//! error status instead of passing it on. A single dev agent cannot be made to answer 500
//! (a cluster without a leader) or 429 (its per-client limit), so this is the fault suite's
//! one stand-in; everything else it passes through to the real agent untouched.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct FaultyProxy {
    pub port: u16,
    /// 0: pass through; otherwise the status every new request is answered with.
    status: Arc<AtomicU16>,
    faults: Arc<AtomicU64>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl FaultyProxy {
    pub async fn start(upstream_port: u16) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(0));
        let faults = Arc::new(AtomicU64::new(0));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (st, fa, li) = (status.clone(), faults.clone(), live.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                match st.load(Ordering::SeqCst) {
                    0 => {
                        let task = tokio::spawn(pass(client, upstream_port));
                        li.lock().unwrap().push(task.abort_handle());
                    }
                    code => {
                        tokio::spawn(answer(client, code, fa.clone()));
                    }
                }
            }
        });
        FaultyProxy {
            port,
            status,
            faults,
            live,
            accept,
        }
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every new request is answered `code`; connections passing through now are cut (a
    /// blocking query in flight fails as it would when its server goes away).
    pub fn fail_with(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
        for conn in self.live.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    pub fn pass(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Requests answered with an error status so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for conn in self.live.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

async fn pass(mut client: TcpStream, upstream_port: u16) {
    if let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Reads one request head and answers it with `code`, closing the connection.
async fn answer(mut client: TcpStream, code: u16, faults: Arc<AtomicU64>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    if read != Ok(true) {
        return;
    }
    let body = format!("injected {code} by the test proxy");
    let reply = format!(
        "HTTP/1.1 {code} Injected\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    faults.fetch_add(1, Ordering::SeqCst);
    let _ = client.write_all(reply.as_bytes()).await;
    let _ = client.shutdown().await;
}
