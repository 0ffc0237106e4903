//! Rate limits as GCRA (the generic cell rate algorithm): one atomic per bucket holding the
//! theoretical arrival time, so a check takes no lock and allocates nothing. A limit of N per
//! second admits bursts of N.

use std::sync::atomic::{AtomicI64, Ordering};

const NANOS: i64 = 1_000_000_000;

/// One rate bucket.
#[derive(Debug, Default)]
pub struct Rate {
    /// Theoretical arrival time, nanoseconds on the service clock.
    tat: AtomicI64,
}

impl Rate {
    /// Takes one request at `now` under a limit of `per_second`; on refusal, the nanoseconds
    /// until one would be admitted. A limit of 0 means none.
    pub fn take(&self, now: i64, per_second: i64) -> Result<(), i64> {
        if per_second <= 0 {
            return Ok(());
        }
        let interval = (NANOS / per_second).max(1);
        let tolerance = interval.saturating_mul(per_second - 1);
        let mut current = self.tat.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            if tat - now > tolerance {
                return Err(tat - tolerance - now);
            }
            match self.tat.compare_exchange_weak(current, tat + interval, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Forgets past use: the next request starts a fresh budget.
    pub fn reset(&self) {
        self.tat.store(0, Ordering::Release);
    }

    /// Returns a request taken by [`take`](Self::take) that was then refused by another limit.
    pub fn give_back(&self, per_second: i64) {
        if per_second > 0 {
            self.tat.fetch_sub((NANOS / per_second).max(1), Ordering::AcqRel);
        }
    }
}

/// Takes one request from every `(bucket, limit)` or from none: a request refused by one limit
/// does not use up another's budget. On refusal, the seconds until a retry can succeed.
pub fn take_all(buckets: &[(&Rate, i64)], now: i64) -> Result<(), i64> {
    for (taken, (bucket, limit)) in buckets.iter().enumerate() {
        if let Err(wait) = bucket.take(now, *limit) {
            for (bucket, limit) in &buckets[..taken] {
                bucket.give_back(*limit);
            }
            return Err((wait + NANOS - 1) / NANOS);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces() {
        let rate = Rate::default();
        let now = 10 * NANOS;
        assert!((0..5).all(|_| rate.take(now, 5).is_ok()));
        let wait = rate.take(now, 5).unwrap_err();
        assert!(wait > 0 && wait <= NANOS / 5, "{wait}");
        assert!(rate.take(now + NANOS / 5, 5).is_ok());
        assert!(Rate::default().take(now, 0).is_ok());
    }

    #[test]
    fn refusal_charges_nothing() {
        let (key, project) = (Rate::default(), Rate::default());
        let now = NANOS;
        assert!(take_all(&[(&key, 3), (&project, 1)], now).is_ok());
        assert_eq!(take_all(&[(&key, 3), (&project, 1)], now), Err(1));
        assert_eq!(take_all(&[(&key, 3), (&project, 1)], now), Err(1));
        // The key has spent one of its three, not three.
        assert!(key.take(now, 3).is_ok() && key.take(now, 3).is_ok());
        assert!(key.take(now, 3).is_err());
    }
}
