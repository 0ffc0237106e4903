//! Conversions between domain values and protobuf well-known types that every service's gRPC
//! adapter needs.

use chrono::{DateTime, Utc};

/// `at` as a `google.protobuf.Timestamp`.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

#[cfg(test)]
mod tests {
    use crate::credential::Environment;

    #[test]
    fn both_wire_enums_number_environments_as_the_domain_does() {
        use keyshare_proto::authorizer::v1 as apb;
        use keyshare_proto::keyring::v1 as kpb;
        for (env, keyring, authorizer) in [
            (Environment::Sandbox, kpb::Environment::Sandbox as i32, apb::Environment::Sandbox as i32),
            (Environment::Production, kpb::Environment::Production as i32, apb::Environment::Production as i32),
        ] {
            assert_eq!((env.number(), env.number()), (keyring, authorizer));
            assert_eq!(Environment::from_number(keyring), Some(env));
        }
        assert_eq!(Environment::from_number(kpb::Environment::Unspecified as i32), None);
        assert_eq!(Environment::from_number(apb::Environment::Unspecified as i32), None);
        assert_eq!(Environment::from_number(3), None);
    }
}
