//! Limits, each in one atomic, so a check takes no lock and allocates nothing.
//!
//! - Rate limits as GCRA (the generic cell rate algorithm): the atomic holds the theoretical
//!   arrival time. A limit of N per second admits bursts of N.
//! - Quotas (a key's calls per UTC day, a project's per UTC month) as a counter tagged with its
//!   period: a counter from an earlier period reads as zero, so periods roll over without a task.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{Datelike, NaiveDate};

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

    /// Copies another bucket's state (the same limit in a freshly loaded index).
    pub fn copy_from(&self, other: &Rate) {
        self.tat.store(other.tat.load(Ordering::Relaxed), Ordering::Relaxed);
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

/// Gives back one request to every `(bucket, limit)`: the call was then refused by a quota.
pub fn give_back_all(buckets: &[(&Rate, i64)]) {
    for (bucket, limit) in buckets {
        bucket.give_back(*limit);
    }
}

const SECONDS_PER_DAY: i64 = 86_400;
const COUNT_BITS: u32 = 48;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// A quota period: a UTC day or a UTC month, numbered from 1970.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period(u16);

impl Period {
    /// The day of a date.
    pub fn of_day(date: NaiveDate) -> Self {
        Self::day(date.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp()))
    }

    /// The month a date falls in.
    pub fn of_month(date: NaiveDate) -> Self {
        Self::month(date.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp()))
    }

    /// The UTC day that Unix second `now` falls in.
    pub fn day(now: i64) -> Self {
        Self(now.div_euclid(SECONDS_PER_DAY).clamp(0, i64::from(u16::MAX)) as u16)
    }

    /// The UTC calendar month that Unix second `now` falls in.
    pub fn month(now: i64) -> Self {
        let date = Self::date(now);
        Self(((date.year() - 1970).max(0) * 12 + date.month0() as i32).clamp(0, i32::from(u16::MAX)) as u16)
    }

    fn date(now: i64) -> NaiveDate {
        chrono::DateTime::from_timestamp(now, 0).map_or(NaiveDate::MIN, |t| t.date_naive())
    }

    /// Seconds from `now` until the next UTC day starts.
    pub fn seconds_to_next_day(now: i64) -> i64 {
        SECONDS_PER_DAY - now.rem_euclid(SECONDS_PER_DAY)
    }

    /// Seconds from `now` until the next UTC month starts.
    pub fn seconds_to_next_month(now: i64) -> i64 {
        let date = Self::date(now);
        let (year, month) = if date.month() == 12 { (date.year() + 1, 1) } else { (date.year(), date.month() + 1) };
        let next = NaiveDate::from_ymd_opt(year, month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(now, |t| t.and_utc().timestamp());
        (next - now).max(1)
    }
}

/// Calls charged to one quota in one period: the period in the top 16 bits, the count in the
/// other 48.
#[derive(Debug, Default)]
pub struct Quota(AtomicU64);

impl Quota {
    fn unpack(value: u64, period: Period) -> u64 {
        if (value >> COUNT_BITS) as u16 == period.0 { value & COUNT_MASK } else { 0 }
    }

    fn pack(period: Period, count: u64) -> u64 {
        (u64::from(period.0) << COUNT_BITS) | count.min(COUNT_MASK)
    }

    /// Calls charged in `period` so far.
    pub fn used(&self, period: Period) -> u64 {
        Self::unpack(self.0.load(Ordering::Relaxed), period)
    }

    /// Charges one call in `period` unless `limit` calls are charged already. A limit of 0 means
    /// none; the call is still counted, so a quota set later in the period sees earlier calls.
    pub fn try_charge(&self, period: Period, limit: i64) -> bool {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let used = Self::unpack(current, period);
            if limit > 0 && used >= limit as u64 {
                return false;
            }
            match self.0.compare_exchange_weak(
                current,
                Self::pack(period, used + 1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Adds `delta` (possibly negative) to `period`'s count, not going below zero: what other
    /// replicas charged, or a call charged and then refused by another limit.
    /// A `period` older than the counter's own is over and changes nothing.
    pub fn add(&self, period: Period, delta: i64) {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            if ((current >> COUNT_BITS) as u16) > period.0 {
                return;
            }
            let used = Self::unpack(current, period);
            let new = Self::pack(period, used.saturating_add_signed(delta));
            match self.0.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Copies another counter's value (the same quota in a freshly loaded index).
    pub fn copy_from(&self, other: &Quota) {
        self.0.store(other.0.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_counts_per_period() {
        let quota = Quota::default();
        let monday = Period::day(20_000 * SECONDS_PER_DAY + 5);
        assert!(quota.try_charge(monday, 2) && quota.try_charge(monday, 2));
        assert!(!quota.try_charge(monday, 2), "the third call of a quota of 2");
        assert_eq!(quota.used(monday), 2);
        let tuesday = Period::day(20_001 * SECONDS_PER_DAY);
        assert_eq!(quota.used(tuesday), 0, "a new day starts from zero");
        assert!(quota.try_charge(tuesday, 2));
        quota.add(monday, 7);
        assert_eq!(quota.used(tuesday), 1, "an earlier day's adjustment changes nothing");
        quota.add(tuesday, -5);
        assert_eq!(quota.used(tuesday), 0, "never below zero");
        assert!(quota.try_charge(tuesday, 0) && quota.used(tuesday) == 1, "no quota still counts");
    }

    #[test]
    fn periods_and_their_ends() {
        // 2026-11-23T12:00:00Z.
        let now = 1_795_435_200;
        assert_eq!(Period::seconds_to_next_day(now), 12 * 3600);
        assert_eq!(Period::seconds_to_next_month(now), 7 * SECONDS_PER_DAY + 12 * 3600);
        assert_eq!(Period::month(now), Period((2026 - 1970) * 12 + 10));
        // 2026-12-31T23:59:59Z rolls into January.
        assert_eq!(Period::seconds_to_next_month(1_798_761_599), 1);
    }

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
