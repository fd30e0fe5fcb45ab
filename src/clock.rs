//! The time an image is stamped with when it arrives, and that retention judges its age by.
//!
//! It is the system clock, unless the environment variable `IMAGED_TEST_CLOCK_OFFSET_SECS` holds a number of
//! seconds (negative allowed): then it is that far off. It exists for tests only, so that they can move time
//! forward by days between two runs of the real binary instead of waiting; nothing else should set it, and the
//! daemon warns at start-up when it is set.

use std::sync::OnceLock;

use chrono::{DateTime, Duration, Utc};

pub const OFFSET_ENV: &str = "IMAGED_TEST_CLOCK_OFFSET_SECS";

/// The offset in seconds, read once.
pub fn offset_secs() -> i64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    *OFFSET.get_or_init(|| parse_offset(std::env::var(OFFSET_ENV).ok().as_deref()))
}

fn parse_offset(value: Option<&str>) -> i64 {
    value.and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

pub fn now() -> DateTime<Utc> {
    Utc::now() + Duration::seconds(offset_secs())
}

/// [`now`] in ms since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    u64::try_from(now().timestamp_millis()).unwrap_or(0)
}

/// A time in ms since the Unix epoch, for log lines: `2026-12-01 08:15:00 UTC`.
pub fn format_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms"),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_number_of_seconds_moves_the_clock() {
        assert_eq!(parse_offset(None), 0);
        assert_eq!(parse_offset(Some("86400")), 86_400);
        assert_eq!(parse_offset(Some(" -60 ")), -60);
        assert_eq!(parse_offset(Some("1d")), 0);
    }

    #[test]
    fn times_are_written_in_utc() {
        assert_eq!(format_ms(1_796_112_900_000), "2026-12-01 08:15:00 UTC");
    }
}
