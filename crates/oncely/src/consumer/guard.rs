//! Guards against processing a flood at full speed: a token-bucket rate limit
//! per consumer, and a spike guard that pauses consumption when the inflow or
//! the share of duplicates over a window crosses a threshold (the incident:
//! 1,200 replayed events processed at full speed, 847 in 90 s).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, bursts up to `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_s: f64, burst: f64) -> Self {
        TokenBucket { rate: rate_per_s, burst: burst.max(1.0), state: Mutex::new((burst.max(1.0), Instant::now())) }
    }

    /// Takes `n` tokens at `now`; returns how long to wait before the tokens
    /// are available (zero if they are). Taking more than the burst is allowed
    /// and waits proportionally.
    pub(crate) fn take_at(&self, n: f64, now: Instant) -> Duration {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (tokens, last) = *g;
        let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
        let available = (tokens + refill).min(self.burst);
        let left = available - n;
        *g = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }

    pub(crate) async fn take(&self, n: usize) {
        let wait = self.take_at(n as f64, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Thresholds of the spike guard. Any threshold left `None` is not checked.
#[derive(Debug, Clone)]
pub struct SpikeGuard {
    /// The window over which inflow and duplicates are measured.
    pub window: Duration,
    /// Trip when more events than this arrive within the window.
    pub max_events: Option<u64>,
    /// Trip when duplicates / events within the window exceed this ratio…
    pub max_duplicate_ratio: Option<f64>,
    /// …and at least this many events arrived (a ratio of 2 events means nothing).
    pub min_events_for_ratio: u64,
    /// How long consumption stays paused after a trip.
    pub pause_for: Duration,
}

impl Default for SpikeGuard {
    fn default() -> Self {
        SpikeGuard {
            window: Duration::from_secs(60),
            max_events: None,
            max_duplicate_ratio: None,
            min_events_for_ratio: 100,
            pause_for: Duration::from_secs(60),
        }
    }
}

/// The guard's sliding window and state.
#[derive(Debug)]
pub(crate) struct SpikeState {
    cfg: SpikeGuard,
    inner: Mutex<SpikeInner>,
}

#[derive(Debug)]
struct SpikeInner {
    samples: VecDeque<(Instant, u64, u64)>,
    paused_until: Option<Instant>,
}

impl SpikeState {
    pub(crate) fn new(cfg: SpikeGuard) -> Self {
        SpikeState { cfg, inner: Mutex::new(SpikeInner { samples: VecDeque::new(), paused_until: None }) }
    }

    /// Records a batch's `events` and `duplicates` at `now`. Returns a reason if
    /// this trips the guard (and starts the pause).
    pub(crate) fn record_at(&self, events: u64, duplicates: u64, now: Instant) -> Option<String> {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.samples.push_back((now, events, duplicates));
        while let Some((t, _, _)) = g.samples.front() {
            if now.saturating_duration_since(*t) > self.cfg.window {
                g.samples.pop_front();
            } else {
                break;
            }
        }
        let (ev, dup) = g.samples.iter().fold((0u64, 0u64), |(a, b), (_, e, d)| (a + e, b + d));
        let reason = if let Some(max) = self.cfg.max_events.filter(|m| ev > *m) {
            Some(format!("{ev} events within {:?} (limit {max})", self.cfg.window))
        } else if let Some(r) = self.cfg.max_duplicate_ratio {
            let ratio = if ev == 0 { 0.0 } else { dup as f64 / ev as f64 };
            (ev >= self.cfg.min_events_for_ratio && ratio > r).then(|| {
                format!(
                    "{dup} of {ev} events within {:?} were duplicates ({:.0}% > {:.0}%)",
                    self.cfg.window,
                    ratio * 100.0,
                    r * 100.0
                )
            })
        } else {
            None
        };
        if reason.is_some() {
            g.paused_until = Some(now + self.cfg.pause_for);
            g.samples.clear();
        }
        reason
    }

    /// How long consumption must still stay paused at `now`.
    pub(crate) fn pause_left_at(&self, now: Instant) -> Duration {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.paused_until.map(|u| u.saturating_duration_since(now)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_paces() {
        let b = TokenBucket::new(100.0, 100.0);
        let t0 = Instant::now();
        assert_eq!(b.take_at(100.0, t0), Duration::ZERO);
        let w = b.take_at(50.0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // After a second the debt is paid and 50 tokens are back.
        assert_eq!(b.take_at(0.0, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn spike_guard_trips_on_the_incident_inflow() {
        // The incident: 847 replayed events in 90 s. A guard of 500 per 90 s trips.
        let g = SpikeState::new(SpikeGuard {
            window: Duration::from_secs(90),
            max_events: Some(500),
            pause_for: Duration::from_secs(30),
            ..SpikeGuard::default()
        });
        let t0 = Instant::now();
        let mut tripped = None;
        for i in 0..85u64 {
            if let Some(r) = g.record_at(10, 0, t0 + Duration::from_secs(i)) {
                tripped = Some((i, r));
                break;
            }
        }
        let (at, reason) = tripped.expect("tripped");
        assert_eq!(at, 50, "the 501st event trips it");
        assert!(reason.contains("limit 500"), "{reason}");
        assert_eq!(g.pause_left_at(t0 + Duration::from_secs(at)), Duration::from_secs(30));
        assert_eq!(g.pause_left_at(t0 + Duration::from_secs(at + 31)), Duration::ZERO);
    }

    #[test]
    fn spike_guard_trips_on_duplicate_ratio_only_with_enough_events() {
        let g = SpikeState::new(SpikeGuard {
            max_duplicate_ratio: Some(0.5),
            min_events_for_ratio: 100,
            ..SpikeGuard::default()
        });
        let t0 = Instant::now();
        assert!(g.record_at(10, 10, t0).is_none(), "10 events are too few to judge");
        assert!(g.record_at(100, 80, t0).is_some(), "90 of 110 duplicates");
    }

    #[test]
    fn old_samples_leave_the_window() {
        let g = SpikeState::new(SpikeGuard {
            window: Duration::from_secs(10),
            max_events: Some(15),
            ..SpikeGuard::default()
        });
        let t0 = Instant::now();
        assert!(g.record_at(10, 0, t0).is_none());
        assert!(g.record_at(10, 0, t0 + Duration::from_secs(11)).is_none(), "the first sample left the window");
        assert!(g.record_at(10, 0, t0 + Duration::from_secs(12)).is_some());
    }
}
