//! Choosing a server for a new connection: weighted least-connections on utilization,
//! `(sessions + reservations + requests in flight) / (capacity × weight × ramp)`, by power
//! of two choices among the servers that may take it, so a burst does not all land on the
//! single emptiest one.
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
    let open: Vec<usize> = (0..cands.len())
        .filter(|i| !exclude.contains(i) && (kind == Kind::Request || !cands[*i].full()))
        .collect();
    match open.len() {
        0 => None,
        1 => Some(open[0]),
        n => {
            let a = open[rng.random_range(0..n)];
            let mut b = open[rng.random_range(0..n - 1)];
            if b == a {
                b = open[n - 1];
            }
            Some(if cands[b].load() < cands[a].load() {
                b
            } else {
                a
            })
        }
    }
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
}
