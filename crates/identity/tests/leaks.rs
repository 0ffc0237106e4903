//! Small leaks: request ids a client chooses, secrets in printed configuration.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::identity::v1 as pb;

/// The `x-request-id` the server answers a call that sent `sent` with.
async fn answered_request_id(client: &mut Client, sent: Option<tonic::metadata::AsciiMetadataValue>) -> String {
    let mut request = tonic::Request::new(pb::ListPublicKeysRequest::default());
    if let Some(value) = sent {
        request.metadata_mut().insert("x-request-id", value);
    }
    let response = client.list_public_keys(request).await.unwrap();
    response.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned()
}

#[tokio::test]
async fn oversized_or_unprintable_request_ids_are_replaced() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let fresh = |id: &str| uuid::Uuid::parse_str(id).is_ok();

    // A short, printable id is kept, up to 128 characters.
    for kept in ["req-42_a.B:c/9", &"x".repeat(128)] {
        let answered = answered_request_id(&mut client, Some(kept.parse().unwrap())).await;
        assert_eq!(answered, kept);
    }
    let forged = [
        "y".repeat(129),
        "x".repeat(8000),
        "two words".to_owned(),
        "tab\there".to_owned(),
        "fake\"}{\"level\":\"ERROR\"} injected log line".to_owned(),
    ];
    for sent in forged {
        let value = tonic::metadata::AsciiMetadataValue::try_from(sent.as_bytes()).unwrap();
        let answered = answered_request_id(&mut client, Some(value)).await;
        assert!(fresh(&answered), "{sent:?} was answered with {answered:?}");
    }
    let non_ascii = tonic::metadata::AsciiMetadataValue::try_from("caf\u{e9}".as_bytes());
    if let Ok(value) = non_ascii {
        assert!(fresh(&answered_request_id(&mut client, Some(value)).await));
    }
    assert!(fresh(&answered_request_id(&mut client, None).await));
}

#[tokio::test]
async fn printed_configuration_shows_no_secret() {
    let h = Harness::start().await;
    let settings = h
        .stack
        .settings(keyshare_testkit::Kind::Identity)
        .with(Setting::DatabaseUrl("postgres://keyshare:db-password-1234@127.0.0.1/keyshare".into()))
        .with(Setting::SmtpUrl("smtp://mailer:smtp-password-5678@127.0.0.1:2525".into()));
    let config = keyshare_identity::Config::from_env(&settings.env()).unwrap();
    let printed = format!("{config:?}");
    let kek = h.kek.split_once(':').unwrap().1.to_owned();
    for secret in ["db-password-1234", "smtp-password-5678", INTERNAL_SECRET, kek.as_str()] {
        assert!(!printed.contains(secret), "Debug of identity's Config shows a secret: {printed}");
    }
    assert!(printed.contains("invitation:<redacted>"), "{printed}");
}
