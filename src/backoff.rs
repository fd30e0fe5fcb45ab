//! Capped exponential backoff with jitter, for reconnecting to the broker and retrying the disk.
//!
//! rumqttc reconnects at once after an error (tens of thousands of attempts a second against a closed port),
//! so every retry loop in imaged waits on one of these.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The broker: about 100 ms after the first failure, doubling to 30 s.
    pub fn broker() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// The disk: retried sooner at the cap, so a freed disk is noticed within a few seconds.
    pub fn disk() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = delay(self.attempt, self.min, self.max, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The delay after `attempt` earlier failures: `min * 2^attempt` capped at `max`, then scaled into
/// `[50%, 100%]` by `unit` (a random number in `[0, 1)`), so that many clients do not retry in step.
pub fn delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let base = min
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(max);
    base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn the_delay_doubles_from_the_minimum_up_to_the_cap() {
        assert_eq!(delay(0, MIN, MAX, 1.0), MIN);
        assert_eq!(delay(1, MIN, MAX, 1.0), MIN * 2);
        assert_eq!(delay(5, MIN, MAX, 1.0), MIN * 32);
        assert_eq!(delay(9, MIN, MAX, 1.0), MAX);
        assert_eq!(delay(u32::MAX, MIN, MAX, 1.0), MAX);
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        assert_eq!(delay(3, MIN, MAX, 0.0), MIN * 4);
        for unit in [0.0, 0.25, 0.5, 0.999] {
            let d = delay(20, MIN, MAX, unit);
            assert!(d >= MAX / 2 && d <= MAX, "{d:?}");
        }
    }

    #[test]
    fn a_reset_starts_again_at_the_minimum() {
        let mut backoff = Backoff::broker();
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= MIN);
    }
}
