//! A minimal connection server embedding the agent: a WebSocket echo server that registers
//! in Consul, reports its sessions to Redis, refuses new sessions while full, cordoned or
//! shedding, closes the sessions it is told to shed, and drains on Ctrl-C.
//!
//! ```text
//! cargo run -p rebalancer-agent --example minimal_server -- 127.0.0.1:9100 ws-9100
//! ```
//!
//! Consul and Redis come from `CONSUL_HTTP_ADDR` and `REDIS_URL` (default: loopback), with
//! the ACL and TLS variables of docs/security.md, and the command keys from
//! `REBALANCER_COMMAND_KEYS`. The health check Consul runs is `GET /health` on the same
//! port; every other request is a WebSocket upgrade.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rebalancer_agent::contract::signing::CommandKeys;
use rebalancer_agent::contract::tls::{ConsulEndpoint, RedisEndpoint};
use rebalancer_agent::{Admission, Agent, AgentConfig, SessionGuard, SessionRegistry};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "ws";
const MAX_SESSIONS: u32 = 100;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:9100").parse()?;
    let id = args
        .next()
        .unwrap_or_else(|| format!("{SERVICE}-{}", listen.port()));
    let env = |k: &str| std::env::var(k).ok();
    let or = |k: &str, default: &str| env(k).unwrap_or_else(|| default.to_string());

    let mut cfg = AgentConfig::new(
        SERVICE,
        &id,
        &listen.ip().to_string(),
        listen.port(),
        MAX_SESSIONS,
    );
    cfg.consul = ConsulEndpoint::from_env(&or("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"), &env);
    cfg.redis = RedisEndpoint::from_env(&or("REDIS_URL", "redis://127.0.0.1:6379/0"), &env);
    cfg.keys = CommandKeys::from_env(&env)?;

    let registry = SessionRegistry::new();
    let agent = Agent::new(cfg, Arc::new(registry.clone()));
    let listener = TcpListener::bind(listen).await?;
    tokio::spawn(accept(listener, agent.clone(), registry));

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    // Until Ctrl-C; then it deregisters, closes the sessions over a short window and
    // removes the count.
    agent.run(shutdown).await?;
    Ok(())
}

async fn accept(listener: TcpListener, agent: Agent, registry: SessionRegistry) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, agent.clone(), registry.clone()));
    }
}

async fn connection(mut stream: TcpStream, agent: Agent, registry: SessionRegistry) {
    let mut head = [0u8; 16];
    let n = stream.peek(&mut head).await.unwrap_or(0);
    if head[..n].starts_with(b"GET /health ") {
        let answer = if agent.is_shutting_down() {
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        };
        let _ = stream.write_all(answer.as_bytes()).await;
        return;
    }
    // Full, cordoned, shedding or stopping: the client reconnects elsewhere.
    let admission = agent.admission();
    if admission != Admission::Accept {
        let body = admission.reason();
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        return;
    }
    // Counted from here until the guard drops.
    let guard = registry.open();
    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
        session(ws, guard).await;
    }
}

async fn session(mut ws: tokio_tungstenite::WebSocketStream<TcpStream>, mut guard: SessionGuard) {
    loop {
        tokio::select! {
            // Told to shed or drain: close with the protocol's code (1012 or 1013).
            reason = guard.closed() => {
                let frame = CloseFrame {
                    code: CloseCode::from(reason.code()),
                    reason: reason.text().into(),
                };
                let _ = ws.send(Message::Close(Some(frame))).await;
                // The client answers the close; wait for it briefly.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                })
                .await;
                return;
            }
            m = ws.next() => match m {
                Some(Ok(m)) if m.is_text() || m.is_binary() => {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
                // The client closes: answer its close frame (queued by tungstenite, sent
                // on close), then drop the connection.
                Some(Ok(Message::Close(_))) => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
