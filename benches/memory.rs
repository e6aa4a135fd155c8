//! Memory per server in the topology snapshot: resident memory before and after building a
//! 100,000-server snapshot with the fold.
//!
//! Run: `cargo bench --bench memory`. Results: BENCHMARKS.md.

use rebalancer::fleet::events::Events;
use rebalancer::fleet::fold::{Fold, Limits};
use rebalancer::fleet::source::{Change, HealthList, Instance, SessionsUpdate, Stamped, StateList};
use tokio::time::Instant;

const N: usize = 100_000;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

fn main() {
    let address: std::sync::Arc<str> = "127.0.0.1".into();
    let before = rss_bytes();
    let instances: Vec<Instance> = (0..N)
        .map(|i| Instance {
            id: format!("server-{i:06}").into(),
            address: address.clone(),
            port: 9000,
            capacity: 1000,
            weight: 1.0,
            passing: true,
            starting: false,
        })
        .collect();
    let counts = instances.iter().map(|i| (i.id.clone(), Ok(500))).collect();
    let (mut fold, _rx) = Fold::new(Events::new("bench"), Limits::default());
    let at = Instant::now();
    let snapshot = fold
        .apply(vec![
            Stamped {
                at,
                change: Change::Health(HealthList {
                    instances,
                    invalid: Vec::new(),
                }),
            },
            Stamped {
                at,
                change: Change::States(StateList::default()),
            },
            Stamped {
                at,
                change: Change::Sessions(SessionsUpdate::Resync(counts)),
            },
        ])
        .expect("a snapshot");
    let after_all = rss_bytes();
    let server = std::mem::size_of::<rebalancer::fleet::topology::Server>();
    // The snapshot's own share: the Server records plus their id strings (shared with the
    // fold's maps, which are counted in the total below).
    let own = N * server + N * (16 + "server-000000".len());
    println!(
        "memory servers={N} snapshot_record={server}B snapshot_per_server~{}B fold+snapshot_per_server={}B (rss {}→{} MiB)",
        own / N,
        (after_all - before) / N as u64,
        before >> 20,
        after_all >> 20
    );
    assert_eq!(snapshot.servers.len(), N);
}
