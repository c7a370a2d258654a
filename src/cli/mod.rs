//! The command line: one file per subcommand. `main` parses [`Cli`], sets up
//! logging and calls [`execute`]; errors become exit codes (see [`CliError`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub mod check;
pub mod flush;
pub mod replay;
pub mod setup;
pub mod sql_api;
pub mod status;

use crate::error::{Because, CliError};

pub mod demo;
pub mod record;
pub mod run;

/// Turns committed PostgreSQL row changes into Redis cache invalidations.
#[derive(Debug, Parser)]
#[command(name = "cache-invalidator", version, about)]
pub struct Cli {
    /// Service config file.
    #[arg(
        long,
        global = true,
        env = "CACHE_INVALIDATOR_CONFIG",
        default_value = "cache-invalidator.toml"
    )]
    pub config: PathBuf,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands of the design.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker in the foreground (SIGINT/SIGTERM stop it gracefully).
    Run,
    /// Create the publication and the slot, add mapped tables, emit flush
    /// markers, install the SQL API (idempotent).
    Setup {
        /// Set REPLICA IDENTITY FULL on tables whose rules need old values.
        #[arg(long)]
        replica_identity_full: bool,
        /// Install the DDL event triggers (needs a superuser): a rewrite,
        /// retype, partition change or drop of a mapped table flushes it.
        #[arg(long)]
        ddl_trigger: bool,
        /// Grant EXECUTE on cache_invalidator.invalidate and flush_table to
        /// this role (repeatable).
        #[arg(long, value_name = "ROLE")]
        grant_execute: Vec<String>,
        /// Print the SQL API's statements (with --grant-execute and
        /// --ddl-trigger, theirs too) without connecting, for migration tools.
        #[arg(long)]
        print_sql: bool,
    },
    /// Validate config and mappings (and, when reachable, against the catalog and Redis).
    Check,
    /// Fire the `truncate` invalidations of every mapped table, or one.
    Flush {
        /// Only this table (`schema.table` or `table`).
        #[arg(long)]
        table: Option<String>,
    },
    /// Stream decoded committed transactions as JSON lines from a temporary slot.
    Record {
        /// Output file (`-` for stdout).
        #[arg(long)]
        out: PathBuf,
        /// Stop after this many transactions.
        #[arg(long)]
        max_txns: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// PostgreSQL URL; overrides the config file's `[postgres] url` (and
        /// then the config file is not read).
        #[arg(long, env = "CACHE_INVALIDATOR_POSTGRES_URL", hide_env_values = true)]
        postgres_url: Option<String>,
        /// Publication to stream (default: the config file's, else `cache_invalidator`).
        #[arg(long)]
        publication: Option<String>,
    },
    /// Run the mappings over a recorded file offline and print the plan per transaction.
    Replay {
        /// The recorded file (JSON lines, as `record` writes).
        file: PathBuf,
        /// Execute the plan against Redis.
        #[arg(long)]
        apply: bool,
        /// Skip malformed lines instead of stopping.
        #[arg(long)]
        skip_bad_lines: bool,
    },
    /// Show the slot, its lag and retained WAL, and whether a worker streams.
    ///
    /// A runtime probe: exits 0 when the slot exists (its health is in the
    /// output), 1 when PostgreSQL is unreachable or the slot is missing (run
    /// `setup`). `--json` still prints its object when the slot is missing.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The guided demo on a local PostgreSQL and Redis.
    Demo,
}

/// Runs one parsed command line.
pub async fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Run => run::run(&cli.config).await,
        Command::Setup {
            replica_identity_full,
            ddl_trigger,
            grant_execute,
            print_sql,
        } => {
            let options = setup::SetupOptions {
                replica_identity_full,
                ddl_trigger,
                grant_execute,
            };
            if print_sql {
                setup::print_sql(&cli.config, &options)
            } else {
                setup::run(&cli.config, &options).await
            }
        }
        Command::Check => check::run(&cli.config).await,
        Command::Flush { table } => flush::run(&cli.config, table.as_deref()).await,
        Command::Record {
            out,
            max_txns,
            timeout,
            postgres_url,
            publication,
        } => {
            // The flag (or its environment variable) stands alone; otherwise the
            // config file gives the URL, password_file and publication.
            let (url, password, config_publication) = match postgres_url {
                Some(url) => (url, None, None),
                None => {
                    let config = crate::config::Config::load(
                        &cli.config,
                        &crate::config::EnvOverrides::from_env(),
                    )
                    .map_err(|e| {
                        CliError::invalid(Because::new(
                            "record needs a PostgreSQL URL: --postgres-url, CACHE_INVALIDATOR_POSTGRES_URL or the config file",
                            e,
                        ))
                    })?;
                    let pg = config.postgres;
                    let password = pg.password.as_ref().map(|s| s.expose().to_string());
                    (pg.url, password, Some(pg.publication))
                }
            };
            let publication = publication
                .or(config_publication)
                .unwrap_or_else(|| "cache_invalidator".into());
            let postgres = crate::source::ConnectionSettings::parse(&url, password)
                .map_err(CliError::invalid)?;
            let timeout = match timeout {
                Some(t) if t.is_finite() && t >= 0.0 => Some(std::time::Duration::from_secs_f64(t)),
                Some(t) => return Err(CliError::invalid(format!("invalid --timeout {t}"))),
                None => None,
            };
            let args = record::RecordArgs {
                postgres,
                publication,
                out,
                max_txns,
                timeout,
            };
            record::run(args).await
        }
        Command::Replay {
            file,
            apply,
            skip_bad_lines,
        } => replay::run(&cli.config, &file, apply, skip_bad_lines).await,
        Command::Status { json } => status::run(&cli.config, json).await,
        Command::Demo => demo::run().await,
    }
}
