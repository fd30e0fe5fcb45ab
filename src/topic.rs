//! MQTT topic names and filters: what is valid (MQTT 3.1.1 section 4.7), what matches, and how a topic from
//! a client may appear in a log line.

/// Checks an MQTT topic filter (MQTT 3.1.1 section 4.7).
pub fn check_topic_filter(filter: &str) -> Result<(), &'static str> {
    check_topic_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("'#' must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

/// Checks an MQTT topic name: a filter without wildcards.
pub fn check_topic_name(name: &str) -> Result<(), &'static str> {
    check_topic_common(name)?;
    if name.contains(['+', '#']) {
        return Err("a topic to publish on cannot contain the wildcards '+' or '#'");
    }
    Ok(())
}

fn check_topic_common(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("it is empty");
    }
    if topic.len() > 65535 {
        return Err("it is longer than 65535 bytes");
    }
    if topic.contains('\0') {
        return Err("it contains a NUL character");
    }
    Ok(())
}

/// A topic as it may appear in a log line: control characters escaped, so a client cannot forge log lines,
/// and cut at 200 characters, so a 64 KB topic does not make a 64 KB line.
pub fn topic_for_log(topic: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    for (n, c) in topic.chars().enumerate() {
        if n == MAX {
            out.push_str(&format!("…({} bytes)", topic.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `topic` matches `filter` by MQTT's rules (`$`-topics are not matched by leading wildcards).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_topic_filters_are_refused() {
        for filter in ["", "a/#/b", "a/b#", "a+/b"] {
            assert!(check_topic_filter(filter).is_err(), "{filter:?}");
        }
        for filter in ["#", "+", "image/upload", "image/+/jpeg", "image/upload/#"] {
            assert!(check_topic_filter(filter).is_ok(), "{filter:?}");
        }
    }

    #[test]
    fn topics_in_log_lines_cannot_forge_lines_or_flood_them() {
        assert_eq!(topic_for_log("image/upload"), "image/upload");
        assert_eq!(
            topic_for_log("a\nINFO fake\u{1b}[31m"),
            "a\\nINFO fake\\u{1b}[31m"
        );
        let long = topic_for_log(&"x".repeat(60_000));
        assert!(
            long.len() < 220 && long.ends_with("…(60000 bytes)"),
            "{long}"
        );
    }

    #[test]
    fn topic_matching_follows_mqtt_rules() {
        assert!(topic_matches("image/upload", "image/upload"));
        assert!(topic_matches("image/#", "image/upload/cam1"));
        assert!(topic_matches("image/#", "image"));
        assert!(topic_matches("image/+/jpeg", "image/cam1/jpeg"));
        assert!(!topic_matches("image/+", "image/cam1/jpeg"));
        assert!(!topic_matches("#", "$SYS/broker"));
        assert!(!topic_matches("image/upload", "image/stored"));
    }
}
