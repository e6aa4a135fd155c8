//! Choosing a server for a new connection: weighted least-connections on utilization,
//! `(sessions + reservations + requests in flight) / (capacity × weight × ramp)`, by power
//! of two choices among the servers that may take it, so a burst does not all land on the
//! single emptiest one. Two servers are drawn, not all looked at, so a pick costs the same
//! at ten servers and at ten thousand.
//! Pure: the candidates and the random draws come in.

use rand::Rng;

/// What routing needs to know of one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub sessions: u64,
    /// Connections routed here that the server's own count does not show yet.
    pub reserved: u64,
    /// Plain requests this gateway has in flight there: connections too, for as long as
    /// they last, but never sessions (they take no slot of the capacity).
    pub inflight: u64,
    pub capacity: u32,
    pub weight: f32,
    /// Slow start: from a small share up to 1 over the ramp after a server joins.
    pub ramp: f64,
}

impl Candidate {
    pub fn load(&self) -> f64 {
        let effective =
            f64::from(self.capacity) * f64::from(self.weight) * self.ramp.clamp(0.05, 1.0);
        (self.sessions + self.reserved + self.inflight) as f64 / effective.max(1e-9)
    }

    /// Full: no room left even counting the reservations.
    pub fn full(&self) -> bool {
        self.sessions + self.reserved >= u64::from(self.capacity)
    }
}

/// The ramp of a server `age` seconds after it joined, with a slow start of `ramp_s`.
pub fn ramp(age_s: f64, ramp_s: f64) -> f64 {
    if ramp_s <= 0.0 {
        1.0
    } else {
        (age_s / ramp_s).clamp(0.05, 1.0)
    }
}

/// What is being placed: a long-lived session (which must fit in a server's capacity and
/// reserves a slot), or a plain request (which neither reserves nor is refused for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Session,
    Request,
}

/// Index of the chosen candidate, or `None` when none can take it. `exclude` lists
/// candidates already tried for this request.
pub fn choose(
    cands: &[Candidate],
    exclude: &[usize],
    kind: Kind,
    rng: &mut impl Rng,
) -> Option<usize> {
    pick_two(
        cands.len(),
        |i| {
            let c = &cands[i];
            (!exclude.contains(&i) && (kind == Kind::Request || !c.full())).then(|| c.load())
        },
        rng,
    )
}

/// Random draws spent looking for two eligible servers before scanning them all: enough
/// that a fleet with one server in ten able to take a session is still not scanned (99 %
/// of picks find two), and cheap where most can (two draws, usually).
const DRAWS: usize = 64;

/// Power of two choices over `n` servers, of which `load(i)` says whether server `i` may
/// take the connection (`Some(its load)`) or not: two distinct eligible servers drawn at
/// random, the less loaded wins (the first drawn on a tie). Its cost does not grow with
/// `n`: only when [`DRAWS`] draws find fewer than two eligible servers (nearly all of the
/// fleet full, down or tried) are all `n` looked at, and two drawn from those that are.
pub fn pick_two(
    n: usize,
    mut load: impl FnMut(usize) -> Option<f64>,
    rng: &mut impl Rng,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let mut found: Vec<(usize, f64)> = Vec::with_capacity(2);
    // A small fleet is scanned sooner: a scan of it costs less than many draws.
    for _ in 0..DRAWS.min(2 * n) {
        let i = rng.random_range(0..n);
        if found.iter().any(|(j, _)| *j == i) {
            continue;
        }
        if let Some(l) = load(i) {
            found.push((i, l));
            if found.len() == 2 {
                break;
            }
        }
    }
    if found.len() < 2 {
        let open: Vec<(usize, f64)> = (0..n).filter_map(|i| load(i).map(|l| (i, l))).collect();
        found = match open.len() {
            0 => return None,
            1 => return Some(open[0].0),
            m => {
                let a = rng.random_range(0..m);
                let mut b = rng.random_range(0..m - 1);
                if b == a {
                    b = m - 1;
                }
                vec![open[a], open[b]]
            }
        };
    }
    let (a, b) = (found[0], found[1]);
    Some(if b.1 < a.1 { b.0 } else { a.0 })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn c(sessions: u64, capacity: u32) -> Candidate {
        Candidate {
            sessions,
            reserved: 0,
            inflight: 0,
            capacity,
            weight: 1.0,
            ramp: 1.0,
        }
    }

    fn tally(cands: &[Candidate], n: usize) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut out = vec![0; cands.len()];
        for _ in 0..n {
            out[choose(cands, &[], Kind::Session, &mut rng).unwrap()] += 1;
        }
        out
    }

    #[test]
    fn requests_in_flight_count_as_connections_but_take_no_capacity() {
        let busy = Candidate {
            inflight: 5,
            ..c(10, 100)
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..50 {
            let i = choose(&[busy.clone(), c(10, 100)], &[], Kind::Request, &mut rng);
            assert_eq!(i, Some(1), "the server with fewer requests in flight wins");
        }
        let full_of_requests = Candidate {
            inflight: 500,
            ..c(10, 100)
        };
        assert!(
            !full_of_requests.full(),
            "requests never fill a server's sessions"
        );
    }

    #[test]
    fn of_two_servers_the_less_utilized_always_wins() {
        assert_eq!(tally(&[c(80, 100), c(20, 100)], 100), vec![0, 100]);
    }

    #[test]
    fn power_of_two_never_picks_the_busiest_of_three() {
        let t = tally(&[c(90, 100), c(50, 100), c(10, 100)], 3000);
        assert_eq!(t[0], 0);
        assert!(t[2] > t[1], "{t:?}");
        assert!(t[1] > 0, "not everything lands on the emptiest: {t:?}");
    }

    #[test]
    fn capacity_and_weight_are_respected() {
        // 50 of 200 is emptier than 30 of 100; a weight of 0.25 makes 50/200 look like 50/50.
        assert_eq!(tally(&[c(30, 100), c(50, 200)], 50), vec![0, 50]);
        let mut heavy = c(50, 200);
        heavy.weight = 0.25;
        assert_eq!(tally(&[c(30, 100), heavy], 50), vec![50, 0]);
    }

    #[test]
    fn reservations_count_until_the_reports_catch_up_and_full_servers_get_nothing() {
        let mut busy = c(10, 100);
        busy.reserved = 80;
        assert_eq!(tally(&[busy, c(50, 100)], 20), vec![0, 20]);
        assert_eq!(
            choose(
                &[c(100, 100), c(99, 100)],
                &[],
                Kind::Session,
                &mut rand::rng()
            ),
            Some(1)
        );
        assert_eq!(
            choose(&[c(100, 100)], &[], Kind::Session, &mut rand::rng()),
            None
        );
        assert_eq!(
            choose(&[c(100, 100)], &[], Kind::Request, &mut rand::rng()),
            Some(0),
            "a server full of sessions still answers plain requests"
        );
        assert_eq!(
            choose(
                &[c(1, 100), c(2, 100)],
                &[0],
                Kind::Session,
                &mut rand::rng()
            ),
            Some(1),
            "retries skip what was tried"
        );
    }

    #[test]
    fn a_new_server_ramps_up_instead_of_taking_the_whole_burst() {
        let mut fresh = c(0, 100);
        fresh.ramp = ramp(1.0, 10.0); // one second into a 10 s slow start
        fresh.sessions = 5;
        // 5 sessions on a tenth of the capacity look like 0.5: the 40/100 server wins.
        assert_eq!(tally(&[c(40, 100), fresh], 10), vec![10, 0]);
        assert_eq!(ramp(20.0, 10.0), 1.0);
        assert_eq!(ramp(0.0, 0.0), 1.0);
    }

    #[test]
    fn two_draws_suffice_in_a_large_fleet_and_a_mostly_closed_one_is_scanned() {
        let mut rng = rand::rng();
        // 10,000 open servers: a pick looks at no more than DRAWS of them.
        let mut looked = 0;
        let pick = pick_two(
            10_000,
            |i| {
                looked += 1;
                Some(i as f64)
            },
            &mut rng,
        );
        assert!(pick.is_some());
        assert!(looked <= DRAWS, "looked at {looked}");
        // Only three of 10,000 may take it: found by the scan, and the emptiest of the
        // two drawn wins; never one that may not.
        let open = [17usize, 4_242, 9_999];
        let load = |i: usize| {
            open.contains(&i)
                .then_some(if i == 4_242 { 0.1 } else { 0.5 })
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let p = pick_two(10_000, load, &mut rng).unwrap();
            assert!(open.contains(&p), "{p}");
            seen.insert(p);
        }
        assert!(seen.contains(&4_242));
        assert_eq!(pick_two(10_000, |_| None, &mut rng), None);
        assert_eq!(
            pick_two(10_000, |i| (i == 5).then_some(1.0), &mut rng),
            Some(5)
        );
    }
}
