//! Where log lines go, for every command: straight to journald with structured fields when stderr is the
//! journal, readable text on stderr otherwise (colour only on a terminal). And how much: `--log-level` over
//! `RUST_LOG` over `log.level`; a reload changes the level when `log.level` decides it ([`Level`]).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, Registry};

use crate::config::LogLevel;

/// The level to log at: the command line's, else `RUST_LOG`'s, else the config's. `RUST_LOG` is read as a
/// plain level or as `imaged=LEVEL` among other crates' directives (only imaged's own lines are logged);
/// anything else in it is ignored, and the second value says why.
pub fn level(
    flag: Option<LogLevel>,
    rust_log: Option<&str>,
    configured: LogLevel,
) -> (LogLevel, Option<String>) {
    if let Some(level) = flag {
        return (level, None);
    }
    let Some(text) = rust_log.map(str::trim).filter(|t| !t.is_empty()) else {
        return (configured, None);
    };
    let ours = text
        .split(',')
        .find_map(|directive| match directive.split_once('=') {
            Some((target, level)) if target.trim() == "imaged" => Some(level),
            Some(_) => None,
            None => Some(directive),
        });
    match ours.map(LogLevel::parse) {
        Some(Ok(level)) => (level, None),
        Some(Err(why)) => (configured, Some(format!("RUST_LOG ignored: {why}"))),
        None => (configured, None),
    }
}

/// The running subscriber's level, and what decides it: a reload applies a new `log.level` unless the
/// command line or `RUST_LOG` set the level.
pub struct Level {
    handle: reload::Handle<LevelFilter, Registry>,
    flag: Option<LogLevel>,
    rust_log: Option<String>,
}

impl Level {
    /// Logs at the level `configured` now makes ([`level`]); returns it.
    pub fn reload(&self, configured: LogLevel) -> LogLevel {
        let (now, _) = level(self.flag, self.rust_log.as_deref(), configured);
        if let Err(e) = self.handle.reload(LevelFilter::from_level(now.0)) {
            tracing::warn!("cannot change the log level: {e}");
        }
        now
    }
}

/// Installs the global subscriber at the level [`level`] makes of these, and logs why `RUST_LOG` was
/// ignored. Call once, before anything logs.
pub fn init(flag: Option<LogLevel>, rust_log: Option<String>, configured: LogLevel) -> Level {
    let (now, ignored) = level(flag, rust_log.as_deref(), configured);
    let (filter, handle) = reload::Layer::new(LevelFilter::from_level(now.0));
    // Only our own crate logs at info; rumqttc's `log` lines are not forwarded.
    let targets = tracing_subscriber::filter::filter_fn(|meta| meta.target().starts_with("imaged"));
    let journald = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    if let Some(journald) = journald {
        let journald = journald
            .with_syslog_identifier("imaged".into())
            .with_field_prefix(None);
        tracing_subscriber::registry()
            .with(journald.with_filter(filter).with_filter(targets))
            .init();
    } else {
        let terminal = std::io::stderr().is_terminal();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(terminal)
            .with_target(false);
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter).with_filter(targets))
            .init();
    }
    if let Some(why) = ignored {
        tracing::warn!("{why}");
    }
    Level {
        handle,
        flag,
        rust_log,
    }
}

/// Whether systemd connected our stderr to the journal: `JOURNAL_STREAM` names stderr's device and inode.
/// (Checking that journald's socket exists is not enough: it also exists when run from a shell.)
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: LogLevel = LogLevel(tracing::Level::INFO);
    const DEBUG: LogLevel = LogLevel(tracing::Level::DEBUG);
    const WARN: LogLevel = LogLevel(tracing::Level::WARN);

    #[test]
    fn the_command_line_beats_rust_log_which_beats_the_config() {
        assert_eq!(level(Some(WARN), Some("debug"), INFO), (WARN, None));
        assert_eq!(level(None, Some("debug"), INFO), (DEBUG, None));
        assert_eq!(level(None, None, WARN), (WARN, None));
        assert_eq!(level(None, Some(""), WARN), (WARN, None));
    }

    #[test]
    fn rust_log_directives_for_imaged_are_read_and_others_are_ignored() {
        assert_eq!(
            level(None, Some("rumqttc=trace,imaged=debug"), INFO),
            (DEBUG, None)
        );
        assert_eq!(level(None, Some("rumqttc=trace"), INFO), (INFO, None));
        let (kept, why) = level(None, Some("loud"), INFO);
        assert_eq!(kept, INFO);
        assert!(why.unwrap().contains("RUST_LOG ignored"));
    }
}
