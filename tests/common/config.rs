//! The imaged config file of a test or a benchmark run: what every run needs (its private broker, a storage
//! folder inside its scratch folder), with keys set over it. The one config writer of the tests and the
//! benchmarks.

use std::path::Path;

/// Sections in the order they were first set, each with its keys in order; values are TOML text.
#[derive(Debug, Clone, Default)]
pub struct ImagedConfig {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl ImagedConfig {
    /// A config for the broker on 127.0.0.1:`port`, as `client_id`, with images in `dir/images` and no free
    /// space kept.
    pub fn new(port: u16, dir: &Path, client_id: &str) -> ImagedConfig {
        let mut config = ImagedConfig::default();
        config
            .set("broker", "host", "\"127.0.0.1\"")
            .set("broker", "port", &port.to_string())
            .set("broker", "client_id", &format!("\"{client_id}\""))
            .set("storage", "dir", &format!("\"{}/images\"", dir.display()))
            // The default keeps 5 % of the disk free, and the machine a run lands on may have less: retention
            // holding every acknowledgement back would fail runs that are not about it. Its tests set their own.
            .set("retention", "min_free", "\"0\"");
        config
    }

    /// Sets `section.key` to `value` (TOML text: `"a string"`, `5`, `true`), over what it was.
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut ImagedConfig {
        let index = match self.sections.iter().position(|(name, _)| name == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[index].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Sets every key of `text` (TOML with `[section]` headers and one `key = value` a line) over these.
    pub fn merge(&mut self, text: &str) -> &mut ImagedConfig {
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_string();
                // A section with no keys of its own still appears, as it would in the text.
                self.set_section(&section);
            } else if let Some((key, value)) = line.split_once('=') {
                self.set(&section, key.trim(), value.trim());
            } else {
                panic!("not a `key = value` line in a test config: {line:?}");
            }
        }
        self
    }

    fn set_section(&mut self, section: &str) {
        if !self.sections.iter().any(|(name, _)| name == section) {
            self.sections.push((section.to_string(), Vec::new()));
        }
    }

    /// The file's text.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for (section, keys) in &self.sections {
            text += &format!("[{section}]\n");
            for (key, value) in keys {
                text += &format!("{key} = {value}\n");
            }
        }
        text
    }
}
