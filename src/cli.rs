//! The command line: one definition for parsing, the man page and the shell completions.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_PATH};

/// Exit code for a configuration error (sysexits' EX_CONFIG); systemd does not restart on it
/// (RestartPreventExitStatus=78 in the unit).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "imaged",
    version,
    about = "MQTT store-and-forward daemon for camera images",
    long_about = "Takes every JPEG published on the upload topic, writes it atomically and durably to disk, \
                  and republishes it on the stored topic. An upload is acknowledged to the broker only once its \
                  file is durable. Without a subcommand, runs the daemon in the foreground."
)]
pub struct Cli {
    /// Config file [default: /etc/imaged.toml]
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config file and say what is wrong (exit 0 when valid, 78 when not)
    CheckConfig,
    /// Publish JPEG files on the upload topic (QoS 1); exit 0 only when the broker acknowledged every one
    Send(SendArgs),
    /// Save the images republished on the stored topic
    Receive(ReceiveArgs),
    /// Write the man pages and shell completions into DIR (used to build the package)
    #[command(hide = true)]
    GenerateAssets {
        /// Output folder
        dir: PathBuf,
    },
}

/// Where a tool connects: flags over the config file over localhost:1883.
#[derive(Debug, Args, Clone, Default)]
pub struct Target {
    /// Broker host [default: broker.host from the config, else localhost]
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Broker port [default: broker.port from the config, else 1883]
    #[arg(long, short = 'p', value_name = "PORT")]
    pub port: Option<u16>,
    /// Topic [default: from the config's [topics], else image/upload or image/stored]
    #[arg(long, short = 't', value_name = "TOPIC")]
    pub topic: Option<String>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub target: Target,
    /// JPEG files to publish (folders are sent file by file)
    #[arg(value_name = "FILE", required_unless_present = "watch")]
    pub files: Vec<PathBuf>,
    /// Publishes waiting for their acknowledgement at once
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub window: u16,
    /// Send the files again every SECS seconds, like a periodic camera
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// With --interval: how many rounds (default: until Ctrl-C)
    #[arg(long, value_name = "N", requires = "interval")]
    pub repeat: Option<u64>,
    /// Send each new JPEG that appears in DIR, once, when it is complete (until Ctrl-C)
    #[arg(long, value_name = "DIR", conflicts_with = "interval")]
    pub watch: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    #[command(flatten)]
    pub target: Target,
    /// Keep overwriting this file with the latest image (atomically)
    #[arg(long, short = 'o', value_name = "FILE", conflicts_with = "dir")]
    pub output: Option<PathBuf>,
    /// Keep every image in DIR instead, never overwriting
    #[arg(long, short = 'd', value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Exit after N images
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,
    /// Use a persistent session under this client id: images published while receive is not running are
    /// delivered at its next start
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
}

/// Parses the command line and runs what it asks for.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => match load(cli.config.as_deref(), true) {
            Ok(config) => {
                crate::logging::init(config.log_level());
                crate::daemon::run(config)
            }
            Err(e) => config_error(&e),
        },
        Some(Command::CheckConfig) => crate::check_config::run(cli.config.as_deref()),
        Some(Command::Send(args)) => match load(cli.config.as_deref(), false) {
            Ok(config) => crate::send::run(config, args),
            Err(e) => config_error(&e),
        },
        Some(Command::Receive(args)) => match load(cli.config.as_deref(), false) {
            Ok(config) => crate::receive::run(config, args),
            Err(e) => config_error(&e),
        },
        Some(Command::GenerateAssets { dir }) => crate::assets::run(&dir),
    }
}

/// Loads the config. The tools may run without one: a missing default file means built-in defaults.
pub fn load(path: Option<&std::path::Path>, required: bool) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::load(path),
        None if required || std::path::Path::new(DEFAULT_PATH).exists() => {
            Config::load(DEFAULT_PATH.as_ref())
        }
        None => Config::parse("", DEFAULT_PATH.as_ref()).map(|mut c| {
            c.path = PathBuf::from("(built-in defaults)");
            c
        }),
    }
}

pub fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("imaged: config error: {e}");
    ExitCode::from(EXIT_CONFIG)
}
