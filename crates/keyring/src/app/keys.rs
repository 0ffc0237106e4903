//! Keys and their credentials: create, get, list (a project's, and those shared with the
//! caller), update, environment settings, reveal, regenerate and delete.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use keyshare_runtime::credential::Credential;
use keyshare_runtime::crypto::Sealed;
use keyshare_runtime::in_transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{CallerChecks, CreatedKey, Ctx, EnvironmentChange, Keyring};
use crate::domain::{
    Environment, InvitationSummary, Key, KeyAccess, KeyAction, KeyEnvironment, KeyRef, KeyRole, Page, Permissions,
    ProjectRole,
};
use crate::error::{Error, Result};
use crate::feed::{self, FeedEvent};
use crate::store;

impl Keyring {
    pub async fn create_key(
        &self,
        ctx: &Ctx,
        project: Uuid,
        display_name: String,
        description: String,
        permissions: Permissions,
        request_id: Option<String>,
    ) -> Result<CreatedKey> {
        let account = ctx.account()?;
        self.project_access(account, project, false).await?;
        if let Some(again) = self.replayed(ctx, account, request_id.as_deref()).await? {
            return Ok(again);
        }
        let now = self.now();
        let key = KeyRef { project, key: Uuid::now_v7() };
        let sandbox = Credential::generate(Environment::Sandbox);
        let production = Credential::generate(Environment::Production);
        let new_key = store::NewKey {
            key,
            display_name: &display_name,
            description: &description,
            created_by: account,
            request_id: request_id.as_deref(),
            now,
        };
        // Some(taken): a unique constraint refused the key. The refused insert leaves nothing
        // to commit (PostgreSQL ends the failed transaction as a rollback).
        let refused = in_transaction!(self.pool, |tx| -> Result<Option<store::KeyTaken>> {
            // A project deleted meanwhile is not found, rather than refusing the insert on its
            // foreign key; a deletion under way waits for this key, and then deletes it too.
            store::share_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            if let Err(taken) = store::insert_key(&tx, &new_key).await? {
                return Ok(Some(taken));
            }
            for (env, credential) in [(Environment::Sandbox, &sandbox), (Environment::Production, &production)] {
                store::insert_environment(&tx, key.key, env, permissions).await?;
                self.insert_credential(&tx, key.key, credential, now).await?;
            }
            store::insert_key_member(&tx, key.key, account, KeyRole::Owner, now).await?;
            self.audit(&tx, ctx, project, Some(key.key), "key.create", &key.name()).await?;
            feed::record_key(&tx, key, now).await?;
            Ok(None)
        })?;
        if let Some(taken) = refused {
            // A concurrent retry with the same request id made the key first. Its insert may
            // refuse this one on the request id or on the name (it has the same name), whichever
            // index PostgreSQL checks first: either way, answer as the winner did. It has
            // committed by now, since PostgreSQL waits for a conflicting insert to end.
            if let Some(again) = self.replayed(ctx, account, request_id.as_deref()).await? {
                return Ok(again);
            }
            return Err(match taken {
                store::KeyTaken::Name => Error::KeyNameTaken,
                store::KeyTaken::Request => Error::Internal("request id conflict without a key".into()),
            });
        }
        let key = self.load(key, Some(KeyRole::Owner)).await?;
        Ok(CreatedKey { key, sandbox: sandbox.expose().to_owned(), production: production.expose().to_owned() })
    }

    /// The answer to a CreateKey whose request id made a key already, if it did.
    async fn replayed(&self, ctx: &Ctx, account: Uuid, request_id: Option<&str>) -> Result<Option<CreatedKey>> {
        let Some(request_id) = request_id else { return Ok(None) };
        let existing = store::key_by_request(&self.pool.get().await?, account, request_id).await?;
        match existing {
            Some(key) => Ok(Some(self.created_again(ctx, key).await?)),
            None => Ok(None),
        }
    }

    /// The answer to a retried CreateKey: the same key and its current credentials.
    async fn created_again(&self, ctx: &Ctx, key: KeyRef) -> Result<CreatedKey> {
        let sandbox = self.reveal(ctx, key, Environment::Sandbox).await?;
        let production = self.reveal(ctx, key, Environment::Production).await?;
        let account = ctx.account()?;
        let client = self.pool.get().await?;
        let role = store::key_role(&client, key.key, account).await?;
        drop(client);
        Ok(CreatedKey { key: self.load(key, role).await?, sandbox, production })
    }

    async fn insert_credential(
        &self,
        tx: &Transaction<'_>,
        key: Uuid,
        credential: &Credential,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let id = Uuid::now_v7();
        // The sealed copy is bound to its row: it cannot be moved to another credential.
        let sealed = self.sealer.seal(credential.expose().as_bytes(), id.as_bytes());
        let hint = credential.hint();
        store::insert_credential(
            tx,
            &store::NewCredential {
                id,
                key,
                environment: credential.environment(),
                sha256: &credential.hash(),
                sealed: &sealed.blob,
                kek_id: &sealed.key_id,
                prefix: hint.prefix,
                last_four: &hint.last_four,
                now,
            },
        )
        .await?;
        Ok(())
    }

    async fn load(&self, key: KeyRef, caller_role: Option<KeyRole>) -> Result<Key> {
        let client = self.pool.get().await?;
        let key = store::load_key(&client, key, self.now()).await?.ok_or(Error::NotFound("key"))?;
        Ok(Key { caller_role, ..key })
    }

    pub async fn get_key(&self, ctx: &Ctx, key: KeyRef) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::See).await?;
        self.load(key, access.key_role).await
    }

    pub async fn list_keys(&self, ctx: &Ctx, project: Uuid, page: PageRequest) -> Result<Page<Key>> {
        let account = ctx.account()?;
        let client = self.pool.get().await?;
        let p = store::project(&client, project).await?.ok_or(Error::NotFound("project"))?;
        let project_role = store::project_role(&client, project, account).await?;
        let key_member = project_role.is_none() && store::has_key_role_in(&client, project, account).await?;
        drop(client);
        let manager = project_role == Some(ProjectRole::Owner) || self.is_org_owner(p.organization_id, account).await?;
        // Decided before the page token is looked at, so no token can tell an outsider whether
        // the project exists.
        if !manager && project_role.is_none() && !key_member {
            return Err(Error::NotFound("project"));
        }
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let member = if manager { None } else { Some(account) };
        let mut rows = store::project_keys(&client, project, member, after, page.size as i64 + 1).await?;
        drop(client);
        let scope = format!("projects/{project}/keys");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |(k, _, at)| page::time_id_cursor(*at, k.key));
        // Invitation counts are sharing information: only for those who may see who a key is
        // shared with (its owner and admins, project and organization owners), never contributors.
        let sees_sharing = |role: Option<KeyRole>| {
            KeyAccess { key_role: role, project_owner: manager, org_owner: false }.allows(KeyAction::Manage)
        };
        let shown: Vec<String> =
            rows.iter().filter(|(_, role, _)| sees_sharing(*role)).map(|(key, _, _)| key.name()).collect();
        let counts = self.invitations.counts(shown).await;
        let mut items = Vec::with_capacity(rows.len());
        for (key, role, _) in rows {
            let mut loaded = self.load(key, role).await?;
            loaded.invitations = match &counts {
                _ if !sees_sharing(role) => InvitationSummary::Hidden,
                Some(counts) => InvitationSummary::Counts(counts.get(&key.name()).copied().unwrap_or_default()),
                None => InvitationSummary::Unknown,
            };
            items.push(loaded);
        }
        Ok(Page { items, next_page_token })
    }

    pub async fn update_key(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        display_name: Option<String>,
        description: Option<String>,
        etag: Option<i64>,
    ) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        in_transaction!(self.pool, |tx| -> Result<()> {
            let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            if etag.is_some_and(|etag| etag != row.version) {
                return Err(Error::EtagMismatch { field: "etag" });
            }
            let name = display_name.clone().unwrap_or(row.display_name);
            let description = description.clone().unwrap_or(row.description);
            store::update_key_text(&tx, key.key, &name, &description).await?.map_err(|_| Error::KeyNameTaken)?;
            store::touch_key(&tx, key.key, self.now()).await?;
            self.audit(&tx, ctx, key.project, Some(key.key), "key.update", &key.name()).await?;
            Ok(())
        })?;
        self.load(key, access.key_role).await
    }

    pub async fn update_environment(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        environment: Environment,
        change: EnvironmentChange,
        etag: Option<i64>,
    ) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
            let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            if etag.is_some_and(|etag| etag != row.version) {
                return Err(Error::EtagMismatch { field: "etag" });
            }
            let current = store::load_key(&tx, key, now).await?.ok_or(Error::NotFound("key"))?;
            let mut env: KeyEnvironment =
                if environment == Environment::Sandbox { current.sandbox } else { current.production };
            env.active = change.active.unwrap_or(env.active);
            env.permissions = change.permissions.unwrap_or(env.permissions);
            env.rate_limit = change.rate_limit.unwrap_or(env.rate_limit);
            env.daily_quota = change.daily_quota.unwrap_or(env.daily_quota);
            env.ip_allowlist = change.ip_allowlist.clone().unwrap_or(env.ip_allowlist);
            env.expire_at = change.expire_at.unwrap_or(env.expire_at);
            store::update_environment(&tx, key.key, &env).await?;
            store::touch_key(&tx, key.key, now).await?;
            let target = format!("{}/environments/{}", key.name(), environment.as_str());
            self.audit(&tx, ctx, key.project, Some(key.key), "key_environment.update", &target).await?;
            feed::record_key(&tx, key, now).await?;
            Ok(())
        })?;
        self.load(key, access.key_role).await
    }

    pub async fn reveal(&self, ctx: &Ctx, key: KeyRef, environment: Environment) -> Result<String> {
        self.key_access(ctx.account()?, key, KeyAction::See).await?;
        let plaintext = in_transaction!(self.pool, |tx| -> Result<_> {
            let (id, blob, kek_id) =
                store::current_sealed(&tx, key.key, environment).await?.ok_or(Error::NoCredential)?;
            let plaintext = self
                .sealer
                .open(&Sealed { key_id: kek_id, blob }, id.as_bytes())
                .map_err(|e| Error::Internal(format!("opening credential {id}: {e}")))?;
            let plaintext =
                String::from_utf8(plaintext).map_err(|_| Error::Internal(format!("credential {id} is not text")))?;
            let target = format!("{}/environments/{}", key.name(), environment.as_str());
            self.audit(&tx, ctx, key.project, Some(key.key), "credential.reveal", &target).await?;
            Ok(plaintext)
        })?;
        Ok(plaintext)
    }

    pub async fn regenerate(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        environment: Environment,
        grace: chrono::Duration,
    ) -> Result<(String, Key)> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let now = self.now();
        let credential = Credential::generate(environment);
        in_transaction!(self.pool, |tx| -> Result<()> {
            store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            store::retire_current(&tx, key.key, environment, now, now + grace).await?;
            self.insert_credential(&tx, key.key, &credential, now).await?;
            store::touch_key(&tx, key.key, now).await?;
            let target = format!("{}/environments/{}", key.name(), environment.as_str());
            self.audit(&tx, ctx, key.project, Some(key.key), "credential.regenerate", &target).await?;
            feed::record_key(&tx, key, now).await?;
            Ok(())
        })?;
        Ok((credential.expose().to_owned(), self.load(key, access.key_role).await?))
    }

    pub async fn delete_key(&self, ctx: &Ctx, key: KeyRef, etag: Option<i64>) -> Result<()> {
        self.key_access(ctx.account()?, key, KeyAction::Delete).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
            let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            if etag.is_some_and(|etag| etag != row.version) {
                return Err(Error::EtagMismatch { field: "etag" });
            }
            store::delete_key(&tx, key.key, now).await?;
            // Invitations live in the invitation service: revoke them after commit, with retries.
            store::queue_call(&tx, "revoke_invitations", &key.name()).await?;
            self.audit(&tx, ctx, key.project, Some(key.key), "key.delete", &key.name()).await?;
            feed::record(&tx, &FeedEvent::KeyRemoved { project: key.project, key: key.key }).await?;
            Ok(())
        })?;
        self.invitations.run_now(&self.pool).await;
        Ok(())
    }

    pub async fn shared_keys(&self, ctx: &Ctx, page: PageRequest) -> Result<Page<(Key, KeyRole)>> {
        let account = ctx.account()?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::shared_keys(&client, account, after, page.size as i64 + 1).await?;
        drop(client);
        let scope = format!("sharedKeys:{account}");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |(k, _, at)| page::time_id_cursor(*at, k.key));
        let mut items = Vec::with_capacity(rows.len());
        for (key, role, _) in rows {
            items.push((self.load(key, Some(role)).await?, role));
        }
        Ok(Page { items, next_page_token })
    }
}
