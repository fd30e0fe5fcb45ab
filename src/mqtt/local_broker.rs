//! What a local Mosquitto's configuration will do to imaged's images.

use std::path::PathBuf;

/// Where imaged looks for the configuration of a broker on the same host.
pub const MOSQUITTO_CONF: &str = "/etc/mosquitto/mosquitto.conf";

/// What a local Mosquitto's configuration will do to imaged's images, in words, when it can be read: imaged
/// cannot ask a broker for its settings over MQTT, but on the same host it can read them.
pub fn local_broker_warnings(host: &str, port: u16) -> Vec<String> {
    if !matches!(host, "localhost" | "127.0.0.1" | "::1") {
        return Vec::new();
    }
    let Ok(main) = std::fs::read_to_string(MOSQUITTO_CONF) else {
        return Vec::new();
    };
    let mut text = main.clone();
    for line in main.lines() {
        if let Some(dir) = line.trim().strip_prefix("include_dir ") {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir.trim())
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            for file in files
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "conf"))
            {
                text += &std::fs::read_to_string(file).unwrap_or_default();
                text.push('\n');
            }
        }
    }
    // Only for the broker that configuration is about: one listening on our port (Mosquitto's own default is 1883).
    let ports: Vec<u16> = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("listener ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let ours = if ports.is_empty() {
        port == 1883
    } else {
        ports.contains(&port)
    };
    if ours {
        mosquitto_warnings(&text)
    } else {
        Vec::new()
    }
}

/// The warnings for a Mosquitto configuration (its files concatenated); the last setting of a key counts.
pub fn mosquitto_warnings(conf: &str) -> Vec<String> {
    let mut settings = std::collections::HashMap::new();
    for line in conf.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if let Some((key, value)) = line.split_once(char::is_whitespace) {
            settings.insert(key, value.trim());
        }
    }
    let number = |key: &str, default: u64| {
        settings
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut warnings = Vec::new();
    let queued = number("max_queued_messages", 1000);
    if queued != 0 && queued < 100_000 {
        warnings.push(format!(
            "the local Mosquitto keeps at most {queued} messages (max_queued_messages) for imaged while it is down \
             or busy and drops the rest: set max_queued_messages 100000 or more in {MOSQUITTO_CONF}"
        ));
    }
    if settings.get("persistence").is_none_or(|v| *v != "true") {
        warnings.push(format!(
            "the local Mosquitto runs without persistence: a broker restart loses the uploads it queued for \
             imaged; set persistence true in {MOSQUITTO_CONF}"
        ));
    }
    let inflight = number("max_inflight_messages", 20);
    if inflight != 0 && inflight < 100 {
        warnings.push(format!(
            "the local Mosquitto hands imaged at most {inflight} unacknowledged uploads at once (max_inflight_messages), \
             which limits how many images imaged stores in parallel: set max_inflight_messages 100 or more"
        ));
    }
    if settings.get("set_tcp_nodelay").is_none_or(|v| *v != "true") {
        warnings.push(
            "the local Mosquitto delays small packets (Nagle's algorithm): set set_tcp_nodelay true for \
             imaged's acknowledgements to go out at once"
                .to_string(),
        );
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_mosquitto_gets_a_warning_for_each_setting_that_loses_or_slows_images() {
        let warnings = mosquitto_warnings("listener 1883\nallow_anonymous true\n");
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert!(warnings[0].contains("at most 1000 messages (max_queued_messages)"));
        assert!(warnings[1].contains("without persistence"));
    }

    #[test]
    fn a_mosquitto_set_up_as_the_readme_says_gets_no_warning() {
        let conf = "# comment\npersistence true\nmax_queued_messages 100000\nmax_inflight_messages 100\nset_tcp_nodelay true\n";
        assert!(mosquitto_warnings(conf).is_empty());
        assert!(mosquitto_warnings(&format!("{conf}max_queued_messages 0\n")).is_empty());
    }
}
