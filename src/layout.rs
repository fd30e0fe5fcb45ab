//! Where an image goes under `storage.dir`: the camera a topic names, and the `storage.path` template that
//! turns the receive time and the camera into a relative path.
//!
//! **{camera}** is the part of the upload topic that the filter's wildcards matched (each `+` level and the
//! `#` rest), each level made a safe folder name, joined by `/`; a filter without wildcards gives `default`.
//! A level is written as it is when it consists of ASCII letters, digits, `-`, `_` and `.` and does not start
//! with `.`; every other byte is written `%XX` (upper-case hex of the byte, so UTF-8 takes several), `%`
//! included, and an empty level is written `%`. That makes the mapping one-to-one: two different topics
//! never give the same folder (a `%` is always followed by two hex digits, except the lone `%` of an empty
//! level). A level longer than [`MAX_LEVEL`] bytes once written is cut and ends in `~` and a hash of the
//! whole level, so it stays one-to-one in practice and fits the 255 bytes a file name may have.

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// The camera of a topic matched by a filter without wildcards.
pub const DEFAULT_CAMERA: &str = "default";

/// The longest folder name a topic level becomes (file systems allow 255 bytes).
pub const MAX_LEVEL: usize = 120;

/// At most this many folders deep from one topic, so a path stays well within PATH_MAX.
pub const MAX_LEVELS: usize = 16;

/// The camera `topic` names under `filter`: the levels its wildcards matched, each made safe, joined by `/`.
/// `topic` must match `filter` (the broker only delivers what matches).
pub fn camera(filter: &str, topic: &str) -> String {
    let mut levels = Vec::new();
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => {
                levels.extend(topic_levels.by_ref());
                break;
            }
            "+" => levels.extend(topic_levels.next()),
            _ => {
                topic_levels.next();
            }
        }
    }
    if levels.is_empty() {
        return DEFAULT_CAMERA.to_string();
    }
    let mut safe: Vec<String> = levels.iter().map(|l| safe_level(l)).collect();
    if safe.len() > MAX_LEVELS {
        // The deep rest becomes one level of its own, hashed like a long one.
        let rest = levels[MAX_LEVELS - 1..].join("/");
        safe.truncate(MAX_LEVELS - 1);
        safe.push(safe_level(&rest));
    }
    safe.join("/")
}

/// The camera of a topic imaged republished on (a `{camera}` stored topic): like [`camera`], but a level
/// that is already a folder name as [`safe_level`] writes it stays as it is, so `imaged receive --dir`
/// keeps the daemon's camera folders instead of escaping their `%` again.
pub fn stored_camera(filter: &str, topic: &str) -> String {
    let original = |safe: &str| decode_level(safe).and_then(|raw| String::from_utf8(raw).ok());
    camera(filter, topic)
        .split('/')
        .map(|safe| match original(safe) {
            Some(level) if original(&level).is_some_and(|raw| safe_level(&raw) == level) => level,
            _ => safe.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The bytes a level written by [`safe_level`] stands for (`None` for what it never writes, such as a cut
/// long level).
fn decode_level(level: &str) -> Option<Vec<u8>> {
    if level == "%" {
        return Some(Vec::new());
    }
    let bytes = level.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = level.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// One topic level as a folder name (see the module's rule).
pub fn safe_level(level: &str) -> String {
    if level.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(level.len());
    for (i, b) in level.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_LEVEL {
        let digest = Sha256::digest(level.as_bytes());
        let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        // Cut on a whole byte: every character written is ASCII.
        out.truncate(MAX_LEVEL - hash.len() - 1);
        if let Some(cut) = out.rfind('%').filter(|&p| p + 3 > out.len()) {
            out.truncate(cut);
        }
        out.push('~');
        out.push_str(&hash);
    }
    out
}

/// A parsed `storage.path`: strftime fields of the receive time (UTC) and `{camera}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Template {
    text: String,
}

impl Template {
    /// Checks a template: a relative path of plain parts, valid strftime fields, a file name ending in
    /// `.jpg` or `.jpeg`, `{camera}` the only placeholder.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if text.starts_with('/') {
            return Err(format!("{text:?} must be relative to storage.dir"));
        }
        let without_camera = text.replace("{camera}", "");
        if without_camera.contains(['{', '}']) {
            return Err(format!(
                "{text:?}: {{camera}} is the only placeholder (strftime fields such as %Y are the others)"
            ));
        }
        if StrftimeItems::new(&without_camera).any(|i| matches!(i, Item::Error)) {
            return Err(format!(
                "{text:?} has a % field strftime does not know (%% is a percent sign)"
            ));
        }
        for part in text.split('/') {
            if part.is_empty() || part == "." || part == ".." || part.starts_with('.') {
                return Err(format!(
                    "{text:?}: every part of the path must be a plain name (no empty part, no . or .., no leading .)"
                ));
            }
        }
        let file = text.rsplit('/').next().unwrap_or(text).to_ascii_lowercase();
        if !(file.ends_with(".jpg") || file.ends_with(".jpeg")) {
            return Err(format!("{text:?}: the file name must end in .jpg or .jpeg"));
        }
        if file.contains("{camera}") {
            return Err(format!(
                "{text:?}: {{camera}} may name folders, not the file (a camera of several levels is several folders)"
            ));
        }
        Ok(Template { text: text.into() })
    }

    /// A template of imaged's own, not checked as a user's is.
    pub(crate) fn fixed(text: &str) -> Template {
        Template { text: text.into() }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The relative path of an image that arrived at `at` from `camera` (a safe relative path, see
    /// [`camera`]), with `-N` before the extension when `suffix` is not 0.
    pub fn render(&self, at: DateTime<Utc>, camera: &str, suffix: u32) -> String {
        // The camera goes in after strftime: a `%` in a safe level is not a field.
        let marker = "\u{0}";
        let stamped = at
            .format(&self.text.replace("{camera}", marker))
            .to_string()
            .replace(marker, camera);
        if suffix == 0 {
            return stamped;
        }
        match stamped.rfind('.') {
            Some(dot) if dot > stamped.rfind('/').map_or(0, |s| s + 1) => {
                format!("{}-{suffix}{}", &stamped[..dot], &stamped[dot..])
            }
            _ => format!("{stamped}-{suffix}"),
        }
    }

    /// Whether every image of a second gets a name of its own (the template names the second), so names
    /// sort in time order.
    pub fn names_the_second(&self) -> bool {
        self.text.contains("%S") || self.text.contains("%T") || self.text.contains("%s")
    }
}

impl TryFrom<String> for Template {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Template::parse(&s)
    }
}

impl Default for Template {
    fn default() -> Self {
        Template {
            text: "image_%Y%m%d-%H%M%S.jpg".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_camera_folder_from_a_stored_topic_is_kept_as_the_daemon_wrote_it() {
        let filter = "image/stored/+";
        for camera in ["cam1", "caf%C3%A9", "%", "a%2Fb", "%2Ehidden"] {
            assert_eq!(
                stored_camera(filter, &format!("image/stored/{camera}")),
                camera
            );
        }
        // Anything else is escaped as ever.
        assert_eq!(stored_camera(filter, "image/stored/café"), "caf%C3%A9");
        assert_eq!(stored_camera(filter, "image/stored/%41"), "%2541");
        assert_eq!(stored_camera(filter, "image/stored/.x"), "%2Ex");
        assert_eq!(
            stored_camera("image/stored/#", "image/stored/a/b%20c"),
            "a/b%20c"
        );
    }
    use chrono::TimeZone;
    use std::collections::HashSet;

    #[test]
    fn the_wildcard_levels_name_the_camera() {
        assert_eq!(camera("image/upload/+", "image/upload/cam1"), "cam1");
        assert_eq!(
            camera("image/upload/#", "image/upload/garden/cam1"),
            "garden/cam1"
        );
        assert_eq!(camera("+/upload/+", "site/upload/cam1"), "site/cam1");
        assert_eq!(camera("image/upload", "image/upload"), "default");
        // `a/#` also matches `a`: nothing matched the wildcard.
        assert_eq!(camera("image/upload/#", "image/upload"), "default");
    }

    #[test]
    fn hostile_levels_become_safe_folder_names() {
        for (level, safe) in [
            ("..", "%2E."),
            (".", "%2E"),
            (".hidden", "%2Ehidden"),
            ("", "%"),
            ("con", "con"),
            ("a b", "a%20b"),
            ("100%", "100%25"),
            ("caméra", "cam%C3%A9ra"),
            ("a\\b", "a%5Cb"),
            ("\u{202e}x", "%E2%80%AEx"),
            ("cam.1", "cam.1"),
        ] {
            assert_eq!(safe_level(level), safe, "{level:?}");
        }
    }

    #[test]
    fn a_60_kb_level_is_cut_and_hashed_within_a_file_name() {
        let long = "x".repeat(60_000);
        let safe = safe_level(&long);
        assert!(safe.len() <= MAX_LEVEL, "{}", safe.len());
        assert_ne!(safe, safe_level(&format!("{long}y")));
        let spaces = safe_level(&" ".repeat(60_000));
        assert!(
            spaces.len() <= MAX_LEVEL && !spaces.contains("%2~"),
            "{spaces}"
        );
    }

    #[test]
    fn different_topics_never_share_a_folder() {
        let topics = [
            "..",
            ".",
            "%2E.",
            "%2E",
            "",
            "%",
            "%25",
            " ",
            "%20",
            "a/b",
            "a%2Fb",
            "a",
            "A",
            "con",
            "CON",
            ".hidden",
            "%2Ehidden",
            "é",
            "%C3%A9",
            "x/",
            "x",
            "x//",
            "~",
            "a~b",
        ];
        let mut seen = HashSet::new();
        let filter = "image/upload/#";
        for t in topics {
            let folder = camera(filter, &format!("image/upload/{t}"));
            assert!(seen.insert(folder.clone()), "{t:?} gave {folder:?} twice");
            for part in folder.split('/') {
                assert!(
                    !part.is_empty() && !part.starts_with('.') && part != "..",
                    "{t:?}: {folder:?}"
                );
            }
        }
    }

    #[test]
    fn a_topic_of_many_levels_stays_a_few_folders_deep() {
        let topic = format!("image/upload/{}", vec!["a"; 180].join("/"));
        let folder = camera("image/upload/#", &topic);
        assert_eq!(folder.split('/').count(), MAX_LEVELS);
        assert!(folder.len() < 4096);
    }

    #[test]
    fn the_default_template_keeps_the_original_names() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 16, 50, 5).unwrap();
        let template = Template::default();
        assert_eq!(template.render(t, "cam1", 0), "image_20261125-165005.jpg");
        assert_eq!(template.render(t, "cam1", 2), "image_20261125-165005-2.jpg");
        let per_camera = Template::parse("{camera}/%Y-%m-%d/image_%Y%m%d-%H%M%S.jpg").unwrap();
        assert_eq!(
            per_camera.render(t, "garden/cam%201", 1),
            "garden/cam%201/2026-11-25/image_20261125-165005-1.jpg"
        );
    }

    #[test]
    fn templates_that_could_escape_or_hide_are_refused() {
        for bad in [
            "",
            "/abs/image.jpg",
            "../image.jpg",
            "a/../image.jpg",
            ".hidden/image.jpg",
            "a//image.jpg",
            "image.png",
            "{cam}/image.jpg",
            "{camera}.jpg",
            "%Q/image.jpg",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Template::parse("{camera}/%Y/%j/%H%M%S.jpeg").is_ok());
    }
}
