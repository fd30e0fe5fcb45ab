//! Slow and stuck disks (issue 14, points 5 and 6), on the power-cut filesystem (tests/powercut): with
//! `--delay-ms` every write and fsync is slow, as on an old SD card; stopped with SIGSTOP, it answers nothing,
//! as a disk stuck in the kernel. The watchdog must tell the two apart, and a stop must not hang on either.
//!
//! Needs root, /dev/fuse and the powercut-fs binary (`make test` builds it first); skips with a line otherwise.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::powercut::{usable, Power};
use common::*;

/// What imaged sent to its notify socket, with when.
struct Notices {
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    _scratch: tempfile::TempDir,
    path: String,
}

impl Notices {
    fn listen() -> Notices {
        let scratch = scratch();
        let path = scratch.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        Notices {
            got,
            path: path.to_str().unwrap().to_string(),
            _scratch: scratch,
        }
    }

    /// When the watchdog was pinged, since `since`.
    fn pings_since(&self, since: Instant) -> Vec<Instant> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, text)| *at >= since && text.contains("WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }
}

/// imaged with its storage folder on a powercut-fs mount made with `options`, and a watchdog of `watchdog`.
fn on_powercut_fs(
    broker: &Broker,
    options: &[&str],
    watchdog: Duration,
) -> Option<(Daemon, Power, Notices)> {
    let bin = usable()?;
    let notices = Notices::listen();
    let usec = watchdog.as_micros().to_string();
    let mut daemon = Daemon::prepare(
        broker.port,
        "",
        &[
            ("NOTIFY_SOCKET", notices.path.as_str()),
            ("WATCHDOG_USEC", usec.as_str()),
        ],
    );
    let backing = daemon.dir.join("backing");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&daemon.images).unwrap();
    let power = Power::with(&bin, options, &backing, &daemon.images);
    daemon.spawn();
    daemon.wait_ready();
    Some((daemon, power, notices))
}

#[test]
fn a_large_image_on_a_slow_disk_keeps_the_watchdog_fed_while_its_bytes_move() {
    let broker = Broker::start();
    // 3 s: pings at 1.5 s while nothing has been still for longer than 1.5 s. Each 1 MiB write takes 250 ms,
    // so the 16 MB image takes about 4 s to reach the disk: longer than the limit, moving all the time.
    let Some((daemon, _power, notices)) =
        on_powercut_fs(&broker, &["--delay-ms", "250"], Duration::from_secs(3))
    else {
        return;
    };
    let start = Instant::now();
    assert!(broker.mosquitto_pub("image/upload", &jpeg(1, 16_000_000)));
    daemon.wait_stored(1, Duration::from_secs(60));
    let took = start.elapsed();
    assert!(took > Duration::from_secs(3), "the disk was slow: {took:?}");
    let log = daemon.log();
    assert!(!log.contains("no sign of life"), "{log}");
    // Pings went on all along: never more than the ping interval and a little apart.
    let pings = notices.pings_since(start);
    assert!(pings.len() >= 2, "{} pings in {took:?}", pings.len());
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap < Duration::from_millis(2500),
            "a gap of {gap:?} between pings"
        );
    }
}

#[test]
fn a_stuck_disk_stops_the_watchdog_and_a_stop_still_exits_in_time() {
    let broker = Broker::start();
    let Some((mut daemon, power, notices)) = on_powercut_fs(&broker, &[], Duration::from_secs(2))
    else {
        return;
    };
    power.freeze();
    assert!(broker.mosquitto_pub("image/upload", &jpeg(2, 50_000)));
    wait_until(
        "imaged says the storage has stalled",
        Duration::from_secs(15),
        || daemon.log().contains("no sign of life"),
    );
    let stalled = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        notices
            .pings_since(stalled + Duration::from_millis(200))
            .is_empty(),
        "pings went on while the disk was stuck"
    );
    // systemd's TimeoutStopSec is 30 s: imaged must be done before it sends SIGKILL. All that may remain is
    // what no process can leave: its threads' files on the stuck disk, which the kernel closes (and flushes)
    // once the disk answers. imaged's own threads must not wait for them.
    let pid = daemon.pid();
    signal(pid, libc::SIGTERM);
    wait_until(
        "imaged has stopped and only the kernel holds it",
        Duration::from_secs(30),
        || daemon.log().contains("Stopped") && main_thread_exited(pid),
    );
    power.thaw();
    wait_until(
        "imaged is gone once the disk answers",
        Duration::from_secs(10),
        || daemon.try_wait().is_some(),
    );
    drop(power);
}

/// Whether the process's main thread has exited (a zombie leader waits only for threads in the kernel).
fn main_thread_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}
