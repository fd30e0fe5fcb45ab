//! `imaged check-config`: the daemon's own validation, run without starting anything.

use std::path::Path;
use std::process::ExitCode;

use crate::broker::{self, Role};
use crate::cli::{config_error, load};

pub fn run(path: Option<&Path>) -> ExitCode {
    let config = match load(path, true) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    // Also the files the config points at: password, CA, client certificate and key.
    if let Err((key, message)) = broker::connect(
        &config.broker,
        config.client_id(),
        config.max_packet_bytes(),
        Role::Receiver { persistent: false },
    ) {
        return config_error(&config.error(&key, message));
    }
    println!(
        "{}: OK (broker {}:{}, client id {}, upload '{}', stored '{}', storage {})",
        config.path.display(),
        config.broker.host,
        config.broker.port,
        config.client_id(),
        config.topics.upload,
        config.topics.stored,
        config.storage.dir.display()
    );
    ExitCode::SUCCESS
}
