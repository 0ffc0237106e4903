//! Every service's `/metrics` serves what ARCHITECTURE.md lists for it. The list is read from
//! the document, so the documentation and the services cannot drift apart.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{Keyshare, SERVICES, authed};
use keyshare_proto::authorizer::v1 as azpb;
use keyshare_proto::authorizer::v1::authorizer_service_client::AuthorizerServiceClient;
use keyshare_proto::invitation::v1 as ivpb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_runtime::testkit::{scrape, workspace_root};

/// A documented metric: its name and the labels its series carry (besides `service`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Documented {
    name: String,
    labels: Vec<String>,
}

/// The "Metrics" entry under "Cross-cutting" in ARCHITECTURE.md: per service, what it exports.
fn documented_metrics(architecture: &str) -> HashMap<&'static str, Vec<Documented>> {
    let section = &architecture[architecture.find("## Cross-cutting").expect("a Cross-cutting section")..];
    let entry = &section[section.find("- **Metrics**").expect("a Metrics entry under Cross-cutting")..];
    // The entry's sub-items ("  - who: names"), each with its continuation lines.
    let mut items: Vec<String> = Vec::new();
    for line in entry.lines().skip(1) {
        if let Some(item) = line.strip_prefix("  - ") {
            items.push(item.to_owned());
        } else if line.starts_with("    ") && !items.is_empty() {
            items.last_mut().unwrap().push_str(line);
        } else if !line.starts_with("  ") {
            break;
        }
    }
    let mut per_service: HashMap<&'static str, Vec<Documented>> = HashMap::new();
    for item in items {
        let (who, names) = item.split_once(':').unwrap_or_else(|| panic!("{item:?} does not say whose metrics"));
        let services: Vec<&'static str> = if who.trim() == "every service" {
            SERVICES.to_vec()
        } else {
            who.split(',')
                .map(|name| {
                    let name = name.trim();
                    *SERVICES.iter().find(|s| **s == name).unwrap_or_else(|| panic!("{name:?} is not a service"))
                })
                .collect()
        };
        let metrics: Vec<Documented> = names
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|quoted| quoted.starts_with("keyshare_"))
            .map(|quoted| match quoted.split_once('{') {
                None => Documented { name: quoted.to_owned(), labels: Vec::new() },
                Some((name, labels)) => Documented {
                    name: name.to_owned(),
                    labels: labels.trim_end_matches('}').split(',').map(|l| l.trim().to_owned()).collect(),
                },
            })
            .collect();
        assert!(!metrics.is_empty(), "{item:?} names no metric");
        for service in services {
            per_service.entry(service).or_default().extend(metrics.iter().cloned());
        }
    }
    per_service
}

/// One sample line of the text exposition: metric name and labels.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
}

fn samples(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = line[..name_end].to_owned();
            let mut labels = HashMap::new();
            if line[name_end..].starts_with('{') {
                let mut rest = &line[name_end + 1..];
                // key="value" pairs; values here hold no quotes or backslashes.
                while let Some((key, after)) = rest.split_once("=\"") {
                    let (value, after) = after.split_once('"').unwrap();
                    labels.insert(key.trim_start_matches(',').to_owned(), value.to_owned());
                    rest = after;
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
            Sample { name, labels }
        })
        .collect()
}

#[test]
fn the_documented_list_parses() {
    let doc = "## Cross-cutting\n\n- **Errors**: x\n- **Metrics**: text `keyshare_not_a_list` (see\n  below):\n  \
               - every service: `keyshare_a_total{method,code}`,\n    `keyshare_b` (histogram)\n  \
               - authorizer: `keyshare_c`\n- **Next**: `keyshare_d`\n";
    let parsed = documented_metrics(doc);
    let names = |service: &str| parsed[service].iter().map(|m| m.name.as_str()).collect::<Vec<_>>();
    assert_eq!(names("identity"), ["keyshare_a_total", "keyshare_b"]);
    assert_eq!(names("authorizer"), ["keyshare_a_total", "keyshare_b", "keyshare_c"]);
    assert_eq!(parsed["keyring"][0].labels, ["method", "code"]);
    let parsed = samples("# TYPE x counter\nx_total{service=\"s\",method=\"/a.B/C\",code=\"Ok\"} 1\ny 2\n");
    assert_eq!(parsed[0].name, "x_total");
    assert_eq!(parsed[0].labels["method"], "/a.B/C");
    assert_eq!(parsed[0].labels["code"], "Ok");
    assert!(parsed[1].labels.is_empty());
}

#[tokio::test]
async fn every_service_exports_the_documented_metrics() {
    let architecture = std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).unwrap();
    let documented = documented_metrics(&architecture);
    for service in SERVICES {
        assert!(documented.contains_key(service), "ARCHITECTURE.md lists no metrics for {service}");
    }

    let keyshare = Keyshare::start(&SERVICES, []).await;
    // A call or two into each service, so the per-call metrics have series.
    let ada = keyshare.account("ada@example.com").await;
    let created = keyshare.key(&ada).await;
    let mut invitations = InvitationServiceClient::new(keyshare.channel("invitation"));
    invitations.list_my_invitations(authed(&ada, ivpb::ListMyInvitationsRequest::default())).await.unwrap();
    let mut authorizer = AuthorizerServiceClient::new(keyshare.channel("authorizer"));
    let check = azpb::CheckKeyRequest {
        key: created.sandbox_credential,
        method: "GET".into(),
        path: "/v1/things".into(),
        ..Default::default()
    };
    authorizer.check_key(check).await.unwrap();

    for service in SERVICES {
        let exposition =
            tokio::time::timeout(Duration::from_secs(10), scrape(keyshare.metrics(service))).await.unwrap();
        let samples = samples(&exposition);
        for sample in &samples {
            assert_eq!(
                sample.labels.get("service").map(String::as_str),
                Some(service),
                "{} of {service} is not labelled service=\"{service}\"",
                sample.name
            );
        }
        for metric in &documented[service] {
            // A histogram shows as its _bucket, _count and _sum series.
            let series: Vec<&Sample> = samples
                .iter()
                .filter(|s| {
                    s.name == metric.name
                        || ["_bucket", "_count", "_sum"]
                            .iter()
                            .any(|suffix| s.name.strip_suffix(suffix) == Some(metric.name.as_str()))
                })
                .collect();
            assert!(!series.is_empty(), "{service} does not export {}:\n{exposition}", metric.name);
            let labels: BTreeSet<&str> = series.iter().flat_map(|s| s.labels.keys().map(String::as_str)).collect();
            for label in &metric.labels {
                assert!(
                    labels.contains(label.as_str()),
                    "{} of {service} has no label {label}: {labels:?}",
                    metric.name
                );
            }
        }
    }
    // The calls above were counted where they were served.
    let identity = scrape(keyshare.metrics("identity")).await;
    let logins = samples(&identity).into_iter().find(|s| {
        s.name == "keyshare_rpc_calls_total"
            && s.labels.get("method").map(String::as_str) == Some("/keyshare.identity.v1.IdentityService/Login")
            && s.labels.get("code").map(String::as_str) == Some("Ok")
    });
    assert!(logins.is_some(), "identity did not count the login:\n{identity}");
}
