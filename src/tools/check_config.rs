//! `imaged check-config`: the daemon's own validation, run without starting anything.

use crate::config::{Config, ConfigError};
use crate::layout;
use crate::mqtt::{self, Role};

/// Checks the config and the files it points at (password, CA, client certificate and key), as the
/// daemon would at start-up, and says what it found.
pub fn run(config: &Config) -> Result<(), ConfigError> {
    mqtt::connect(
        &config.broker,
        config.client_id(),
        config.max_packet_bytes(),
        Role::Receiver { persistent: false },
        None,
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
    let topic = example_topic(&config.topics.upload);
    let camera = layout::camera(&config.topics.upload, &topic);
    let name = config.storage.path.render(crate::clock::now(), &camera, 0);
    println!(
        "an image on '{topic}' now goes to {}",
        config.storage.dir.join(name).display()
    );
    Ok(())
}

/// A topic the upload filter matches, with `camera1` where it has a wildcard.
fn example_topic(filter: &str) -> String {
    filter
        .split('/')
        .map(|level| match level {
            "+" | "#" => "camera1",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_topic_fills_each_wildcard_with_a_camera() {
        assert_eq!(super::example_topic("image/upload"), "image/upload");
        assert_eq!(super::example_topic("image/+/jpeg"), "image/camera1/jpeg");
        assert_eq!(
            super::example_topic("image/upload/#"),
            "image/upload/camera1"
        );
    }
}
