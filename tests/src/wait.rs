//! Waiting for something to happen: the tests' one polling loop.

use std::{
    fmt::Display,
    time::{Duration, Instant},
};

/// The longest pause between two polls. Polls start 1 ms apart and back off
/// to this: a condition that holds at once costs no wait, and one that
/// runs `reloader status` is not asked more than 50 times a second.
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// What a condition polled by [`wait_for`] returns: it holds with `true`,
/// `Some(value)` or `Ok(value)`; it does not hold yet with `false`, `None`
/// or `Err(what it saw)`, the last of which the timeout's panic shows.
pub trait Check {
    /// What [`wait_for`] returns once the condition holds.
    type Value;
    /// The value, or what was seen instead (if the condition says).
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Check for bool {
    type Value = ();

    fn check(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Check for Option<T> {
    type Value = T;

    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Check for Result<T, E> {
    type Value = T;

    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Polls `condition` until it holds and returns its value; panics, naming
/// `what` and what the condition last saw, if it does not hold within
/// `within`. The condition is polled at least once, and once more after
/// `within` has passed.
#[track_caller]
pub fn wait_for<C: Check>(
    what: impl Display,
    within: Duration,
    mut condition: impl FnMut() -> C,
) -> C::Value {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let timed_out = started.elapsed() >= within;
        match condition().check() {
            Ok(value) => return value,
            Err(seen) if timed_out => panic!(
                "timed out after {within:?} waiting for {what}{}",
                seen.map(|s| format!("; last seen: {s}"))
                    .unwrap_or_default()
            ),
            Err(_) => {}
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut polls = 0;
        let value = wait_for("three polls", Duration::from_secs(5), || {
            polls += 1;
            (polls == 3).then_some(polls)
        });
        assert_eq!(value, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible; last seen: still 7")]
    fn panics_naming_what_and_what_was_seen() {
        wait_for("the impossible", Duration::from_millis(30), || {
            Err::<(), _>("still 7")
        });
    }

    #[test]
    fn polls_once_more_after_the_deadline() {
        let started = Instant::now();
        wait_for("the deadline", Duration::from_millis(30), || {
            started.elapsed() >= Duration::from_millis(30)
        });
    }
}
