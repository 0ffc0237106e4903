//! The session-revocation feed misses nothing, even a revocation that commits after a later one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{Harness, authed, internal_token, login, verified_account};
use keyshare_proto::identity::v1 as pb;
use pb::watch_session_revocations_response::Event;

type Feed = tonic::Streaming<pb::WatchSessionRevocationsResponse>;

/// The `sid` claim of an access token.
fn session_of(access_token: &str) -> String {
    let payload = access_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["sid"].as_str().unwrap().to_owned()
}

async fn next(feed: &mut Feed) -> Event {
    let message = tokio::time::timeout(Duration::from_secs(5), feed.message()).await.expect("nothing within 5 s");
    message.unwrap().expect("the stream ended").event.unwrap()
}

async fn next_revoked(feed: &mut Feed) -> String {
    match next(feed).await {
        Event::Revocation(revocation) => revocation.session_id,
        other => panic!("expected a revocation, got {other:?}"),
    }
}

async fn watch(h: &Harness) -> Feed {
    let mut client = h.client().await;
    let token = internal_token(h).await;
    let mut feed = client
        .watch_session_revocations(authed(&token, pb::WatchSessionRevocationsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next(&mut feed).await, Event::SnapshotEnd(_)), "the snapshot is empty before any session ends");
    feed
}

#[tokio::test]
async fn a_revocation_committed_after_a_later_one_is_still_streamed_and_in_the_next_snapshot() {
    let h = Harness::start().await;
    let (_, first_access, _) = verified_account(&h, "ada@example.com").await;
    let mut client = h.client().await;
    let second = login(&mut client, "ada@example.com").await.unwrap();
    let (first, second_session) = (session_of(&first_access), session_of(&second.access_token));
    let mut feed = watch(&h).await;

    // A transaction ends the first session and stays open: its revocation has drawn its
    // sequence number but is not visible yet.
    let (mut slow, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let slow = slow.transaction().await.unwrap();
    slow.execute(
        "UPDATE identity.sessions SET revoked_at = now(), revoked_reason = 'test' WHERE id = $1::text::uuid",
        &[&first],
    )
    .await
    .unwrap();

    // A logout of the second session commits first, with a later sequence number.
    client.logout(pb::LogoutRequest { refresh_token: second.refresh_token }).await.unwrap();
    assert_eq!(next_revoked(&mut feed).await, second_session);

    slow.commit().await.unwrap();
    assert_eq!(next_revoked(&mut feed).await, first, "a revocation that committed late was missed");
    let (check, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let sessions: Vec<String> = check
        .query("SELECT session_id::text FROM identity.session_revocations ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(sessions, [first.clone(), second_session.clone()], "the late one drew the earlier sequence");

    // A watcher that connects now gets both in its snapshot, then the snapshot's end.
    let mut client = h.client().await;
    let token = internal_token(&h).await;
    let mut fresh = client
        .watch_session_revocations(authed(&token, pb::WatchSessionRevocationsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = vec![next_revoked(&mut fresh).await, next_revoked(&mut fresh).await];
    snapshot.sort();
    let mut expected = vec![first, second_session];
    expected.sort();
    assert_eq!(snapshot, expected);
    assert!(matches!(next(&mut fresh).await, Event::SnapshotEnd(_)));
}

#[tokio::test]
async fn revocations_whose_tokens_have_all_expired_are_not_sent() {
    let h = Harness::start().await;
    let (_, _, refresh) = verified_account(&h, "ada@example.com").await;
    let mut client = h.client().await;
    client.logout(pb::LogoutRequest { refresh_token: refresh }).await.unwrap();
    // Past the access-token lifetime (15 min) and the skew, nobody needs to hear of it.
    h.clock.advance(chrono::Duration::minutes(17));
    watch(&h).await;
}
