//! Where log lines go: straight to journald with structured fields when stderr is the journal, readable text
//! on stderr otherwise (colour only on a terminal).

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::Level;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: Level) {
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    // Only our own crate logs at info; rumqttc's `log` lines are not forwarded.
    let targets = tracing_subscriber::filter::filter_fn(|meta| meta.target().starts_with("imaged"));
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald
                .with_syslog_identifier("imaged".into())
                .with_field_prefix(None);
            tracing_subscriber::registry()
                .with(journald.with_filter(filter).with_filter(targets))
                .init();
            return;
        }
    }
    let terminal = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(terminal)
        .with_target(false);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter).with_filter(targets))
        .init();
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
