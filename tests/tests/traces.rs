//! Traces across the services: one call into invitation is one trace, holding the spans that
//! identity and keyring serve for it as children of invitation's. Each service runs as its own
//! process (the tracer provider is process-wide) and exports over OTLP to a receiver here.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Keyshare, Setting, authed, token_in};
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const ACCEPT: &str = "keyshare.invitation.v1.InvitationService/AcceptInvitation";
const ADD_KEY_MEMBER: &str = "keyshare.keyring.v1.KeyringService/AddKeyMember";
const GET_ACCOUNT: &str = "keyshare.identity.v1.IdentityService/GetAccount";

/// One received span, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    kind: i32,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// An OTLP/gRPC trace receiver, as a collector would run one.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| match attribute.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Listens on a free port; returns the environment that points a service at it.
    async fn start() -> (Self, Vec<Setting>) {
        let receiver = Self::default();
        let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(receiver.clone()));
        tokio::spawn(server.serve_with_incoming(incoming));
        let settings = vec![
            Setting::TraceEndpoint(format!("http://{addr}")),
            // Export every 100 ms rather than every 5 s, so the test need not wait long.
            Setting::TraceBatchDelay(Duration::from_millis(100)),
        ];
        (receiver, settings)
    }

    /// Waits for the trace whose root is the server span `root` until `complete` says it has
    /// arrived whole, and returns its spans.
    async fn trace(&self, root: &str, complete: impl Fn(&Trace) -> bool) -> Trace {
        let deadline = Duration::from_secs(20);
        let start = Instant::now();
        loop {
            let spans = self.spans.lock().unwrap().clone();
            // Every call of `root` is a trace of its own: the one that is wanted may not be the first.
            let found = spans
                .iter()
                .filter(|s| s.name == root && s.kind == SpanKind::Server as i32)
                .map(|root| Trace {
                    root: root.clone(),
                    spans: spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect(),
                })
                .find(|trace| complete(trace) && trace.connected());
            if let Some(trace) = found {
                return trace;
            }
            assert!(
                start.elapsed() < deadline,
                "no complete trace of {root} within {deadline:?}; received:\n{}",
                describe(&spans)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every span received so far called `name`.
    fn named(&self, name: &str) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().iter().filter(|s| s.name == name).cloned().collect()
    }
}

struct Trace {
    root: ReceivedSpan,
    spans: Vec<ReceivedSpan>,
}

impl Trace {
    fn by_id(&self) -> HashMap<&[u8], &ReceivedSpan> {
        self.spans.iter().map(|s| (s.span_id.as_slice(), s)).collect()
    }

    /// Every span but the root has its parent in the trace.
    fn connected(&self) -> bool {
        let by_id = self.by_id();
        self.spans.iter().all(|s| s.span_id == self.root.span_id || by_id.contains_key(s.parent_span_id.as_slice()))
    }

    fn server_spans(&self, service: &str, name: &str) -> Vec<&ReceivedSpan> {
        self.spans
            .iter()
            .filter(|s| s.service == service && s.name == name && s.kind == SpanKind::Server as i32)
            .collect()
    }

    fn parent(&self, span: &ReceivedSpan) -> &ReceivedSpan {
        self.by_id()
            .get(span.parent_span_id.as_slice())
            .copied()
            .unwrap_or_else(|| panic!("{} has no parent in the trace", span.name))
    }

    /// The chain of span names from `span` up to the root.
    fn ancestry(&self, span: &ReceivedSpan) -> Vec<String> {
        let mut chain = vec![format!("{} ({})", span.name, span.service)];
        let mut current = span;
        while current.span_id != self.root.span_id {
            current = self.parent(current);
            chain.push(format!("{} ({})", current.name, current.service));
        }
        chain
    }
}

fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} {} trace={} span={} parent={}\n",
                s.service,
                s.name,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ada owns a key and invites Bob to it; Bob has signed up and verified. Returns Bob's access
/// token and the acceptance token from his invitation mail.
async fn invited_bob(keyshare: &Keyshare) -> (InvitationServiceClient<tonic::transport::Channel>, String, String) {
    let ada = keyshare.account("ada@example.com").await;
    let key = keyshare.key(&ada).await.key.unwrap().name;
    let mut invitations = InvitationServiceClient::new(keyshare.channel("invitation"));
    let invitee = pb::Invitee { email: "bob@example.com".into(), role: pb::InvitationRole::KeyContributor as i32 };
    let request = pb::CreateInvitationsRequest { parent: key, invitees: vec![invitee] };
    let created = invitations.create_invitations(authed(&ada, request)).await.unwrap().into_inner();
    assert!(created.results[0].invitation.is_some(), "Bob was not invited: {:?}", created.results);
    let bob = keyshare.account("bob@example.com").await;
    let mail = keyshare.smtp.wait_for_mail("bob@example.com", "invited you").await;
    (invitations, bob, token_in(&mail.body))
}

#[tokio::test]
async fn accepting_an_invitation_is_one_trace_across_the_services() {
    let (receiver, otlp) = Receiver::start().await;
    let keyshare = Keyshare::start(&["identity", "keyring", "invitation"], otlp).await;
    let (mut invitations, bob, token) = invited_bob(&keyshare).await;

    invitations.accept_invitation(authed(&bob, pb::AcceptInvitationRequest { token })).await.unwrap();

    let trace = receiver
        .trace(ACCEPT, |trace| {
            !trace.server_spans("keyshare-keyring", ADD_KEY_MEMBER).is_empty()
                && !trace.server_spans("keyshare-identity", GET_ACCOUNT).is_empty()
        })
        .await;
    let all = describe(&trace.spans);
    assert_eq!(trace.root.service, "keyshare-invitation");
    assert!(trace.root.parent_span_id.is_empty(), "the client sent no trace context:\n{all}");
    for service in ["keyshare-invitation", "keyshare-keyring", "keyshare-identity"] {
        assert!(trace.spans.iter().any(|s| s.service == service), "no span of {service} in the trace:\n{all}");
    }
    // What identity and keyring served for the acceptance hangs under invitation's spans.
    for (service, name) in [("keyshare-keyring", ADD_KEY_MEMBER), ("keyshare-identity", GET_ACCOUNT)] {
        for span in trace.server_spans(service, name) {
            let parent = trace.parent(span);
            assert_eq!(parent.service, "keyshare-invitation", "{:?}\n{all}", trace.ancestry(span));
        }
    }
    let grant = trace.server_spans("keyshare-keyring", ADD_KEY_MEMBER)[0];
    assert_eq!(trace.parent(grant).name, "invitation.grant", "{:?}", trace.ancestry(grant));
    // The grant happened once, in this trace and no other.
    let grants = receiver.named(ADD_KEY_MEMBER);
    assert_eq!(grants.len(), 1, "{}", describe(&grants));
}

#[tokio::test]
async fn an_acceptance_refused_while_keyring_was_down_is_one_trace_when_retried() {
    let (receiver, otlp) = Receiver::start().await;
    let mut keyshare = Keyshare::start(&["identity", "keyring", "invitation"], otlp).await;
    let (mut invitations, bob, token) = invited_bob(&keyshare).await;

    // Keyring is down when Bob accepts: whether the inviter may still grant the role cannot be
    // checked, so nothing is accepted, and Bob can try again once keyring is back.
    assert!(keyshare.terminate("keyring").await.success());
    let refused =
        invitations.accept_invitation(authed(&bob, pb::AcceptInvitationRequest { token: token.clone() })).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    keyshare.restart("keyring").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match invitations.accept_invitation(authed(&bob, pb::AcceptInvitationRequest { token: token.clone() })).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "accepting still refused 30 s after keyring came back");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    let trace =
        receiver.trace(ACCEPT, |trace| !trace.server_spans("keyshare-keyring", ADD_KEY_MEMBER).is_empty()).await;
    let grant = trace.server_spans("keyshare-keyring", ADD_KEY_MEMBER)[0];
    let ancestry = trace.ancestry(grant);
    assert_eq!(trace.parent(grant).name, "invitation.grant", "{ancestry:?}");
    assert_eq!(trace.parent(grant).service, "keyshare-invitation", "{ancestry:?}");
    // The grant happened once, in the acceptance that succeeded.
    let grants = receiver.named(ADD_KEY_MEMBER);
    assert_eq!(grants.len(), 1, "{}", describe(&grants));
}
