//! Fuzzing on stable Rust: property tests over arbitrary bytes and over structure-aware
//! inputs for every decoder that takes outside input — commands (decode, verify, filter),
//! pipeline files, Consul answers (health, state records), Redis counts and acks. Each must
//! not panic, and must accept or refuse with an error.
//!
//! CI runs 256 cases of each. The long run (BENCHMARKS.md):
//! `PROPTEST_CASES=1000000 cargo test --release --test fuzz`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use proptest::prelude::*;
use rebalancer::agent::{CommandFilter, Here};
use rebalancer::config;
use rebalancer::contract::consul::Fetched;
use rebalancer::contract::protocol::{Ack, Command, MAX_COMMAND_BYTES};
use rebalancer::contract::signing::CommandKeys;
use rebalancer::fleet::source::{consul_health, redis_sessions};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn fetched(body: Vec<u8>, found: bool) -> Fetched {
    Fetched {
        index: 7,
        found,
        body: body.into(),
    }
}

fn keys() -> CommandKeys {
    CommandKeys::parse(
        "fuzz",
        "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    )
    .unwrap()
}

/// A value for a JSON field: mostly plausible, sometimes absurd.
fn json_scalar() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        ".{0,80}".prop_map(serde_json::Value::from),
        "[a-z0-9._-]{1,70}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
    ]
}

/// A command-shaped JSON object: the real field names with arbitrary values, some missing,
/// some extra.
fn command_json() -> impl Strategy<Value = String> {
    let fields = [
        "v",
        "id",
        "kind",
        "server",
        "count",
        "epoch",
        "issued_at_ms",
        "expires_at_ms",
        "kid",
        "sig",
        "extra",
    ];
    proptest::collection::vec((0..fields.len(), json_scalar()), 0..14).prop_map(move |kv| {
        let mut m = serde_json::Map::new();
        for (i, v) in kv {
            m.insert(fields[i].to_string(), v);
        }
        serde_json::Value::Object(m).to_string()
    })
}

/// A Consul health answer: entries with arbitrary IDs, addresses, ports, meta and checks.
fn health_json() -> impl Strategy<Value = String> {
    let entry = (
        ".{0,40}",
        ".{0,40}",
        any::<i64>(),
        proptest::collection::hash_map("[a-z_]{1,14}", ".{0,24}", 0..4),
        proptest::collection::vec(("passing|warning|critical|.{0,8}", ".{0,12}"), 0..3),
    )
        .prop_map(|(id, address, port, meta, checks)| {
            serde_json::json!({
                "Node": {"Address": address},
                "Service": {"ID": id, "Address": address, "Port": port, "Meta": meta},
                "Checks": checks.into_iter()
                    .map(|(s, o)| serde_json::json!({"Status": s, "Output": o}))
                    .collect::<Vec<_>>(),
            })
        });
    proptest::collection::vec(entry, 0..6).prop_map(|v| serde_json::Value::from(v).to_string())
}

/// A pipeline file: real sections and keys, arbitrary values.
fn pipeline_toml() -> impl Strategy<Value = String> {
    let keys = [
        ("", "name"),
        ("", "service"),
        ("", "dry_run"),
        ("consul", "address"),
        ("consul", "wait"),
        ("redis", "url"),
        ("redis", "reconcile"),
        ("redis", "count_ttl"),
        ("debounce", "quiet"),
        ("debounce", "max_delay"),
        ("rebalance", "tolerance"),
        ("rebalance", "max_shed"),
        ("rebalance", "round_interval"),
        ("rebalance", "command_ttl"),
        ("scale", "scale_out_at"),
        ("scale", "scale_in_at"),
        ("scale", "min_servers"),
        ("scale", "max_servers"),
        ("scale", "cooldown"),
        ("safety", "max_capacity"),
        ("leader", "session_ttl"),
        ("metrics", "listen"),
        ("gateway", "listen"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[0-9]{1,25}(ms|s|m|h|d|y)?".prop_map(|s| format!("{s:?}")),
        ".{0,30}".prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
    ];
    proptest::collection::vec((0..keys.len(), value), 0..12).prop_map(move |kv| {
        let mut sections: HashMap<&str, Vec<String>> = HashMap::new();
        for (i, v) in kv {
            let (section, key) = keys[i];
            sections
                .entry(section)
                .or_default()
                .push(format!("{key} = {v}"));
        }
        let mut text = sections.remove("").unwrap_or_default().join("\n") + "\n";
        for (section, lines) in sections {
            let _ = write!(text, "[{section}]\n{}\n", lines.join("\n"));
        }
        text
    })
}

/// What a server does with one payload off the channel, as the agent does it.
fn receive(filter: &mut CommandFilter, payload: &str) {
    if payload.len() > MAX_COMMAND_BYTES {
        return;
    }
    if let Ok(c) = serde_json::from_str::<Command>(payload) {
        let here = Here {
            sessions: 10,
            capacity: 100,
            cordoned: false,
        };
        let _ = filter.check(&c, 1_795_000_000_000, here);
        let _ = keys().verify(&c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn commands_as_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut f = CommandFilter::new("s1", 64).with_keys(Some(keys()));
        receive(&mut f, &String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn commands_as_json_of_the_right_shape(payload in command_json()) {
        let mut signed = CommandFilter::new("s1", 64).with_keys(Some(keys()));
        let mut open = CommandFilter::new("s1", 64);
        receive(&mut signed, &payload);
        receive(&mut open, &payload);
        if let Ok(mut c) = serde_json::from_str::<Command>(&payload) {
            // Whatever it holds, a command signed here verifies here.
            keys().sign(&mut c);
            prop_assert_eq!(keys().verify(&c), Ok(()));
        }
    }

    #[test]
    fn pipeline_files_as_arbitrary_text(text in ".{0,400}") {
        let _ = config::parse(Path::new("fuzz.toml"), &text, &|_| None);
    }

    #[test]
    fn pipeline_files_of_the_right_shape(text in pipeline_toml()) {
        match config::parse(Path::new("fuzz.toml"), &text, &|_| None) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn consul_health_answers_as_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        found in any::<bool>(),
    ) {
        let _ = consul_health::parse("/v1/health/service/ws", &fetched(bytes, found));
    }

    #[test]
    fn consul_health_answers_of_the_right_shape(body in health_json()) {
        let list = consul_health::parse("/v1/health/service/ws", &fetched(body.into_bytes(), true))
            .expect("well-formed JSON of the right shape is an answer");
        for i in &list.instances {
            prop_assert!(rebalancer::contract::protocol::valid_server_id(&i.id));
            prop_assert!(consul_health::valid_address(&i.address));
        }
    }

    #[test]
    fn consul_state_records_as_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        key in ".{0,40}",
    ) {
        let _ = rebalancer::contract::states::read_state(&bytes);
        let body = serde_json::json!([{"Key": format!("rebalancer/ws/servers/{key}"),
            "Value": base64_of(&bytes), "ModifyIndex": 3}]).to_string();
        let _ = rebalancer::contract::states::parse(
            "ws", "/v1/kv/rebalancer/ws/servers/?recurse=true", &fetched(body.into_bytes(), true));
    }

    #[test]
    fn redis_counts_and_acks_as_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        fields in proptest::collection::hash_map(".{0,12}", ".{0,140}", 0..9),
    ) {
        let _ = redis_sessions::read_count(&bytes);
        let _ = Ack::from_fields(|k| fields.get(k).cloned());
    }
}

/// Base64 as Consul encodes KV values (standard alphabet, padded).
fn base64_of(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
