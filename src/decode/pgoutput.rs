//! pgoutput protocol v1 messages, parsed from one XLogData payload.
