//! The gateway's per-backend series: counted in each server's state (atomics, no labelled
//! lookup on the hot path) and rendered from the routing table at every scrape, so a
//! server's series appear when it joins and are gone once it leaves the fleet. The rest of
//! the gateway's metrics go through the `metrics` recorder as everywhere else.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::telemetry::{
    GW_BACKEND_UP as BACKEND_UP, GW_CIRCUIT as CIRCUIT, GW_REQUESTS as REQUESTS,
    GW_WS_OPEN as WS_OPEN, METRICS,
};

use super::table::{Backend, Table};

/// What one server's requests came to, and its relayed WebSocket sessions.
#[derive(Debug, Default)]
pub struct BackendCounts {
    pub ok: AtomicU64,
    pub error: AtomicU64,
    /// WebSocket upgrades relayed.
    pub ws: AtomicU64,
    /// WebSocket sessions being relayed now.
    pub ws_open: AtomicU64,
}

/// One WebSocket relayed to a server, counted open until dropped.
pub struct WsOpen<'a>(&'a AtomicU64);

impl<'a> WsOpen<'a> {
    pub fn new(open: &'a AtomicU64) -> WsOpen<'a> {
        open.fetch_add(1, Ordering::Relaxed);
        WsOpen(open)
    }
}

impl Drop for WsOpen<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn header(out: &mut String, name: &str, kind: &str) {
    let help = METRICS
        .iter()
        .find(|(n, ..)| *n == name)
        .map_or("", |(.., help)| *help);
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it.
fn escaped(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How a per-backend gauge reads a server's state.
type Gauge<'a> = dyn Fn(&Backend) -> f64 + 'a;

/// The per-backend families for every server of `table`, and the requests no server could
/// take (`no_backend`).
pub fn render(
    table: &Table,
    no_backend: u64,
    now: Instant,
    breaker_open: Duration,
    out: &mut String,
) {
    header(out, REQUESTS, "counter");
    let _ = writeln!(
        out,
        "{REQUESTS}{{backend=\"none\",outcome=\"no_backend\"}} {no_backend}"
    );
    for slot in &table.all {
        let b = &slot.backend;
        let id = escaped(&b.id);
        for (outcome, n) in [
            ("ok", &b.counts.ok),
            ("ws", &b.counts.ws),
            ("error", &b.counts.error),
        ] {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{REQUESTS}{{backend=\"{id}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    let gauges: [(&str, &Gauge<'_>); 3] = [
        (BACKEND_UP, &|b| if b.up() { 1.0 } else { 0.0 }),
        (CIRCUIT, &|b| b.breaker_state(now, breaker_open).as_f64()),
        (WS_OPEN, &|b| {
            b.counts.ws_open.load(Ordering::Relaxed) as f64
        }),
    ];
    for (name, value) in gauges {
        header(out, name, "gauge");
        for slot in &table.all {
            let b = &slot.backend;
            let _ = writeln!(out, "{name}{{backend=\"{}\"}} {}", escaped(&b.id), value(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escaped(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escaped("x\ny"), "x\\ny");
    }
}
