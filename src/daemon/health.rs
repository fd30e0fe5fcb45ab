//! What the daemon's parts share about themselves: signs of life for the watchdog, and the counters the
//! systemd status line shows.
//!
//! Health is progress against outstanding work. A part that is waiting (for work, for the broker) is healthy;
//! a part in the middle of something is healthy while it keeps moving (a long write of a large image reports
//! each chunk); a part that started something and has not moved within the limit (a write stuck in the
//! kernel, an event loop that no longer turns) is not. And the pipeline as a whole: uploads waiting with
//! nothing settled or written within the limit is a hang, unless the disk is known to be failing (imaged
//! says so and retries; a restart would not mend a full disk).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

const IDLE: u64 = 0;

/// One part's sign of life: when it last showed it (ms since start), or that it is idle. Set by the part's
/// own thread, read by the watchdog task.
#[derive(Debug, Default)]
pub struct Beat(AtomicU64);

impl Beat {
    /// "I am working, and this is now."
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// "I am waiting for work": healthy however long it lasts.
    pub fn idle(&self) {
        self.0.store(IDLE, Ordering::Relaxed);
    }

    /// How long since the last beat, `None` when idle.
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            IDLE => None,
            at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
        }
    }
}

/// How often a loop that waits on several things must show a sign of life: often enough for a quarter of
/// systemd's watchdog period, and at least twice a second.
pub fn tick_period() -> Duration {
    let watchdog = sd_notify::watchdog_enabled().unwrap_or(Duration::from_secs(4));
    (watchdog / 8).clamp(Duration::from_millis(10), Duration::from_millis(500))
}

/// Counters for the status line: written by the session and the committer, read by the systemd task and
/// the memory trimmer.
#[derive(Debug, Default)]
pub struct Stats {
    /// Set by the session while it has a connection.
    pub connected: AtomicBool,
    /// Images stored, duplicates of stored ones, and payloads rejected (quarantined or refused): the
    /// committer's.
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    /// Republishes the broker confirmed: the session's.
    pub republished: AtomicU64,
    /// Unix time in ms of the last stored image; 0 before the first.
    pub last_image_ms: AtomicU64,
    /// Set while the disk refuses writes.
    pub disk_trouble: AtomicBool,
    /// Uploads handed to the pipeline and not yet settled: the session's.
    pub inflight: AtomicU64,
    /// Set while uploads are held because the free space is below `retention.min_free`.
    pub space_low: AtomicBool,
    /// Images and bytes listed in the catalog since start (the catalog writer's counts).
    pub appended_images: AtomicU64,
    pub appended_bytes: AtomicU64,
    /// What retention last counted as stored, and the committer's appends it counted in by then.
    pub kept_images: AtomicU64,
    pub kept_bytes: AtomicU64,
    pub kept_at_images: AtomicU64,
    pub kept_at_bytes: AtomicU64,
}

impl Stats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// What the catalog writer appended since start, in all.
    pub fn set_appended(&self, images: u64, bytes: u64) {
        self.appended_images.store(images, Ordering::Relaxed);
        self.appended_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Retention counted what is stored, with the committer's appends up to `at_images` and `at_bytes`.
    pub fn set_kept(&self, images: u64, bytes: u64, at_images: u64, at_bytes: u64) {
        self.kept_images.store(images, Ordering::Relaxed);
        self.kept_bytes.store(bytes, Ordering::Relaxed);
        self.kept_at_images.store(at_images, Ordering::Relaxed);
        self.kept_at_bytes.store(at_bytes, Ordering::Relaxed);
    }

    /// The images and bytes stored now: retention's last count and what was appended since.
    pub fn stored_totals(&self) -> (u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            get(&self.kept_images)
                + get(&self.appended_images).saturating_sub(get(&self.kept_at_images)),
            get(&self.kept_bytes)
                + get(&self.appended_bytes).saturating_sub(get(&self.kept_at_bytes)),
        )
    }
}

/// The shared view: every part's beat and the counters.
#[derive(Debug, Default)]
pub struct Health {
    /// Each part registers once at start; the watchdog task reads them all.
    beats: std::sync::Mutex<Vec<(String, Arc<Beat>)>>,
    pub stats: Stats,
    /// When the pipeline last moved an upload forward (a chunk written, a commit, a settle): the writers'
    /// and the committer's, read by the watchdog task.
    pub progress: Beat,
}

impl Health {
    /// A new beat for a part called `name` (named in the log when it stalls).
    pub fn register(&self, name: &str) -> Arc<Beat> {
        let beat = Arc::new(Beat::default());
        beat.beat();
        self.beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), beat.clone()));
        beat
    }

    /// The first part that has not moved within `limit`, if any, or the pipeline when uploads wait and
    /// nothing moved.
    pub fn stalled(&self, limit: Duration) -> Option<(String, Duration)> {
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        let part = beats.iter().find_map(|(name, beat)| {
            beat.age()
                .filter(|age| *age > limit)
                .map(|age| (name.clone(), age))
        });
        part.or_else(|| {
            let waiting = self.stats.inflight.load(Ordering::Relaxed);
            // Uploads held for want of space are as known as a failing disk: imaged says so and waits.
            let trouble = self.stats.disk_trouble.load(Ordering::Relaxed)
                || self.stats.space_low.load(Ordering::Relaxed);
            let since = self.progress.age().unwrap_or_default();
            pipeline_stalled(waiting, trouble, since, limit).then(|| {
                (
                    format!("storage pipeline ({waiting} uploads waiting)"),
                    since,
                )
            })
        })
    }
}

/// Whether the pipeline hangs: uploads are waiting, nothing moved for longer than `limit`, and the disk is
/// not known to be failing.
pub fn pipeline_stalled(
    waiting: u64,
    disk_trouble: bool,
    since_progress: Duration,
    limit: Duration,
) -> bool {
    waiting > 0 && !disk_trouble && since_progress > limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_that_keeps_moving_is_healthy_however_long_its_work_takes() {
        let health = Health::default();
        let writer = health.register("writer");
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(10));
            writer.beat();
            health.progress.beat();
            assert_eq!(health.stalled(Duration::from_millis(25)), None);
        }
    }

    #[test]
    fn waiting_uploads_with_no_progress_are_a_hang_unless_the_disk_is_known_to_fail() {
        let limit = Duration::from_secs(15);
        let long = Duration::from_secs(20);
        assert!(pipeline_stalled(3, false, long, limit));
        assert!(
            !pipeline_stalled(3, true, long, limit),
            "a failing disk is retried, not a hang"
        );
        assert!(
            !pipeline_stalled(0, false, long, limit),
            "no work, nothing to hang on"
        );
        assert!(!pipeline_stalled(3, false, Duration::from_secs(2), limit));
    }

    #[test]
    fn the_stored_totals_are_retentions_count_and_the_appends_after_it() {
        let stats = Stats::default();
        stats.set_appended(3, 300);
        stats.set_kept(10, 1000, 2, 200);
        assert_eq!(stats.stored_totals(), (11, 1100));
    }

    #[test]
    fn an_idle_part_is_never_stalled_and_a_busy_one_is_after_the_limit() {
        let health = Health::default();
        let beat = health.register("writer");
        assert_eq!(health.stalled(Duration::from_secs(1)), None);
        beat.idle();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(health.stalled(Duration::from_millis(10)), None);
        beat.beat();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            health.stalled(Duration::from_millis(10)).map(|(n, _)| n),
            Some("writer".to_string())
        );
    }
}
