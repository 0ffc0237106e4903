//! Account tokens are not accepted blindly by a keyring that has never received identity's list
//! of ended sessions: it waits a few seconds for it, then answers UNAVAILABLE.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::keyring::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn without_the_session_feed_account_tokens_get_unavailable_not_access() {
    let mut h = Harness::start().await;
    let (_, token) = h.account("ada@example.com").await;
    let nowhere = || pb::GetProjectRequest { name: format!("projects/{}", uuid::Uuid::new_v4()) };

    // This keyring's internal client is refused by identity, so it never gets the feed.
    let blind = h.start_keyring_with_secret("not-the-keyring-secret-0123456789abcdef").await;
    let refused = keyring_at(blind).await.get_project(authed(&token, nowhere())).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused).as_str()), (Code::Unavailable, "SESSIONS_UNAVAILABLE"));

    // The keyring that follows the feed takes the same token (and finds no such project).
    let answered = h.keyring().await.get_project(authed(&token, nowhere())).await.unwrap_err();
    assert_eq!(answered.code(), Code::NotFound);
}
