//! Consul health of the service: registered instances, whether they pass, and their meta.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use serde::Deserialize;

use crate::contract::consul::{Consul, ConsulError, Fetched};
use crate::contract::consul_watch::{consul_fetch, watch, Restarts};
use crate::contract::protocol::{segment, valid_server_id, META_MAX_SESSIONS, META_WEIGHT};
use crate::fleet::topology::ServerId;

/// A registered instance with valid meta.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: ServerId,
    pub address: Arc<str>,
    pub port: u16,
    pub capacity: u32,
    pub weight: f32,
    pub passing: bool,
    /// Not passing only because a check has never run since it was registered (Consul
    /// starts checks critical with no output): starting, not failing.
    pub starting: bool,
}

/// Every instance of the service, split into usable ones and those excluded for bad meta.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthList {
    pub instances: Vec<Instance>,
    /// `(service ID, what is wrong)`.
    pub invalid: Vec<(ServerId, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    node: Node,
    service: Service,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    meta: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
    #[serde(default)]
    output: String,
}

/// Reads `Meta.max_sessions` and `Meta.weight`, or says what is wrong with them.
pub fn read_meta<S: std::hash::BuildHasher + Default>(
    meta: Option<&HashMap<String, String, S>>,
) -> Result<(u32, f32), String> {
    let empty = HashMap::default();
    let meta = meta.unwrap_or(&empty);
    let capacity = match meta.get(META_MAX_SESSIONS) {
        None => return Err(format!("Meta.{META_MAX_SESSIONS} is missing")),
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "Meta.{META_MAX_SESSIONS} = {v:?} is not a positive integer"
                ))
            }
        },
    };
    let weight = match meta.get(META_WEIGHT) {
        None => 1.0,
        Some(v) => match v.trim().parse::<f32>() {
            Ok(w) if w.is_finite() && w > 0.0 && w <= 1000.0 => w,
            _ => {
                return Err(format!(
                    "Meta.{META_WEIGHT} = {v:?} is not a number in (0, 1000]"
                ))
            }
        },
    };
    Ok((capacity, weight))
}

/// An IP address, or a hostname of RFC 1123 labels: where a health check or a proxied
/// connection may be sent. Anything else (a URL, a path, a port) is invalid meta.
pub fn valid_address(a: &str) -> bool {
    if a.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !a.is_empty()
        && a.len() <= 253
        && a.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses an answer of `/v1/health/service/<svc>`.
pub fn parse(path: &str, f: &Fetched) -> Result<HealthList, ConsulError> {
    // Entry by entry: one registration Consul holds but we cannot read (a port out of
    // range, a field of the wrong type) is excluded alone, not the whole answer.
    let raw: Vec<serde_json::Value> = if f.found {
        Consul::decode(path, &f.body)?
    } else {
        Vec::new()
    };
    let mut out = HealthList::default();
    for value in raw {
        let e: Entry = match serde_json::from_value(value.clone()) {
            Ok(e) => e,
            Err(why) => {
                let id = value
                    .pointer("/Service/ID")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("?");
                let shown: String = id.chars().take(64).collect();
                out.invalid
                    .push((shown.as_str().into(), format!("unreadable entry: {why}")));
                continue;
            }
        };
        if !valid_server_id(&e.service.id) {
            let shown: String = e.service.id.chars().take(64).collect();
            out.invalid.push((
                shown.as_str().into(),
                format!("service ID {shown:?} is not 1 to 128 of [A-Za-z0-9._-]"),
            ));
            continue;
        }
        let id: ServerId = e.service.id.as_str().into();
        let address = if e.service.address.is_empty() {
            e.node.address
        } else {
            e.service.address
        };
        if !valid_address(&address) {
            let shown: String = address.chars().take(64).collect();
            out.invalid.push((
                id,
                format!("Address {shown:?} is not an IP address or a hostname"),
            ));
            continue;
        }
        match read_meta(e.service.meta.as_ref()) {
            Ok((capacity, weight)) => {
                out.instances.push(Instance {
                    id,
                    address: address.into(),
                    port: e.service.port,
                    capacity,
                    weight,
                    passing: e.checks.iter().all(|c| c.status == "passing"),
                    starting: e.checks.iter().any(|c| c.status != "passing")
                        && e.checks
                            .iter()
                            .all(|c| c.status == "passing" || c.output.is_empty()),
                });
            }
            Err(why) => out.invalid.push((id, why)),
        }
    }
    out.instances.sort_by(|a, b| a.id.cmp(&b.id));
    out.instances.dedup_by(|a, b| a.id == b.id);
    out.invalid.sort();
    Ok(out)
}

/// Streams the health of `service` each time it changes.
pub fn stream(
    consul: Consul,
    service: &str,
    wait: Duration,
    restarts: Restarts,
) -> impl Stream<Item = Result<HealthList, ConsulError>> {
    let path = format!("/v1/health/service/{}", segment(service));
    let p2 = path.clone();
    watch(consul_fetch(consul, path, wait, restarts), move |f| {
        parse(&p2, f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_that_cannot_be_read_is_excluded_alone() {
        let body = r#"[
            {"Node":{"Address":"127.0.0.1"},"Service":{"ID":"bad","Port":70000,"Meta":{"max_sessions":"10"}},"Checks":[]},
            {"Node":{"Address":"127.0.0.1"},"Service":{"ID":"good","Port":9000,"Meta":{"max_sessions":"10"}},"Checks":[]}
        ]"#;
        let h = parse("/v1/health/service/ws", &fetched(body)).unwrap();
        assert_eq!(h.instances.len(), 1);
        assert_eq!(&*h.instances[0].id, "good");
        assert_eq!(&*h.invalid[0].0, "bad");
        assert!(
            h.invalid[0].1.contains("unreadable entry"),
            "{:?}",
            h.invalid
        );
    }

    #[test]
    fn addresses_are_ips_or_hostnames() {
        for good in ["127.0.0.1", "::1", "ws-1.example.com", "localhost", "a1"] {
            assert!(valid_address(good), "{good:?}");
        }
        for bad in [
            "",
            "http://10.0.0.1/x",
            "127.0.0.1:80",
            "a..b",
            "-a.b",
            "a_b",
            "a b",
            "a/b",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
    }

    fn fetched(body: &str) -> Fetched {
        Fetched {
            index: 1,
            found: true,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn instances_with_bad_meta_are_excluded_with_a_reason() {
        let body = r#"[
          {"Node":{"Address":"127.0.0.2"},"Service":{"ID":"a","Address":"","Port":9001,"Meta":{"max_sessions":"100","weight":"2"}},
           "Checks":[{"Status":"passing"},{"Status":"passing"}]},
          {"Node":{"Address":"127.0.0.1"},"Service":{"ID":"b","Address":"127.0.0.1","Port":9002,"Meta":{"max_sessions":"lots"}},"Checks":[]},
          {"Node":{"Address":"127.0.0.1"},"Service":{"ID":"c","Address":"127.0.0.1","Port":9003,"Meta":null},"Checks":[]},
          {"Node":{"Address":"127.0.0.1"},"Service":{"ID":"d","Address":"127.0.0.1","Port":9004,"Meta":{"max_sessions":"10"}},
           "Checks":[{"Status":"passing"},{"Status":"critical"}]}
        ]"#;
        let h = parse("/v1/health/service/ws", &fetched(body)).unwrap();
        assert_eq!(h.instances.len(), 2);
        assert_eq!(
            &*h.instances[0].address, "127.0.0.2",
            "falls back to the node address"
        );
        assert_eq!(h.instances[0].capacity, 100);
        assert_eq!(h.instances[0].weight, 2.0);
        assert!(h.instances[0].passing);
        assert!(
            !h.instances[1].passing,
            "one critical check fails the instance"
        );
        assert_eq!(h.invalid.len(), 2);
        assert!(h.invalid[0]
            .1
            .contains("\"lots\" is not a positive integer"));
        assert!(h.invalid[1].1.contains("missing"));
    }

    #[test]
    fn a_check_that_has_never_run_is_starting_not_failing() {
        // As Consul 1.8 answers right after a registration: critical, with no output yet.
        let entry = |id: &str, checks: &str| {
            format!(
                r#"{{"Node":{{"Address":"127.0.0.1"}},"Service":{{"ID":"{id}","Port":1,"Meta":{{"max_sessions":"10"}}}},"Checks":{checks}}}"#
            )
        };
        let serf = r#"{"Status":"passing","Output":"Agent alive and reachable"}"#;
        let body = format!(
            "[{},{},{}]",
            entry(
                "fresh",
                &format!(r#"[{serf},{{"Status":"critical","Output":""}}]"#)
            ),
            entry(
                "failing",
                &format!(r#"[{serf},{{"Status":"critical","Output":"HTTP GET: 503"}}]"#)
            ),
            entry(
                "up",
                &format!(r#"[{serf},{{"Status":"passing","Output":"200"}}]"#)
            ),
        );
        let h = parse("/v1/health/service/ws", &fetched(&body)).unwrap();
        let got: Vec<(&str, bool, bool)> = h
            .instances
            .iter()
            .map(|i| (&*i.id, i.passing, i.starting))
            .collect();
        assert_eq!(
            got,
            vec![
                ("failing", false, false),
                ("fresh", false, true),
                ("up", true, false)
            ]
        );
    }

    #[test]
    fn a_body_that_is_not_consul_json_is_an_error_naming_the_url() {
        let e = parse("/v1/health/service/ws", &fetched("<html>")).unwrap_err();
        assert!(e.to_string().contains("/v1/health/service/ws"), "{e}");
    }
}
