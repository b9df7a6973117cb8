//! What every error type shares: how the controller comes back after it, and the backoff.
//! The error types themselves belong to their steps: `oci::Error`, `cache::Error`,
//! `render::Error`, and `controller::Error`, which wraps them.

use std::time::Duration;

/// How the controller should come back to an object after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Something outside the spec may recover by itself (registry down, conflict): back off.
    Transient,
    /// The input is wrong as it stands: wait for a change, but look again now and then, since
    /// the registry's content can be fixed without the spec changing.
    Invalid,
}

/// Per-object retry delays: exponential with full jitter for transient failures, a long fixed
/// look-again for invalid input.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub invalid: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            invalid: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// Delay before attempt number `failures` (1 = first failure). `jitter` is in [0, 1).
    pub fn delay(&self, retry: Retry, failures: u32, jitter: f64) -> Duration {
        match retry {
            Retry::Invalid => self.invalid,
            Retry::Transient => {
                let exp = self
                    .base
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
                let cap = exp.min(self.max);
                // Half fixed, half jittered: never a hot loop, never a thundering herd.
                cap / 2 + cap.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_backoff_grows_and_is_capped() {
        let b = Backoff::default();
        let d1 = b.delay(Retry::Transient, 1, 0.0);
        let d4 = b.delay(Retry::Transient, 4, 0.0);
        assert_eq!(d1, Duration::from_millis(500));
        assert_eq!(d4, Duration::from_secs(4));
        assert_eq!(b.delay(Retry::Transient, 40, 0.999).as_secs(), 299);
        assert!(b.delay(Retry::Transient, 40, 0.0) >= Duration::from_secs(150));
    }

    #[test]
    fn invalid_input_waits_long() {
        let b = Backoff::default();
        assert_eq!(b.delay(Retry::Invalid, 1, 0.5), Duration::from_secs(300));
    }
}
