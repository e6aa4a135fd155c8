//! A WebSocket client by hand, for tests that must see frames as bytes: the upgrade, masked
//! frames sent, frames read back, close codes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `port` on 127.0.0.1 from `from` (any 127.0.0.0/8 address).
pub async fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((from, 0)))
        .expect("bind a loopback address");
    socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect to the gateway")
}

/// Reads one response head, and the bytes that came with it.
pub async fn read_head_bytes<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    while !all.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("a response within 15 s")
            .expect("reading a response");
        assert!(n > 0, "closed before a response");
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// Reads until the peer closes or `within` passes: what came, and whether it closed.
pub async fn read_until_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => all.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
    })
    .await
    .is_ok();
    (all, closed)
}

/// A WebSocket session through the gateway, by hand: the upgrade, then frames as bytes.
/// Over TCP, or any stream (TLS).
pub struct RawWs<S = TcpStream> {
    pub s: S,
    pub buf: Vec<u8>,
}

impl RawWs {
    /// Opens a session at `path` on `port`, checks the 101, and reads the demo server's
    /// hello (a text frame).
    pub async fn open(port: u16) -> RawWs {
        RawWs::open_at(port, "/ws").await
    }

    pub async fn open_at(port: u16, path: &str) -> RawWs {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        RawWs::open_on(s, path).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawWs<S> {
    /// Opens a session at `path` on the connection `s`, as `open_at` does.
    pub async fn open_on(mut s: S, path: &str) -> RawWs<S> {
        s.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        s.flush().await.unwrap();
        let raw = read_head_bytes(&mut s).await;
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&raw[..at]);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "the server's accept key relayed: {head}"
        );
        let mut ws = RawWs {
            s,
            buf: raw[at..].to_vec(),
        };
        // The demo server says hello first.
        let Some((op, hello)) = ws.frame().await else {
            panic!(
                "no hello from the server; had {:?}",
                String::from_utf8_lossy(&ws.buf)
            );
        };
        assert_eq!(op, 1, "{hello:?}");
        ws
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 0x7e);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 0x7f);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [7u8, 1, 9, 3];
        f.extend_from_slice(&key);
        f.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        self.s.write_all(&f).await?;
        self.s.flush().await
    }

    /// The next frame from the gateway (`None` once it closes): opcode and payload.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let len7 = usize::from(self.buf[1] & 0x7f);
                let (len, at) = match len7 {
                    126 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    127 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n => (n, 2),
                };
                if self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(120), self.s.read(&mut chunk))
                .await
                .expect("a frame within 120 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the close frame: its code, and the opcodes of the frames before it.
    /// Sends the header of a binary frame of 2 MiB (past the gateway's default limits).
    pub async fn send_oversized_header(&mut self) {
        let mut header = vec![0x82, 0x80 | 0x7f];
        header.extend_from_slice(&(2u64 << 20).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        self.s.write_all(&header).await.unwrap();
    }

    pub async fn close_code(&mut self) -> (u16, Vec<u8>) {
        let mut before = Vec::new();
        loop {
            match self.frame().await {
                Some((8, payload)) => {
                    return (u16::from_be_bytes([payload[0], payload[1]]), before)
                }
                Some((op, _)) => before.push(op),
                None => panic!("closed without a close frame after {before:?}"),
            }
        }
    }
}
