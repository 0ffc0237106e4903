//! Why a service could not start: shared by the server, the metrics listener and every
//! service's `start`.

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Config(#[from] crate::env::ConfigError),
    #[error("binding {what}: {source}")]
    Bind { what: &'static str, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}
