//! Signed commands (protocol v1 `kid` and `sig`): HMAC-SHA256 over a canonical encoding of
//! every field but `sig`, hex-encoded, under a key named by `kid`. Keys come from
//! `REBALANCER_COMMAND_KEYS` (`id:hexsecret[,id:hexsecret…]`) or the file named by
//! `REBALANCER_COMMAND_KEYS_FILE` (the same list; commas or newlines between entries): the
//! first signs, every one verifies, so a rotation is adding a key, moving it first, then
//! removing the old one. The canonical encoding is in `docs/protocol.md`, with a worked
//! example a test checks.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::contract::protocol::Command;

type HmacSha256 = Hmac<Sha256>;

pub const KEYS_ENV: &str = "REBALANCER_COMMAND_KEYS";
pub const KEYS_FILE_ENV: &str = "REBALANCER_COMMAND_KEYS_FILE";

/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest key id.
pub const MAX_KID_BYTES: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{source_name}: entry {index} is not `id:hexsecret`")]
    Shape { source_name: String, index: usize },
    #[error("{source_name}: key {kid:?}: the id must be 1 to 64 of [A-Za-z0-9._-]")]
    Kid { source_name: String, kid: String },
    #[error("{source_name}: key {kid:?}: the secret is not hex")]
    Hex { source_name: String, kid: String },
    #[error("{source_name}: key {kid:?}: the secret is shorter than 16 bytes (32 hex digits)")]
    Short { source_name: String, kid: String },
    #[error("{source_name}: key id {kid:?} appears twice")]
    Duplicate { source_name: String, kid: String },
    #[error("{source_name}: no key")]
    Empty { source_name: String },
    #[error("both {KEYS_ENV} and {KEYS_FILE_ENV} are set: choose one")]
    Both,
    #[error("{KEYS_FILE_ENV}={path}: cannot read it: {error}")]
    File { path: String, error: String },
}

/// Why a command's signature does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigError {
    /// No `sig` (or no `kid`) while keys are configured.
    Unsigned,
    /// A `kid` none of the keys has.
    UnknownKey,
    /// The `sig` does not match.
    BadSignature,
}

impl SigError {
    pub fn as_str(self) -> &'static str {
        match self {
            SigError::Unsigned => "unsigned",
            SigError::UnknownKey => "unknown_key",
            SigError::BadSignature => "bad_signature",
        }
    }
}

/// The command keys: the first signs, all verify. `Debug` shows the ids, never a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for CommandKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandKeys")
            .field("ids", &self.ids())
            .field("secrets", &"***")
            .finish()
    }
}

/// A key id (and a command's `id` and `server`) as the canonical encoding allows it: 1 to
/// `max` of `[A-Za-z0-9._-]`, and not dots only (`.` and `..` are path steps).
pub fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.bytes().all(|b| b == b'.')
}

impl CommandKeys {
    /// Parses `id:hexsecret` entries separated by commas or newlines; `source_name` names
    /// where they came from in errors (never the secrets).
    pub fn parse(source_name: &str, text: &str) -> Result<CommandKeys, KeyError> {
        let source_name = source_name.to_string();
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        let entries = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for (index, entry) in entries.enumerate() {
            let Some((kid, hexsecret)) = entry.split_once(':') else {
                return Err(KeyError::Shape {
                    source_name,
                    index: index + 1,
                });
            };
            let kid = kid.trim().to_string();
            if !valid_token(&kid, MAX_KID_BYTES) {
                return Err(KeyError::Kid { source_name, kid });
            }
            let Ok(secret) = hex::decode(hexsecret.trim()) else {
                return Err(KeyError::Hex { source_name, kid });
            };
            if secret.len() < MIN_SECRET_BYTES {
                return Err(KeyError::Short { source_name, kid });
            }
            if keys.iter().any(|(k, _)| *k == kid) {
                return Err(KeyError::Duplicate { source_name, kid });
            }
            keys.push((kid, secret));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty { source_name });
        }
        Ok(CommandKeys { keys })
    }

    /// The keys the environment names (`lookup` reads a variable), or `None` when neither
    /// variable is set: commands are then unsigned.
    pub fn from_env(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<CommandKeys>, KeyError> {
        let inline = lookup(KEYS_ENV).filter(|v| !v.trim().is_empty());
        let file = lookup(KEYS_FILE_ENV).filter(|v| !v.trim().is_empty());
        match (inline, file) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(KeyError::Both),
            (Some(text), None) => CommandKeys::parse(KEYS_ENV, &text).map(Some),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| KeyError::File {
                    path: path.clone(),
                    error: e.to_string(),
                })?;
                CommandKeys::parse(&format!("{KEYS_FILE_ENV}={path}"), &text).map(Some)
            }
        }
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Signs `c` with the first key: sets `kid` and `sig`.
    pub fn sign(&self, c: &mut Command) {
        let (kid, secret) = &self.keys[0];
        c.kid = Some(kid.clone());
        c.sig = Some(hex::encode(
            mac(secret, &canonical(c)).finalize().into_bytes(),
        ));
    }

    /// Checks `c`'s signature, in constant time.
    pub fn verify(&self, c: &Command) -> Result<(), SigError> {
        let (Some(kid), Some(sig)) = (&c.kid, &c.sig) else {
            return Err(SigError::Unsigned);
        };
        let Some((_, secret)) = self.keys.iter().find(|(k, _)| k == kid) else {
            return Err(SigError::UnknownKey);
        };
        let Ok(sig) = hex::decode(sig) else {
            return Err(SigError::BadSignature);
        };
        mac(secret, &canonical(c))
            .verify_slice(&sig)
            .map_err(|_| SigError::BadSignature)
    }
}

fn mac(secret: &[u8], message: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    m.update(message.as_bytes());
    m
}

/// The signed bytes: a first line naming the encoding, then one `name=value` line per field
/// but `sig`, in this order, each ending with `\n`. `kid` is empty when absent. Values are
/// decimal numbers or tokens of `[A-Za-z0-9._-]` (the agent refuses other ids before it
/// verifies), so the encoding is the same in every language.
pub fn canonical(c: &Command) -> String {
    format!(
        "rebalancer-command-v1\nv={}\nid={}\nkind={}\nserver={}\ncount={}\nepoch={}\n\
         issued_at_ms={}\nexpires_at_ms={}\nkid={}\n",
        c.v,
        c.id,
        c.kind.as_str(),
        c.server,
        c.count,
        c.epoch,
        c.issued_at_ms,
        c.expires_at_ms,
        c.kid.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::protocol::CommandKind;

    fn cmd() -> Command {
        Command {
            v: 1,
            id: "4f1c2a9e".into(),
            kind: CommandKind::Shed,
            server: "ws-1".into(),
            count: 40,
            epoch: 1_795_000_000_000,
            issued_at_ms: 1_795_000_100_000,
            expires_at_ms: 1_795_000_110_000,
            kid: None,
            sig: None,
        }
    }

    const K1: &str = "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_signed_command_verifies_and_any_change_to_it_does_not() {
        let keys = CommandKeys::parse("test", K1).unwrap();
        let mut c = cmd();
        keys.sign(&mut c);
        assert_eq!(c.kid.as_deref(), Some("k1"));
        assert_eq!(keys.verify(&c), Ok(()));
        let tampered = [
            Command {
                count: 41,
                ..c.clone()
            },
            Command {
                server: "ws-2".into(),
                ..c.clone()
            },
            Command {
                epoch: u64::MAX,
                ..c.clone()
            },
            Command {
                expires_at_ms: u64::MAX,
                ..c.clone()
            },
            Command {
                kind: CommandKind::Drain,
                ..c.clone()
            },
            Command {
                id: "other".into(),
                ..c.clone()
            },
        ];
        for t in tampered {
            assert_eq!(keys.verify(&t), Err(SigError::BadSignature), "{t:?}");
        }
        assert_eq!(
            keys.verify(&Command {
                sig: None,
                ..c.clone()
            }),
            Err(SigError::Unsigned)
        );
        assert_eq!(
            keys.verify(&Command {
                kid: Some("k9".into()),
                ..c.clone()
            }),
            Err(SigError::UnknownKey)
        );
        assert_eq!(
            keys.verify(&Command {
                sig: Some("zz".into()),
                ..c
            }),
            Err(SigError::BadSignature)
        );
    }

    /// The example in `docs/protocol.md`, read from the doc itself.
    #[test]
    fn the_worked_example_in_the_protocol_doc_holds() {
        let doc = include_str!("../../../docs/protocol.md");
        let field = |name: &str| {
            doc.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("docs/protocol.md has no `{name}` line"))
                .trim()
                .to_string()
        };
        let keys = CommandKeys::parse("doc", &field("key:")).unwrap();
        let mut c: Command = serde_json::from_str(&field("command:")).unwrap();
        assert_eq!(canonical(&c), field("canonical:").replace("\\n", "\n"));
        c.sig = Some(field("sig:"));
        assert_eq!(keys.verify(&c), Ok(()));
        let mut signed = Command {
            sig: None,
            ..c.clone()
        };
        keys.sign(&mut signed);
        assert_eq!(signed.sig, c.sig);
    }

    #[test]
    fn the_first_key_signs_and_every_key_verifies_so_keys_rotate() {
        let old = CommandKeys::parse("t", K1).unwrap();
        let k2 = "k2:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
        let both = CommandKeys::parse("t", &format!("{k2},{K1}")).unwrap();
        let mut by_old = cmd();
        old.sign(&mut by_old);
        let mut by_new = cmd();
        both.sign(&mut by_new);
        assert_eq!(by_new.kid.as_deref(), Some("k2"));
        assert_eq!(
            both.verify(&by_old),
            Ok(()),
            "servers with both keys accept the old"
        );
        assert_eq!(old.verify(&by_new), Err(SigError::UnknownKey));
    }

    #[test]
    fn bad_key_lists_are_refused_naming_the_entry_and_never_the_secret() {
        let cases = [
            (
                "k1",
                KeyError::Shape {
                    source_name: "t".into(),
                    index: 1,
                },
            ),
            (
                "k1:zz",
                KeyError::Hex {
                    source_name: "t".into(),
                    kid: "k1".into(),
                },
            ),
            (
                "k1:0011",
                KeyError::Short {
                    source_name: "t".into(),
                    kid: "k1".into(),
                },
            ),
            (
                "a b:00",
                KeyError::Kid {
                    source_name: "t".into(),
                    kid: "a b".into(),
                },
            ),
            (
                &format!("{K1}\n{K1}"),
                KeyError::Duplicate {
                    source_name: "t".into(),
                    kid: "k1".into(),
                },
            ),
            (
                " , ",
                KeyError::Empty {
                    source_name: "t".into(),
                },
            ),
        ];
        for (text, want) in cases {
            let got = CommandKeys::parse("t", text).unwrap_err();
            assert_eq!(got, want, "{text}");
            assert!(!got.to_string().contains("0001020304"), "{got}");
        }
        let keys = CommandKeys::parse("t", K1).unwrap();
        assert!(!format!("{keys:?}").contains("0001"), "{keys:?}");
    }

    #[test]
    fn the_environment_names_the_keys_or_their_file_but_not_both() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(CommandKeys::from_env(&env(&[])), Ok(None));
        assert!(CommandKeys::from_env(&env(&[(KEYS_ENV, K1)]))
            .unwrap()
            .is_some());
        assert_eq!(
            CommandKeys::from_env(&env(&[(KEYS_ENV, K1), (KEYS_FILE_ENV, "/x")])),
            Err(KeyError::Both)
        );
        let dir = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::write(&dir, format!("{K1}\n")).unwrap();
        let path: &'static str = Box::leak(dir.to_string_lossy().into_owned().into_boxed_str());
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(Box::new([(KEYS_FILE_ENV, path)]));
        let from_file = CommandKeys::from_env(&env(pairs)).unwrap().unwrap();
        assert_eq!(from_file.ids(), vec!["k1"]);
        std::fs::remove_file(&dir).unwrap();
    }
}
