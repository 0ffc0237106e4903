//! Organization service accounts and Keyshare's own internal clients.

use keyshare_runtime::auth::{Caller, Scope};
use keyshare_runtime::crypto::{constant_time_eq, random_token, sha256};
use keyshare_runtime::in_transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{Identity, SELF_CLIENT};
use crate::domain::{DisplayName, Page, ServiceAccount, TokenGrant};
use crate::error::{Error, Result};
use crate::store;

impl Identity {
    pub async fn create_service_account(
        &self,
        caller: &Caller,
        org: Uuid,
        display_name: DisplayName,
    ) -> Result<(ServiceAccount, String)> {
        self.require_owner(caller, org).await?;
        let id = Uuid::now_v7();
        let client_id = format!("sa-{}", id.simple());
        let secret = random_token(32);
        let client = self.pool.get().await?;
        let account = store::insert_service_account(
            &client,
            id,
            org,
            display_name.as_str(),
            &client_id,
            &sha256(secret.as_bytes()),
            self.now(),
        )
        .await?;
        Ok((account, secret))
    }

    pub async fn list_service_accounts(
        &self,
        caller: &Caller,
        org: Uuid,
        page: PageRequest,
    ) -> Result<Page<ServiceAccount>> {
        self.require_owner(caller, org).await?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::service_accounts(&client, org, after, page.size as i64 + 1).await?;
        let scope = format!("organizations/{org}/serviceAccounts");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |s| page::time_id_cursor(s.created_at, s.id));
        Ok(Page { items: rows, next_page_token })
    }

    /// Owners read their organization's service accounts; so do Keyshare's services that read
    /// organizations (keyring, before making one a project member).
    pub async fn get_service_account(&self, caller: &Caller, org: Uuid, id: Uuid) -> Result<ServiceAccount> {
        if !caller.has_scope(Scope::OrganizationsRead) {
            self.require_owner(caller, org).await?;
        }
        let client = self.pool.get().await?;
        store::live_service_account(&client, org, id).await?.ok_or(Error::NotFound("service account"))
    }

    /// Deletes a service account. Keyring is told in the same transaction's queue, as for a
    /// person leaving, so its project memberships and key roles end before this answers (unless
    /// keyring takes longer than [`keyshare_runtime::jobs::RUN_NOW_DEADLINE`]; the worker then ends them).
    pub async fn delete_service_account(&self, caller: &Caller, org: Uuid, id: Uuid) -> Result<()> {
        self.require_owner(caller, org).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
            if !store::delete_service_account(&tx, org, id, now).await? {
                return Err(Error::NotFound("service account"));
            }
            store::queue_keyring_call(&tx, org, id, now).await?;
            Ok(())
        })?;
        self.tell_keyring().await;
        Ok(())
    }

    pub async fn issue_service_account_token(&self, client_id: &str, secret: &str) -> Result<TokenGrant> {
        let client = self.pool.get().await?;
        let found = store::service_account_by_client_id(&client, client_id.trim()).await?;
        drop(client);
        let presented = sha256(secret.as_bytes());
        let Some((account, _, scopes)) = found.filter(|(_, stored, _)| constant_time_eq(stored, &presented)) else {
            return Err(Error::InvalidClientCredentials);
        };
        // Keyshare's own services' tokens name their client, for the certificate check of mTLS.
        let internal_client = account.organization_id.is_none().then_some(account.client_id.as_str());
        let org = account.organization_id;
        self.sign(format!("serviceAccounts/{}", account.id), None, org, scopes, internal_client, self.now()).await
    }

    /// Creates or updates Keyshare's own service accounts from configuration.
    pub async fn provision_internal_clients(&self) -> Result<()> {
        let client = self.pool.get().await?;
        let own = [Scope::MembershipsEnd].into_iter().collect();
        store::upsert_internal_client(&client, SELF_CLIENT, &sha256(random_token(32).as_bytes()), own, self.now())
            .await?;
        for internal in &self.config.internal_clients {
            let secret_hash = sha256(internal.secret.as_bytes());
            store::upsert_internal_client(&client, &internal.name, &secret_hash, internal.scopes, self.now()).await?;
        }
        Ok(())
    }

    // --- For other services ---
}
