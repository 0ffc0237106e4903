//! Generated protobuf and gRPC code for the Keyshare APIs.
//!
//! Only the services' gRPC adapter modules should depend on these types; domain code converts
//! at the boundary.

/// Encoded `FileDescriptorSet` of every Keyshare proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyshare_descriptor");

/// Envoy's external authorization service (`envoy.service.auth.v3.Authorization`, which the
/// authorizer serves) with everything it imports, for server reflection.
pub const EXT_AUTHZ_FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ext_authz_descriptor");

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("keyshare.identity.v1");
    }
}

pub mod keyring {
    pub mod v1 {
        tonic::include_proto!("keyshare.keyring.v1");
    }
}

pub mod invitation {
    pub mod v1 {
        tonic::include_proto!("keyshare.invitation.v1");
    }
}

pub mod authorizer {
    pub mod v1 {
        tonic::include_proto!("keyshare.authorizer.v1");
    }
}
