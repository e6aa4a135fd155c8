//! Secrets that never reach a log line, a metric or `Debug` output: tokens, passwords and
//! command keys are held in [`Secret`], and URLs that may carry a password are shown
//! through [`redact_url`].

use std::fmt;

/// A token or password. `Debug` and `Display` print `***`; [`Secret::expose`] is the one
/// way to the value, for the request that needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `url` with the password of its user info (`scheme://user:password@host…`) replaced by
/// `***`, and a user info with no `:` (a bare token) replaced whole. Works on text that is
/// not a valid URL too: an invalid URL is exactly what an error message shows.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted_valid_or_not() {
        let cases = [
            (
                "redis://:pw@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("rediss://app:pw@h:1/0?x=1", "rediss://app:***@h:1/0?x=1"),
            ("redis://pw@h", "redis://***@h"),
            ("redis://:p@w@[::1", "redis://:***@[::1"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("http://h/path@x", "http://h/path@x"),
            ("no scheme at all:pw@x", "no scheme at all:pw@x"),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn a_secret_prints_as_stars() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
