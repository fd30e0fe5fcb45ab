//! The command line: one definition for parsing, the man page and the shell completions. What each
//! command does is in [`crate::daemon`] and [`crate::tools`]; `main` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogLevel};
use crate::layout::Template;

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

    /// Log level (error, warn, info, debug, trace) [default: RUST_LOG, else log.level from the config]
    #[arg(long, global = true, value_name = "LEVEL", value_parser = LogLevel::parse)]
    pub log_level: Option<LogLevel>,

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
    /// Delete the oldest stored images as [retention] says, now (safe while the daemon runs: it asks the
    /// daemon to do it); --dry-run only says what would go
    Prune(PruneArgs),
    /// Reload the running daemon's config (SIGHUP) and wait until it has applied the file or refused it
    /// (exit 0 when applied, 1 when refused: imaged then keeps running on the config it had); the unit's
    /// ExecReload=, so `systemctl reload imaged` waits for it
    Reload(ReloadArgs),
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

impl Target {
    /// Applies `--host` and `--port` over the config's broker.
    pub fn apply(&self, config: &mut Config) {
        if let Some(host) = &self.host {
            config.broker.host = host.clone();
        }
        if let Some(port) = self.port {
            config.broker.port = port;
        }
    }
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub target: Target,
    /// JPEG files to publish (folders are sent file by file)
    #[arg(value_name = "FILE", required_unless_present = "watch")]
    pub files: Vec<PathBuf>,
    /// Publishes waiting for their acknowledgement at once (1 to 4095)
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
pub struct PruneArgs {
    /// Print what the policy would delete now (count, bytes, oldest and newest), and delete nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The daemon's process id [default: MAINPID, which systemd sets for ExecReload=]
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
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
    /// With --dir: where each image goes in DIR, as storage.path says (strftime fields, {camera} from the
    /// levels the --topic filter's wildcards match) [default: image_%Y%m%d-%H%M%S.jpg]
    #[arg(long, value_name = "TEMPLATE", requires = "dir", value_parser = Template::parse)]
    pub path: Option<Template>,
    /// Exit after N images
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,
    /// Use a persistent session under this client id: images published while receive is not running are
    /// delivered at its next start
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
}
