//! Config values that are more than a number or a string, parsed once when the file is read: what is kept
//! is the typed value, and what was wrong with the text is reported with the key that held it.

use std::fmt;

use serde::Deserialize;

/// How much imaged logs (`log.level`, `--log-level`, `RUST_LOG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LogLevel(pub tracing::Level);

impl LogLevel {
    pub fn parse(s: &str) -> Result<LogLevel, String> {
        let level = match s.trim().to_ascii_lowercase().as_str() {
            "error" => tracing::Level::ERROR,
            "warn" | "warning" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            _ => {
                return Err(format!(
                    "{s:?} is not one of error, warn, info, debug, trace"
                ))
            }
        };
        Ok(LogLevel(level))
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        LogLevel::parse(&s)
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_str().to_ascii_lowercase())
    }
}

/// The permission bits of stored files (`storage.file_mode`), written in octal as a string ("0640") in the
/// file, and applied whatever the umask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl FileMode {
    pub fn parse(s: &str) -> Result<FileMode, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 && !digits.is_empty() => {
                if mode & 0o600 != 0o600 {
                    Err(format!(
                        "{s:?} must let the owner read and write (0600 at least)"
                    ))
                } else {
                    Ok(FileMode(mode))
                }
            }
            _ => Err(format!("{s:?} is not an octal file mode such as \"0640\"")),
        }
    }
}

impl TryFrom<String> for FileMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        FileMode::parse(&s)
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_modes_are_octal_and_keep_the_owner_able_to_write() {
        assert_eq!(FileMode::parse("0640"), Ok(FileMode(0o640)));
        assert_eq!(FileMode::parse("644"), Ok(FileMode(0o644)));
        assert!(FileMode::parse("0400").is_err());
        assert!(FileMode::parse("rw-r-----").is_err());
        assert!(FileMode::parse("01777").is_err());
        assert_eq!(FileMode(0o640).to_string(), "0640");
    }

    #[test]
    fn log_levels_are_read_in_any_case_and_warning_is_warn() {
        assert_eq!(LogLevel::parse("INFO"), Ok(LogLevel(tracing::Level::INFO)));
        assert_eq!(
            LogLevel::parse("warning"),
            Ok(LogLevel(tracing::Level::WARN))
        );
        assert!(LogLevel::parse("loud").is_err());
        assert_eq!(LogLevel(tracing::Level::DEBUG).to_string(), "debug");
    }
}
