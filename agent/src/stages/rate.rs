//! A token bucket on tokio's clock, pacing loops such as Consul blocking queries.
//!
//! Written here rather than taken from `governor` because governor keeps its own clock:
//! under tokio's paused test time its waits never elapse, and the loops it paces are
//! exactly what the paused-time tests exercise.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: f64, burst: u32) -> Self {
        TokenBucket {
            capacity: f64::from(burst.max(1)),
            per_second,
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token at `now`, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }

    /// Waits for a token.
    pub async fn take(&mut self) {
        while let Err(wait) = self.try_take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_holds() {
        let mut b = TokenBucket::new(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..13 {
            b.take().await;
        }
        // 3 at once, then 10 more at 10 per second.
        let ms = t0.elapsed().as_millis();
        assert!((999..=1001).contains(&ms), "{ms}");
    }
}
