//! The TOML configuration: its structure, its defaults (the `Default` impls below, nowhere else) and its
//! validation, one section at a time.
//!
//! Every error names the file and the `section.key` it is about, so that `journalctl -u imaged` says what to
//! fix. Semantic checks (a topic filter that matches the stored topic, half a client certificate) are done
//! here too, so `imaged check-config` and the daemon agree on what is valid.

pub mod reload;
mod values;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::layout::Template;
use crate::topic::{check_topic_filter, check_topic_name, topic_matches};
pub use values::{FileMode, FreeSpace, LogLevel, Protocol, Size, Span};

/// Where the daemon and the tools look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/imaged.toml";

/// MQTT's own limit on a packet's remaining length (the variable header and payload).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Room for the fixed header, topic and packet id next to an image in one PUBLISH packet.
pub const PACKET_OVERHEAD: usize = 64 * 1024 + 16;

/// The name of the systemd credential that may hold the MQTT password (`LoadCredential=mqtt-password:…`).
pub const PASSWORD_CREDENTIAL: &str = "mqtt-password";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The file this came from, for errors found later (an unreadable password file, say).
    #[serde(skip)]
    pub path: PathBuf,
    pub broker: Broker,
    pub topics: Topics,
    pub storage: Storage,
    pub retention: Retention,
    pub limits: Limits,
    pub log: Log,
    pub homeassistant: HomeAssistant,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// `None` until [`Config::parse`] derives it from /etc/machine-id.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub keep_alive_secs: u64,
    pub connect_timeout_secs: u64,
    /// The MQTT version spoken: 3.1.1 or 5 (only 5 carries packet limits, flow control and properties).
    pub protocol: Protocol,
    /// MQTT 5: how long the broker keeps a persistent session while imaged is away.
    pub session_expiry: Span,
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// `false` turns TLS off while keeping the other keys for later.
    pub enabled: bool,
    /// PEM file with the CA certificates to trust; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (PEM); both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when `host` is an IP address or another alias.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub upload: String,
    /// May contain `{camera}` as a whole level: each camera's images on a topic of their own.
    pub stored: String,
    /// Republishes are retained: a late viewer gets each stored topic's latest image at once.
    pub retain_stored: bool,
    /// One JSON message per stored image; "" = off.
    pub events: String,
    /// Retained `online`/`offline` (the last will), with `<status>/stats` beside it; `{client_id}` is
    /// replaced; "" = off.
    pub status: String,
}

/// Home Assistant's MQTT discovery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistant {
    pub enabled: bool,
    pub discovery_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    pub dir: PathBuf,
    /// Defaults to `<dir>/.quarantine`.
    pub quarantine_dir: Option<PathBuf>,
    /// The index and outbox; defaults to `<dir>/.imaged`.
    pub state_dir: Option<PathBuf>,
    pub max_image_bytes: usize,
    pub file_mode: FileMode,
    pub writers: usize,
    pub dedup_window: usize,
    /// Where an image goes under `dir`: strftime fields of the receive time (UTC) and `{camera}`.
    pub path: Template,
    /// The most rejected payloads the quarantine keeps; the oldest go first.
    pub quarantine_max_size: Size,
    /// Also take the base64 text of a JPEG (optionally a `data:image/jpeg;base64,` URI) and store the JPEG.
    pub accept_base64: bool,
}

/// What imaged deletes to keep running: the oldest images first, never one whose republish is pending.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Total size of the stored images; 0 = no limit.
    pub max_size: Size,
    /// Age of the oldest image kept; 0 = forever.
    pub max_age: Span,
    /// Free space to keep on the storage filesystem.
    pub min_free: FreeSpace,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub inflight_images: usize,
    pub inflight_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub level: LogLevel,
}

// The defaults, as config/imaged.toml and imaged.toml(5) document them.

impl Default for Broker {
    fn default() -> Self {
        Broker {
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            username: None,
            password_file: None,
            keep_alive_secs: 30,
            connect_timeout_secs: 5,
            protocol: Protocol::V311,
            session_expiry: Span(std::time::Duration::from_secs(7 * 86_400)),
            tls: None,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            enabled: true,
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            upload: "image/upload".into(),
            stored: "image/stored".into(),
            retain_stored: false,
            events: String::new(),
            status: "imaged/{client_id}/status".into(),
        }
    }
}

impl Default for HomeAssistant {
    fn default() -> Self {
        HomeAssistant {
            enabled: false,
            discovery_prefix: "homeassistant".into(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            dir: "/var/lib/imaged/images".into(),
            quarantine_dir: None,
            state_dir: None,
            max_image_bytes: 32 * 1024 * 1024,
            file_mode: FileMode(0o640),
            writers: 16,
            dedup_window: 100_000,
            path: Template::default(),
            quarantine_max_size: Size(100_000_000),
            accept_base64: false,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_size: Size(0),
            max_age: Span(std::time::Duration::ZERO),
            min_free: FreeSpace::Percent(5.0),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            inflight_images: 256,
            inflight_bytes: 128 * 1024 * 1024,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: LogLevel(tracing::Level::INFO),
        }
    }
}

/// A problem with one key, found after parsing: its `section.key` and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

impl KeyError {
    pub fn new(key: &str, message: impl Into<String>) -> KeyError {
        KeyError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A config problem, with the file and (where there is one) the line and key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        match &self.key {
            Some(key) => write!(f, ": {key}: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates `path`, and fills in the derived defaults (client id, state folders).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.into(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// The config a tool runs with: `path`, else the default file when there is one, else the built-in
    /// defaults (a tool may run on a machine without imaged's config).
    pub fn load_or_defaults(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => Config::load(path),
            None if Path::new(DEFAULT_PATH).exists() => Config::load(DEFAULT_PATH.as_ref()),
            None => Config::parse("", DEFAULT_PATH.as_ref()).map(|mut c| {
                c.path = PathBuf::from("(built-in defaults)");
                c
            }),
        }
    }

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = parse_toml(text, path)?;
        let derived = config.broker.client_id.is_none();
        config.validate().map_err(|e| ConfigError {
            file: path.into(),
            line: line_of_key(text, &e.key),
            key: Some(e.key),
            message: e.message,
        })?;
        if derived {
            config.broker.client_id = Some(default_client_id());
        }
        // The status topic names the client id: checked once that is known.
        config.check_status_topic().map_err(|e| ConfigError {
            file: path.into(),
            line: line_of_key(text, &e.key),
            key: Some(e.key),
            message: e.message,
        })?;
        config.path = path.into();
        Ok(config)
    }

    /// The checks serde cannot do, section by section.
    fn validate(&self) -> Result<(), KeyError> {
        self.broker.validate()?;
        self.topics.validate()?;
        self.storage.validate()?;
        self.limits.validate()?;
        self.homeassistant.validate(&self.topics)
    }

    /// `topics.status` with the client id in it: a topic imaged may publish on, outside `topics.upload`.
    fn check_status_topic(&self) -> Result<(), KeyError> {
        let Some(status) = self.status_topic() else {
            return Ok(());
        };
        for topic in [status.clone(), format!("{status}/stats")] {
            if let Err(why) = check_topic_name(&topic) {
                return Err(KeyError::new(
                    "topics.status",
                    format!("{topic:?} is not a valid MQTT topic name: {why}"),
                ));
            }
            if topic_matches(&self.topics.upload, &topic) {
                return Err(KeyError::new(
                    "topics.status",
                    format!(
                        "{topic:?} matches topics.upload {:?}: imaged would take its own status for an upload",
                        self.topics.upload
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `topics.status` with `{client_id}` replaced; `None` when it is off.
    pub fn status_topic(&self) -> Option<String> {
        (!self.topics.status.is_empty())
            .then(|| self.topics.status.replace("{client_id}", self.client_id()))
    }

    /// A problem with a key of this config found after parsing (a password file that cannot be read, say),
    /// with the line that sets the key.
    pub fn error(&self, e: KeyError) -> ConfigError {
        let line = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| line_of_key(&text, &e.key));
        ConfigError {
            file: self.path.clone(),
            line,
            key: Some(e.key),
            message: e.message,
        }
    }

    pub fn client_id(&self) -> &str {
        self.broker.client_id.as_deref().unwrap_or("imaged")
    }

    /// `host:port`, as log lines and the status line name the broker.
    pub fn broker_name(&self) -> String {
        format!("{}:{}", self.broker.host, self.broker.port)
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.storage
            .quarantine_dir
            .clone()
            .unwrap_or_else(|| self.storage.dir.join(".quarantine"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.storage
            .state_dir
            .clone()
            .unwrap_or_else(|| self.storage.dir.join(".imaged"))
    }

    /// The largest packet imaged accepts or sends: one image plus room for its topic and header.
    pub fn max_packet_bytes(&self) -> usize {
        let payload = if self.storage.accept_base64 {
            crate::storage::base64_limit(self.storage.max_image_bytes)
        } else {
            self.storage.max_image_bytes
        };
        (payload + PACKET_OVERHEAD).min(MQTT_MAX_PACKET)
    }
}

impl Broker {
    fn validate(&self) -> Result<(), KeyError> {
        let err = |key: &str, msg: &str| Err(KeyError::new(key, msg));
        if self.host.trim().is_empty() {
            return err("broker.host", "must not be empty");
        }
        if self.port == 0 {
            return err("broker.port", "must be between 1 and 65535");
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 65535 {
                return err("broker.client_id", "must be between 1 and 65535 bytes long");
            }
        }
        if self.password_file.is_some() && self.username.is_none() {
            return err("broker.password_file", "is set but broker.username is not");
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs > 65535 {
            return err("broker.keep_alive_secs", "must be between 1 and 65535");
        }
        if self.protocol == Protocol::V5 && self.keep_alive_secs < 5 {
            // rumqttc's MQTT 5 client refuses a shorter one (it panics).
            return err(
                "broker.keep_alive_secs",
                "must be at least 5 with broker.protocol = \"5\"",
            );
        }
        if self.connect_timeout_secs == 0 {
            return err("broker.connect_timeout_secs", "must be at least 1");
        }
        if self.session_expiry.is_zero() {
            // 0 would tell an MQTT 5 broker to drop the session, and the uploads queued in it, at every
            // disconnect.
            return err(
                "broker.session_expiry",
                "must be longer than 0 (the broker keeps uploads in imaged's session while it is away)",
            );
        }
        match &self.tls {
            Some(tls) => tls.validate(),
            None => Ok(()),
        }
    }
}

impl Tls {
    fn validate(&self) -> Result<(), KeyError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            let key = if self.cert_file.is_some() {
                "broker.tls.key_file"
            } else {
                "broker.tls.cert_file"
            };
            return Err(KeyError::new(
                key,
                "mutual TLS needs both cert_file and key_file",
            ));
        }
        if let Some(name) = &self.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(KeyError::new(
                    "broker.tls.server_name",
                    format!("{name:?} is not a valid DNS name or IP address"),
                ));
            }
        }
        Ok(())
    }
}

impl Topics {
    fn validate(&self) -> Result<(), KeyError> {
        if let Err(why) = check_topic_filter(&self.upload) {
            return Err(KeyError::new(
                "topics.upload",
                format!("{:?} is not a valid MQTT topic filter: {why}", self.upload),
            ));
        }
        let stored = &self.stored;
        let levels: Vec<&str> = stored.split('/').collect();
        if levels.iter().any(|l| l.contains(CAMERA) && *l != CAMERA) {
            return Err(KeyError::new(
                "topics.stored",
                format!(
                    "{stored:?}: {CAMERA} must be a whole level (e.g. \"image/stored/{CAMERA}\")"
                ),
            ));
        }
        if let Err(why) = check_topic_name(&stored.replace(CAMERA, "camera")) {
            return Err(KeyError::new(
                "topics.stored",
                format!("{stored:?} is not a valid MQTT topic name: {why}"),
            ));
        }
        if may_match_stored(&self.upload.split('/').collect::<Vec<_>>(), &levels) {
            return Err(KeyError::new(
                "topics.stored",
                format!(
                    "{stored:?} matches topics.upload {:?}: imaged would store its own republished images again",
                    self.upload
                ),
            ));
        }
        if !self.events.is_empty() {
            if let Err(why) = check_topic_name(&self.events) {
                return Err(KeyError::new(
                    "topics.events",
                    format!("{:?} is not a valid MQTT topic name: {why}", self.events),
                ));
            }
            if topic_matches(&self.upload, &self.events) {
                return Err(KeyError::new(
                    "topics.events",
                    format!(
                        "{:?} matches topics.upload {:?}: imaged would take its own events for uploads",
                        self.events, self.upload
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The placeholder of `topics.stored` for the camera (as in `storage.path`).
pub const CAMERA: &str = "{camera}";

/// Whether the upload filter's levels match some topic the stored template's levels can become, where a
/// `{camera}` level stands for one level or more (a `#` or several wildcards in the filter name a camera
/// of several levels).
fn may_match_stored(filter: &[&str], stored: &[&str]) -> bool {
    match (filter.first(), stored.first()) {
        (Some(&"#"), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        // A camera level is a safe name: any filter level may equal it.
        (Some(_), Some(&CAMERA)) => {
            may_match_stored(&filter[1..], &stored[1..]) || may_match_stored(&filter[1..], stored)
        }
        (Some(f), Some(s)) => (*f == "+" || f == s) && may_match_stored(&filter[1..], &stored[1..]),
    }
}

impl HomeAssistant {
    fn validate(&self, topics: &Topics) -> Result<(), KeyError> {
        if !self.enabled {
            return Ok(());
        }
        let prefix = &self.discovery_prefix;
        if let Err(why) = check_topic_name(prefix) {
            return Err(KeyError::new(
                "homeassistant.discovery_prefix",
                format!("{prefix:?} is not a valid MQTT topic name: {why}"),
            ));
        }
        // Home Assistant's birth message comes on <prefix>/status: it must not be taken for an upload.
        let mut under_prefix: Vec<&str> = prefix.split('/').collect();
        under_prefix.push(CAMERA);
        if may_match_stored(&topics.upload.split('/').collect::<Vec<_>>(), &under_prefix) {
            return Err(KeyError::new(
                "homeassistant.discovery_prefix",
                format!(
                    "topics.upload {:?} matches topics under {prefix:?}: imaged would take Home Assistant's messages for uploads",
                    topics.upload
                ),
            ));
        }
        if topics.status.is_empty() {
            return Err(KeyError::new(
                "homeassistant.enabled",
                "needs topics.status: the device's availability and its sensors come from it",
            ));
        }
        Ok(())
    }
}

impl Storage {
    fn validate(&self) -> Result<(), KeyError> {
        if self.dir.as_os_str().is_empty() {
            return Err(KeyError::new("storage.dir", "must not be empty"));
        }
        let max = MQTT_MAX_PACKET - PACKET_OVERHEAD;
        if self.max_image_bytes == 0 || self.max_image_bytes > max {
            return Err(KeyError::new(
                "storage.max_image_bytes",
                format!("must be between 1 and {max} (MQTT's packet limit)"),
            ));
        }
        if self.writers == 0 || self.writers > 64 {
            return Err(KeyError::new("storage.writers", "must be between 1 and 64"));
        }
        if self.dedup_window == 0 {
            return Err(KeyError::new("storage.dedup_window", "must be at least 1"));
        }
        // Retention deletes under dir, and start-up sweeps the state folder's hidden files: they must differ.
        for (key, dir) in [
            ("storage.state_dir", &self.state_dir),
            ("storage.quarantine_dir", &self.quarantine_dir),
        ] {
            if dir.as_ref().is_some_and(|d| d == &self.dir) {
                return Err(KeyError::new(
                    key,
                    "must not be storage.dir itself (the default is a hidden folder inside it)",
                ));
            }
        }
        Ok(())
    }
}

impl Limits {
    fn validate(&self) -> Result<(), KeyError> {
        if self.inflight_images == 0 || self.inflight_images > 65535 {
            return Err(KeyError::new(
                "limits.inflight_images",
                "must be between 1 and 65535",
            ));
        }
        if self.inflight_bytes == 0 {
            return Err(KeyError::new("limits.inflight_bytes", "must be at least 1"));
        }
        Ok(())
    }
}

/// Deserializes config text, turning serde's error into one that names the key and the line.
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let located =
        |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| ConfigError {
            file: path.into(),
            line: span.map(|s| line_at(text, s.start)),
            key,
            message,
        };
    let de = toml::Deserializer::parse(text)
        .map_err(|e| located(e.span(), None, e.message().trim().to_string()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        // The path includes an unknown key itself, e.g. `broker.prot`.
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim().to_string();
        let key = (path != ".").then_some(path);
        located(inner.span(), key, message)
    })
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The line where `section.key` is set, for errors found after parsing.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let (section, name) = key.rsplit_once('.')?;
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim().to_string();
        } else if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == name {
                    return Some(n + 1);
                }
            }
        }
    }
    None
}

/// A client id that is stable on this host and differs between hosts: two daemons sharing an id would
/// take each other's persistent session and kick each other off the broker.
pub fn default_client_id() -> String {
    use sha2::{Digest, Sha256};
    let seed = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        });
    match seed {
        // Hashed, as systemd asks: the machine id itself should not leave the host.
        Some(seed) => {
            let digest = Sha256::digest(format!("imaged:{seed}").as_bytes());
            let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
            format!("imaged-{hex}")
        }
        None => "imaged".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/imaged.toml"))
    }

    #[test]
    fn the_shipped_config_parses_and_sets_every_key() {
        let text = include_str!("../../config/imaged.toml");
        let config = parse(text).expect("config/imaged.toml must parse");
        assert_eq!(config.topics.upload, "image/upload");
        assert_eq!(config.topics.stored, "image/stored");
        assert_eq!(config.storage.max_image_bytes, 33_554_432);
        // The file shows the defaults.
        let defaults = parse("").unwrap();
        assert_eq!(
            config.storage.quarantine_max_size,
            defaults.storage.quarantine_max_size
        );
        assert_eq!(config.retention.max_size, defaults.retention.max_size);
        assert_eq!(config.retention.max_age, defaults.retention.max_age);
        assert_eq!(config.retention.min_free, defaults.retention.min_free);
        assert!(text.contains("\n[retention]\n"));
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = parse("[broker]\n").unwrap();
        assert_eq!(config.broker.host, "localhost");
        assert_eq!(config.broker.port, 1883);
        assert_eq!(config.storage.dir, Path::new("/var/lib/imaged/images"));
        assert_eq!(
            config.quarantine_dir(),
            Path::new("/var/lib/imaged/images/.quarantine")
        );
        assert_eq!(config.storage.file_mode, FileMode(0o640));
        assert!(config.client_id().starts_with("imaged"));
    }

    #[test]
    fn the_protocol_is_3_1_1_unless_5_is_asked_for_and_a_session_expiry_of_0_is_refused() {
        assert_eq!(parse("").unwrap().broker.protocol, Protocol::V311);
        assert_eq!(
            parse("[broker]\nprotocol = \"5\"\n")
                .unwrap()
                .broker
                .protocol,
            Protocol::V5
        );
        assert_eq!(
            parse("[broker]\nprotocol = 5\n").unwrap().broker.protocol,
            Protocol::V5
        );
        let err = parse("[broker]\nprotocol = \"4\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.protocol"));
        assert_eq!(
            parse("").unwrap().broker.session_expiry.0,
            std::time::Duration::from_secs(7 * 86_400)
        );
        let err = parse("[broker]\nsession_expiry = \"0\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.session_expiry"));
    }

    #[test]
    fn an_mqtt_5_keep_alive_under_five_seconds_is_a_config_error_not_a_crash() {
        let err = parse("[broker]\nprotocol = \"5\"\nkeep_alive_secs = 4\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.keep_alive_secs"));
        assert!(parse("[broker]\nprotocol = \"5\"\nkeep_alive_secs = 5\n").is_ok());
        assert!(parse("[broker]\nkeep_alive_secs = 4\n").is_ok());
    }

    #[test]
    fn an_unknown_key_is_named_with_its_section_and_line() {
        let err = parse("[broker]\nhost = \"x\"\nprot = 1\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.prot"));
        assert_eq!(err.line, Some(3));
        assert!(
            err.to_string()
                .starts_with("/etc/imaged.toml:3: broker.prot: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = parse("[broker]\nport = \"eighty\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.port"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn an_unknown_section_is_named() {
        let err = parse("[broker]\n[brokr]\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("brokr"));
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let err = parse("[broker]\nhost = \n").unwrap_err();
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn a_stored_topic_inside_the_upload_filter_is_refused() {
        let err = parse("[broker]\n[topics]\nupload = \"image/#\"\nstored = \"image/stored\"\n")
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("topics.stored"));
        assert_eq!(err.line, Some(4));
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_config_or_an_error_never_a_panic(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn any_value_for_a_known_key_gives_a_config_or_an_error_naming_it(
            section in "(broker|topics|storage|retention|limits|log)", key in "[a-z_]{1,20}", value in "(\"[^\"\\\\]{0,20}\"|-?[0-9]{1,12}|true|false|\\[\\])",
        ) {
            if let Err(e) = parse(&format!("[{section}]\n{key} = {value}\n")) {
                proptest::prop_assert!(e.key.is_some() || e.line.is_some(), "{}", e);
            }
        }
    }

    #[test]
    fn retention_takes_sizes_durations_and_shares_and_names_a_bad_one() {
        let config = parse(
            "[storage]\nquarantine_max_size = \"1MiB\"\n[retention]\nmax_size = \"50GB\"\nmax_age = \"30d\"\nmin_free = \"2GB\"\n",
        )
        .unwrap();
        assert_eq!(config.storage.quarantine_max_size, Size(1 << 20));
        assert_eq!(config.retention.max_size, Size(50_000_000_000));
        assert_eq!(config.retention.max_age.to_string(), "30d");
        assert_eq!(
            config.retention.min_free,
            FreeSpace::Bytes(Size(2_000_000_000))
        );
        let defaults = parse("").unwrap();
        assert_eq!(defaults.retention.max_size, Size(0));
        assert!(defaults.retention.max_age.is_zero());
        assert_eq!(defaults.retention.min_free, FreeSpace::Percent(5.0));
        let err = parse("[retention]\nmax_age = \"a month\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retention.max_age"));
        assert_eq!(err.line, Some(2));
        let err = parse("[retention]\nmin_free = \"120%\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retention.min_free"));
    }

    #[test]
    fn the_state_folder_may_not_be_the_image_folder() {
        let err = parse("[storage]\ndir = \"/srv/img\"\nstate_dir = \"/srv/img\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("storage.state_dir"));
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn a_stored_topic_per_camera_is_refused_only_where_uploads_could_land_on_it() {
        let ok = |upload: &str, stored: &str| {
            parse(&format!(
                "[topics]\nupload = \"{upload}\"\nstored = \"{stored}\"\n"
            ))
        };
        assert!(ok("image/upload/+", "image/stored/{camera}").is_ok());
        assert!(ok("cam/+/upload", "cam/{camera}/stored").is_ok());
        assert!(ok("image/#", "image/{camera}").is_err());
        assert!(ok("image/+/x", "image/{camera}/x").is_err());
        // A camera can span levels: the filter's # can meet a deeper stored topic.
        assert!(ok("a/+/+/b", "a/{camera}/b").is_err());
        for bad in ["image/cam-{camera}", "image/+/{camera}"] {
            let err = ok("image/upload", bad).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("topics.stored"), "{bad}");
        }
    }

    #[test]
    fn events_and_status_topics_must_be_topics_outside_the_upload_filter() {
        let err =
            parse("[topics]\nupload = \"imaged/#\"\nstored = \"x\"\nevents = \"imaged/events\"\n")
                .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("topics.events"));
        let err = parse("[topics]\nevents = \"imaged/+\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("topics.events"));
        let err = parse("[topics]\nupload = \"imaged/#\"\nstored = \"x\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("topics.status"));
        let config = parse("[broker]\nclient_id = \"cam-host\"\n").unwrap();
        assert_eq!(
            config.status_topic().as_deref(),
            Some("imaged/cam-host/status")
        );
        let config = parse("[topics]\nstatus = \"\"\n").unwrap();
        assert_eq!(config.status_topic(), None);
        let err = parse("[broker]\nclient_id = \"a+b\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("topics.status"));
    }

    #[test]
    fn home_assistant_needs_the_status_topic_and_its_own_topics_apart_from_uploads() {
        assert!(parse("[homeassistant]\nenabled = true\n").is_ok());
        let err = parse("[homeassistant]\nenabled = true\n[topics]\nstatus = \"\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("homeassistant.enabled"));
        let err = parse(
            "[homeassistant]\nenabled = true\n[topics]\nupload = \"+/status\"\nstored = \"x/y/z\"\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("homeassistant.discovery_prefix"));
    }

    #[test]
    fn accepting_base64_makes_room_in_the_packet_for_the_text_of_the_largest_image() {
        let raw = parse("[storage]\nmax_image_bytes = 3000\n").unwrap();
        let text = parse("[storage]\nmax_image_bytes = 3000\naccept_base64 = true\n").unwrap();
        assert_eq!(raw.max_packet_bytes(), 3000 + PACKET_OVERHEAD);
        assert!(
            text.max_packet_bytes() >= 4000 + "data:image/jpeg;base64,".len() + PACKET_OVERHEAD
        );
    }

    #[test]
    fn half_a_client_certificate_is_refused() {
        let err = parse("[broker.tls]\ncert_file = \"/c.pem\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.tls.key_file"));
    }
}
