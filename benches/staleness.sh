#!/bin/sh
# The staleness benchmark (docs/staleness.md): racing readers and writers on
# throwaway PostgreSQL and Redis servers with a real worker, four strategies,
# fill delays 0/5/20 ms, medians of 3 runs. Prints a Markdown table.
#
# Knobs (environment): STALENESS_SECS (10), STALENESS_RUNS (3),
# STALENESS_DELAYS ("0,5,20"), STALENESS_IDS (1000), STALENESS_READERS (8),
# STALENESS_WRITERS (2), STALENESS_TPS (500). PROFILE=release builds the
# worker and the load generator optimized (slower to build).
set -eu
cd "$(dirname "$0")/.."
if [ "${PROFILE:-dev}" = release ]; then
  set -- --release
else
  set --
fi
exec cargo test "$@" --test staleness -- --ignored --nocapture --test-threads 1 staleness
