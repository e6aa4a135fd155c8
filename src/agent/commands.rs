//! Which commands a server obeys: addressed to it, not seen before, not expired, not from a
//! deposed leader. The newest epoch is learned from every current command on the channel,
//! not only from those addressed here, so a deposed leader's next command is refused by
//! every server. Pure, so the rules are tested as a table.

use std::collections::{HashSet, VecDeque};

use crate::contract::protocol::{Command, PROTOCOL_VERSION};

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
        }
    }
}

/// Remembers the ids it accepted (the last `capacity` of them) and the newest epoch.
#[derive(Debug, Clone)]
pub struct CommandFilter {
    server: String,
    seen: VecDeque<String>,
    seen_set: HashSet<String>,
    capacity: usize,
    epoch: u64,
}

impl CommandFilter {
    pub fn new(server: &str, capacity: usize) -> CommandFilter {
        CommandFilter {
            server: server.to_string(),
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
            capacity: capacity.max(1),
            epoch: 0,
        }
    }

    pub fn check(&mut self, c: &Command, now_ms: u64) -> Verdict {
        if c.v != PROTOCOL_VERSION {
            return Verdict::UnknownVersion;
        }
        if c.expires_at_ms > now_ms && c.epoch > self.epoch && c.server != self.server {
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
        if c.epoch < self.epoch {
            return Verdict::StaleEpoch;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::protocol::CommandKind;

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
            assert_eq!(f.check(&c, now), want, "command {} epoch {}", c.id, c.epoch);
        }
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut f = CommandFilter::new("me", 2);
        for id in ["a", "b", "c"] {
            assert_eq!(f.check(&cmd(id, "me", 1, 10), 0), Verdict::Accept);
        }
        assert_eq!(f.check(&cmd("c", "me", 1, 10), 0), Verdict::Duplicate);
        assert_eq!(
            f.check(&cmd("a", "me", 1, 10), 0),
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
            sig: None,
        };
        assert_eq!(f.check(&cmd("a", "s1", 5, 100), 10), Verdict::Accept);
        // The new leader (epoch 9) sheds from s2; an expired one proves nothing.
        assert_eq!(f.check(&cmd("b", "s2", 12, 5), 10), Verdict::OtherServer);
        assert_eq!(f.check(&cmd("c", "s2", 9, 100), 10), Verdict::OtherServer);
        // The old leader's next command for s1 is refused.
        assert_eq!(f.check(&cmd("d", "s1", 5, 100), 10), Verdict::StaleEpoch);
        assert_eq!(f.check(&cmd("e", "s1", 9, 100), 10), Verdict::Accept);
    }
}
