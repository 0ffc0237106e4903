//! WatchKeys: the change feed the authorizer follows, streamed as protobuf messages.

use std::pin::Pin;

use futures::Stream;
use futures::StreamExt as _;
use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::auth;
use keyshare_runtime::error::InvalidInput;
use keyshare_runtime::wire::timestamp;
use tonic::{Request, Response, Status};

use super::convert::{limits_pb, permissions_pb};
use keyshare_runtime::error::Reply;

use super::KeyringGrpc;
use crate::app::Ctx;
use crate::domain::Environment;
use crate::error::Error;
use crate::feed::{self, FeedEvent, FeedMessage};

pub(super) type WatchKeysStream = Pin<Box<dyn Stream<Item = Result<pb::WatchKeysResponse, Status>> + Send>>;

/// WatchKeys: checks the caller and the starting point, then streams the change feed from a task
/// of its own.
pub(super) fn watch_keys(grpc: &KeyringGrpc, request: Request<pb::WatchKeysRequest>) -> Reply<WatchKeysStream> {
    let ctx = Ctx::of(&request)?;
    if !ctx.caller.has_scope(auth::Scope::KeysWatch) {
        return Err(Error::PermissionDenied(auth::Scope::KeysWatch.denial()).into());
    }
    let after = request.into_inner().after_sequence;
    if after < 0 {
        return Err(Error::from(InvalidInput::field("after_sequence", "must not be negative")).into());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let app = grpc.app.clone();
    let clock_app = grpc.app.clone();
    tokio::spawn(feed::stream(
        app.pool().clone(),
        grpc.feed_wake.clone(),
        grpc.stopping.clone(),
        after,
        move || clock_app.now(),
        tx,
    ));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|message| match message {
        Ok(message) => Ok(feed_pb(message)),
        Err(e) => Err(Status::from(Error::from(e))),
    });
    Ok(Response::new(Box::pin(stream)))
}

fn feed_pb(message: FeedMessage) -> pb::WatchKeysResponse {
    use pb::watch_keys_response::Event;
    let (sequence, event) = match message {
        FeedMessage::SnapshotStart { sequence, estimated_keys } => {
            (sequence, Event::SnapshotStart(pb::SnapshotStart { estimated_key_count: estimated_keys }))
        }
        FeedMessage::SnapshotEnd { sequence } => (sequence, Event::SnapshotEnd(pb::SnapshotEnd {})),
        FeedMessage::Event { sequence, event } => (
            sequence,
            match event {
                FeedEvent::KeyUpserted(state) => Event::KeyUpserted(pb::KeyState {
                    key: format!("projects/{}/keys/{}", state.project, state.key),
                    project: format!("projects/{}", state.project),
                    credentials: state
                        .credentials
                        .into_iter()
                        .map(|c| pb::CredentialState {
                            sha256: c.sha256,
                            environment: Environment::parse(&c.environment).map_or(0, Environment::number),
                            active: c.active,
                            permissions: Some(permissions_pb(c.permissions)),
                            rate_limit_per_second: c.rate_limit,
                            daily_quota: c.daily_quota,
                            ip_allowlist: c.ip_allowlist,
                            expire_time: c.expire_at.map(timestamp),
                            grace_end_time: c.grace_end.map(timestamp),
                        })
                        .collect(),
                }),
                FeedEvent::KeyRemoved { project, key } => Event::KeyRemoved(format!("projects/{project}/keys/{key}")),
                FeedEvent::ProjectUpserted(state) => Event::ProjectUpserted(pb::ProjectState {
                    project: format!("projects/{}", state.project),
                    sandbox: Some(limits_pb(state.sandbox)),
                    production: Some(limits_pb(state.production)),
                }),
                FeedEvent::ProjectRemoved { project } => Event::ProjectRemoved(format!("projects/{project}")),
            },
        ),
    };
    pb::WatchKeysResponse { sequence, event: Some(event) }
}
