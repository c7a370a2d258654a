//! Sink errors and how to retry them.

/// How the worker should react to a sink error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Redis unreachable, timed out, loading, or failing over: back off and
    /// retry the whole plan (deletes are safe to repeat).
    BackOff,
    /// Redis refuses the commands (NOPERM, OOM, READONLY): acknowledgement is
    /// blocked until an operator fixes it; retried with backoff meanwhile.
    Blocked,
    /// A configuration error: retrying cannot help.
    Fatal,
}

impl From<RetryClass> for crate::retry::Retry {
    fn from(class: RetryClass) -> Self {
        match class {
            RetryClass::BackOff | RetryClass::Blocked => crate::retry::Retry::BackOff,
            RetryClass::Fatal => crate::retry::Retry::Fatal,
        }
    }
}

/// A failure executing a plan against Redis.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The Redis URL or password file is unusable.
    #[error("invalid Redis configuration: {0}")]
    Config(String),
    /// A Redis command failed.
    #[error("Redis {command} failed ({target}): {source}")]
    Redis {
        /// The command (or step) that failed.
        command: &'static str,
        /// The Redis URL, password masked.
        target: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// Redis accepted the deletes but not enough replicas confirmed them.
    #[error(
        "WAIT: only {acked} of {wanted} Redis replicas confirmed the batch within {timeout_ms} ms"
    )]
    Replicas {
        /// Replicas that confirmed.
        acked: i64,
        /// `wait_replicas`.
        wanted: u32,
        /// WAIT timeout.
        timeout_ms: u64,
    },
    /// A failure the in-memory sink was told to produce (its unit tests).
    #[error("simulated sink failure ({class:?}): {reason}")]
    Simulated {
        /// How the failure asks to be retried.
        class: RetryClass,
        /// What the test said about it.
        reason: String,
    },
}

impl SinkError {
    /// How to retry this error.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            SinkError::Config(_) => RetryClass::Fatal,
            SinkError::Replicas { .. } => RetryClass::BackOff,
            SinkError::Simulated { class, .. } => *class,
            SinkError::Redis { source, .. } => classify(source),
        }
    }

    /// Every value [`SinkError::kind`] returns for a real sink (not the
    /// in-memory one's `simulated`), for metrics that start at 0.
    pub const KINDS: [&'static str; 10] = [
        "config",
        "replicas",
        "noperm",
        "oom",
        "readonly",
        "loading",
        "busy",
        "timeout",
        "connection",
        "other",
    ];

    /// A short stable name for metrics and dedup of log lines (`connection`, `noperm`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Config(_) => "config",
            SinkError::Replicas { .. } => "replicas",
            SinkError::Simulated { .. } => "simulated",
            SinkError::Redis { source, .. } => {
                let code = source.code().unwrap_or("");
                match code {
                    "NOPERM" => "noperm",
                    "OOM" => "oom",
                    "READONLY" => "readonly",
                    "LOADING" => "loading",
                    "BUSY" => "busy",
                    _ if source.is_timeout() => "timeout",
                    _ if source.is_io_error()
                        || source.is_connection_dropped()
                        || source.is_connection_refusal() =>
                    {
                        "connection"
                    }
                    _ => "other",
                }
            }
        }
    }
}

fn classify(err: &redis::RedisError) -> RetryClass {
    match err.code() {
        Some("NOPERM") | Some("OOM") | Some("READONLY") => RetryClass::Blocked,
        _ if err.kind() == redis::ErrorKind::AuthenticationFailed => RetryClass::Blocked,
        _ => RetryClass::BackOff,
    }
}

/// A Redis URL with its password replaced by `***`, for logs and errors.
pub fn mask_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable Redis URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(mask_url("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(mask_url("redis://h:1/0"), "redis://h:1/0");
        assert!(!mask_url("not a url secret").contains("secret"));
    }
}
