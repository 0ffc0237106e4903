//! Time as the domain sees it. Services read the time from a [`Clock`] so tests can move it
//! (a 7-day validity is tested without waiting 7 days).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// A clock shared by the parts of a service.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that follows the system clock, shifted by an offset tests can move forward.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset: Mutex<Duration>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *offset += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        let offset = *self.offset.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Utc::now() + offset
    }
}

/// A clock that stands still until moved: for tests of rates, where wall time must not pass.
#[derive(Debug)]
pub struct FrozenClock {
    now: Mutex<DateTime<Utc>>,
}

impl FrozenClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { now: Mutex::new(Utc::now()) })
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) += by;
    }
}

impl Clock for FrozenClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
