//! Which commands a server obeys: well formed, signed by a configured key (when keys are
//! set), addressed to it, not seen before, not expired, not issued in the future, not
//! living longer than the protocol allows, not from a deposed leader, not asking for more
//! than the server could hold, and a drain only while the server is cordoned. The newest
//! epoch is learned from every current, verified command on the channel, not only from
//! those addressed here, so a deposed leader's next command is refused by every server,
//! and a forged one cannot pin the epoch. Pure, so the rules are tested as a table.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::contract::protocol::{
    Command, CommandKind, MAX_CLOCK_SKEW_MS, MAX_COMMAND_ID_BYTES, MAX_COMMAND_LIFETIME,
    MAX_SERVER_ID_BYTES, PROTOCOL_VERSION,
};
use crate::contract::signing::{valid_token, CommandKeys, SigError};

/// What the filter says of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    OtherServer,
    Duplicate,
    Expired,
    /// From an older epoch than the newest seen: a deposed leader.
    StaleEpoch,
    UnknownVersion,
    /// An `id` or `server` that is not a token of `[A-Za-z0-9._-]` of the allowed length.
    Malformed,
    /// Keys are configured and the command carries no signature.
    Unsigned,
    UnknownKey,
    BadSignature,
    /// `issued_at_ms` beyond the clock skew allowance in the future.
    IssuedInFuture,
    /// `expires_at_ms − issued_at_ms` above the protocol's bound.
    LivesTooLong,
    /// A `count` above what this server holds plus its capacity.
    CountTooLarge,
    /// A `drain` while this server's own state record is not `cordoned`.
    NotCordoned,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::OtherServer => "other_server",
            Verdict::Duplicate => "duplicate",
            Verdict::Expired => "expired",
            Verdict::StaleEpoch => "stale_epoch",
            Verdict::UnknownVersion => "unknown_version",
            Verdict::Malformed => "malformed",
            Verdict::Unsigned => SigError::Unsigned.as_str(),
            Verdict::UnknownKey => SigError::UnknownKey.as_str(),
            Verdict::BadSignature => SigError::BadSignature.as_str(),
            Verdict::IssuedInFuture => "issued_in_future",
            Verdict::LivesTooLong => "lives_too_long",
            Verdict::CountTooLarge => "count_too_large",
            Verdict::NotCordoned => "not_cordoned",
        }
    }

    /// A refusal the server says on the acks stream (when the command is addressed to it):
    /// one with an id that can be written back (the command's own, validated).
    pub fn is_acked_refusal(self) -> bool {
        !matches!(
            self,
            Verdict::Accept | Verdict::OtherServer | Verdict::Duplicate | Verdict::Malformed
        )
    }
}

/// What the server is now, for the bounds that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Here {
    pub sessions: u64,
    pub capacity: u64,
    /// Its own state record says `cordoned`.
    pub cordoned: bool,
}

/// Remembers the ids it accepted (the last `capacity` of them) and the newest epoch.
#[derive(Debug, Clone)]
pub struct CommandFilter {
    server: String,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
    capacity: usize,
    epoch: u64,
    keys: Option<CommandKeys>,
}

impl CommandFilter {
    pub fn new(server: &str, capacity: usize) -> CommandFilter {
        CommandFilter {
            server: server.to_string(),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
            capacity: capacity.max(1),
            epoch: 0,
            keys: None,
        }
    }

    /// Refuses every command not signed by one of `keys`.
    #[must_use]
    pub fn with_keys(mut self, keys: Option<CommandKeys>) -> CommandFilter {
        self.keys = keys;
        self
    }

    /// The newest epoch learned so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn check(&mut self, c: &Command, now_ms: u64, here: Here) -> Verdict {
        if c.v != PROTOCOL_VERSION {
            return Verdict::UnknownVersion;
        }
        if !valid_token(&c.id, MAX_COMMAND_ID_BYTES) || !valid_token(&c.server, MAX_SERVER_ID_BYTES)
        {
            return Verdict::Malformed;
        }
        if let Some(keys) = &self.keys {
            match keys.verify(c) {
                Ok(()) => {}
                Err(SigError::Unsigned) => return Verdict::Unsigned,
                Err(SigError::UnknownKey) => return Verdict::UnknownKey,
                Err(SigError::BadSignature) => return Verdict::BadSignature,
            }
        }
        let current = c.expires_at_ms > now_ms
            && c.issued_at_ms <= now_ms.saturating_add(MAX_CLOCK_SKEW_MS)
            && lifetime_ok(c);
        if current && c.epoch > self.epoch && c.server != self.server {
            self.epoch = c.epoch; // a newer leader speaks, to whomever
        }
        if c.server != self.server {
            return Verdict::OtherServer;
        }
        if self.seen_set.contains(&c.id) {
            return Verdict::Duplicate;
        }
        if c.expires_at_ms <= now_ms {
            return Verdict::Expired;
        }
        if c.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Verdict::IssuedInFuture;
        }
        if !lifetime_ok(c) {
            return Verdict::LivesTooLong;
        }
        if c.epoch < self.epoch {
            return Verdict::StaleEpoch;
        }
        if c.count > here.sessions.saturating_add(here.capacity) {
            return Verdict::CountTooLarge;
        }
        if c.kind == CommandKind::Drain && !here.cordoned {
            return Verdict::NotCordoned;
        }
        self.epoch = c.epoch;
        if self.seen.len() == self.capacity {
            if let Some(old) = self.seen.pop_front() {
                self.seen_set.remove(&old);
            }
        }
        self.seen.push_back(c.id.clone());
        self.seen_set.insert(c.id.clone());
        Verdict::Accept
    }
}

fn lifetime_ok(c: &Command) -> bool {
    c.expires_at_ms.saturating_sub(c.issued_at_ms) <= MAX_COMMAND_LIFETIME.as_millis() as u64
}

/// Logs each refusal reason at most once per `every`, so a flood of forged commands cannot
/// flood the log.
#[derive(Debug, Default)]
pub struct RefusalLog {
    last: HashMap<&'static str, u64>,
}

impl RefusalLog {
    /// Whether a refusal for `reason` at `now_ms` should be logged.
    pub fn should_log(&mut self, reason: &'static str, now_ms: u64, every_ms: u64) -> bool {
        match self.last.get(reason) {
            Some(at) if now_ms.saturating_sub(*at) < every_ms => false,
            _ => {
                self.last.insert(reason, now_ms);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: Here = Here {
        sessions: 100,
        capacity: 100,
        cordoned: true,
    };

    fn cmd(id: &str, server: &str, epoch: u64, expires: u64) -> Command {
        Command {
            v: 1,
            id: id.into(),
            kind: CommandKind::Shed,
            server: server.into(),
            count: 3,
            epoch,
            issued_at_ms: 0,
            expires_at_ms: expires,
            kid: None,
            sig: None,
        }
    }

    #[test]
    fn the_rules_of_the_contract_in_order() {
        let mut f = CommandFilter::new("me", 100);
        let now = 1_000;
        let table = [
            (cmd("a", "other", 5, 2_000), Verdict::OtherServer),
            (cmd("a", "me", 5, 2_000), Verdict::Accept),
            (cmd("a", "me", 5, 2_000), Verdict::Duplicate),
            (cmd("b", "me", 5, 999), Verdict::Expired),
            (cmd("c", "me", 4, 2_000), Verdict::StaleEpoch),
            (cmd("d", "me", 5, 2_000), Verdict::Accept),
            (cmd("e", "me", 6, 2_000), Verdict::Accept),
            (cmd("f", "me", 5, 2_000), Verdict::StaleEpoch),
            (
                Command {
                    v: 2,
                    ..cmd("g", "me", 9, 2_000)
                },
                Verdict::UnknownVersion,
            ),
        ];
        for (c, want) in table {
            assert_eq!(
                f.check(&c, now, HERE),
                want,
                "command {} epoch {}",
                c.id,
                c.epoch
            );
        }
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut f = CommandFilter::new("me", 2);
        for id in ["a", "b", "c"] {
            assert_eq!(f.check(&cmd(id, "me", 1, 10), 0, HERE), Verdict::Accept);
        }
        assert_eq!(f.check(&cmd("c", "me", 1, 10), 0, HERE), Verdict::Duplicate);
        assert_eq!(
            f.check(&cmd("a", "me", 1, 10), 0, HERE),
            Verdict::Accept,
            "the oldest id was forgotten"
        );
    }

    #[test]
    fn a_newer_epoch_addressed_to_another_server_deposes_the_old_leader_here_too() {
        let mut f = CommandFilter::new("s1", 16);
        let cmd = |id: &str, server: &str, epoch: u64, expires_at_ms: u64| Command {
            v: PROTOCOL_VERSION,
            id: id.into(),
            kind: crate::contract::protocol::CommandKind::Shed,
            server: server.into(),
            count: 1,
            epoch,
            issued_at_ms: 0,
            expires_at_ms,
            kid: None,
            sig: None,
        };
        assert_eq!(f.check(&cmd("a", "s1", 5, 100), 10, HERE), Verdict::Accept);
        // The new leader (epoch 9) sheds from s2; an expired one proves nothing.
        assert_eq!(
            f.check(&cmd("b", "s2", 12, 5), 10, HERE),
            Verdict::OtherServer
        );
        assert_eq!(
            f.check(&cmd("c", "s2", 9, 100), 10, HERE),
            Verdict::OtherServer
        );
        // The old leader's next command for s1 is refused.
        assert_eq!(
            f.check(&cmd("d", "s1", 5, 100), 10, HERE),
            Verdict::StaleEpoch
        );
        assert_eq!(f.check(&cmd("e", "s1", 9, 100), 10, HERE), Verdict::Accept);
    }

    fn at(id: &str, server: &str, now: u64) -> Command {
        Command {
            v: PROTOCOL_VERSION,
            id: id.into(),
            kind: CommandKind::Shed,
            server: server.into(),
            count: 10,
            epoch: 5,
            issued_at_ms: now,
            expires_at_ms: now + 10_000,
            kid: None,
            sig: None,
        }
    }

    #[test]
    fn bounds_refuse_what_no_controller_sends() {
        let now = 1_000_000;
        let mut f = CommandFilter::new("me", 16);
        let here = Here {
            sessions: 30,
            capacity: 100,
            cordoned: false,
        };
        let long_id = "x".repeat(65);
        let table = [
            (at(&long_id, "me", now), Verdict::Malformed),
            (at("a\nkind=drain", "me", now), Verdict::Malformed),
            (at("a", "../../x", now), Verdict::Malformed),
            (
                Command {
                    issued_at_ms: now + MAX_CLOCK_SKEW_MS + 1,
                    expires_at_ms: now + MAX_CLOCK_SKEW_MS + 10_000,
                    ..at("b", "me", now)
                },
                Verdict::IssuedInFuture,
            ),
            (
                Command {
                    expires_at_ms: u64::MAX,
                    ..at("c", "me", now)
                },
                Verdict::LivesTooLong,
            ),
            (
                Command {
                    count: 131,
                    ..at("d", "me", now)
                },
                Verdict::CountTooLarge,
            ),
            (
                Command {
                    kind: CommandKind::Drain,
                    ..at("e", "me", now)
                },
                Verdict::NotCordoned,
            ),
            (
                Command {
                    count: 130,
                    ..at("f", "me", now)
                },
                Verdict::Accept,
            ),
        ];
        for (c, want) in table {
            assert_eq!(f.check(&c, now, here), want, "{c:?}");
        }
        let cordoned = Here {
            cordoned: true,
            ..here
        };
        let drain = Command {
            kind: CommandKind::Drain,
            ..at("g", "me", now)
        };
        assert_eq!(f.check(&drain, now, cordoned), Verdict::Accept);
    }

    #[test]
    fn with_keys_only_signed_commands_pass_and_a_forged_epoch_teaches_nothing() {
        let keys = CommandKeys::parse(
            "t",
            "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )
        .unwrap();
        let other = CommandKeys::parse(
            "t",
            "k1:ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )
        .unwrap();
        let now = 1_000_000;
        let mut f = CommandFilter::new("me", 16).with_keys(Some(keys.clone()));
        let signed = |mut c: Command, k: &CommandKeys| {
            k.sign(&mut c);
            c
        };
        assert_eq!(f.check(&at("a", "me", now), now, HERE), Verdict::Unsigned);
        let forged = Command {
            epoch: u64::MAX,
            ..at("b", "other", now)
        };
        assert_eq!(f.check(&forged, now, HERE), Verdict::Unsigned);
        assert_eq!(
            f.check(&signed(forged, &other), now, HERE),
            Verdict::BadSignature
        );
        assert_eq!(f.epoch(), 0, "nothing learned from unverified commands");
        let mut tampered = signed(at("c", "me", now), &keys);
        tampered.count = 99;
        assert_eq!(f.check(&tampered, now, HERE), Verdict::BadSignature);
        assert_eq!(
            f.check(&signed(at("d", "me", now), &keys), now, HERE),
            Verdict::Accept
        );
        assert_eq!(f.epoch(), 5);
    }

    #[test]
    fn each_refusal_reason_is_logged_once_a_minute() {
        let mut log = RefusalLog::default();
        assert!(log.should_log("unsigned", 0, 60_000));
        assert!(!log.should_log("unsigned", 59_999, 60_000));
        assert!(log.should_log("bad_signature", 1, 60_000));
        assert!(log.should_log("unsigned", 60_000, 60_000));
    }
}
