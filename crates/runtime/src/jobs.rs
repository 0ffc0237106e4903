//! Durable work: rows a service writes in the same transaction as a change and carries out after
//! it, until done. Each queue keeps its rows and its SQL in its own store (the mail outbox,
//! identity's keyring calls, keyring's calls to the invitation service, invitation's grants);
//! what they share is here: when to try again ([`Backoff`]) and the worker that runs rounds of
//! due work ([`spawn_rounds`]), on a tick and whenever a commit wakes it ([`Waker`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How long a job waits before its next try: `first`, doubled with every further failure, never
/// more than `max`. Deterministic, so a queue's rows say when they run next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Calls to another Keyshare service, which is back within seconds when it restarts and may
    /// be gone for minutes when it is down: 1 s, 2 s, 4 s … 256 s.
    pub const PEER_CALL: Backoff = Backoff { first: Duration::from_secs(1), max: Duration::from_secs(256) };

    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The wait after the `failures`-th failure in a row (the one just seen counts; 0 is taken
    /// as 1).
    pub fn after(&self, failures: i32) -> Duration {
        let doublings = u32::try_from(failures.saturating_sub(1)).unwrap_or(0).min(31);
        self.first.checked_mul(1 << doublings).map_or(self.max, |wait| wait.min(self.max))
    }

    /// [`Backoff::after`] in seconds, as the stores write it (`make_interval(secs => …)`).
    pub fn secs_after(&self, failures: i32) -> f64 {
        self.after(failures).as_secs_f64()
    }
}

/// What a round of work found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Nothing more is due now: the worker waits for its tick or a wake-up.
    Idle,
    /// It did work and more may be due: the worker goes again at once.
    More,
}

/// What a runner of queued calls does with a call another runner holds (its row is locked while
/// the call is made, so replicas never make one call together).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Pass it over (`SKIP LOCKED`): the workers, since the holder will finish it.
    Skip,
    /// Wait for the holder, then run the call if it is still due: a change's own run, which
    /// promises the change's effect by the time the change answers.
    Wait,
}

impl Held {
    /// Whether a call held elsewhere is passed over.
    pub fn skips(self) -> bool {
        self == Held::Skip
    }
}

/// How long a change waits for its own queued calls before it answers; the queue's worker makes
/// whatever is left.
pub const RUN_NOW_DEADLINE: Duration = Duration::from_secs(2);

/// Runs `round` right after a change committed work to `queue`, so its effect shows from the
/// very next call, but for [`RUN_NOW_DEADLINE`] at most: a peer that hangs or a call another
/// runner holds for long never holds the change's answer. A round cut short rolls back what it
/// had not recorded, and the worker makes those calls again (they are idempotent).
pub async fn run_now<E: std::fmt::Display>(queue: &'static str, round: impl Future<Output = Result<Round, E>>) {
    match tokio::time::timeout(RUN_NOW_DEADLINE, round).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::debug!(queue, error = %error, "queued calls left to the worker"),
        Err(_) => tracing::debug!(queue, "queued calls took too long; left to the worker"),
    }
}

/// Wakes a queue's worker after a commit added work, so the work does not wait for the tick.
#[derive(Clone, Debug, Default)]
pub struct Waker(Arc<Notify>);

impl Waker {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    async fn woken(&self) {
        self.0.notified().await;
    }
}

/// Runs `round` until it answers `None` (what it works for is gone) or the task is aborted:
/// again at once after [`Round::More`], otherwise at the next tick of `every` or when `waker`
/// wakes it. A failed round is logged with `queue` and tried again at the next tick; each job's
/// own failures are the round's to record, with a [`Backoff`].
pub fn spawn_rounds<F, Fut>(
    queue: &'static str,
    every: Duration,
    waker: Waker,
    mut round: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Option<Fut> + Send + 'static,
    Fut: Future<Output = Result<Round, String>> + Send,
{
    tokio::spawn(async move {
        loop {
            let Some(work) = round() else { return };
            match work.await {
                Ok(Round::More) => continue,
                Ok(Round::Idle) => {}
                Err(error) => tracing::debug!(queue, error = %error, "round of queued work failed; tried again"),
            }
            tokio::select! {
                () = waker.woken() => {}
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_the_first_and_stops_at_the_most() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let waits: Vec<u64> = [0, 1, 2, 3, 9, 10, 40, i32::MAX].iter().map(|&n| backoff.after(n).as_secs()).collect();
        assert_eq!(waits, [1, 1, 2, 4, 256, 300, 300, 300]);
        assert_eq!(Backoff::PEER_CALL.after(9), Duration::from_secs(256));
        assert_eq!(Backoff::PEER_CALL.after(i32::MIN), Duration::from_secs(1));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.after(5), Duration::MAX);
    }

    #[tokio::test]
    async fn rounds_run_again_at_once_when_more_is_due_on_a_wake_and_stop_when_told() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let waker = Waker::default();
        let mut answers = vec![None, Some(Round::Idle), Some(Round::Idle), Some(Round::More), Some(Round::More)];
        let task = spawn_rounds("test", Duration::from_secs(3600), waker.clone(), move || {
            let answer = answers.pop().flatten()?;
            let tx = tx.clone();
            Some(async move {
                tx.send(()).unwrap();
                Ok(answer)
            })
        });
        // The tick is an hour away, so every round here comes without it: two that found more
        // and one that found nothing, at once; then one for each wake-up.
        let soon = Duration::from_secs(30);
        for _ in 0..3 {
            tokio::time::timeout(soon, rx.recv()).await.unwrap().unwrap();
        }
        waker.wake();
        tokio::time::timeout(soon, rx.recv()).await.unwrap().unwrap();
        // Woken again, the round says the work is gone: the task ends.
        waker.wake();
        tokio::time::timeout(soon, task).await.unwrap().unwrap();
    }
}
