//! `imaged check-config`: the daemon's own validation, run without starting anything.

use crate::config::{Config, ConfigError};
use crate::mqtt::{self, Role};

/// Checks the config and the files it points at (password, CA, client certificate and key), as the
/// daemon would at start-up, and says what it found.
pub fn run(config: &Config) -> Result<(), ConfigError> {
    mqtt::connect(
        &config.broker,
        config.client_id(),
        config.max_packet_bytes(),
        Role::Receiver { persistent: false },
    )
    .map_err(|e| config.error(e))?;
    println!(
        "{}: OK (broker {}, client id {}, upload '{}', stored '{}', storage {})",
        config.path.display(),
        config.broker_name(),
        config.client_id(),
        config.topics.upload,
        config.topics.stored,
        config.storage.dir.display()
    );
    Ok(())
}
