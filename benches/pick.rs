//! The gateway's pick over 10 / 100 / 1,000 / 10,000 routable servers: the routing table
//! read without a lock and two servers drawn (power of two choices), so the cost stays flat
//! as the fleet grows. A second group has nine servers in ten full, the worst a pick meets
//! before it scans.
//!
//! Run: `cargo bench --bench pick`. Results are recorded in BENCHMARKS.md.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rebalancer::fleet::topology::{Admin, Count, Server, Topology};
use rebalancer::gateway::route::{choose, Candidate, Kind};
use rebalancer::gateway::table::{PickRules, Table};
use tokio::time::Instant;

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];

const RULES: PickRules = PickRules {
    reservation_ttl: Duration::from_secs(5),
    slow_start: Duration::ZERO,
    breaker_open: Duration::from_secs(10),
};

/// `n` passing, active servers of capacity 1,000; `full_every` of them (every k-th) full.
fn table(n: usize, full_every: Option<usize>) -> Table {
    let servers = (0..n)
        .map(|i| Server {
            id: format!("server-{i:06}").into(),
            address: "127.0.0.1".into(),
            port: 9000,
            capacity: 1_000,
            weight: 1.0,
            passing: true,
            admin: Admin::Active,
            sessions: Count::Known(match full_every {
                Some(k) if i % k != 0 => 1_000,
                _ => (i % 900) as u64,
            }),
            provisioning: false,
            starting: false,
        })
        .collect();
    let t = Topology {
        version: 1,
        servers,
        ..Topology::default()
    };
    Table::build(&t, &mut HashMap::new(), None, Instant::now()).0
}

fn pick(c: &mut Criterion) {
    let mut rng = rand::rng();
    let mut open = c.benchmark_group("pick/request");
    for n in SIZES {
        let t = table(n, None);
        open.bench_with_input(BenchmarkId::from_parameter(n), &t, |b, t| {
            b.iter(|| {
                let now = Instant::now();
                black_box(
                    t.pick(&[], Kind::Request, None, RULES, now, &mut rng)
                        .is_some(),
                )
            });
        });
    }
    open.finish();
    // Session picks reserve a slot; reservations expire at once here so that millions of
    // iterations do not fill the fleet.
    let rules = PickRules {
        reservation_ttl: Duration::ZERO,
        ..RULES
    };
    let mut crowded = c.benchmark_group("pick/session, 9 in 10 servers full");
    for n in SIZES {
        let t = table(n, Some(10));
        crowded.bench_with_input(BenchmarkId::from_parameter(n), &t, |b, t| {
            b.iter(|| {
                let now = Instant::now();
                black_box(
                    t.pick(&[], Kind::Session, None, rules, now, &mut rng)
                        .is_some(),
                )
            });
        });
    }
    crowded.finish();
    // For comparison, what every pick did before the table: a candidate built for every
    // server, then two drawn among them.
    let mut all = c.benchmark_group("pick/request, every server looked at (before)");
    for n in SIZES {
        let cands: Vec<Candidate> = (0..n)
            .map(|i| Candidate {
                sessions: (i % 900) as u64,
                reserved: 0,
                inflight: 0,
                capacity: 1_000,
                weight: 1.0,
                ramp: 1.0,
            })
            .collect();
        all.bench_with_input(BenchmarkId::from_parameter(n), &cands, |b, cands| {
            b.iter(|| {
                let fresh: Vec<Candidate> = cands.clone();
                black_box(choose(&fresh, &[], Kind::Request, &mut rng))
            });
        });
    }
    all.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
