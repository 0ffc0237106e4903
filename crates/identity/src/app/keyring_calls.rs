//! identity's calls to keyring, queued in `keyring_calls` in the transaction that ends an
//! organization membership or a service account: run right after its commit and retried until
//! keyring takes or refuses them.
//!
//! Each call runs in a transaction of its own, opened by hand rather than with
//! `in_transaction!`: it holds the call's row while it calls keyring, so that replicas never make
//! one call together, and a change's own run waits for a worker that is making it.

use std::sync::Arc;

use keyshare_runtime::auth::Scope;
use keyshare_runtime::client::PeerError;
use keyshare_runtime::jobs::{self, Backoff, Held, Round, Waker};

use super::{Identity, SELF_CLIENT};
use crate::error::{Error, Result};
use crate::store;

impl Identity {
    /// Tells keyring of the removals it has not confirmed yet, waiting for any call another
    /// replica is making, for [`jobs::RUN_NOW_DEADLINE`] at most: a call keyring refuses for good
    /// is recorded as such, any other failure (or a keyring that does not answer in time) is
    /// tried again by the worker with [`Backoff::PEER_CALL`].
    pub async fn tell_keyring(&self) {
        jobs::run_now("keyring_calls", self.keyring_round(Held::Wait)).await;
    }

    async fn keyring_round(&self, held: Held) -> Result<Round> {
        let due = store::due_keyring_calls(&self.pool.get().await?).await?;
        let mut ran = 0;
        for id in due {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let Some(call) = store::lock_keyring_call(&tx, id, held.skips()).await? else {
                continue;
            };
            match self.end_in_keyring(&call).await {
                Ok(()) => store::keyring_call_done(&tx, call.id, None).await?,
                Err(PeerError::Permanent(why)) => {
                    tracing::warn!(organization = %call.org, account = %call.account, error = %why,
                        "keyring refused the end of a membership for good");
                    store::keyring_call_done(&tx, call.id, Some(&why)).await?;
                }
                Err(PeerError::Retry(why)) => {
                    tracing::warn!(organization = %call.org, account = %call.account, error = %why,
                        "keyring did not take the end of a membership yet; will retry");
                    let wait = Backoff::PEER_CALL.secs_after(call.attempts + 1);
                    store::keyring_call_failed(&tx, call.id, &why, wait).await?;
                }
            }
            tx.commit().await?;
            ran += 1;
        }
        // Only a round that carried something out may find more at once; calls held elsewhere
        // wait for the next tick.
        Ok(if ran == 0 { Round::Idle } else { Round::More })
    }

    async fn end_in_keyring(&self, call: &store::KeyringCall) -> std::result::Result<(), PeerError> {
        let token = self.self_token().await.map_err(|e| PeerError::Retry(e.to_string()))?;
        self.keyring.end_membership(&token, call.org, call.account, call.removed_at).await
    }

    /// An access token of identity's own internal client, signed here.
    async fn self_token(&self) -> Result<String> {
        let client = self.pool.get().await?;
        let (account, _, _) = store::service_account_by_client_id(&client, SELF_CLIENT)
            .await?
            .ok_or_else(|| Error::Internal("identity's own internal client is missing".into()))?;
        drop(client);
        let scopes = [Scope::MembershipsEnd].into_iter().collect();
        Ok(self
            .sign(format!("serviceAccounts/{}", account.id), None, None, scopes, Some(SELF_CLIENT), self.now())
            .await?
            .access_token)
    }

    /// Retries keyring calls until the process ends, passing over those another replica is
    /// making.
    pub fn spawn_keyring_calls(self: &Arc<Self>, every: std::time::Duration) {
        let app = Arc::downgrade(self);
        keyshare_runtime::jobs::spawn_rounds("keyring_calls", every, Waker::default(), move || {
            let app = app.upgrade()?;
            Some(async move { app.keyring_round(Held::Skip).await.map_err(|e| e.to_string()) })
        });
    }
}
