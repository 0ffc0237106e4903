//! The runner of an invitation's queued grants and removals: at once after the change that
//! queued them, and from the retry worker until each succeeds or is refused for good.
//!
//! Its transaction is opened by hand, not with `in_transaction!`: it holds the invitation's call
//! rows while it calls the peers, so that concurrent runners of one invitation take turns and
//! its calls run in the order they were queued.

use std::time::Duration;

use keyshare_runtime::client::PeerError;
use keyshare_runtime::jobs::{Backoff, Round, Waker, spawn_rounds};
use tracing::Instrument;
use uuid::Uuid;

use super::Invitations;
use crate::error::{Error, Result};
use crate::store;
use crate::trace;

/// A grant or removal a peer did not take waits 1 s, then 2 s, 4 s … at most a minute: someone
/// who just accepted is waiting for it.
const CALL_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

impl Invitations {
    /// Runs an invitation's queued calls in order. Row locks on the calls make concurrent
    /// drainers of one invitation take turns; a failure stops the run (later calls must not
    /// overtake it) and leaves the rest to the retry worker.
    pub async fn drain(&self, invitation: Uuid) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let calls = store::lock_calls(&tx, invitation).await?;
        if calls.is_empty() {
            return Ok(());
        }
        let (target, account, role) =
            store::grant_facts(&tx, invitation).await?.ok_or(Error::NotFound("invitation"))?;
        let account = account.ok_or_else(|| Error::Internal("a call for an invitation nobody accepted".into()))?;
        let mut outcome = Ok(());
        for call in calls {
            let (id, kind) = (call.id, call.kind.as_str());
            let result = async {
                match kind {
                    "grant" => self.peers.grant(invitation, &target, account, role).await,
                    _ => self.peers.remove(invitation, &target, account).await,
                }
            }
            .instrument(trace::call_span(invitation, kind, &call.trace))
            .await;
            match result {
                Ok(()) => store::call_done(&tx, id, None).await?,
                Err(PeerError::Permanent(why)) => {
                    tracing::warn!(invitation = %invitation, call = %kind, error = %why, "call to a peer refused for good");
                    store::call_done(&tx, id, Some(&why)).await?;
                    // A grant that can never happen must not leave the invitation ACCEPTED.
                    if kind == "grant" {
                        store::mark_revoked(&tx, invitation, self.now()).await?;
                    }
                }
                Err(PeerError::Retry(why)) => {
                    tracing::warn!(invitation = %invitation, call = %kind, error = %why, "call to a peer failed; will retry");
                    store::call_failed(&tx, id, &why, CALL_BACKOFF.secs_after(call.attempts + 1)).await?;
                    outcome = Err(Error::Unavailable(why));
                    break;
                }
            }
        }
        tx.commit().await?;
        outcome
    }

    /// Retries due calls until the process ends, each invitation's in order.
    pub fn spawn_retries(self: &std::sync::Arc<Self>, every: Duration) {
        let app = std::sync::Arc::downgrade(self);
        spawn_rounds("calls", every, Waker::default(), move || {
            let app = app.upgrade()?;
            Some(async move {
                let due = {
                    let client = app.pool.get().await.map_err(|e| e.to_string())?;
                    store::due_calls(&client).await.map_err(|e| e.to_string())?
                };
                for invitation in due {
                    if let Err(e) = app.drain(invitation).await {
                        tracing::debug!(invitation = %invitation, error = %e, "retry did not go through yet");
                    }
                }
                // A call that failed again waits for its backoff, so the tick is soon enough.
                Ok(Round::Idle)
            })
        });
    }
}
