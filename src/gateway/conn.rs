//! A client connection, plain TCP or TLS (`tls.rs` holds the certificate): one type for
//! every path. The fast path and the WebSocket relay work on socket readiness (`readable`,
//! `try_read_buf`, `try_write`); hyper's path on `AsyncRead`/`AsyncWrite`. TLS is rustls
//! driven directly over the socket, so it has both: records are read when the socket is
//! readable and decrypted into the caller's buffer; what is written is encrypted into
//! rustls's buffer and sent at once, the rest (`wants_flush`) when the socket can take it.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A client connection.
pub(super) enum Conn {
    Tcp(TcpStream),
    Tls(Box<TlsConn>),
}

/// rustls over a socket, after its handshake.
pub(super) struct TlsConn {
    tcp: TcpStream,
    tls: rustls::ServerConnection,
    /// rustls may hold decrypted bytes not read yet: the socket's readiness does not say.
    plaintext: bool,
    /// The socket has said it is at its end.
    eof: bool,
    close_sent: bool,
}

/// The socket as `io::Read`/`io::Write` for rustls, without waiting: `WouldBlock` clears
/// its readiness, so the next wait is a real one.
struct Socket<'a>(&'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads what `tcp` has into `buf`'s spare capacity, without waiting. A read that leaves
/// room in `buf` has emptied the socket, so its readiness is cleared there and then: the
/// next wait is a real one, not a read that only says it would block (a system call saved
/// per read). tokio clears it only if no readiness came since the read began.
pub(super) fn try_read_drain<B: BufMut>(tcp: &TcpStream, buf: &mut B) -> io::Result<usize> {
    let mut got = None;
    let read = tcp.try_io(Interest::READABLE, || {
        let room = buf.chunk_mut().len();
        let n = tcp.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (read, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (read, _) => read,
    }
}

/// Reads with `read` into this thread's scratch buffer and appends what came to `buf`: a
/// connection's buffer grows by what it was sent (a request head: a few hundred bytes), not
/// by a read's worth of room it holds while it waits, and a burst of new connections does
/// not leave the heap at a high-water mark of empty buffers.
pub(super) fn read_appending(
    buf: &mut BytesMut,
    read: impl FnOnce(&mut Vec<u8>) -> io::Result<usize>,
) -> io::Result<usize> {
    with_scratch(|scratch| {
        let n = read(scratch)?;
        buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    })
}

/// The most one read takes (`with_scratch`).
pub(super) const SCRATCH_BYTES: usize = 16 * 1024;

/// Runs `f` with this thread's scratch buffer, emptied: `SCRATCH_BYTES` of capacity, never
/// zeroed (reads write into its spare capacity). Not to be held across an `.await`.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(Vec::with_capacity(SCRATCH_BYTES));
    }
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        f(scratch)
    })
}

/// Waits for `tcp` and appends what it has to `buf` (`read_appending`).
pub(super) async fn read_drain_appending(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        match read_appending(buf, |scratch| try_read_drain(tcp, scratch)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return read,
        }
    }
}

/// Waits for `tcp` and reads what it has (`try_read_drain`).
pub(super) async fn read_drain<B: BufMut>(tcp: &TcpStream, buf: &mut B) -> io::Result<usize> {
    loop {
        tcp.readable().await?;
        match try_read_drain(tcp, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return read,
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsConn {
    /// The handshake on `tcp`, to its end.
    pub(super) async fn accept(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsConn> {
        let tls = rustls::ServerConnection::new(config).map_err(invalid)?;
        let mut c = TlsConn {
            tcp,
            tls,
            plaintext: false,
            eof: false,
            close_sent: false,
        };
        while c.tls.is_handshaking() {
            if c.tls.wants_write() {
                std::future::poll_fn(|cx| c.poll_flush_tls(cx)).await?;
                continue;
            }
            c.tcp.readable().await?;
            match c.tls.read_tls(&mut Socket(&c.tcp)) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed during the TLS handshake",
                    ))
                }
                Ok(_) => {
                    if let Err(e) = c.tls.process_new_packets() {
                        // The alert saying why, if the socket takes it.
                        let _ = c.tls.write_tls(&mut Socket(&c.tcp));
                        return Err(invalid(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        std::future::poll_fn(|cx| c.poll_flush_tls(cx)).await?;
        // The client may have sent its first request with its last handshake message.
        c.plaintext = true;
        Ok(c)
    }

    /// Decrypted bytes into `out`, reading records from the socket as needed: `Ok(0)` at
    /// the end (with or without the client's `close_notify`), `WouldBlock` when the socket
    /// has nothing more.
    fn try_read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(out) {
                Ok(n) => {
                    self.plaintext = n == out.len() && n > 0;
                    return Ok(n);
                }
                // The socket closed with no close_notify: most clients end so.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.eof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plaintext = false,
                Err(e) => return Err(e),
            }
            if self.tls.read_tls(&mut Socket(&self.tcp))? == 0 {
                self.eof = true;
            }
            if let Err(e) = self.tls.process_new_packets() {
                let _ = self.tls.write_tls(&mut Socket(&self.tcp));
                return Err(invalid(e));
            }
            // Anything rustls has to answer (a key update) goes out now if it can.
            self.try_flush_tls()?;
        }
    }

    /// Encrypts what rustls takes of `buf` (after sending what it held) and sends it.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_flush_tls()?;
        if self.tls.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.tls.writer().write(buf)?;
        self.try_flush_tls()?;
        Ok(n)
    }

    /// Sends what rustls holds, as much as the socket takes now.
    fn try_flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut Socket(&self.tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends all rustls holds, waiting for the socket.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            self.try_flush_tls()?;
            if !self.tls.wants_write() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }
}

impl Conn {
    pub(super) fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Tcp(s) => s,
            Conn::Tls(t) => &t.tcp,
        }
    }

    /// Waits until reading may give something.
    pub(super) async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Tls(t) if t.plaintext => Ok(()),
            _ => self.tcp().readable().await,
        }
    }

    /// `readable` as a poll, for a loop that waits on several things without a future for
    /// each (`ws_relay::relay`): one task may wait on it at a time.
    pub(super) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Tls(t) if t.plaintext => Poll::Ready(Ok(())),
            _ => self.tcp().poll_read_ready(cx),
        }
    }

    /// Ready when the socket can take more (see `poll_readable`).
    pub(super) fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_write_ready(cx)
    }

    /// Reads what is there into `buf`'s spare capacity, without waiting.
    pub(super) fn try_read_buf<B: BufMut>(&mut self, buf: &mut B) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => try_read_drain(s, buf),
            Conn::Tls(t) => {
                let mut chunk = [0u8; 16 * 1024];
                let room = buf.chunk_mut().len().min(chunk.len());
                let n = t.try_read(&mut chunk[..room])?;
                buf.put_slice(&chunk[..n]);
                Ok(n)
            }
        }
    }

    /// Writes what the connection takes of `buf` now, without waiting.
    pub(super) fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.try_write(buf),
            Conn::Tls(t) => t.try_write(buf),
        }
    }

    /// Bytes taken by `try_write` not sent yet (TLS records the socket did not take).
    pub(super) fn wants_flush(&self) -> bool {
        match self {
            Conn::Tcp(_) => false,
            Conn::Tls(t) => t.tls.wants_write(),
        }
    }

    /// Sends what `try_write` left, as much as the socket takes now.
    pub(super) fn try_flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(_) => Ok(()),
            Conn::Tls(t) => t.try_flush_tls(),
        }
    }

    /// All of `buf`, sent: over TLS, its records flushed too.
    pub(super) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await?;
        AsyncWriteExt::flush(self).await
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(t) => loop {
                match t.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(t.tcp.poll_read_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(t) => {
                ready!(t.poll_flush_tls(cx))?;
                let n = t.tls.writer().write(buf)?;
                t.try_flush_tls()?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(t) => {
                ready!(t.poll_flush_tls(cx))?;
                let n = t.tls.writer().write_vectored(bufs)?;
                t.try_flush_tls()?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(t) => t.poll_flush_tls(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(t) => {
                if !t.close_sent {
                    t.close_sent = true;
                    t.tls.send_close_notify();
                }
                ready!(t.poll_flush_tls(cx))?;
                Pin::new(&mut t.tcp).poll_shutdown(cx)
            }
        }
    }
}
