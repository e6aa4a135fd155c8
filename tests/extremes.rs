//! Property: whatever value any pipeline key is given, `check` either refuses it with an error or
//! accepts one that every stage can hold. Each accepted config is run through the stages
//! that do arithmetic on configured values: the debounce, the decision stages and their
//! history, the reconcile interval, a command's expiry.

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use proptest::prelude::*;

use rebalancer::config::raw::{RawDocker, RawGateway, RawPipeline};
use rebalancer::config::{env_overrides, parse, PipelineConfig};
use rebalancer::controller::act::{command_for, ActContext};
use rebalancer::controller::decide::{decide, Action, ActionKind, Capabilities, History};
use rebalancer::fleet::topology::fixtures::{fleet, server};
use rebalancer::stages::StreamStages;

/// Every overridable key's variable with its default, as the file's schema has them.
fn keys() -> Vec<(String, toml::Value)> {
    let mut all = RawPipeline::default();
    all.scale.docker = Some(RawDocker::default());
    all.gateway = Some(RawGateway::default());
    let table = toml::Table::try_from(all).expect("defaults serialize");
    env_overrides()
        .into_iter()
        .map(|(dotted, name)| {
            let mut v = toml::Value::Table(table.clone());
            for k in dotted.split('.') {
                v = v.get(k).cloned().expect("every listed key has a default");
            }
            (name, v)
        })
        .collect()
}

/// Extreme texts for a key whose default is `default`.
fn extremes(default: &toml::Value) -> Vec<String> {
    match default {
        toml::Value::String(s) if humantime::parse_duration(s).is_ok() => [
            "0s",
            "1ns",
            "1ms",
            "7days",
            "7days 1s",
            "18446744073709551615s",
            "584942417355years",
            "-1s",
            "soon",
        ]
        .map(String::from)
        .to_vec(),
        toml::Value::Integer(_) => [i64::MIN, -1, 0, 1, 2, 1_000_000, 100_000_001, i64::MAX]
            .map(|n| n.to_string())
            .to_vec(),
        toml::Value::Float(_) => [
            "-1",
            "0",
            "1e-300",
            "0.5",
            "1",
            "1.0000001",
            "1e308",
            "NaN",
            "inf",
        ]
        .map(String::from)
        .to_vec(),
        _ => Vec::new(),
    }
}

fn cases() -> Vec<(String, String)> {
    keys()
        .into_iter()
        .flat_map(|(name, default)| {
            extremes(&default)
                .into_iter()
                .map(move |v| (name.clone(), v))
        })
        .collect()
}

/// Runs the stages that compute with configured values; panics if one cannot hold them.
fn exercise(cfg: &PipelineConfig) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let batches: Vec<Vec<u32>> = futures::stream::iter(0..3)
            .debounce(cfg.debounce.quiet, cfg.debounce.max_delay)
            .collect()
            .await;
        assert_eq!(batches.concat(), vec![0, 1, 2]);
        let mut reconcile = tokio::time::interval(cfg.redis.reconcile);
        reconcile.tick().await;

        let t = fleet(vec![
            server("a", 100, 90),
            server("b", 100, 10),
            server("c", 100, 0),
        ]);
        let mut h = History::default();
        let t0 = tokio::time::Instant::now();
        let d = &cfg.decide;
        for later in [
            Duration::ZERO,
            d.rebalance.round_interval,
            d.scale.scale_in_after,
            d.scale.cooldown,
            d.scale.reap_after,
            d.scale.provision_timeout.unwrap_or_default(),
        ] {
            let now = t0 + later;
            h.observe(&t, d, now);
            let plan = decide(&t, d, Capabilities::SCALER, now, &h);
            h.record(&plan, &t, now);
        }
        let shed = Action {
            kind: ActionKind::Shed {
                server: "a".into(),
                count: d.rebalance.max_shed,
            },
            reason: "extremes".into(),
        };
        let ctx = ActContext {
            epoch: u64::MAX,
            version: 1,
        };
        let cmd = command_for(&shed, ctx, SystemTime::now(), cfg.command_ttl).expect("a command");
        assert!(cmd.expires_at_ms > cmd.issued_at_ms);
    });
}

/// Checks one set of overrides: refused with errors, or held by every stage.
fn refused_or_held(overrides: &[(String, String)]) {
    let env = |k: &str| {
        overrides
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    match parse(Path::new("p.toml"), "", &env) {
        Ok(cfg) => exercise(&cfg),
        Err(e) => assert!(!e.0.is_empty()),
    }
}

#[test]
fn every_extreme_value_of_every_key_is_refused_or_held() {
    let cases = cases();
    for key in [
        "REBALANCER_DEBOUNCE_MAX_DELAY",
        "REBALANCER_SCALE_MAX_SERVERS",
        "REBALANCER_SAFETY_HALT_UNHEALTHY_FRACTION",
    ] {
        assert!(cases.iter().any(|(k, _)| k == key), "{key} is tried");
    }
    for case in cases {
        refused_or_held(std::slice::from_ref(&case));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_mix_of_extreme_values_is_refused_or_held(
        mix in prop::collection::vec(prop::sample::select(cases()), 1..8)
    ) {
        refused_or_held(&mix);
    }
}

#[test]
fn a_duration_no_clock_can_hold_is_refused_by_check() {
    let env = |k: &str| {
        (k == "REBALANCER_DEBOUNCE_MAX_DELAY").then(|| "18446744073709551615s".to_string())
    };
    let e = parse(Path::new("p.toml"), "", &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("debounce.max_delay"), "{e}");
    assert!(e.contains("7 days"), "{e}");
}
