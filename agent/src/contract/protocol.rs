//! The contract between the controller and connection servers (protocol v1): names and shapes.
//!
//! Everything here is public API. A server built from nothing but `redis-cli` and `curl`
//! takes part by following these names; see `docs/protocol.md`.

use serde::{Deserialize, Serialize};

/// Version carried in every command (`"v"`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Consul service meta key holding a server's capacity (positive integer, required).
pub const META_MAX_SESSIONS: &str = "max_sessions";
/// Consul service meta key holding a server's routing weight (positive number, optional).
pub const META_WEIGHT: &str = "weight";

/// Redis key prefix of session counts: `rebalancer:<svc>:sessions:`.
pub fn sessions_key_prefix(service: &str) -> String {
    format!("rebalancer:{service}:sessions:")
}

/// Redis key of one server's live session count.
pub fn sessions_key(service: &str, server: &str) -> String {
    format!("rebalancer:{service}:sessions:{server}")
}

/// Redis pub/sub channel of commands to servers.
pub fn commands_channel(service: &str) -> String {
    format!("rebalancer:{service}:commands")
}

/// Redis stream where servers acknowledge what they did.
pub fn acks_stream(service: &str) -> String {
    format!("rebalancer:{service}:acks")
}

/// Consul KV prefix of per-server administrative state (each segment percent-encoded).
pub fn state_prefix(service: &str) -> String {
    format!("rebalancer/{}/servers/", segment(service))
}

/// Consul KV key of one server's administrative state (each segment percent-encoded: an
/// ID can never reach outside the prefix).
pub fn state_key(service: &str, server: &str) -> String {
    format!(
        "rebalancer/{}/servers/{}",
        segment(service),
        segment(server)
    )
}

/// One path segment, percent-encoded but for `[A-Za-z0-9._~-]`; a segment of dots only
/// (`.`, `..`) is encoded whole, so no URL parser resolves it as a step up.
pub fn segment(s: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    if !s.is_empty() && s.bytes().all(|b| b == b'.') {
        return s.bytes().map(|_| "%2E").collect();
    }
    utf8_percent_encode(s, KEEP).to_string()
}

/// A server (Consul service) ID the controller accepts: 1 to 128 of `[A-Za-z0-9._-]`, not
/// dots only.
pub fn valid_server_id(id: &str) -> bool {
    crate::contract::signing::valid_token(id, MAX_SERVER_ID_BYTES)
}

/// Consul KV key the controllers of one pipeline contend for; its `LockIndex` is the epoch.
pub fn leader_key(pipeline: &str) -> String {
    format!("rebalancer/{pipeline}/leader")
}

/// What a command asks a server to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandKind {
    /// Close `count` sessions so that clients reconnect elsewhere.
    Shed,
    /// Close `count` sessions of a cordoned server on its way out.
    Drain,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Shed => "shed",
            CommandKind::Drain => "drain",
        }
    }
}

/// Longest command payload a server reads; longer ones are refused unread.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Longest command `id`.
pub const MAX_COMMAND_ID_BYTES: usize = 64;
/// Longest `server` (a Consul service ID, as the controller accepts them).
pub const MAX_SERVER_ID_BYTES: usize = 128;
/// Longest a command may stay valid (`expires_at_ms − issued_at_ms`); `rebalance.command_ttl`
/// may not be longer.
pub const MAX_COMMAND_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);
/// How far in the future a command's `issued_at_ms` may be (clock skew allowance).
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// A command published on [`commands_channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub v: u32,
    /// Unique per command; servers drop ids they have already seen.
    pub id: String,
    pub kind: CommandKind,
    /// The Consul service ID this command is addressed to.
    pub server: String,
    pub count: u64,
    /// The issuing leader's lock index; servers ignore commands from older epochs.
    pub epoch: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The id of the key that signed the command (see `contract::signing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Hex HMAC-SHA256 over the canonical encoding of every other field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// One entry of [`acks_stream`]: what a server did with a command addressed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The command's `id`.
    pub id: String,
    pub server: String,
    /// The command's `count`.
    pub requested: u64,
    /// Sessions closed (0 when refused).
    pub shed: u64,
    /// When the server finished (or refused), in Unix milliseconds.
    pub at_ms: u64,
    /// The command's `epoch`; 0 in acks of servers older than this field.
    pub epoch: u64,
    /// Why the server refused the command (`stale_epoch`, `expired`, `unknown_version`);
    /// absent when it obeyed.
    pub refused: Option<String>,
}

/// Longest `id`, `server` or `refused` value an ack reader keeps; longer entries are not acks.
pub const ACK_FIELD_MAX: usize = 128;

impl Ack {
    /// The stream entry's fields, in the documented order.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("id", self.id.clone()),
            ("server", self.server.clone()),
            ("requested", self.requested.to_string()),
            ("shed", self.shed.to_string()),
            ("at_ms", self.at_ms.to_string()),
            ("epoch", self.epoch.to_string()),
        ];
        if let Some(r) = &self.refused {
            f.push(("refused", r.clone()));
        }
        f
    }

    /// Reads an entry through `field` (its value by name); says which field is wrong.
    pub fn from_fields(field: impl Fn(&str) -> Option<String>) -> Result<Ack, String> {
        let text = |name: &str| -> Result<String, String> {
            let v = field(name).ok_or_else(|| format!("no field `{name}`"))?;
            if v.is_empty() || v.len() > ACK_FIELD_MAX {
                return Err(format!(
                    "field `{name}` is empty or over {ACK_FIELD_MAX} bytes"
                ));
            }
            Ok(v)
        };
        let number = |name: &str| -> Result<u64, String> {
            text(name)?
                .parse()
                .map_err(|_| format!("field `{name}` is not a non-negative integer"))
        };
        Ok(Ack {
            id: text("id")?,
            server: text("server")?,
            requested: number("requested")?,
            shed: number("shed")?,
            at_ms: number("at_ms")?,
            epoch: if field("epoch").is_some() {
                number("epoch")?
            } else {
                0
            },
            refused: if field("refused").is_some() {
                Some(text("refused")?)
            } else {
                None
            },
        })
    }
}

/// Administrative state of a server, as stored in Consul KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    Active,
    Cordoned,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Cordoned => "cordoned",
        }
    }
}

/// Who wrote a state record. The controller never undoes an operator's cordon.
pub const BY_CONTROLLER: &str = "controller";
/// See [`BY_CONTROLLER`]; any author but the controller counts as an operator.
pub const BY_OPERATOR: &str = "operator";

/// The JSON document at [`state_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: AdminState,
    #[serde(default)]
    pub since_ms: u64,
    #[serde(default)]
    pub reason: String,
    /// `"controller"` or `"operator"`; absent: the controller (records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The epoch of the leader that wrote it; a leader never overwrites a newer one's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl StateRecord {
    /// Written by someone other than the controller: an operator's decision to keep.
    pub fn by_operator(&self) -> bool {
        self.by.as_deref().is_some_and(|b| b != BY_CONTROLLER)
    }
}

/// The controller's snapshot of one pipeline's fleet, as its topology feed serves it:
/// the body of `GET /v1/topology` and each text message of the WebSocket
/// `/v1/topology/watch` (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopologyDoc {
    pub v: u32,
    pub pipeline: String,
    pub service: String,
    /// Increases with each change; starts over when the controller restarts.
    pub version: u64,
    /// Some source is disconnected or not yet synced (named in `missing_sources`).
    pub stale: bool,
    #[serde(default)]
    pub missing_sources: Vec<String>,
    /// Servers being provisioned by the controller's scaler.
    #[serde(default)]
    pub pending: u32,
    pub servers: Vec<ServerDoc>,
}

/// One registered server in a [`TopologyDoc`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerDoc {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub capacity: u32,
    pub weight: f32,
    /// Every Consul check of the instance passes.
    pub passing: bool,
    /// `active`, `cordoned`, or `unknown` (the KV record cannot be read).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordoned_since_ms: Option<u64>,
    /// `"operator"` for a cordon an operator wrote (the controller never undoes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordoned_by: Option<String>,
    /// The live session count; `null` while unknown (never read as zero).
    pub sessions: Option<u64>,
    #[serde(default)]
    pub provisioning: bool,
}

/// Milliseconds since the Unix epoch, as carried in the contract's `*_ms` fields.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_id_reaches_outside_its_prefix() {
        assert_eq!(
            state_key("ws", "ws-1.a_b"),
            "rebalancer/ws/servers/ws-1.a_b"
        );
        assert_eq!(
            state_key("ws", "../../x"),
            "rebalancer/ws/servers/..%2F..%2Fx"
        );
        assert_eq!(state_key("ws", ".."), "rebalancer/ws/servers/%2E%2E");
        assert_eq!(state_key("ws", "ws-2#"), "rebalancer/ws/servers/ws-2%23");
        assert_eq!(state_prefix("a/b"), "rebalancer/a%2Fb/servers/");
        for bad in [
            "",
            ".",
            "..",
            "ws-2#",
            "../../x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(!valid_server_id(bad), "{bad:?}");
        }
        for good in ["ws-1", "a.b_c-D9", "...x", &"x".repeat(128)] {
            assert!(valid_server_id(good), "{good:?}");
        }
    }

    #[test]
    fn a_command_serializes_to_the_documented_shape() {
        let c = Command {
            v: 1,
            id: "abc".into(),
            kind: CommandKind::Shed,
            server: "s1".into(),
            count: 40,
            epoch: 3,
            issued_at_ms: 10,
            expires_at_ms: 20,
            kid: None,
            sig: None,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"id":"abc","kind":"shed","server":"s1","count":40,"epoch":3,"issued_at_ms":10,"expires_at_ms":20}"#
        );
    }

    #[test]
    fn an_ack_reads_back_what_it_writes_and_a_bad_field_is_named() {
        let ack = Ack {
            id: "abc".into(),
            server: "s1".into(),
            requested: 40,
            shed: 0,
            at_ms: 12,
            epoch: 7,
            refused: Some("stale_epoch".into()),
        };
        let fields = ack.fields();
        let get = |k: &str| fields.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(Ack::from_fields(get), Ok(ack.clone()));
        // An ack of an older agent: no epoch, no refusal.
        let old = |k: &str| match k {
            "epoch" | "refused" => None,
            _ => get(k),
        };
        assert_eq!(
            Ack::from_fields(old).map(|a| (a.epoch, a.refused)),
            Ok((0, None))
        );
        let bad = |k: &str| {
            if k == "shed" {
                Some("-1".into())
            } else {
                get(k)
            }
        };
        assert_eq!(
            Ack::from_fields(bad),
            Err("field `shed` is not a non-negative integer".into())
        );
        let long = |k: &str| {
            if k == "id" {
                Some("x".repeat(200))
            } else {
                get(k)
            }
        };
        assert!(Ack::from_fields(long).unwrap_err().contains("`id`"));
    }

    #[test]
    fn a_state_record_without_optional_fields_parses() {
        let r: StateRecord = serde_json::from_str(r#"{"state":"cordoned"}"#).unwrap();
        assert_eq!(r.state, AdminState::Cordoned);
        assert_eq!(r.since_ms, 0);
    }
}
