//! The algorithms this project grew from, as baselines: the Elixir `ClusterLoadBalancer` round
//! and the naive form of the original rebalancer design.

/// One `ClusterLoadBalancer` round over session counts: only the most loaded node acts; it
/// sheds when above the average × 1.25, half of its excess over the average, at most 100,
/// and nothing when that is under 10. Returns `(index, count)`.
pub fn clb_round(counts: &[u64]) -> Option<(usize, u64)> {
    if counts.is_empty() {
        return None;
    }
    let avg = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    let (i, &top) = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))?;
    if (top as f64) <= avg * 1.25 {
        return None;
    }
    let shed = (((top as f64 - avg) * 0.5).floor() as u64).min(100);
    (shed >= 10).then_some((i, shed))
}

/// The naive round: every server with `u > U + tolerance` sheds its whole excess,
/// `sessions − ceil(capacity × U)`, every round. `servers` are `(capacity, sessions)`.
pub fn naive_round(servers: &[(u32, u64)], tolerance: f64) -> Vec<(usize, u64)> {
    let sessions: u64 = servers.iter().map(|s| s.1).sum();
    let capacity: u64 = servers.iter().map(|s| u64::from(s.0)).sum();
    if capacity == 0 {
        return Vec::new();
    }
    let u = sessions as f64 / capacity as f64;
    servers
        .iter()
        .enumerate()
        .filter(|(_, (c, s))| *s as f64 / f64::from(*c) > u + tolerance)
        .map(|(i, (c, s))| {
            (
                i,
                s.saturating_sub((u64::from(*c) * sessions).div_ceil(capacity)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clb_sheds_half_the_excess_of_the_most_loaded_node_only() {
        // avg 100: the first node is at 200 > 125, excess 100, half is 50.
        assert_eq!(clb_round(&[200, 100, 100, 0]), Some((0, 50)));
        // Capped at 100.
        assert_eq!(clb_round(&[1000, 0, 0, 0]), Some((0, 100)));
        // Within 25 % of the average: nothing.
        assert_eq!(clb_round(&[120, 100, 80]), None);
        // Half the excess under 10: nothing (dead band).
        assert_eq!(clb_round(&[30, 10, 10, 10]), None);
    }

    #[test]
    fn naive_sheds_every_over_utilized_server_to_its_threshold_at_once() {
        // U = 0.5; 90 and 70 are over 0.6; threshold 50.
        assert_eq!(
            naive_round(&[(100, 90), (100, 70), (100, 40), (100, 0)], 0.10),
            vec![(0, 40), (1, 20)]
        );
        assert!(naive_round(&[(100, 55), (100, 45)], 0.10).is_empty());
    }
}
