//! What keyring asks the invitation service: invitation counts for the key list, revoking a
//! deleted key's or project's invitations, and marking the invitation that granted a membership
//! which ended here. Calls are queued in `pending_calls` with the change, run right after its
//! commit and retried until done.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_runtime::client::{PeerError, ServiceToken};
use keyshare_runtime::jobs::{self, Backoff, Held, Round, Waker, spawn_rounds};
use tonic::transport::Channel;

use crate::domain::InvitationCounts;
use crate::store;

/// The key list answers without counts rather than wait longer than this.
const COUNT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct InvitationClient {
    channel: Channel,
    token: Arc<ServiceToken>,
}

impl InvitationClient {
    pub fn new(channel: Channel, token: Arc<ServiceToken>) -> Self {
        Self { channel, token }
    }

    /// Accepted/pending counts per target, or `None` if the invitation service did not answer.
    pub async fn counts(&self, targets: Vec<String>) -> Option<HashMap<String, InvitationCounts>> {
        if targets.is_empty() {
            return Some(HashMap::new());
        }
        let call = async {
            let request = self.token.request(pb::CountInvitationsRequest { targets }).await.ok()?;
            let response = InvitationServiceClient::new(self.channel.clone()).count_invitations(request).await.ok()?;
            Some(
                response
                    .into_inner()
                    .counts
                    .into_iter()
                    .map(|c| (c.target, InvitationCounts { accepted: c.accepted, pending: c.pending }))
                    .collect(),
            )
        };
        match tokio::time::timeout(COUNT_TIMEOUT, call).await {
            Ok(counts) => counts,
            Err(_) => {
                tracing::warn!("invitation counts timed out; the key list answers without them");
                None
            }
        }
    }

    async fn revoke_target(&self, target: &str) -> Result<(), PeerError> {
        let request = self.token.request(pb::RevokeTargetInvitationsRequest { target: target.to_owned() }).await?;
        InvitationServiceClient::new(self.channel.clone())
            .revoke_target_invitations(request)
            .await
            .map(|_| ())
            .map_err(|status| PeerError::from_status(&status))
    }

    async fn end_invitations(&self, target: &str, account: Option<uuid::Uuid>) -> Result<(), PeerError> {
        let account = account.ok_or_else(|| PeerError::Permanent("no account".into()))?;
        let request = self
            .token
            .request(pb::EndAcceptedInvitationsRequest {
                target: target.to_owned(),
                account: format!("accounts/{account}"),
            })
            .await?;
        InvitationServiceClient::new(self.channel.clone())
            .end_accepted_invitations(request)
            .await
            .map(|_| ())
            .map_err(|status| PeerError::from_status(&status))
    }

    /// Runs the due calls now, so a change's effect on invitations shows from the very next
    /// call: a call another runner holds is waited for, not skipped. Whatever fails or takes too
    /// long is left to the worker.
    pub async fn run_now(&self, pool: &Pool) {
        jobs::run_now("pending_calls", self.run_due(pool, Held::Wait)).await;
    }

    /// Carries out queued calls until the process ends, passing over those another replica is
    /// running.
    pub fn spawn_worker(self, pool: Pool, every: Duration) {
        let this = Arc::new(self);
        spawn_rounds("pending_calls", every, Waker::default(), move || {
            let (this, pool) = (this.clone(), pool.clone());
            Some(async move { this.run_due(&pool, Held::Skip).await })
        });
    }

    /// One round of due calls, each in a transaction of its own that holds the call's row while
    /// the call runs, so replicas never make one call together. A call the invitation service
    /// refuses for good is recorded as such, any other failure is tried again with
    /// [`Backoff::PEER_CALL`].
    async fn run_due(&self, pool: &Pool, held: Held) -> Result<Round, String> {
        let due = {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            store::due_pending_calls(&client).await.map_err(|e| e.to_string())?
        };
        let mut ran = 0;
        for id in due {
            let mut client = pool.get().await.map_err(|e| e.to_string())?;
            let tx = client.transaction().await.map_err(|e| e.to_string())?;
            let Some(call) = store::lock_pending_call(&tx, id, held.skips()).await.map_err(|e| e.to_string())? else {
                continue;
            };
            let result = match call.kind.as_str() {
                "revoke_invitations" => self.revoke_target(&call.target).await,
                "end_invitations" => self.end_invitations(&call.target, call.account).await,
                other => Err(PeerError::Permanent(format!("unknown call kind {other}"))),
            };
            let recorded = match result {
                Ok(()) => store::pending_call_done(&tx, call.id, None).await,
                Err(PeerError::Permanent(why)) => {
                    tracing::warn!(call = %call.kind, target = %call.target, error = %why,
                        "the invitation service refused a call for good");
                    store::pending_call_done(&tx, call.id, Some(&why)).await
                }
                Err(PeerError::Retry(why)) => {
                    let wait = Backoff::PEER_CALL.secs_after(call.attempts + 1);
                    store::pending_call_failed(&tx, call.id, &why, wait).await
                }
            };
            recorded.map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            ran += 1;
        }
        // Only a round that carried something out may find more at once; calls held elsewhere
        // wait for the next tick.
        Ok(if ran == 0 { Round::Idle } else { Round::More })
    }
}
