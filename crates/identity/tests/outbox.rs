//! The mail outbox against a real SMTP server that is slow, or refuses a mailbox for good.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::testkit::{SmtpServer, eventually};

async fn sign_up(client: &mut Client, email: &str) {
    client
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            display_name: "Someone".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
}

async fn db(h: &Harness) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_smtp_server_cannot_make_two_replicas_send_one_mail_twice() {
    // Each mail takes the server a second; twelve of them take twice a 6-second lease, so a
    // worker that leased them together would see the later ones taken over and sent again.
    let smtp = SmtpServer::start_slow(Duration::from_secs(1)).await;
    let h = Harness::start_with_smtp(
        smtp,
        [Setting::MailLease(Duration::from_secs(6)), Setting::MailPoll(Duration::from_secs(1))],
    )
    .await;
    let (_, _, _second_replica) = h.spawn_instance().await;
    let mut client = h.client().await;
    let addresses: Vec<String> = (0..12).map(|i| format!("slow{i}@example.com")).collect();
    for address in &addresses {
        sign_up(&mut client, address).await;
    }
    let db = db(&h).await;
    eventually("every mail delivered", Duration::from_secs(120), || async {
        let pending: i64 =
            db.query_one("SELECT count(*) FROM identity.outbox WHERE delivered_at IS NULL", &[]).await.unwrap().get(0);
        (pending == 0).then_some(())
    })
    .await;
    let received = h.smtp.received();
    for address in &addresses {
        let copies = received.iter().filter(|m| m.to.contains(address.as_str())).count();
        assert_eq!(copies, 1, "{address} got {copies} copies");
    }
}

#[tokio::test]
async fn mail_refused_for_good_keeps_no_token_in_the_outbox() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    // The SMTP server refuses this mailbox with a permanent error; the other one is delivered.
    sign_up(&mut client, "refused-mailbox@example.com").await;
    sign_up(&mut client, "delivered@example.com").await;
    let db = db(&h).await;
    let rows = eventually("both mails settled", Duration::from_secs(30), || async {
        let rows = db
            .query(
                "SELECT recipient, body, delivered_at IS NOT NULL, failed_at IS NOT NULL FROM identity.outbox
                 WHERE delivered_at IS NOT NULL OR failed_at IS NOT NULL ORDER BY recipient",
                &[],
            )
            .await
            .unwrap();
        (rows.len() == 2).then_some(rows)
    })
    .await;
    let settled: Vec<(String, String, bool, bool)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        settled,
        vec![
            ("delivered@example.com".to_owned(), String::new(), true, false),
            ("refused-mailbox@example.com".to_owned(), String::new(), false, true),
        ],
        "a settled mail keeps no body, so no token"
    );
}
