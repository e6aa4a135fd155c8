//! WebSocket as the gateway relays it, pure: the checks on a client's upgrade request
//! (RFC 6455 §4.2.1), and a scanner that follows one direction of a session frame by frame
//! (§5.2) without touching the payload. The relay passes bytes through as they come; the
//! scanner says how many may pass, where frames begin (so that the gateway's own pings and
//! closes go between them), and when a frame breaks a limit or the protocol. No I/O;
//! `ws_relay.rs` drives it.

use base64::Engine as _;

use super::limits::Limit;

/// Why an upgrade request is answered 400.
pub(super) fn check_upgrade<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<(), &'static str> {
    let (mut key, mut version) = (None, None);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err("more than one Sec-WebSocket-Key");
            }
            key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.is_some() {
                return Err("more than one Sec-WebSocket-Version");
            }
            version = Some(value);
        }
    }
    let key = key.ok_or("no Sec-WebSocket-Key")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key.trim_ascii())
        .map_err(|_| "a Sec-WebSocket-Key that is not base64")?;
    if decoded.len() != 16 {
        return Err("a Sec-WebSocket-Key that is not 16 bytes");
    }
    match version.map(<[u8]>::trim_ascii) {
        Some(b"13") => Ok(()),
        Some(_) => Err("a Sec-WebSocket-Version other than 13"),
        None => Err("no Sec-WebSocket-Version"),
    }
}

/// The answer to an upgrade request that fails `check_upgrade`.
pub(super) fn bad_upgrade(why: &str) -> Vec<u8> {
    let text = format!("not a valid WebSocket upgrade: {why}\n");
    format!(
        "HTTP/1.1 400 Bad Request\r\nsec-websocket-version: 13\r\ncontent-type: text/plain; \
         charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

/// Close codes the gateway sends (RFC 6455 §7.4.1).
pub(super) const GOING_AWAY: u16 = 1001;
pub(super) const PROTOCOL_ERROR: u16 = 1002;
pub(super) const TOO_BIG: u16 = 1009;

/// What a frame broke: the session ends with a close frame with this code to its sender.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Broken {
    /// A limit (`ws_max_frame_bytes`, `ws_max_message_bytes`): 1009.
    Limit(Limit),
    /// The protocol (a client frame not masked, a fragmented control frame, …): 1002.
    Protocol(&'static str),
}

impl Broken {
    pub(super) fn close_code(self) -> u16 {
        match self {
            Broken::Limit(_) => TOO_BIG,
            Broken::Protocol(_) => PROTOCOL_ERROR,
        }
    }

    /// What ended the session, for the access log: the limit's key, or `protocol`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Broken::Limit(l) => l.label(),
            Broken::Protocol(_) => "protocol",
        }
    }

    pub(super) fn reason(self) -> &'static str {
        match self {
            Broken::Limit(Limit::WsFrameBytes) => "frame too big",
            Broken::Limit(_) => "message too big",
            Broken::Protocol(why) => why,
        }
    }
}

/// One direction of a session, frame by frame.
#[derive(Debug, Clone)]
pub(super) struct Frames {
    /// Frames this way must be masked (client to server) or must not be.
    masked: bool,
    max_frame: u64,
    max_message: u64,
    /// Payload bytes of the current frame not yet seen.
    left: u64,
    /// Payload bytes of the data message in progress, and whether one is.
    message: u64,
    in_message: bool,
    /// A close frame has begun.
    pub closed: bool,
    /// The code of the first close frame, when its first two bytes came with its header.
    pub close_code: Option<u16>,
}

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub(super) const MAX_HEADER: usize = 14;

impl Frames {
    pub(super) fn new(masked: bool, max_frame: usize, max_message: usize) -> Frames {
        Frames {
            masked,
            max_frame: max_frame as u64,
            max_message: max_message as u64,
            left: 0,
            message: 0,
            in_message: false,
            closed: false,
            close_code: None,
        }
    }

    /// Between frames: everything passed so far ends with a whole frame.
    pub(super) fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// Follows `data`, the next bytes this way, and returns how many of them may pass now:
    /// all but a frame header cut short at the end, which the caller keeps and gives again
    /// with what follows. `Err((n, why))`: the frame whose header starts at `n` breaks a
    /// rule; the `n` bytes before it may pass, nothing from it on.
    pub(super) fn scan(&mut self, data: &[u8]) -> Result<usize, (usize, Broken)> {
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                let n = self.left.min((data.len() - i) as u64);
                self.left -= n;
                i += n as usize;
                continue;
            }
            let Some((header_len, len)) = self.header(&data[i..]).map_err(|why| (i, why))? else {
                return Ok(i);
            };
            let closing = data[i] & 0x0f == 0x8;
            if closing && self.close_code.is_none() && len >= 2 && data.len() >= i + header_len + 2
            {
                let at = i + header_len;
                let mut code = [data[at], data[at + 1]];
                if data[i + 1] & 0x80 != 0 {
                    let key = &data[at - 4..at];
                    code = [code[0] ^ key[0], code[1] ^ key[1]];
                }
                self.close_code = Some(u16::from_be_bytes(code));
            }
            i += header_len;
            self.left = len;
        }
        Ok(i)
    }

    /// The frame header at the start of `h`: its length and the payload's, once whole.
    fn header(&mut self, h: &[u8]) -> Result<Option<(usize, u64)>, Broken> {
        if h.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv_opcode, masked, len7) =
            (h[0] & 0x80 != 0, h[0] & 0x7f, h[1] & 0x80 != 0, h[1] & 0x7f);
        let opcode = rsv_opcode & 0x0f;
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + extended + if masked { 4 } else { 0 };
        if h.len() < header_len {
            return Ok(None);
        }
        let len = match extended {
            0 => u64::from(len7),
            2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            _ => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
        };
        if masked != self.masked {
            return Err(Broken::Protocol(if self.masked {
                "a client frame not masked"
            } else {
                "a masked server frame"
            }));
        }
        match opcode {
            0x8..=0xa => {
                if !fin || len > 125 {
                    return Err(Broken::Protocol("a fragmented or long control frame"));
                }
                if opcode == 0x8 {
                    self.closed = true;
                }
            }
            0x0..=0x2 => {
                if (opcode == 0) != self.in_message {
                    return Err(Broken::Protocol("a fragment out of its message"));
                }
                if len > self.max_frame {
                    return Err(Broken::Limit(Limit::WsFrameBytes));
                }
                self.message += len;
                if self.message > self.max_message {
                    return Err(Broken::Limit(Limit::WsMessageBytes));
                }
                self.in_message = !fin;
                if fin {
                    self.message = 0;
                }
            }
            _ => return Err(Broken::Protocol("a reserved opcode")),
        }
        Ok(Some((header_len, len)))
    }
}

/// A control frame of the gateway's own: masked with `mask` when it goes to a server.
fn control(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    debug_assert!(payload.len() <= 125);
    let mut f = Vec::with_capacity(6 + payload.len());
    f.push(0x80 | opcode);
    if let Some(key) = mask {
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&key);
        f.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    } else {
        f.push(payload.len() as u8);
        f.extend_from_slice(payload);
    }
    f
}

pub(super) fn ping(mask: Option<[u8; 4]>) -> Vec<u8> {
    control(0x9, b"gw", mask)
}

pub(super) fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    control(0x8, &payload, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, len: usize, mask: bool) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let m = if mask { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 0x7e);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 0x7f);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn an_upgrade_needs_a_16_byte_base64_key_and_version_13() {
        let check = |key: &str, version: &str| {
            check_upgrade(
                [
                    ("Sec-WebSocket-Key", key.as_bytes()),
                    ("Sec-WebSocket-Version", version.as_bytes()),
                ]
                .into_iter(),
            )
        };
        assert_eq!(check("dGhlIHNhbXBsZSBub25jZQ==", "13"), Ok(()));
        assert!(check("not base64!", "13").is_err());
        assert!(check("aGVsbG8=", "13").is_err(), "5 bytes");
        assert!(check("dGhlIHNhbXBsZSBub25jZQ==", "8").is_err());
        assert!(check_upgrade([("Sec-WebSocket-Version", &b"13"[..])].into_iter()).is_err());
        assert!(String::from_utf8(bad_upgrade("x"))
            .unwrap()
            .starts_with("HTTP/1.1 400"));
    }

    #[test]
    fn frames_pass_whole_or_in_pieces_and_a_cut_header_is_held_back() {
        let mut stream = frame(true, 1, 5, true);
        stream.extend(frame(false, 2, 300, true));
        stream.extend(frame(true, 9, 3, true));
        stream.extend(frame(true, 0, 70_000, true));
        let mut whole = Frames::new(true, 1 << 20, 1 << 20);
        assert_eq!(whole.scan(&stream), Ok(stream.len()));
        assert!(whole.at_boundary());
        // Fed in pieces of 3, the caller keeping what was held back: the same bytes pass.
        let mut pieces = Frames::new(true, 1 << 20, 1 << 20);
        let (mut kept, mut passed) = (Vec::new(), 0);
        for chunk in stream.chunks(3) {
            kept.extend_from_slice(chunk);
            let n = pieces.scan(&kept).unwrap();
            passed += n;
            kept.drain(..n);
            assert!(kept.len() < MAX_HEADER);
        }
        assert_eq!(passed, stream.len());
        assert!(pieces.at_boundary());
    }

    #[test]
    fn frames_and_messages_over_their_limits_are_stopped_at_their_header() {
        let first = frame(true, 1, 10, false);
        let mut stream = first.clone();
        stream.extend(frame(true, 2, 2000, false));
        let mut f = Frames::new(false, 1024, 4096);
        assert_eq!(
            f.scan(&stream),
            Err((first.len(), Broken::Limit(Limit::WsFrameBytes)))
        );
        // Three fragments of 1,000 bytes within a 2,500-byte message limit: the third.
        let mut f = Frames::new(false, 1024, 2500);
        let mut stream = frame(false, 2, 1000, false);
        stream.extend(frame(false, 0, 1000, false));
        let at = stream.len();
        stream.extend(frame(true, 0, 1000, false));
        assert_eq!(
            f.scan(&stream),
            Err((at, Broken::Limit(Limit::WsMessageBytes)))
        );
        // A message ends with its FIN: the next one counts from zero.
        let mut f = Frames::new(false, 1024, 1500);
        let mut stream = frame(true, 2, 1000, false);
        stream.extend(frame(true, 2, 1000, false));
        assert_eq!(f.scan(&stream), Ok(stream.len()));
    }

    #[test]
    fn protocol_errors_are_named_and_close_frames_are_seen() {
        let broken =
            |masked: bool, bytes: Vec<u8>| Frames::new(masked, 1 << 20, 1 << 20).scan(&bytes);
        assert!(matches!(
            broken(true, frame(true, 1, 3, false)),
            Err((0, Broken::Protocol(_)))
        ));
        assert!(matches!(
            broken(false, frame(true, 1, 3, true)),
            Err((0, Broken::Protocol(_)))
        ));
        assert!(matches!(
            broken(false, frame(false, 9, 3, false)),
            Err((0, Broken::Protocol(_)))
        ));
        assert!(matches!(
            broken(false, frame(true, 0, 3, false)),
            Err((0, Broken::Protocol(_)))
        ));
        assert!(matches!(
            broken(false, frame(true, 3, 3, false)),
            Err((0, Broken::Protocol(_)))
        ));
        let mut f = Frames::new(false, 1 << 20, 1 << 20);
        let c = close(1000, "bye", None);
        assert_eq!(f.scan(&c), Ok(c.len()));
        assert!(f.closed);
        assert_eq!(f.close_code, Some(1000));
        let mut masked = Frames::new(true, 1 << 20, 1 << 20);
        let c = close(4001, "x", Some([9, 8, 7, 6]));
        assert_eq!(masked.scan(&c), Ok(c.len()));
        assert_eq!(masked.close_code, Some(4001), "unmasked");
        // The gateway's own frames scan as valid frames, masked to a server.
        let mut to_server = Frames::new(true, 1 << 20, 1 << 20);
        let mine = [
            ping(Some([9, 8, 7, 6])),
            close(1009, "message too big", Some([1, 2, 3, 4])),
        ]
        .concat();
        assert_eq!(to_server.scan(&mine), Ok(mine.len()));
        let c = close(1009, "message too big", Some([1, 2, 3, 4]));
        let unmasked: Vec<u8> = c[6..]
            .iter()
            .zip([1u8, 2, 3, 4].iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(&unmasked[..2], &1009u16.to_be_bytes());
        assert_eq!(&unmasked[2..], b"message too big");
    }
}
