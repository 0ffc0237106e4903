//! Transactional email outbox, shared by every service that sends mail.
//!
//! A mail is a row in the service's own `outbox` table, inserted in the same transaction as the
//! change that caused it, so a change never commits without its mail and a rolled-back change
//! never mails. A background worker delivers pending rows over SMTP (lettre) or, when no SMTP
//! server is configured, as `.eml` files in a spool directory. Failed sends are retried with
//! exponential backoff; permanent refusals are marked failed. Delivery state (attempts, last
//! error, delivered or failed time) stays on the row. Once delivered or failed for good, the
//! body (which may hold a single-use token) is erased.
//!
//! Rows are claimed one at a time with `FOR UPDATE SKIP LOCKED` and a lease of their own, and a
//! send is abandoned (and retried) after half the lease, so a mail's lease never ends while it
//! is being sent: replicas share the work, a crashed worker's mail is picked up again when its
//! lease ends, and a slow SMTP server cannot make two replicas send the same mail. Delivery is
//! still at least once: a crash between the SMTP server accepting a mail and the row being
//! marked can send it twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::Body;
use lettre::message::Mailbox;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::db::{DbError, GenericClient};
use crate::env::{ConfigError, Env};
use crate::jobs::{Backoff, Round};

/// A mail to send.
#[derive(Clone, PartialEq, Eq)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// What the mail is about (e.g. `invitations/…`), to find its delivery state later.
    pub topic: Option<String>,
}

impl std::fmt::Debug for Mail {
    // The body can carry a token: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mail").field("subject", &self.subject).field("topic", &self.topic).finish_non_exhaustive()
    }
}

/// The base URL of the deployment's web front end, where links in mails point
/// (`KEYSHARE_PUBLIC_URL`, e.g. `https://keyshare.example.com`), or `None` when there is none:
/// then mails carry no link at all, since a link to a host where nothing answers is worse than
/// none.
pub fn public_url(env: &Env) -> Result<Option<String>, ConfigError> {
    let Some(url) = env.get("KEYSHARE_PUBLIC_URL").filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("https://") || url.starts_with("http://")) || url.contains(char::is_whitespace) {
        return Err(ConfigError::new(
            "KEYSHARE_PUBLIC_URL",
            "must be an http(s) URL such as https://keyshare.example.com",
        ));
    }
    Ok(Some(url.to_owned()))
}

/// How a mail tells its reader to use a single-use token: the link into the web front end
/// when there is one (`public_url` + `path`), and always the RPC that takes the token, so the
/// mail is useful with grpcurl alone. `action` completes "To …, ", e.g. "confirm your email".
pub fn token_steps(public_url: Option<&str>, path: &str, token: &str, rpc: &str, action: &str) -> String {
    let call = format!("call {rpc} with\n\n    token={token}\n");
    match public_url {
        Some(base) => format!("To {action}, open this link:\n\n{base}{path}?token={token}\n\nor {call}"),
        None => format!("To {action}, {call}"),
    }
}

/// The DDL of the outbox table in `schema`, for a service's migrations.
pub fn outbox_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE {schema}.outbox (
            id BIGSERIAL PRIMARY KEY,
            recipient TEXT NOT NULL,
            subject TEXT NOT NULL,
            body TEXT NOT NULL,
            topic TEXT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            attempts INT NOT NULL DEFAULT 0,
            next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            locked_until TIMESTAMPTZ,
            delivered_at TIMESTAMPTZ,
            failed_at TIMESTAMPTZ,
            last_error TEXT
        );
        CREATE INDEX outbox_pending ON {schema}.outbox (next_attempt_at)
            WHERE delivered_at IS NULL AND failed_at IS NULL;
        CREATE INDEX outbox_topic ON {schema}.outbox (topic) WHERE topic IS NOT NULL;"
    )
}

/// Queues `mail` in the caller's transaction. Returns the outbox row id.
pub async fn enqueue(client: &impl GenericClient, schema: &str, mail: &Mail) -> Result<i64, DbError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO {schema}.outbox (recipient, subject, body, topic) VALUES ($1, $2, $3, $4) RETURNING id"
            ),
            &[&mail.to, &mail.subject, &mail.body, &mail.topic],
        )
        .await?;
    Ok(row.get(0))
}

/// Where mail goes.
#[derive(Clone)]
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Spool(PathBuf),
}

/// Outbox settings from the environment.
#[derive(Clone)]
pub struct MailConfig {
    transport: Transport,
    from: Mailbox,
    retry_max: Duration,
    poll_interval: Duration,
    lease: Duration,
}

impl std::fmt::Debug for MailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let transport = match &self.transport {
            Transport::Smtp(_) => "smtp".to_owned(),
            Transport::Spool(dir) => format!("spool:{}", dir.display()),
        };
        f.debug_struct("MailConfig").field("transport", &transport).field("from", &self.from.to_string()).finish()
    }
}

impl MailConfig {
    /// `KEYSHARE_SMTP_URL` (e.g. `smtp://user:pass@host:587?tls=required`; unset: spool files),
    /// `KEYSHARE_MAIL_SPOOL_DIR`, `KEYSHARE_MAIL_FROM`, `KEYSHARE_MAIL_RETRY_MAX_SECS`,
    /// `KEYSHARE_MAIL_POLL_SECS`, `KEYSHARE_MAIL_LEASE_SECS`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let transport = match env.get("KEYSHARE_SMTP_URL") {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
                    // The URL may hold credentials: say what is wrong without echoing it.
                    .map_err(|_| ConfigError::new("KEYSHARE_SMTP_URL", "must be a URL such as smtp://host:25"))?
                    .timeout(Some(Duration::from_secs(10)))
                    .build(),
            ),
            None => {
                Transport::Spool(PathBuf::from(env.get("KEYSHARE_MAIL_SPOOL_DIR").unwrap_or_else(|| "var/mail".into())))
            }
        };
        let from = env
            .get("KEYSHARE_MAIL_FROM")
            .unwrap_or_else(|| "Keyshare <no-reply@keyshare.localhost>".into())
            .parse()
            .map_err(|_| {
                ConfigError::new("KEYSHARE_MAIL_FROM", "must be an address such as Keyshare <no-reply@example.com>")
            })?;
        Ok(Self {
            transport,
            from,
            retry_max: env.secs_or("KEYSHARE_MAIL_RETRY_MAX_SECS", 300)?,
            poll_interval: env.secs_or("KEYSHARE_MAIL_POLL_SECS", 2)?,
            lease: env.secs_or("KEYSHARE_MAIL_LEASE_SECS", 60)?,
        })
    }

    /// Where mail goes, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Smtp(_) => "smtp".into(),
            Transport::Spool(dir) => format!("files in {}", dir.display()),
        }
    }
}

/// Wakes the outbox worker after a mail was committed, so delivery does not wait for the poll.
pub type OutboxWaker = crate::jobs::Waker;

/// The delivery worker of one service's outbox.
pub struct OutboxWorker {
    pool: deadpool_postgres::Pool,
    schema: &'static str,
    config: MailConfig,
    waker: OutboxWaker,
}

impl OutboxWorker {
    pub fn new(pool: deadpool_postgres::Pool, schema: &'static str, config: MailConfig) -> Self {
        Self { pool, schema, config, waker: OutboxWaker::default() }
    }

    pub fn waker(&self) -> OutboxWaker {
        self.waker.clone()
    }

    /// Runs until the task is aborted: one mail a round, the next at once while any is due.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let worker = Arc::new(self);
        let (every, waker) = (worker.config.poll_interval, worker.waker.clone());
        crate::jobs::spawn_rounds("outbox", every, waker, move || {
            let worker = worker.clone();
            Some(async move {
                match worker.deliver_next().await {
                    Ok(true) => Ok(Round::More),
                    Ok(false) => Ok(Round::Idle),
                    Err(e) => {
                        tracing::warn!(error = %e, schema = worker.schema, "outbox delivery round failed");
                        Ok(Round::Idle)
                    }
                }
            })
        })
    }

    /// Claims and delivers the next due mail, if there is one; answers whether there was.
    pub async fn deliver_next(&self) -> Result<bool, DbError> {
        let schema = self.schema;
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE {schema}.outbox
                     SET locked_until = now() + make_interval(secs => $1), attempts = attempts + 1
                     WHERE id = (
                        SELECT id FROM {schema}.outbox
                        WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
                          AND (locked_until IS NULL OR locked_until < now())
                        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING id, recipient, subject, body, attempts"
                ),
                &[&self.config.lease.as_secs_f64()],
            )
            .await?;
        drop(client);
        let Some(row) = row else { return Ok(false) };
        let (id, recipient, subject, body, attempts): (i64, String, String, String, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        // Half the lease: the row is marked well before another worker could claim it again.
        let outcome = tokio::time::timeout(self.config.lease / 2, self.send(id, &recipient, subject, body))
            .await
            .unwrap_or_else(|_| Err(SendError { permanent: false, message: "sending timed out".into() }));
        let client = self.pool.get().await?;
        match outcome {
            Ok(()) => {
                client
                    .execute(
                        &format!(
                            "UPDATE {schema}.outbox SET delivered_at = now(), locked_until = NULL,
                             body = '', last_error = NULL WHERE id = $1"
                        ),
                        &[&id],
                    )
                    .await?;
                tracing::info!(outbox_id = id, schema, "mail delivered");
            }
            Err(SendError { permanent, message }) => {
                let backoff = self.backoff(attempts);
                let sql = if permanent {
                    // Never to be sent: nothing needs the body (or the token it may carry).
                    format!(
                        "UPDATE {schema}.outbox SET failed_at = now(), locked_until = NULL, body = '',
                         last_error = $2 WHERE id = $1"
                    )
                } else {
                    format!(
                        "UPDATE {schema}.outbox SET locked_until = NULL, last_error = $2,
                         next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1"
                    )
                };
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    if permanent { vec![&id, &message] } else { vec![&id, &message, &backoff] };
                client.execute(&sql, &params).await?;
                tracing::warn!(outbox_id = id, schema, attempts, permanent, error = %message, "mail not delivered");
            }
        }
        Ok(true)
    }

    /// 1 s after the first failure, doubled after each further one, up to
    /// `KEYSHARE_MAIL_RETRY_MAX_SECS`.
    fn backoff(&self, attempts: i32) -> f64 {
        Backoff::new(Duration::from_secs(1), self.config.retry_max).secs_after(attempts)
    }

    async fn send(&self, id: i64, recipient: &str, subject: String, body: String) -> Result<(), SendError> {
        let to: Mailbox = recipient
            .parse()
            .map_err(|_| SendError { permanent: true, message: "recipient address is not valid".into() })?;
        let message = Message::builder()
            .from(self.config.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(readable_body(body))
            .map_err(|e| SendError { permanent: true, message: format!("building message: {e}") })?;
        match &self.config.transport {
            Transport::Smtp(smtp) => smtp.send(message).await.map(|_| ()).map_err(|e| SendError {
                permanent: e.is_permanent(),
                message: format!("smtp: {}", smtp_error_summary(&e)),
            }),
            Transport::Spool(dir) => {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| SendError { permanent: false, message: format!("spool directory: {e}") })?;
                // Written aside and renamed, so a reader of the spool never sees half a mail.
                let path = dir.join(format!("{}-{id}.eml", self.schema));
                let partial = dir.join(format!(".{}-{id}.eml.partial", self.schema));
                tokio::fs::write(&partial, message.formatted())
                    .await
                    .map_err(|e| SendError { permanent: false, message: format!("spool file: {e}") })?;
                tokio::fs::rename(&partial, &path)
                    .await
                    .map_err(|e| SendError { permanent: false, message: format!("spool file: {e}") })
            }
        }
    }
}

/// The body as plain 8bit text when every line fits RFC 5322's 998-byte limit, so links and
/// tokens stay readable in spool files and mail clients (lettre would otherwise pick
/// quoted-printable for any line over 76 characters, such as a link).
fn readable_body(body: String) -> Body {
    let crlf = body.replace("\r\n", "\n").replace('\n', "\r\n");
    if crlf.split("\r\n").all(|line| line.len() <= 998) && !crlf.contains('\0') {
        Body::dangerous_pre_encoded(crlf.into_bytes(), ContentTransferEncoding::EightBit)
    } else {
        Body::new(body)
    }
}

struct SendError {
    permanent: bool,
    message: String,
}

// lettre's errors describe the SMTP exchange (status codes, connection problems), never the
// message content; keep them short.
fn smtp_error_summary(e: &lettre::transport::smtp::Error) -> String {
    let text = e.to_string();
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mail_links_only_to_a_configured_front_end() {
        let rpc = "keyshare.identity.v1.IdentityService/VerifyEmail";
        let without = token_steps(None, "/verify-email", "tok_123", rpc, "confirm your email");
        assert!(!without.contains("http"), "{without}");
        assert!(without.contains(&format!("call {rpc} with")) && without.contains("token=tok_123"), "{without}");

        let with = token_steps(Some("https://keyshare.example.com"), "/verify-email", "tok_123", rpc, "confirm");
        assert!(with.contains("https://keyshare.example.com/verify-email?token=tok_123"), "{with}");
        assert!(with.contains(rpc), "{with}");
    }

    #[test]
    fn the_public_url_is_optional_and_checked() {
        let read = |value: &str| public_url(&Env::from_pairs([("KEYSHARE_PUBLIC_URL", value.to_owned())]));
        assert_eq!(public_url(&Env::from_pairs(Vec::<(String, String)>::new())).unwrap(), None);
        assert_eq!(read("").unwrap(), None);
        assert_eq!(read("https://keyshare.example.com/").unwrap().as_deref(), Some("https://keyshare.example.com"));
        let error = read("keyshare.example.com").unwrap_err().to_string();
        assert!(error.contains("KEYSHARE_PUBLIC_URL"), "{error}");
    }
}
