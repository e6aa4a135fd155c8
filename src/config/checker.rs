//! The checker that collects every error of one pipeline file, and the value checks that
//! every section's compiler uses (durations, ranges, minimums, names).

use std::ops::{Bound, RangeBounds, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use super::ConfigError;

/// The longest any duration key may be.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Collects every error of one file, each naming its key, and checks values on the way.
pub(super) struct Checker<'a> {
    pub file: &'a Path,
    pub errors: Vec<ConfigError>,
}

impl Checker<'_> {
    pub fn err(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// A duration in [1ms, [`MAX_DURATION`]]: no stage can be handed one it cannot add to a
    /// clock reading, nor one that rounds to nothing in milliseconds (a command's expiry).
    pub fn duration(&mut self, key: &str, text: &str) -> Duration {
        match humantime::parse_duration(text) {
            Ok(d) if d > MAX_DURATION => {
                self.err(
                    key,
                    format!("{text:?} is longer than the most any duration may be (7 days)"),
                );
                Duration::from_secs(1)
            }
            Ok(d) if d >= Duration::from_millis(1) => d,
            Ok(_) => {
                self.err(key, "must be at least 1ms");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.err(
                    key,
                    format!("{text:?} is not a duration such as \"250ms\" or \"15s\" ({e})"),
                );
                Duration::from_secs(1)
            }
        }
    }

    /// `v` must lie in `bounds`, e.g. `0.0..=1.0`, `0.0..1.0`, or
    /// `(Bound::Excluded(0.0), Bound::Included(1.0))` for (0, 1].
    pub fn range(&mut self, key: &str, v: f64, bounds: impl RangeBounds<f64>) -> f64 {
        if !(bounds.contains(&v) && v.is_finite()) {
            let lo = match bounds.start_bound() {
                Bound::Included(x) => format!("[{x}"),
                Bound::Excluded(x) => format!("({x}"),
                Bound::Unbounded => "(-inf".to_string(),
            };
            let hi = match bounds.end_bound() {
                Bound::Included(x) => format!("{x}]"),
                Bound::Excluded(x) => format!("{x})"),
                Bound::Unbounded => "inf)".to_string(),
            };
            self.err(key, format!("{v} is outside {lo}, {hi}"));
        }
        v
    }

    /// A whole number in `bounds`; out of them, an error and the nearest bound.
    pub fn count(&mut self, key: &str, v: i64, bounds: RangeInclusive<i64>) -> u64 {
        let (lo, hi) = (*bounds.start(), *bounds.end());
        if v < lo {
            self.err(key, format!("{v} must be at least {lo}"));
            return lo.max(0) as u64;
        }
        if v > hi {
            self.err(key, format!("{v} must be at most {hi}"));
            return hi.max(0) as u64;
        }
        v as u64
    }

    pub fn name(&mut self, key: &str, v: &str) {
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.err(
                key,
                format!("{v:?} must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.'"),
            );
        }
    }
}
