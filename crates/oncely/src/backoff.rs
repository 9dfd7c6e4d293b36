//! One backoff for every retry in oncely: the lanes (parked keys,
//! infrastructure failures), side effects, the outbox relay, the Admin API's
//! retriable group requests and the processor's start.
//!
//! Retry `n` (0-based: `n = 0` is the wait before the first retry) waits a
//! random time in `[step / 10, step]`, where `step = base · 2ⁿ`, capped at
//! `max`. The randomness is "full jitter" (AWS Architecture Blog, "Exponential
//! Backoff And Jitter"): many clients failing at once spread their retries
//! over the whole step instead of retrying together. The floor of a tenth
//! keeps a retry from firing at once when the dice roll near zero, which under
//! a burst of failures would hammer the thing that is failing.

use std::time::Duration;

/// Exponential backoff with full jitter and a floor of a tenth of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Steps `base · 2ⁿ` capped at `max` (a `max` below `base` is raised to
    /// `base`).
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max: max.max(base) }
    }

    /// The first step.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The exponential step of retry `n`: `base · 2ⁿ`, capped at `max`.
    pub fn step(&self, n: u32) -> Duration {
        self.base.saturating_mul(2u32.saturating_pow(n)).min(self.max)
    }

    /// The shortest and longest wait before retry `n`: `(step / 10, step)`.
    pub fn bounds(&self, n: u32) -> (Duration, Duration) {
        let step = self.step(n);
        (step / 10, step)
    }

    /// A random wait before retry `n`, uniform within [`bounds`](Self::bounds).
    pub fn delay(&self, n: u32) -> Duration {
        self.delay_at(n, fastrand::f64())
    }

    /// The wait before retry `n` at point `u` of the jitter range (`0.0` the
    /// shortest, `1.0` the longest; clamped to that range).
    pub fn delay_at(&self, n: u32, u: f64) -> Duration {
        let (lo, hi) = self.bounds(n);
        let u = if u.is_nan() { 0.0 } else { u.clamp(0.0, 1.0) };
        // f64 rounding on very long durations may land a nanosecond past hi.
        (lo + (hi - lo).mul_f64(u)).min(hi)
    }
}

/// A retry counter over a [`Backoff`], for loops that retry until success.
#[derive(Debug, Clone)]
pub(crate) struct Retries {
    backoff: Backoff,
    n: u32,
}

impl Retries {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Retries { backoff, n: 0 }
    }

    /// The wait before the next retry; each call moves one step up.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.backoff.delay(self.n);
        self.n = self.n.saturating_add(1);
        d
    }

    /// The wait [`next_delay`](Self::next_delay) would return, without moving up.
    pub(crate) fn peek(&self) -> Duration {
        self.backoff.delay(self.n)
    }

    /// Back to the first step (after a success).
    pub(crate) fn reset(&mut self) {
        self.n = 0;
    }

    /// Retries waited for since the last reset.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u32 {
        self.n
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_from_the_base_up_to_the_cap() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(b.step(0), 100 * MS);
        assert_eq!(b.step(1), 200 * MS);
        assert_eq!(b.step(2), 400 * MS);
        assert_eq!(b.step(3), 800 * MS);
        assert_eq!(b.step(4), 1000 * MS);
        assert_eq!(b.step(u32::MAX), 1000 * MS);
    }

    #[test]
    fn the_jitter_range_is_a_tenth_of_the_step_to_the_step() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(b.bounds(0), (10 * MS, 100 * MS));
        assert_eq!(b.bounds(2), (40 * MS, 400 * MS));
        assert_eq!(b.bounds(9), (100 * MS, 1000 * MS));
        assert_eq!(b.delay_at(2, 0.0), 40 * MS);
        assert_eq!(b.delay_at(2, 1.0), 400 * MS);
        assert_eq!(b.delay_at(2, 0.5), 220 * MS);
        assert_eq!(b.delay_at(2, -3.0), 40 * MS);
        assert_eq!(b.delay_at(2, 7.0), 400 * MS);
        assert_eq!(b.delay_at(2, f64::NAN), 40 * MS);
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let b = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(b.max(), 500 * MS);
        assert_eq!(b.step(5), 500 * MS);
    }

    #[test]
    fn retries_move_up_and_reset() {
        let mut r = Retries::new(Backoff::new(100 * MS, 2000 * MS));
        assert!(r.next_delay() <= 100 * MS);
        for _ in 0..20 {
            assert!(r.next_delay() <= 2000 * MS);
        }
        assert_eq!(r.count(), 21);
        assert!(r.peek() >= 200 * MS, "at the cap, the floor is a tenth of it");
        r.reset();
        assert_eq!(r.count(), 0);
        assert!(r.next_delay() <= 100 * MS);
    }

    proptest! {
        #[test]
        fn every_delay_is_within_its_bounds_and_the_cap(
            base_ms in 0u64..100_000,
            max_ms in 0u64..10_000_000,
            n in 0u32..200,
            u in any::<f64>(),
        ) {
            let b = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let (lo, hi) = b.bounds(n);
            let d = b.delay_at(n, u);
            prop_assert!(lo <= d && d <= hi, "{lo:?} <= {d:?} <= {hi:?}");
            prop_assert!(hi <= b.max());
            prop_assert_eq!(lo, hi / 10);
            let r = b.delay(n);
            prop_assert!(lo <= r && r <= hi);
        }

        #[test]
        fn steps_never_shrink(base_ms in 1u64..100_000, max_ms in 1u64..10_000_000, n in 0u32..100) {
            let b = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            prop_assert!(b.step(n) <= b.step(n + 1));
            prop_assert!(b.step(n) >= b.base().min(b.max()));
        }

        #[test]
        fn huge_durations_do_not_overflow(n in 0u32..u32::MAX, u in 0.0f64..=1.0) {
            let b = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
            let (lo, hi) = b.bounds(n);
            let d = b.delay_at(n, u);
            prop_assert!(lo <= d && d <= hi);
        }
    }
}
