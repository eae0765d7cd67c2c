//! Restart math: exponential backoff with jitter, and the circuit breaker.
//!
//! ## Backoff
//!
//! The delay before restart attempt `n` (1-based) is
//!
//! ```text
//! base(n)  = min(max, initial * factor^(n-1))
//! delay(n) = base(n) * (1 - jitter * r),   r uniform in [0, 1)
//! ```
//!
//! so the delay lies in `(base * (1 - jitter), base]`: never more than `max`, and jitter
//! only ever shortens it (spreading restarts of many instances without exceeding the cap).
//! Worked example with the defaults `initial: 100ms, factor: 2, max: 30s, jitter: 0.2`:
//!
//! | attempt | base    | delay range         |
//! |---------|---------|---------------------|
//! | 1       | 100 ms  | 80 ms – 100 ms      |
//! | 2       | 200 ms  | 160 ms – 200 ms     |
//! | 3       | 400 ms  | 320 ms – 400 ms     |
//! | 9       | 25.6 s  | 20.48 s – 25.6 s    |
//! | 10+     | 30 s    | 24 s – 30 s (capped) |
//!
//! A run that stayed up (ready) for at least `reset_after` resets the attempt count and the
//! breaker's failure count before its own exit is judged.
//!
//! ## Circuit breaker
//!
//! A *failed run* is a crash (signal), a non-zero exit, a readiness that never came, or a
//! failed liveness probe. After `max_failures` consecutive failed runs the breaker opens:
//! no more restarts, and launches of the key fail fast with the reason. After `cooldown` it
//! is half-open: one trial run. The trial becoming ready closes the breaker; the trial
//! failing opens it again for another cooldown.

use std::fmt;
use std::time::Duration;

use crate::spec::Backoff;

/// The delay before attempt `attempt` (1-based), with `r` in `[0, 1)` drawn by the caller.
pub fn backoff_delay(b: &Backoff, attempt: u32, r: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(1000) as i32;
    let base = (b.initial.as_secs_f64() * b.factor.powi(exp)).min(b.max.as_secs_f64());
    let r = if r.is_finite() {
        r.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let delay = base * (1.0 - b.jitter * r);
    Duration::from_secs_f64(delay.max(0.0))
}

/// The lower bound of [`backoff_delay`] for an attempt (what tests may assert).
pub fn backoff_floor(b: &Backoff, attempt: u32) -> Duration {
    backoff_delay(b, attempt, 1.0)
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small deterministic generator (splitmix64) for jitter, so that the core stays pure
/// and tests are reproducible; the daemon seeds it at random.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn defaults() -> Backoff {
        Backoff::default()
    }

    #[test]
    fn worked_example_from_the_docs() {
        let b = defaults();
        assert_eq!(backoff_delay(&b, 1, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_floor(&b, 1), Duration::from_millis(80));
        assert_eq!(backoff_delay(&b, 3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(&b, 9, 0.0), Duration::from_millis(25_600));
        assert_eq!(backoff_delay(&b, 10, 0.0), Duration::from_secs(30));
        assert_eq!(backoff_floor(&b, 50), Duration::from_secs(24));
        assert_eq!(backoff_delay(&b, u32::MAX, 0.5), Duration::from_secs(27));
    }

    proptest! {
        #[test]
        fn delay_is_capped_monotonic_in_base_and_jitter_bounded(
            initial_ms in 1u64..10_000, max_ms in 1u64..100_000, factor in 1.0f64..10.0,
            jitter in 0.0f64..=1.0, attempt in 1u32..200, r in 0.0f64..1.0,
        ) {
            let b = Backoff {
                initial: Duration::from_millis(initial_ms.min(max_ms)),
                max: Duration::from_millis(max_ms),
                factor,
                jitter,
            };
            let d = backoff_delay(&b, attempt, r);
            prop_assert!(d <= b.max + Duration::from_nanos(1));
            prop_assert!(d + Duration::from_micros(1) >= backoff_floor(&b, attempt));
            // The jitter-free delay never decreases with the attempt number.
            prop_assert!(backoff_delay(&b, attempt + 1, 0.0) + Duration::from_nanos(1) >= backoff_delay(&b, attempt, 0.0));
        }

        #[test]
        fn jitter_is_in_unit_interval(seed in any::<u64>()) {
            let mut j = Jitter::new(seed);
            for _ in 0..100 {
                let x = j.next_unit();
                prop_assert!((0.0..1.0).contains(&x));
            }
        }
    }
}
