//! What the demo's load saw, per second of the run: who answered, what
//! failed and how, and each successful connection's latency.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;

use super::load::{Event, Kind};

/// Counts of a load, per second.
#[derive(Debug)]
pub struct Stats {
    /// `answered[s][g]`: connections generation `g` answered in second `s`.
    pub answered: Vec<BTreeMap<u64, u64>>,
    pub failures: BTreeMap<Kind, u64>,
    /// Latencies of the successful connections (connect to full
    /// response), µs.
    pub latencies_us: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            answered: Vec::new(),
            failures: BTreeMap::new(),
            latencies_us: histogram(),
        }
    }
}

/// A histogram of microseconds, 1 µs to 1 h at 3 significant digits (as
/// the benchmark's); longer values count as 1 h.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The `q` quantile (0..=1) of `h` by nearest rank, to its precision (the
/// lowest value of the recorded value's bucket, so a value the histogram
/// holds exactly reads back exactly); 0 when it is empty.
pub fn quantile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        return 0;
    }
    h.lowest_equivalent(h.value_at_quantile(q))
}

impl Stats {
    pub fn ok(&self) -> u64 {
        self.answered.iter().flat_map(|s| s.values()).sum()
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Connections per generation over the whole run.
    pub fn per_generation(&self) -> BTreeMap<u64, u64> {
        let mut total = BTreeMap::new();
        for second in &self.answered {
            for (g, n) in second {
                *total.entry(*g).or_default() += n;
            }
        }
        total
    }

    /// The `q` quantile of latencies (0..=1).
    pub fn latency(&self, q: f64) -> Duration {
        Duration::from_micros(quantile(&self.latencies_us, q))
    }

    /// Counts `event`, which started `second` seconds into the run. A
    /// `200` that does not say which generation answered is a failure of
    /// kind `other`: the demo's server always says.
    pub fn record(&mut self, second: usize, event: &Event) {
        match (event.kind, event.generation()) {
            (Kind::Ok, Some(generation)) => {
                if self.answered.len() <= second {
                    self.answered.resize_with(second + 1, BTreeMap::new);
                }
                *self.answered[second].entry(generation).or_default() += 1;
                self.latencies_us
                    .saturating_record(u64::from(event.latency_us));
            }
            (Kind::Ok, None) => *self.failures.entry(Kind::Other).or_default() += 1,
            (kind, _) => *self.failures.entry(kind).or_default() += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::load::Answer, *};

    fn event(kind: Kind, generation: Option<u64>, latency_ms: u32) -> Event {
        Event {
            start_ns: 0,
            latency_us: latency_ms * 1000,
            kind,
            answer: Answer {
                generation,
                ..Answer::default()
            },
        }
    }

    #[test]
    fn stats_add_up() {
        let mut s = Stats::default();
        s.record(0, &event(Kind::Ok, Some(1), 1));
        s.record(2, &event(Kind::Ok, Some(2), 3));
        s.record(2, &event(Kind::Ok, Some(2), 2));
        s.record(2, &event(Kind::Reset, None, 1));
        s.record(2, &event(Kind::Ok, None, 1));
        assert_eq!(s.ok(), 3);
        assert_eq!(s.failed(), 2);
        assert_eq!(s.answered.len(), 3);
        assert_eq!(s.per_generation(), BTreeMap::from([(1, 1), (2, 2)]));
        assert_eq!(s.latency(0.5), Duration::from_millis(2));
        assert_eq!(s.latency(1.0), Duration::from_millis(3));
    }
}
