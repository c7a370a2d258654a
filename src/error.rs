//! The error a subcommand returns to `main`, which maps it to an exit code and
//! prints it with its causes ([`chain`]).

use std::error::Error;

/// Any error, boxed: what [`CliError`] keeps as its cause.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// What ended a subcommand unsuccessfully, with the exit code of the design:
/// 1 runtime failure, 2 bad usage / config / mapping. Both keep the error
/// they were made from, so `main` prints its whole chain.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid usage, config or mapping (exit 2).
    #[error(transparent)]
    Invalid(BoxError),
    /// The subcommand exists in the design but is not built yet (exit 2).
    #[error("`{0}` is not implemented yet")]
    NotImplemented(&'static str),
    /// A failure at run time: a server unreachable, a protocol error (exit 1).
    #[error(transparent)]
    Runtime(BoxError),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Invalid(_) | CliError::NotImplemented(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }

    /// Invalid usage, config or mapping (exit 2): an error (kept with its
    /// causes) or a message.
    pub fn invalid(err: impl Into<BoxError>) -> Self {
        CliError::Invalid(err.into())
    }

    /// A runtime failure (exit 1): an error (kept with its causes) or a message.
    pub fn runtime(err: impl Into<BoxError>) -> Self {
        CliError::Runtime(err.into())
    }
}

/// What failed and what to do about it, with the error that caused it as its
/// source (not pasted into the message: `main` prints it on its own line).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Because {
    message: String,
    #[source]
    source: BoxError,
}

impl Because {
    /// `message` (what failed, where, what to do) caused by `source`.
    pub fn new(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Because {
            message: message.into(),
            source: source.into(),
        }
    }
}

/// An error and its causes, one line each, outermost first. A cause whose
/// text a line above already contains is left out: many errors name their
/// cause in their own message as well (`cannot read FILE: REASON`).
pub fn chain(err: &(dyn Error + 'static)) -> Vec<String> {
    let mut lines = vec![err.to_string()];
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !lines.iter().any(|l| l.contains(&text)) {
            lines.push(text);
        }
        cause = c.source();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_keeps_every_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = CliError::invalid(Because::new(
            "cannot open --out x.jsonl: check the directory exists",
            io,
        ));
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            chain(&err),
            [
                "cannot open --out x.jsonl: check the directory exists",
                "no such file"
            ]
        );
        // A cause already said in the message above is not repeated.
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = CliError::runtime(Because::new("cannot read x.toml: no such file", io));
        assert_eq!(err.exit_code(), 1);
        assert_eq!(chain(&err), ["cannot read x.toml: no such file"]);
        // A message alone is an error without causes.
        assert_eq!(
            chain(&CliError::invalid("bad --timeout")),
            ["bad --timeout"]
        );
    }
}
