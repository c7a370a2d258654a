//! The relation cache: pgoutput messages -> [`super::Event`]s.
