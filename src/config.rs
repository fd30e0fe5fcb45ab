//! The TOML configuration: its structure, its defaults (all in this file) and its validation.
//!
//! Every error names the file and the `section.key` it is about, so that `journalctl -u imaged` says what to
//! fix. Semantic checks (a topic filter that matches the stored topic, an unreadable password file) are done
//! here too, so `imaged check-config` and the daemon agree on what is valid.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the daemon and the tools look when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/imaged.toml";

/// MQTT's own limit on a packet's remaining length (the variable header and payload).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Room for the fixed header, topic and packet id next to an image in one PUBLISH packet.
pub const PACKET_OVERHEAD: usize = 64 * 1024 + 16;

/// The name of the systemd credential that may hold the MQTT password (`LoadCredential=mqtt-password:…`).
pub const PASSWORD_CREDENTIAL: &str = "mqtt-password";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file this came from, for errors found later (an unreadable password file, say).
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(default)]
    pub broker: Broker,
    #[serde(default)]
    pub topics: Topics,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: Log,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// `None` until [`Config::load`] derives it from /etc/machine-id.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// `false` turns TLS off while keeping the other keys for later.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// PEM file with the CA certificates to trust; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (PEM); both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when `host` is an IP address or another alias.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    #[serde(default = "default_upload")]
    pub upload: String,
    #[serde(default = "default_stored")]
    pub stored: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// Defaults to `<dir>/.quarantine`.
    pub quarantine_dir: Option<PathBuf>,
    /// The index and outbox; defaults to `<dir>/.imaged`.
    pub state_dir: Option<PathBuf>,
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: usize,
    /// Octal, as a string ("0640"), applied whatever the umask.
    #[serde(default = "default_file_mode")]
    pub file_mode: String,
    #[serde(default = "default_writers")]
    pub writers: usize,
    #[serde(default = "default_dedup_window")]
    pub dedup_window: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_inflight_images")]
    pub inflight_images: usize,
    #[serde(default = "default_inflight_bytes")]
    pub inflight_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default = "default_level")]
    pub level: String,
}

fn yes() -> bool {
    true
}
fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_upload() -> String {
    "image/upload".into()
}
fn default_stored() -> String {
    "image/stored".into()
}
fn default_dir() -> PathBuf {
    "/var/lib/imaged/images".into()
}
fn default_max_image_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_file_mode() -> String {
    "0640".into()
}
fn default_writers() -> usize {
    4
}
fn default_dedup_window() -> usize {
    100_000
}
fn default_inflight_images() -> usize {
    256
}
fn default_inflight_bytes() -> usize {
    128 * 1024 * 1024
}
fn default_level() -> String {
    "info".into()
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            upload: default_upload(),
            stored: default_stored(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            dir: default_dir(),
            quarantine_dir: None,
            state_dir: None,
            max_image_bytes: default_max_image_bytes(),
            file_mode: default_file_mode(),
            writers: default_writers(),
            dedup_window: default_dedup_window(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            inflight_images: default_inflight_images(),
            inflight_bytes: default_inflight_bytes(),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: default_level(),
        }
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            host: default_host(),
            port: default_port(),
            client_id: None,
            username: None,
            password_file: None,
            keep_alive_secs: default_keep_alive(),
            connect_timeout_secs: default_connect_timeout(),
            tls: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            path: PathBuf::new(),
            broker: Broker::default(),
            topics: Topics::default(),
            storage: Storage::default(),
            limits: Limits::default(),
            log: Log::default(),
        }
    }
}

/// A config problem, with the file and (where there is one) the key it is about.
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

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = parse_toml(text, path)?;
        config.validate().map_err(|(key, message)| ConfigError {
            file: path.into(),
            line: line_of_key(text, &key),
            key: Some(key),
            message,
        })?;
        if config.broker.client_id.is_none() {
            config.broker.client_id = Some(default_client_id());
        }
        config.path = path.into();
        Ok(config)
    }

    /// The checks serde cannot do, as (`section.key`, what is wrong).
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: String| Err((key.to_string(), msg));
        let b = &self.broker;
        if b.host.trim().is_empty() {
            return err("broker.host", "must not be empty".into());
        }
        if b.port == 0 {
            return err("broker.port", "must be between 1 and 65535".into());
        }
        if let Some(id) = &b.client_id {
            if id.is_empty() || id.len() > 65535 {
                return err(
                    "broker.client_id",
                    "must be between 1 and 65535 bytes long".into(),
                );
            }
        }
        if b.password_file.is_some() && b.username.is_none() {
            return err(
                "broker.password_file",
                "is set but broker.username is not".into(),
            );
        }
        if b.keep_alive_secs == 0 || b.keep_alive_secs > 65535 {
            return err(
                "broker.keep_alive_secs",
                "must be between 1 and 65535".into(),
            );
        }
        if b.connect_timeout_secs == 0 {
            return err("broker.connect_timeout_secs", "must be at least 1".into());
        }
        if let Some(tls) = &b.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                let key = if tls.cert_file.is_some() {
                    "broker.tls.key_file"
                } else {
                    "broker.tls.cert_file"
                };
                return err(key, "mutual TLS needs both cert_file and key_file".into());
            }
            if let Some(name) = &tls.server_name {
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return err(
                        "broker.tls.server_name",
                        format!("{name:?} is not a valid DNS name or IP address"),
                    );
                }
            }
        }
        if let Err(why) = check_topic_filter(&self.topics.upload) {
            return err(
                "topics.upload",
                format!(
                    "{:?} is not a valid MQTT topic filter: {why}",
                    self.topics.upload
                ),
            );
        }
        if let Err(why) = check_topic_name(&self.topics.stored) {
            return err(
                "topics.stored",
                format!(
                    "{:?} is not a valid MQTT topic name: {why}",
                    self.topics.stored
                ),
            );
        }
        if topic_matches(&self.topics.upload, &self.topics.stored) {
            return err(
                "topics.stored",
                format!(
                    "{:?} matches topics.upload {:?}: imaged would store its own republished images again",
                    self.topics.stored, self.topics.upload
                ),
            );
        }
        let s = &self.storage;
        if s.dir.as_os_str().is_empty() {
            return err("storage.dir", "must not be empty".into());
        }
        if s.max_image_bytes == 0 || s.max_image_bytes > MQTT_MAX_PACKET - PACKET_OVERHEAD {
            return err(
                "storage.max_image_bytes",
                format!(
                    "must be between 1 and {} (MQTT's packet limit)",
                    MQTT_MAX_PACKET - PACKET_OVERHEAD
                ),
            );
        }
        if let Err(why) = parse_mode(&s.file_mode) {
            return err("storage.file_mode", why);
        }
        if s.writers == 0 || s.writers > 64 {
            return err("storage.writers", "must be between 1 and 64".into());
        }
        if s.dedup_window == 0 {
            return err("storage.dedup_window", "must be at least 1".into());
        }
        let l = &self.limits;
        if l.inflight_images == 0 || l.inflight_images > 65535 {
            return err(
                "limits.inflight_images",
                "must be between 1 and 65535".into(),
            );
        }
        if l.inflight_bytes == 0 {
            return err("limits.inflight_bytes", "must be at least 1".into());
        }
        if parse_level(&self.log.level).is_none() {
            return err(
                "log.level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log.level
                ),
            );
        }
        Ok(())
    }

    /// An error about `key` of this config, found after parsing.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let line = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| line_of_key(&text, key));
        ConfigError {
            file: self.path.clone(),
            line,
            key: Some(key.into()),
            message: message.into(),
        }
    }

    pub fn client_id(&self) -> &str {
        self.broker.client_id.as_deref().unwrap_or("imaged")
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

    pub fn file_mode(&self) -> u32 {
        parse_mode(&self.storage.file_mode).unwrap_or(0o640)
    }

    pub fn log_level(&self) -> tracing::Level {
        parse_level(&self.log.level).unwrap_or(tracing::Level::INFO)
    }

    /// The largest packet imaged accepts or sends: one image plus room for its topic and header.
    pub fn max_packet_bytes(&self) -> usize {
        (self.storage.max_image_bytes + PACKET_OVERHEAD).min(MQTT_MAX_PACKET)
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

pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 && !digits.is_empty() => {
            if mode & 0o600 != 0o600 {
                Err(format!(
                    "{s:?} must let the owner read and write (0600 at least)"
                ))
            } else {
                Ok(mode)
            }
        }
        _ => Err(format!("{s:?} is not an octal file mode such as \"0640\"")),
    }
}

fn parse_level(s: &str) -> Option<tracing::Level> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Some(tracing::Level::ERROR),
        "warn" | "warning" => Some(tracing::Level::WARN),
        "info" => Some(tracing::Level::INFO),
        "debug" => Some(tracing::Level::DEBUG),
        "trace" => Some(tracing::Level::TRACE),
        _ => None,
    }
}

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
        let text = include_str!("../config/imaged.toml");
        let config = parse(text).expect("config/imaged.toml must parse");
        assert_eq!(config.topics.upload, "image/upload");
        assert_eq!(config.topics.stored, "image/stored");
        assert_eq!(config.storage.max_image_bytes, 33_554_432);
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
        assert_eq!(config.file_mode(), 0o640);
        assert!(config.client_id().starts_with("imaged"));
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

    #[test]
    fn file_modes_are_octal_and_keep_the_owner_able_to_write() {
        assert_eq!(parse_mode("0640"), Ok(0o640));
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert!(parse_mode("0400").is_err());
        assert!(parse_mode("rw-r-----").is_err());
        assert!(parse_mode("01777").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_config_or_an_error_never_a_panic(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn any_value_for_a_known_key_gives_a_config_or_an_error_naming_it(
            section in "(broker|topics|storage|limits|log)", key in "[a-z_]{1,20}", value in "(\"[^\"\\\\]{0,20}\"|-?[0-9]{1,12}|true|false|\\[\\])",
        ) {
            if let Err(e) = parse(&format!("[{section}]\n{key} = {value}\n")) {
                proptest::prop_assert!(e.key.is_some() || e.line.is_some(), "{}", e);
            }
        }
    }

    #[test]
    fn half_a_client_certificate_is_refused() {
        let err = parse("[broker.tls]\ncert_file = \"/c.pem\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("broker.tls.key_file"));
    }
}
