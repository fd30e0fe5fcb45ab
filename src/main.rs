//! The `imaged` command: parse the command line, load the config, start logging, run the command, and turn
//! what went wrong into one message and an exit status ([`imaged::exit::Exit`] names them).

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use imaged::cli::{Cli, Command};
use imaged::config::{Config, ConfigError, LogLevel, DEFAULT_PATH};
use imaged::exit::Exit;
use imaged::{daemon, logging, tools};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    let required = || Config::load(path.unwrap_or(Path::new(DEFAULT_PATH)));
    let result = match cli.command {
        // The daemon logs its failure, so that the journal has it with its priority.
        None => start(required(), cli.log_level).and_then(|(config, level)| {
            daemon::run(config, level).map_err(|e| {
                tracing::error!("{e}");
                e.exit()
            })
        }),
        Some(Command::CheckConfig) => start(required(), cli.log_level).and_then(|(config, _)| {
            end_quietly_when_stdout_closes();
            tools::check_config::run(&config).map_err(|e| config_error(&e))
        }),
        Some(Command::Send(args)) => {
            start(Config::load_or_defaults(path), cli.log_level).and_then(|(config, _)| {
                tools::send::run(config, args).map_err(|e| report("imaged send", &e, e.exit()))
            })
        }
        Some(Command::Receive(args)) => start(Config::load_or_defaults(path), cli.log_level)
            .and_then(|(config, _)| {
                tools::receive::run(config, &args)
                    .map_err(|e| report("imaged receive", &e, e.exit()))
            }),
        Some(Command::Prune(args)) => start(required(), cli.log_level).and_then(|(config, _)| {
            end_quietly_when_stdout_closes();
            tools::prune::run(&config, &args, daemon::outbox_names)
                .map_err(|e| report("imaged prune", &e, e.exit()))
        }),
        // No config loaded: a broken file is what the daemon is to report.
        Some(Command::Reload(args)) => {
            end_quietly_when_stdout_closes();
            tools::reload::run(path.unwrap_or(Path::new(DEFAULT_PATH)), &args)
                .map_err(|e| report("imaged reload", &e, e.exit()))
        }
        Some(Command::GenerateAssets { dir }) => {
            tools::assets::run(&dir).map_err(|e| report("imaged", e, Exit::Failure))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => exit.into(),
    }
}

/// The config, and logging started at the level the command line, `RUST_LOG` or the config ask for.
fn start(
    config: Result<Config, ConfigError>,
    flag: Option<LogLevel>,
) -> Result<(Config, logging::Level), Exit> {
    let config = config.map_err(|e| config_error(&e))?;
    let level = logging::init(flag, std::env::var("RUST_LOG").ok(), config.log.level);
    Ok((config, level))
}

/// For the commands that only print (`imaged prune | head`, `imaged check-config | grep -q`): a reader that
/// stops reading ends them quietly, as it would any Unix tool, instead of a panic in `println!`. Not for the
/// daemon, send or receive: a closed socket must come back to them as an error, not end them.
fn end_quietly_when_stdout_closes() {
    // SAFETY: only sets SIGPIPE's disposition back to the default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn config_error(e: &ConfigError) -> Exit {
    report("imaged", format!("config error: {e}"), Exit::Config)
}

fn report(who: &str, e: impl Display, exit: Exit) -> Exit {
    eprintln!("{who}: {e}");
    exit
}
