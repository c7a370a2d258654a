//! Crash points for the fault-injection tests, every name in one place. A
//! leaf: the sink and the worker both reach it without importing each other.

/// In the sink stage, after a batch completing a transaction was applied in
/// Redis and before its end LSN is acknowledged.
pub const AFTER_APPLY_BEFORE_ACK: &str = "after_apply_before_ack";

/// In a pattern pass, after a SCAN reply was matched and before the pass
/// ends (its matches not all invalidated, its transactions not acknowledged).
pub const IN_PATTERN_PASS: &str = "in_pattern_pass";

/// Crash points for the fault-injection tests: with the `failpoints` feature
/// (on in this crate's own test builds), `CACHE_INVALIDATOR_FAILPOINT=<name>`
/// aborts the process (like SIGKILL) when the named point is reached. Without
/// the feature, nothing.
pub fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let armed = ARMED.get_or_init(|| std::env::var("CACHE_INVALIDATOR_FAILPOINT").ok());
        if armed.as_deref() == Some(name) {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
