//! WebSocket upgrades: a server picked (and retried) for each, and messages relayed both
//! ways until either side closes, close codes passed through.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use metrics::histogram;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TgCloseFrame;
use tokio_tungstenite::tungstenite::Message as TgMessage;

use crate::telemetry::GW_REQUEST_DURATION as REQUEST_DURATION;

use super::attempt::{Ask, AttemptError, Tries};
use super::route::Kind;
use super::series::WsOpen;
use super::table::Backend;
use super::{unavailable, Gateway};

/// Read and write buffers per relayed WebSocket side. tungstenite's default is 128 KiB
/// each, which made an idle relayed connection cost ~270 KB (measured, benches/proxy.sh);
/// the buffers grow as needed for large messages anyway.
pub(super) const WS_BUFFER: usize = 4 * 1024;

pub(super) fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
}

pub(super) async fn ws(g: Gateway, req: Request) -> Response {
    let started = Instant::now();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".into(), |p| p.as_str().to_string());
    let (mut parts, _body) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    // A WebSocket upgrade is a GET: tried on another server whatever went wrong.
    let ask = Ask {
        kind: Kind::Session,
        inflight: None,
        idempotent: true,
    };
    let mut tries = Tries::new(&g, ask);
    let (target, backend) = loop {
        let target = match tries.next() {
            Ok(t) => t,
            Err(why) => return unavailable(why),
        };
        let url = format!("ws://{}{}", target.host, path);
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true);
        let error = match tokio::time::timeout(g.0.cfg.connect_timeout, connect).await {
            Ok(Ok((backend, _))) => break (target, backend),
            // The server is up but refuses (full, cordoned, shedding): try another.
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                tracing::debug!(backend = %target.id, status = %resp.status(), "upgrade refused");
                AttemptError::Refused(format!("upgrade refused: {}", resp.status()))
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = %target.id, error = %e, "cannot connect");
                AttemptError::NotSent(e.to_string())
            }
            Err(_) => {
                AttemptError::NotSent(format!("no upgrade within {:?}", g.0.cfg.connect_timeout))
            }
        };
        if tries.after_failure(target, error).await.is_err() {
            return unavailable("every server tried refused or failed");
        }
    };
    g.outcome(&target, true);
    histogram!(REQUEST_DURATION, "kind" => "ws_connect").record(started.elapsed().as_secs_f64());
    target.backend.counts.ws.fetch_add(1, Ordering::Relaxed);
    let server = target.backend.clone();
    upgrade
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .on_upgrade(move |client| relay(client, backend, server))
}

pub(super) type BackendStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Relays messages both ways until either side closes, passing close codes through.
pub(super) async fn relay(client: WebSocket, backend: BackendStream, server: Arc<Backend>) {
    let _open = WsOpen::new(&server.counts.ws_open);
    let (mut c_tx, mut c_rx) = client.split();
    let (mut b_tx, mut b_rx) = backend.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                AxMessage::Text(t) => TgMessage::Text(t.as_str().into()),
                AxMessage::Binary(b) => TgMessage::Binary(b),
                AxMessage::Ping(p) => TgMessage::Ping(p),
                AxMessage::Pong(p) => TgMessage::Pong(p),
                AxMessage::Close(f) => {
                    let f = f.map(|f| TgCloseFrame {
                        code: CloseCode::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = b_tx.send(TgMessage::Close(f)).await;
                    break;
                }
            };
            if b_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        while let Some(Ok(m)) = b_rx.next().await {
            let m = match m {
                TgMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TgMessage::Binary(b) => AxMessage::Binary(b),
                TgMessage::Ping(p) => AxMessage::Ping(p),
                TgMessage::Pong(p) => AxMessage::Pong(p),
                TgMessage::Close(f) => {
                    let f = f.map(|f| CloseFrame {
                        code: u16::from(f.code),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = c_tx.send(AxMessage::Close(f)).await;
                    break;
                }
                TgMessage::Frame(_) => continue,
            };
            if c_tx.send(m).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
