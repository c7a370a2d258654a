//! Mapping rules (placeholder until the mappings work lands).
pub mod glob;
