//! How the gateway tells a server who its client was, pure: `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host` and the standard `Forwarded` (RFC 7239), set
//! from the connection's peer. A client's own forwarding headers are believed only when it
//! is a proxy in `trusted_proxies`; from anyone else they are dropped, so that the left-most
//! `X-Forwarded-For` a server sees is never one a client made up.

use std::net::IpAddr;

use ipnet::IpNet;

/// The forwarding headers a client sent: every one is replaced, none passed on as is.
pub(super) const FORWARDING: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// What the client sent of them.
#[derive(Debug, Default)]
pub(super) struct Prior<'a> {
    pub host: Option<&'a [u8]>,
    pub xff: Vec<&'a [u8]>,
    pub proto: Option<&'a [u8]>,
    pub xhost: Option<&'a [u8]>,
    pub forwarded: Vec<&'a [u8]>,
}

impl<'a> Prior<'a> {
    /// Notes one header of the client's request, if it is one of these (or `Host`).
    pub(super) fn note(&mut self, name: &str, value: &'a [u8]) {
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case("host") {
            self.host = Some(value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            self.xff.push(value);
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            self.proto = Some(value);
        } else if name.eq_ignore_ascii_case("x-forwarded-host") {
            self.xhost = Some(value);
        } else if name.eq_ignore_ascii_case("forwarded") {
            self.forwarded.push(value);
        }
    }
}

/// The gateway's rules for the forwarding headers.
#[derive(Debug, Clone)]
pub(super) struct Forwarding {
    trusted: Vec<IpNet>,
    /// `http`, or `https` on a TLS listener.
    proto: &'static str,
}

impl Forwarding {
    pub(super) fn new(trusted: Vec<IpNet>, tls: bool) -> Forwarding {
        Forwarding {
            trusted,
            proto: if tls { "https" } else { "http" },
        }
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|net| net.contains(&peer))
    }

    /// Appends the four headers, as lines, for a request from `peer`.
    pub(super) fn write(&self, peer: IpAddr, prior: &Prior<'_>, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // Written straight into `out`: this runs for every request on the fast path.
        let trusted = self.trusts(peer);
        let peer = peer.to_canonical();
        let host = prior.host.unwrap_or_default();
        out.extend_from_slice(b"x-forwarded-for: ");
        if trusted {
            for v in prior.xff.iter().filter(|v| !v.is_empty()) {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        }
        let _ = write!(out, "{peer}\r\nx-forwarded-proto: ");
        match prior.proto {
            Some(p) if trusted && !p.is_empty() => out.extend_from_slice(p),
            _ => out.extend_from_slice(self.proto.as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        let xhost = match prior.xhost {
            Some(h) if trusted && !h.is_empty() => h,
            _ => host,
        };
        if !xhost.is_empty() {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(xhost);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"forwarded: ");
        if trusted {
            for v in prior.forwarded.iter().filter(|v| !v.is_empty()) {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        }
        let _ = match peer {
            IpAddr::V4(_) => write!(out, "for={peer}"),
            IpAddr::V6(_) => write!(out, "for=\"[{peer}]\""),
        };
        if !host.is_empty() {
            out.extend_from_slice(b";host=");
            quoted(host, out);
        }
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(self.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// The four headers as name and value, for hyper's header map.
    pub(super) fn pairs(&self, peer: IpAddr, prior: &Prior<'_>) -> Vec<(String, Vec<u8>)> {
        let mut lines = Vec::new();
        self.write(peer, prior, &mut lines);
        lines
            .split(|b| *b == b'\n')
            .filter_map(|l| {
                let l = l.strip_suffix(b"\r")?;
                let at = l.windows(2).position(|w| w == b": ")?;
                Some((
                    String::from_utf8_lossy(&l[..at]).into_owned(),
                    l[at + 2..].to_vec(),
                ))
            })
            .collect()
    }
}

/// A quoted-string (RFC 9110 §5.6.4): a host with a port has a colon, which a token may not.
fn quoted(value: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for b in value {
        if matches!(b, b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(*b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: &Forwarding, peer: &str, prior: &Prior<'_>) -> String {
        let mut out = Vec::new();
        f.write(peer.parse().unwrap(), prior, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn prior() -> Prior<'static> {
        let mut p = Prior::default();
        for (n, v) in [
            ("Host", &b"app.example:8080"[..]),
            ("X-Forwarded-For", b"203.0.113.9"),
            ("X-Forwarded-For", b"198.51.100.2"),
            ("X-Forwarded-Proto", b"https"),
            ("X-Forwarded-Host", b"front.example"),
            ("Forwarded", b"for=203.0.113.9;proto=https"),
        ] {
            p.note(n, v);
        }
        p
    }

    #[test]
    fn an_untrusted_clients_forwarding_headers_are_replaced_by_what_the_gateway_saw() {
        let f = Forwarding::new(Vec::new(), false);
        assert_eq!(
            written(&f, "192.0.2.7", &prior()),
            "x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: app.example:8080\r\n\
             forwarded: for=192.0.2.7;host=\"app.example:8080\";proto=http\r\n"
        );
        // No Host: no host anywhere.
        let out = written(&f, "::1", &Prior::default());
        assert_eq!(
            out,
            "x-forwarded-for: ::1\r\nx-forwarded-proto: http\r\nforwarded: for=\"[::1]\";proto=http\r\n"
        );
    }

    #[test]
    fn a_trusted_proxys_chain_is_extended() {
        let f = Forwarding::new(
            vec![
                "198.51.100.0/24".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ],
            true,
        );
        assert_eq!(
            written(&f, "198.51.100.3", &prior()),
            "x-forwarded-for: 203.0.113.9, 198.51.100.2, 198.51.100.3\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: front.example\r\n\
             forwarded: for=203.0.113.9;proto=https, for=198.51.100.3;host=\"app.example:8080\";proto=https\r\n"
        );
        // An IPv4 peer on a dual-stack socket is the same address.
        assert!(
            written(&f, "::ffff:127.0.0.1", &prior()).starts_with("x-forwarded-for: 203.0.113.9")
        );
        assert!(written(&f, "127.0.0.2", &prior()).starts_with("x-forwarded-for: 127.0.0.2\r\n"));
        let pairs = f.pairs("198.51.100.3".parse().unwrap(), &prior());
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[0].0, "x-forwarded-for");
    }
}
