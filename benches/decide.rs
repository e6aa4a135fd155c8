//! `decide()` and the snapshot fold over 1,000 / 10,000 / 100,000 servers.
//!
//! Run: `cargo bench --bench decide`. Results are recorded in BENCHMARKS.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rebalancer::controller::decide::{decide, Capabilities, DecideConfig, History};
use rebalancer::fleet::events::Events;
use rebalancer::fleet::fold::{Fold, Limits};
use rebalancer::fleet::source::{Change, HealthList, Instance, SessionsUpdate, Stamped, StateList};
use rebalancer::fleet::topology::Topology;
use tokio::time::Instant;

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

type Counts = Vec<(rebalancer::fleet::topology::ServerId, Result<u64, String>)>;

/// A fleet with mixed capacities, a tenth of it fresh and empty, as after a scale-out.
fn inputs(n: usize) -> (HealthList, Counts) {
    let mut rng = StdRng::seed_from_u64(n as u64);
    let mut instances = Vec::with_capacity(n);
    let mut counts = Vec::with_capacity(n);
    for i in 0..n {
        let id: rebalancer::fleet::topology::ServerId = format!("server-{i:06}").into();
        let capacity = [500u32, 1000, 2000][i % 3];
        let sessions = if i % 10 == 0 {
            0
        } else {
            rng.random_range(0..=u64::from(capacity))
        };
        instances.push(Instance {
            id: id.clone(),
            address: "127.0.0.1".into(),
            port: 9000,
            capacity,
            weight: 1.0,
            passing: true,
            starting: false,
        });
        counts.push((id, Ok(sessions)));
    }
    (
        HealthList {
            instances,
            invalid: Vec::new(),
        },
        counts,
    )
}

fn batch(health: HealthList, counts: Counts) -> Vec<Stamped> {
    let at = Instant::now();
    vec![
        Stamped {
            at,
            change: Change::Health(health),
        },
        Stamped {
            at,
            change: Change::States(StateList::default()),
        },
        Stamped {
            at,
            change: Change::Sessions(SessionsUpdate::Resync(counts)),
        },
    ]
}

fn snapshot(n: usize) -> std::sync::Arc<Topology> {
    let (health, counts) = inputs(n);
    let (mut fold, _rx) = Fold::new(Events::new("bench"), Limits::default());
    fold.apply(batch(health, counts)).expect("a first snapshot")
}

fn bench_decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    let cfg = DecideConfig::default();
    for n in SIZES {
        let t = snapshot(n);
        let history = History::default();
        let now = Instant::now();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &t, |b, t| {
            b.iter(|| {
                black_box(decide(
                    black_box(t),
                    &cfg,
                    Capabilities::default(),
                    now,
                    &history,
                ))
            });
        });
    }
    g.finish();
}

fn bench_fold(c: &mut Criterion) {
    let mut g = c.benchmark_group("fold_full_resync");
    for n in SIZES {
        let (health, counts) = inputs(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || {
                    (
                        Fold::new(Events::new("bench"), Limits::default()),
                        batch(health.clone(), counts.clone()),
                    )
                },
                |((mut fold, _rx), batch)| black_box(fold.apply(batch)),
                criterion::BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

fn bench_fold_one_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("fold_one_count_change");
    for n in SIZES {
        let (health, counts) = inputs(n);
        let (mut fold, _rx) = Fold::new(Events::new("bench"), Limits::default());
        fold.apply(batch(health, counts));
        let mut v = 0u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                v += 1;
                let change = Change::Sessions(SessionsUpdate::Patch {
                    changes: vec![("server-000001".into(), Some(Ok(v)))],
                    noticed_at: Instant::now(),
                    notifications: 1,
                });
                black_box(fold.apply(vec![Stamped {
                    at: Instant::now(),
                    change,
                }]))
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench_decide, bench_fold, bench_fold_one_change
}
criterion_main!(benches);
