//! Exponential backoff with jitter, for every retry oncely makes (lanes,
//! parked keys, effects, the relay): `base · 2ⁿ`, capped at `max`, then a
//! random delay between a tenth of that and all of it ("full jitter" with a
//! floor, so retries spread out without ever going back to zero).

use std::time::Duration;

/// A backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first step.
    pub base: Duration,
    /// The cap.
    pub max: Duration,
}

impl Backoff {
    /// `base · 2ⁿ` capped at `max` (`max` is raised to `base` if lower).
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max: max.max(base) }
    }

    /// The exponential step for attempt `n` (0-based), before jitter.
    pub fn step(&self, n: u32) -> Duration {
        self.base.saturating_mul(1u32 << n.min(20)).min(self.max)
    }

    /// A delay for attempt `n` (0-based): uniform in `[step/10, step]`.
    pub fn delay(&self, n: u32) -> Duration {
        let ms = self.step(n).as_millis() as u64;
        Duration::from_millis(ms / 10 + fastrand::u64(0..=ms - ms / 10))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn steps_double_and_stop_at_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.step(0), Duration::from_millis(100));
        assert_eq!(b.step(2), Duration::from_millis(400));
        assert_eq!(b.step(4), Duration::from_secs(1));
        assert_eq!(b.step(1000), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn delays_stay_between_a_tenth_of_the_step_and_the_step(base in 1u64..5_000, max in 1u64..100_000, n in 0u32..40) {
            let b = Backoff::new(Duration::from_millis(base), Duration::from_millis(max));
            let step = b.step(n);
            let d = b.delay(n);
            prop_assert!(d <= step);
            prop_assert!(d >= Duration::from_millis(step.as_millis() as u64 / 10));
        }
    }
}
