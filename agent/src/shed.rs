//! Closing sessions on command without a thundering herd: the closes are spread over a
//! window at random offsets, so the clients' reconnects are spread too.

use std::time::Duration;

use rand::Rng;

/// `n` offsets in `[0, window]`, sorted: when to close each of `n` sessions.
pub fn spread(n: u64, window: Duration, rng: &mut impl Rng) -> Vec<Duration> {
    let ms = window.as_millis() as u64;
    let mut out: Vec<Duration> = (0..n)
        .map(|_| Duration::from_millis(if ms == 0 { 0 } else { rng.random_range(0..=ms) }))
        .collect();
    out.sort();
    out
}

/// Groups sorted offsets into `(offset, how many)` so equal instants close together.
pub fn batches(offsets: &[Duration]) -> Vec<(Duration, u64)> {
    let mut out: Vec<(Duration, u64)> = Vec::new();
    for o in offsets {
        match out.last_mut() {
            Some((at, n)) if at == o => *n += 1,
            _ => out.push((*o, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn closes_fall_inside_the_window_and_are_not_bunched() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let w = Duration::from_secs(2);
        let s = spread(1000, w, &mut rng);
        assert_eq!(s.len(), 1000);
        assert!(s.iter().all(|o| *o <= w));
        assert!(s.windows(2).all(|p| p[0] <= p[1]), "sorted");
        // No 100 ms slice holds more than a fifth of them.
        for slice in 0..20 {
            let lo = Duration::from_millis(slice * 100);
            let hi = lo + Duration::from_millis(100);
            let n = s.iter().filter(|o| **o >= lo && **o < hi).count();
            assert!(n < 200, "slice {slice} holds {n}");
        }
        let total: u64 = batches(&s).iter().map(|(_, n)| n).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn a_zero_window_closes_at_once() {
        let s = spread(5, Duration::ZERO, &mut rand::rng());
        assert_eq!(batches(&s), vec![(Duration::ZERO, 5)]);
    }
}
