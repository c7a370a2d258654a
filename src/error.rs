//! The error a subcommand returns to `main`, which maps it to an exit code.

/// What ended a subcommand unsuccessfully, with the exit code of the design:
/// 1 runtime failure, 2 bad usage / config / mapping.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid usage, config or mapping (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// The subcommand exists in the design but is not built yet (exit 2).
    #[error("`{0}` is not implemented yet")]
    NotImplemented(&'static str),
    /// A failure at run time: a server unreachable, a protocol error (exit 1).
    #[error(transparent)]
    Runtime(Box<dyn std::error::Error + Send + Sync>),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Invalid(_) | CliError::NotImplemented(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }

    /// Wraps any error as a runtime failure (exit 1).
    pub fn runtime(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        CliError::Runtime(Box::new(err))
    }
}
