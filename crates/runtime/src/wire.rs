//! Conversions between domain values and protobuf well-known types that every service's gRPC
//! adapter needs.

use chrono::{DateTime, Utc};

/// `at` as a `google.protobuf.Timestamp`.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}
