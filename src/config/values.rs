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

/// `broker.protocol`: the MQTT version imaged speaks, `"3.1.1"` or `"5"` (a bare `5` is taken too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ProtocolText")]
pub enum Protocol {
    V311,
    V5,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ProtocolText {
    Text(String),
    Number(i64),
}

impl TryFrom<ProtocolText> for Protocol {
    type Error = String;
    fn try_from(v: ProtocolText) -> Result<Self, String> {
        match v {
            ProtocolText::Text(t) if t.trim() == "3.1.1" => Ok(Protocol::V311),
            ProtocolText::Text(t) if t.trim() == "5" => Ok(Protocol::V5),
            ProtocolText::Number(5) => Ok(Protocol::V5),
            ProtocolText::Text(t) => Err(format!("{t:?} is not \"3.1.1\" or \"5\"")),
            ProtocolText::Number(n) => Err(format!("{n} is not \"3.1.1\" or \"5\"")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
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

/// A number of bytes, written as a string with a unit: `KB MB GB TB` (powers of 1000), `KiB MiB GiB TiB`
/// (powers of 1024), `B` or none for bytes; `"0"` means no limit where a limit is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit_bytes: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "MB" => 1000_u64.pow(2),
            "GB" => 1000_u64.pow(3),
            "TB" => 1000_u64.pow(4),
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => {
                return Err(format!(
                    "{s:?} is not a size such as \"500MB\", \"2GiB\" or \"0\""
                ))
            }
        };
        let bytes = scale(number, unit_bytes)
            .ok_or_else(|| format!("{s:?} is not a size such as \"500MB\", \"2GiB\" or \"0\""))?;
        Ok(Size(bytes))
    }
}

/// `number` (digits with an optional fraction) times `unit`, in whole units of one, or `None`.
fn scale(number: &str, unit: u64) -> Option<u64> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 9 {
        return None;
    }
    let mut total = whole.parse::<u64>().ok()?.checked_mul(unit)?;
    if !fraction.is_empty() {
        let digits: u64 = fraction.parse().ok()?;
        let per = 10_u64.pow(u32::try_from(fraction.len()).ok()?);
        total = total.checked_add(
            u64::try_from(u128::from(digits) * u128::from(unit) / u128::from(per)).ok()?,
        )?;
    }
    Some(total)
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Size::parse(&s)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1_000_000_000_000, "TB"),
            (1_000_000_000, "GB"),
            (1_000_000, "MB"),
            (1000, "KB"),
        ];
        for (unit, name) in UNITS {
            if self.0 >= unit {
                let tenths = self.0 / (unit / 10);
                return if tenths % 10 == 0 {
                    write!(f, "{} {name}", tenths / 10)
                } else {
                    write!(f, "{}.{} {name}", tenths / 10, tenths % 10)
                };
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// A length of time, written as a string: a number and `s`, `m`, `h` or `d`; `"0"` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Span(pub std::time::Duration);

impl Span {
    pub fn parse(s: &str) -> Result<Span, String> {
        let t = s.trim();
        let bad = || {
            format!("{s:?} is not a duration such as \"30d\", \"12h\", \"90m\", \"45s\" or \"0\"")
        };
        if t == "0" {
            return Ok(Span(std::time::Duration::ZERO));
        }
        let (number, unit) = t.split_at(t.len().saturating_sub(1));
        let secs: u64 = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.trim().parse().map_err(|_| bad())?;
        n.checked_mul(secs)
            .map(|total| Span(std::time::Duration::from_secs(total)))
            .ok_or_else(bad)
    }

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl TryFrom<String> for Span {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Span::parse(&s)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        for (unit, name) in [(86_400, "d"), (3600, "h"), (60, "m")] {
            if secs >= unit && secs % unit == 0 {
                return write!(f, "{}{name}", secs / unit);
            }
        }
        write!(f, "{secs}s")
    }
}

/// Free space to keep on a filesystem: a share of its size (`"5%"`) or a size (`"2GB"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub enum FreeSpace {
    /// Percent of the filesystem's size, 0 to 100.
    Percent(f64),
    Bytes(Size),
}

impl FreeSpace {
    pub fn parse(s: &str) -> Result<FreeSpace, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(FreeSpace::Percent(p)),
                _ => Err(format!("{s:?} is not a share between \"0%\" and \"100%\"")),
            },
            None => Size::parse(s).map(FreeSpace::Bytes),
        }
    }

    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes_of(&self, total: u64) -> u64 {
        match *self {
            #[expect(
                clippy::cast_possible_truncation,
                reason = "a share of a u64 fits a u64; a float to integer `as` saturates"
            )]
            FreeSpace::Percent(p) => (total as f64 * p / 100.0) as u64,
            FreeSpace::Bytes(Size(b)) => b,
        }
    }
}

impl TryFrom<String> for FreeSpace {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        FreeSpace::parse(&s)
    }
}

impl fmt::Display for FreeSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FreeSpace::Percent(p) => write!(f, "{p}%"),
            FreeSpace::Bytes(b) => write!(f, "{b}"),
        }
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

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(Size::parse("0"), Ok(Size(0)));
        assert_eq!(Size::parse("100MB"), Ok(Size(100_000_000)));
        assert_eq!(Size::parse("2 GiB"), Ok(Size(2 << 30)));
        assert_eq!(Size::parse("1.5KB"), Ok(Size(1500)));
        assert_eq!(Size::parse("512"), Ok(Size(512)));
        assert_eq!(Size::parse("3TB"), Ok(Size(3_000_000_000_000)));
        for bad in ["", "MB", "5XB", "-1GB", "1.2.3MB", "99999999999999TB"] {
            assert!(Size::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Size(50_000_000_000).to_string(), "50 GB");
        assert_eq!(Size(1_500_000).to_string(), "1.5 MB");
    }

    #[test]
    fn durations_take_seconds_minutes_hours_and_days() {
        use std::time::Duration;
        assert_eq!(Span::parse("0"), Ok(Span(Duration::ZERO)));
        assert_eq!(
            Span::parse("30d"),
            Ok(Span(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(Span::parse("12h"), Ok(Span(Duration::from_secs(43_200))));
        assert_eq!(Span::parse("90m"), Ok(Span(Duration::from_secs(5400))));
        assert_eq!(Span::parse("45s"), Ok(Span(Duration::from_secs(45))));
        for bad in ["", "d", "5", "5w", "-1d", "1.5h"] {
            assert!(Span::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Span(Duration::from_secs(7 * 86_400)).to_string(), "7d");
    }

    #[test]
    fn free_space_is_a_share_or_a_size() {
        assert_eq!(FreeSpace::parse("5%"), Ok(FreeSpace::Percent(5.0)));
        assert_eq!(
            FreeSpace::parse("2GB"),
            Ok(FreeSpace::Bytes(Size(2_000_000_000)))
        );
        assert!(FreeSpace::parse("150%").is_err());
        assert_eq!(FreeSpace::Percent(5.0).bytes_of(1000), 50);
    }
}
