//! `cache-invalidator`: parse the command line, set up logging, run the
//! subcommand, map its error to an exit code. Nothing else lives here.

use std::process::ExitCode;

use cache_invalidator::cli::{self, Cli, LogFormat};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One thread: the pipeline's stages hand every replication message to
    // each other; across threads each hand-off is a wake-up of a parked
    // thread (a futex), and on a small machine the WAL sender and Redis need
    // the other cores anyway (BENCHMARKS.md, "What changed").
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            for (i, line) in cache_invalidator::error::chain(&err).iter().enumerate() {
                let lead = if i == 0 { "error" } else { "  caused by" };
                eprintln!("{lead}: {line}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
