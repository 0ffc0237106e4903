//! Envoy's ext_authz `Check` end to end: a `CheckRequest` answered by the authorizer's real
//! adapter and checker against the fixture's keys (see `keyshare_fuzz::Kind`), once as Envoy
//! runs it by default (the client address is the source peer) and once trusting
//! `x-forwarded-for`.
//!
//! Input: a first byte with its low bit clear decodes the rest as a protobuf `CheckRequest`;
//! set, the rest fills one field by field (credential in `x-api-key` or `authorization` under
//! any scheme, many `x-forwarded-for` entries, source address, method, path, context
//! extensions), so that checks beyond the decoding are reached.
//!
//! The adapter reads requests with its own lean `wire::CheckRequest`: raw bytes Envoy's type
//! decodes must decode into it too, and it is what the adapter checks.
//!
//! Properties: no panic; the answer is OK exactly when
//! it carries an OK HTTP response, and a denial carries the outcome's status (and `retry-after`
//! with 429); no response echoes the credential or any request header value; the allowlisted
//! key is granted only when the address the adapter is told to trust is in its allowlist: the
//! source peer by default (whatever `x-forwarded-for` says), the last `x-forwarded-for` entry
//! when trusting it, so an unparseable or missing last entry never grants it.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use keyshare_authorizer::ext_authz::{ExtAuthz, ExtAuthzConfig, wire};
use keyshare_fuzz::{Fixture, Kind, PROJECT, fixture};
use libfuzzer_sys::arbitrary::{self, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const ADDRESSES: [&str; 9] = [
    "198.51.100.7",
    "10.0.0.1",
    "2001:db8::7",
    "203.0.113.9",
    "::1",
    "198.51.100.300",
    "garbage",
    "",
    " 198.51.100.8 ",
];
const SEPARATORS: [&str; 5] = [",", ", ", " ,", ",\t", ",,"];
const SCHEMES: [&str; 6] = ["Bearer", "bearer", "BEARER", "Basic", "Token", ""];
const METHODS: [&str; 8] = ["GET", "POST", "put", "DELETE", "HEAD", "PATCH", "OPTIONS", "get "];
const ENVIRONMENTS: [&str; 4] = ["sandbox", "production", "Production", "live"];

/// One of `pool`, or (one time in `pool.len() + 1`) any text.
fn one_of(u: &mut Unstructured<'_>, pool: &[&str]) -> arbitrary::Result<String> {
    let n = u.choose_index(pool.len() + 1)?;
    match pool.get(n) {
        Some(text) => Ok((*text).to_owned()),
        None => u.arbitrary(),
    }
}

fn credential(u: &mut Unstructured<'_>, fixture: &Fixture) -> arbitrary::Result<String> {
    let key = &fixture.keys[u.choose_index(fixture.keys.len())?];
    Ok(match u.choose_index(4)? {
        0 => key.credential.clone(),
        1 => format!(" {}\t", key.credential),
        2 => {
            let mut bytes = key.credential.clone().into_bytes();
            let at = u.choose_index(bytes.len())?;
            bytes[at] = u.int_in_range(b'0'..=b'z')?;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => u.arbitrary()?,
    })
}

/// A request built field by field from `u`.
fn structured(u: &mut Unstructured<'_>, fixture: &Fixture) -> arbitrary::Result<CheckRequest> {
    let mut headers = HashMap::new();
    let presented = credential(u, fixture)?;
    match u.choose_index(4)? {
        0 => {
            headers.insert("x-api-key".to_owned(), presented);
        }
        1 => {
            let scheme = one_of(u, &SCHEMES)?;
            let spaces = " ".repeat(u.int_in_range(1..=3)?);
            headers.insert("authorization".to_owned(), format!("{scheme}{spaces}{presented}"));
        }
        2 => {
            headers.insert("authorization".to_owned(), format!("Bearer {presented}"));
            headers.insert("x-api-key".to_owned(), credential(u, fixture)?);
        }
        _ => {}
    }
    if u.ratio(7, 8)? {
        let mut forwarded = one_of(u, &ADDRESSES)?;
        for _ in 0..u.int_in_range(0..=16)? {
            forwarded.push_str(&one_of(u, &SEPARATORS)?);
            forwarded.push_str(&one_of(u, &ADDRESSES)?);
        }
        headers.insert("x-forwarded-for".to_owned(), forwarded);
    }
    for _ in 0..u.int_in_range(0..=3)? {
        headers.insert(u.arbitrary()?, u.arbitrary()?);
    }
    let mut extensions = HashMap::new();
    if u.ratio(1, 2)? {
        let project = match u.choose_index(4)? {
            0 => format!("projects/{PROJECT}"),
            1 => format!("projects/{}", PROJECT.simple()),
            2 => "projects/0193f7e2-0000-7000-8000-00000000ffff".to_owned(),
            _ => u.arbitrary()?,
        };
        extensions.insert("project".to_owned(), project);
    }
    if u.ratio(1, 2)? {
        extensions.insert("environment".to_owned(), one_of(u, &ENVIRONMENTS)?);
    }
    let source = if u.ratio(7, 8)? {
        let socket = SocketAddress { address: one_of(u, &ADDRESSES)?, ..Default::default() };
        let address = Address { address: Some(address::Address::SocketAddress(socket)) };
        Some(Peer { address: Some(address), ..Default::default() })
    } else {
        None
    };
    let http = HttpRequest { method: one_of(u, &METHODS)?, path: u.arbitrary()?, headers, ..Default::default() };
    let request = Request { http: Some(http), ..Default::default() };
    let attributes =
        AttributeContext { source, request: Some(request), context_extensions: extensions, ..Default::default() };
    Ok(CheckRequest { attributes: Some(attributes) })
}

/// Every text a response carries.
fn texts(response: &CheckResponse) -> Vec<&str> {
    let mut texts = Vec::new();
    if let Some(status) = &response.status {
        texts.push(status.message.as_str());
    }
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            texts.push(&denied.body);
            for header in denied.headers.iter().filter_map(|h| h.header.as_ref()) {
                texts.extend([header.key.as_str(), header.value.as_str()]);
            }
        }
        Some(HttpResponse::OkResponse(ok)) => {
            texts.extend(ok.headers_to_remove.iter().map(String::as_str));
            for header in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                texts.extend([header.key.as_str(), header.value.as_str()]);
            }
        }
        _ => {}
    }
    texts
}

fn header<'a>(response: &'a CheckResponse, name: &str) -> Option<&'a str> {
    let headers = match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => &denied.headers,
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        _ => return None,
    };
    headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| h.value.as_str())
}

fn allowlisted(address: Option<&str>) -> bool {
    let ip = address.and_then(|a| a.parse::<IpAddr>().ok());
    ip.is_some_and(|ip| Fixture::allowlist().iter().any(|net| net.contains(&ip)))
}

/// Checks `lean`, the adapter's own reading of the bytes Envoy's type decoded as `request`;
/// what the answer must be is worked out from `request`.
fn check(fixture: &Fixture, trust_forwarded_for: bool, request: &CheckRequest, lean: &wire::CheckRequest) {
    let config = ExtAuthzConfig { credential_header: "x-api-key".to_owned(), trust_forwarded_for };
    let adapter = ExtAuthz::new(fixture.checker.clone(), config);
    let response = adapter.check(lean.clone());
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let http = request.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
    let empty = HashMap::new();
    let headers = http.map_or(&empty, |h| &h.headers);

    // Nothing of the request's headers comes back. A value with a digit and another character
    // cannot occur by chance in what the adapter writes itself (fixed words, a number of
    // seconds), leaving out the key name an allowed call is told.
    let key_name = header(&response, "x-keyshare-key").filter(|_| code == 0);
    let texts: Vec<&str> = texts(&response).into_iter().filter(|text| Some(*text) != key_name).collect();
    for value in headers.values() {
        let candidates = [Some(value.trim()), value.trim_start().split_once(' ').map(|(_, rest)| rest.trim())];
        for candidate in candidates.into_iter().flatten() {
            let has_digit = candidate.bytes().any(|b| b.is_ascii_digit());
            let has_other = candidate.bytes().any(|b| !b.is_ascii_digit());
            if has_digit && has_other {
                assert!(texts.iter().all(|text| !text.contains(candidate)), "{candidate:?} is echoed in {response:?}");
            }
        }
    }
    for key in &fixture.keys {
        assert!(texts.iter().all(|text| !text.contains(&key.credential)), "{key:?} is echoed in {response:?}");
    }

    match &response.http_response {
        Some(HttpResponse::OkResponse(_)) => {
            assert_eq!(code, 0, "{response:?}");
            let name = header(&response, "x-keyshare-key").expect("an allowed call names its key");
            let key = fixture.keys.iter().find(|key| key.name() == name).expect("a fixture key");
            assert!(matches!(
                key.kind,
                Kind::Valid | Kind::Allowlisted | Kind::RateLimited | Kind::DailyQuota | Kind::ReadOnly
            ));
            if key.kind == Kind::Allowlisted {
                let trusted = if trust_forwarded_for {
                    headers.get("x-forwarded-for").and_then(|v| v.rsplit(',').next()).map(str::trim)
                } else {
                    request
                        .attributes
                        .as_ref()
                        .and_then(|a| a.source.as_ref())
                        .and_then(|p| p.address.as_ref())
                        .and_then(|a| match &a.address {
                            Some(address::Address::SocketAddress(socket)) => Some(socket.address.as_str()),
                            _ => None,
                        })
                };
                assert!(
                    allowlisted(trusted),
                    "granted from {trusted:?} (trusting x-forwarded-for: {trust_forwarded_for}): {request:?}"
                );
            }
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(code, 0, "{response:?}");
            let status = denied.status.as_ref().map_or(0, |s| s.code);
            assert!(matches!(status, 401 | 403 | 429), "{response:?}");
            assert_eq!(header(&response, "retry-after").is_some(), status == 429, "{response:?}");
        }
        other => panic!("no HTTP response: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (request, lean) = if mode & 1 == 0 {
        let Ok(request) = CheckRequest::decode(rest) else {
            return;
        };
        // Whatever Envoy's type reads, the adapter's lean type reads too.
        (request, wire::CheckRequest::decode(rest).expect("the lean CheckRequest decodes what Envoy's does"))
    } else {
        let Ok(request) = structured(&mut Unstructured::new(rest), fixture) else {
            return;
        };
        let lean = wire::CheckRequest::decode(request.encode_to_vec().as_slice()).expect("the lean type decodes it");
        (request, lean)
    };
    check(fixture, false, &request, &lean);
    check(fixture, true, &request, &lean);
});
