//! Server state records in Consul KV (`rebalancer/<svc>/servers/<id>`): how they read, for
//! the controller's source and for every role that watches its own or the fleet's state.

use base64::Engine;
use serde::Deserialize;

use super::consul::{Consul, ConsulError, Fetched};
use super::protocol::{state_prefix, AdminState, StateRecord};

/// A server's id: its Consul service ID.
pub type ServerId = std::sync::Arc<str>;

/// A server's administrative state as read from its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    Active,
    Cordoned {
        since_ms: u64,
        /// Cordoned by an operator: never reactivated (nor reaped) by the controller.
        by_operator: bool,
    },
    /// The KV record exists but cannot be read: treated like an unknown count.
    Unknown,
}

/// Every state record under the prefix. Unreadable ones are `Admin::Unknown` and listed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateList {
    pub states: Vec<(ServerId, Admin)>,
    pub invalid: Vec<(ServerId, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

/// Reads one state record's raw bytes.
pub fn read_state(raw: &[u8]) -> Result<Admin, String> {
    let rec: StateRecord = serde_json::from_slice(raw).map_err(|e| {
        format!(
            "not a state record ({e}): {:?}",
            String::from_utf8_lossy(raw)
        )
    })?;
    Ok(match rec.state {
        AdminState::Active => Admin::Active,
        AdminState::Cordoned => Admin::Cordoned {
            since_ms: rec.since_ms,
            by_operator: rec.by_operator(),
        },
    })
}

/// Parses an answer of `/v1/kv/<prefix>?recurse` (404: no keys, everything active).
pub fn parse(service: &str, path: &str, f: &Fetched) -> Result<StateList, ConsulError> {
    let mut out = StateList::default();
    if !f.found {
        return Ok(out);
    }
    let prefix = state_prefix(service);
    let entries: Vec<KvEntry> = Consul::decode(path, &f.body)?;
    for e in entries {
        let Some(id) = e.key.strip_prefix(&prefix) else {
            continue;
        };
        if id.is_empty() || id.contains('/') {
            continue;
        }
        let id: ServerId = id.into();
        let raw = e
            .value
            .as_deref()
            .map(|v| base64::engine::general_purpose::STANDARD.decode(v))
            .transpose();
        let admin = match raw {
            Ok(Some(bytes)) => read_state(&bytes),
            Ok(None) => Err("empty value".to_string()),
            Err(e) => Err(format!("value is not base64 ({e})")),
        };
        match admin {
            Ok(a) => out.states.push((id, a)),
            Err(why) => {
                out.states.push((id.clone(), Admin::Unknown));
                out.invalid.push((id, why));
            }
        }
    }
    out.states.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn states_are_read_and_garbage_is_unknown_not_active() {
        let body = format!(
            r#"[{{"Key":"rebalancer/ws/servers/a","Value":"{}"}},
                {{"Key":"rebalancer/ws/servers/b","Value":"{}"}},
                {{"Key":"rebalancer/ws/servers/c","Value":"{}"}},
                {{"Key":"rebalancer/ws/servers/d/extra","Value":null}}]"#,
            b64(r#"{"state":"cordoned","since_ms":7,"reason":"scale-in"}"#),
            b64(r#"{"state":"active"}"#),
            b64("cordon please"),
        );
        let f = Fetched {
            index: 3,
            found: true,
            body: body.into(),
        };
        let s = parse("ws", "/v1/kv/x", &f).unwrap();
        assert_eq!(
            s.states,
            vec![
                (
                    "a".into(),
                    Admin::Cordoned {
                        since_ms: 7,
                        by_operator: false
                    }
                ),
                ("b".into(), Admin::Active),
                ("c".into(), Admin::Unknown)
            ]
        );
        assert_eq!(s.invalid.len(), 1);
    }

    #[test]
    fn no_keys_means_everything_is_active() {
        let f = Fetched {
            index: 3,
            found: false,
            body: bytes::Bytes::new(),
        };
        assert_eq!(parse("ws", "/v1/kv/x", &f).unwrap(), StateList::default());
    }
}
