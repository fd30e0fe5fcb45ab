//! Fault scenarios: a live imaged under load, one kind of fault injected many times, and the ledger of what
//! came out. `tests/faults.rs` runs each at CI size and asserts a clean ledger; `benches/torture.rs` runs them
//! at scale and prints the table for docs/RELIABILITY.md.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::load::{publish_all, publish_each, Ledger, Mode, Proxy};
use super::powercut::{usable, Power};
use super::*;

pub const UPLOAD: &str = "image/upload";
pub const STORED: &str = "image/stored";

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct Run {
    pub kind: &'static str,
    pub faults: usize,
    pub ledger: Ledger,
}

/// Unique images with sizes spread between `min` and `max` bytes.
pub fn images(seed: u64, n: usize, min: usize, max: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            jpeg(
                seed.wrapping_mul(1_000_003) + i as u64,
                rng.usize(min..=max),
            )
        })
        .collect()
}

fn pause(rng: &mut fastrand::Rng, min_ms: u64, max_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.u64(min_ms..=max_ms)));
}

/// Waits until every acknowledged image is stored and republished (or 90 s), then counts. When something is
/// missing, the daemon's and the broker's logs are kept under /tmp/imaged-evidence-* for a look. Publishes
/// that rumqttc had to hold back for a packet id in use fail the scenario: a second one replaces the first,
/// and the loss may well stay hidden (the ledger found none where rumqttc collided 76 times).
pub fn settle(
    daemon: &Daemon,
    broker: &Broker,
    observer: &Observer,
    images: &[Vec<u8>],
    acked: &[bool],
) -> Ledger {
    let start = Instant::now();
    loop {
        let ledger = Ledger::count(
            images,
            acked,
            &daemon.images,
            &observer.seen(),
            &confirmed_republishes(daemon),
        );
        if ledger.lost.is_empty() || start.elapsed() > Duration::from_secs(90) {
            let collisions = daemon.log_count("a publish got a packet id still in use");
            if !ledger.lost.is_empty() || collisions > 0 {
                let keep = tempfile::Builder::new()
                    .prefix("imaged-evidence-")
                    .tempdir()
                    .unwrap()
                    .keep();
                let _ = std::fs::copy(&daemon.log_path, keep.join("imaged.log"));
                let _ = std::fs::write(keep.join("mosquitto.log"), broker.log());
                let _ = std::fs::write(keep.join("lost.txt"), ledger.lost.join("\n"));
                eprintln!("evidence of the losses kept in {}", keep.display());
            }
            assert_eq!(collisions, 0, "publishes collided on packet ids");
            return ledger;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The images whose republish the broker acknowledged, by imaged's log (`Image re-published … name=N`).
pub fn confirmed_republishes(daemon: &Daemon) -> HashSet<Hash> {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains("Image re-published"))
        .filter_map(|l| l.split("name=").nth(1)?.split_whitespace().next())
        .filter_map(|name| std::fs::read(daemon.images.join(name)).ok())
        .map(|bytes| sha(&bytes))
        .collect()
}

/// Publishes in the background while `inject` runs; returns the acknowledgements. The broker takes the
/// images faster than imaged stores them, so the faults land while imaged works through the backlog.
fn under_load(port: u16, images: &[Vec<u8>], inject: impl FnOnce()) -> Vec<bool> {
    let publisher = {
        let images = images.to_vec();
        std::thread::spawn(move || publish_all(port, UPLOAD, &images, 32, Duration::from_secs(900)))
    };
    inject();
    publisher.join().unwrap()
}

/// The MQTT version imaged speaks in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mqtt {
    V311,
    /// With a broker of Mosquitto's default Receive Maximum (20), which is where rumqttc's packet ids wrap.
    V5,
}

impl Mqtt {
    fn broker(self, persistent: bool) -> Broker {
        let max_inflight = match self {
            Mqtt::V311 => BrokerOptions::default().max_inflight,
            Mqtt::V5 => 20,
        };
        Broker::with(BrokerOptions {
            persistent,
            max_inflight,
            ..BrokerOptions::default()
        })
    }

    /// Config keys for imaged, after `[broker]` keys of a scenario's own. rumqttc's MQTT 5 client keeps
    /// alive no shorter than 5 s.
    fn imaged(self) -> &'static str {
        match self {
            Mqtt::V311 => "",
            Mqtt::V5 => "[broker]\nprotocol = \"5\"\nkeep_alive_secs = 5\n",
        }
    }
}

/// Fault 1: kill -9 of imaged at random moments (in a write, an fsync, a rename, a republish, an ack, or its
/// start-up), restarted each time.
pub fn imaged_kills(seed: u64, n_images: usize, n_faults: usize, mqtt: Mqtt) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = mqtt.broker(false);
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start_with(broker.port, mqtt.imaged(), &[]);
    daemon.wait_ready();
    let imgs = images(seed, n_images, 2_000, 120_000);
    let mut faults = 0;
    let acked = under_load(broker.port, &imgs, || {
        while faults < n_faults {
            pause(&mut rng, 20, 400);
            daemon.kill9();
            faults += 1;
            pause(&mut rng, 0, 50);
            daemon.spawn();
        }
    });
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    Run {
        kind: "kill -9 imaged",
        faults,
        ledger,
    }
}

/// Fault 2: kill -9 of the broker and a restart, at random moments. The broker keeps its state on disk after
/// every change (`autosave_on_changes`); see docs/RELIABILITY.md for the losses that are its own by its rules
/// and how the scenario keeps them out.
pub fn broker_kills(seed: u64, n_images: usize, n_faults: usize, mqtt: Mqtt) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut broker = mqtt.broker(true);
    let observer = Observer::start(broker.port, STORED);
    let mut daemon = Daemon::start_with(broker.port, mqtt.imaged(), &[]);
    daemon.wait_ready();
    // Small images: the broker rewrites its whole database after every change, so its speed falls with the
    // bytes it holds.
    let imgs = images(seed, n_images, 1_000, 8_000);
    let chunk = n_images.div_ceil(n_faults.max(1));
    let mut acked = Vec::new();
    let mut faults = 0;
    for batch in imgs.chunks(chunk) {
        // The batch is acknowledged by the broker and saved before the kill, which then lands while imaged is
        // still storing, acking and republishing it. Mosquitto acknowledges a publish before it saves it (it
        // saves after each change, but a save already running does not hold the newest): a kill right after
        // the last PUBACK can take a message the sender saw acknowledged, which no client can help. So the
        // kill waits for two saves begun after the batch was acknowledged, the first of which holds it.
        acked.extend(publish_all(
            broker.port,
            UPLOAD,
            batch,
            32,
            Duration::from_secs(120),
        ));
        let saves = broker.log().matches("Saving in-memory database").count();
        let start = Instant::now();
        while broker.log().matches("Saving in-memory database").count() < saves + 2
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        pause(&mut rng, 20, 80);
        broker.kill9();
        faults += 1;
        pause(&mut rng, 0, 300);
        broker.restart();
    }
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    Run {
        kind: "kill -9 broker",
        faults,
        ledger,
    }
}

/// Fault 3: a TCP proxy between imaged and the broker that cuts the connection, black-holes it for longer
/// than the keep-alive, or trickles bytes.
/// With MQTT 5 the keep-alive is 5 s, so the black hole outlasts the connect timeout, not the keep-alive.
pub fn network_faults(seed: u64, n_images: usize, n_faults: usize, mqtt: Mqtt) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = mqtt.broker(false);
    let observer = Observer::start(broker.port, STORED);
    let proxy = Proxy::start(broker.port);
    let extra = "[broker]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"imaged-net-{id}\"\nkeep_alive_secs = 2\nconnect_timeout_secs = 2\n"
        .replace("{port}", &proxy.port.to_string())
        .replace("{id}", &seed.to_string())
        + mqtt.imaged();
    let mut daemon = Daemon::start_with(proxy.port, &extra, &[]);
    daemon.wait_ready();
    let imgs = images(seed, n_images, 2_000, 80_000);
    let mut faults = 0;
    let acked = under_load(broker.port, &imgs, || {
        while faults < n_faults {
            pause(&mut rng, 100, 500);
            match faults % 3 {
                0 => proxy.cut(),
                1 => {
                    proxy.set(Mode::BlackHole);
                    pause(&mut rng, 3_500, 4_500);
                    proxy.set(Mode::Pass);
                }
                _ => {
                    proxy.set(Mode::Trickle);
                    pause(&mut rng, 500, 1_500);
                    proxy.set(Mode::Pass);
                }
            }
            faults += 1;
        }
    });
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    Run {
        kind: "network cut/stall/trickle",
        faults,
        ledger,
    }
}

/// Whether this process may mount (the disk scenarios need root, which CI has).
pub fn can_mount() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?} failed");
}

/// A small tmpfs, unmounted on drop.
pub struct Tmpfs {
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_mb: usize) -> Tmpfs {
        let dir = scratch();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Tmpfs { path, _dir: dir }
    }

    pub fn remount(&self, how: &str) {
        run(
            "mount",
            &["-o", &format!("remount,{how}"), self.path.to_str().unwrap()],
        );
    }

    pub fn try_remount(&self, how: &str) -> bool {
        Command::new("mount")
            .args(["-o", &format!("remount,{how}"), self.path.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills a file system until it is full; deleting the returned file frees the space.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    path
}

/// Fault 4: a full disk (storage on a small tmpfs, filled), then freed; and a read-only remount, then
/// read-write again. imaged must hold back acks, say so, and store everything once the disk works.
pub fn disk_faults(seed: u64, n_images: usize, n_faults: usize) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let imgs = images(seed, n_images, 2_000, 100_000);
    // Room for every image and the filler's headroom: the faults are the filler and the remount, not a disk
    // that the images themselves fill up for good.
    let disk = Tmpfs::mount(imgs.iter().map(Vec::len).sum::<usize>() * 2 / 1_000_000 + 32);
    // The index on its own small disk, filled with the images' disk: a file open for writing on the images'
    // disk would make the read-only remount fail with EBUSY.
    let state = Tmpfs::mount(16);
    let extra = format!(
        "[storage]\ndir = \"{}/images\"\nstate_dir = \"{}/state\"\n",
        disk.path.display(),
        state.path.display()
    );
    let mut daemon = Daemon::start_with(broker.port, &extra, &[]);
    daemon.images = disk.path.join("images");
    daemon.wait_ready();
    let mut faults = 0;
    let acked = under_load(broker.port, &imgs, || {
        while faults < n_faults {
            pause(&mut rng, 100, 400);
            if faults % 2 == 0 {
                let fillers = [fill(&disk.path), fill(&state.path)];
                pause(&mut rng, 500, 1_500);
                for filler in fillers {
                    std::fs::remove_file(filler).unwrap();
                }
            } else {
                // EBUSY while a temp file is open for writing: try again between writes.
                let start = Instant::now();
                while !disk.try_remount("ro") {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "the read-only remount keeps failing"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                pause(&mut rng, 500, 1_500);
                disk.remount("rw");
            }
            faults += 1;
        }
    });
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    let log = daemon.log();
    assert!(
        log.contains("Storage is failing"),
        "the disk trouble is logged:\n{log}"
    );
    assert!(
        log.contains("Storage works again"),
        "the recovery is logged:\n{log}"
    );
    // Once per episode, not once per failed write or retry: each failing line has its recovery line.
    let failing = log.matches("Storage is failing").count();
    let recovered = log.matches("Storage works again").count();
    assert!(
        failing == recovered,
        "{failing} 'Storage is failing' lines but {recovered} recoveries:\n{log}"
    );
    Run {
        kind: "full disk / read-only",
        faults,
        ledger,
    }
}

/// What a disk outage with the upload window full did to imaged's connection.
pub struct Outage {
    /// Mosquitto's log lines about imaged's connection ending (a keep-alive timeout among them).
    pub broker_dropped: Vec<String>,
    /// imaged's "Lost the connection" lines.
    pub imaged_lost: Vec<String>,
    pub ledger: Ledger,
}

/// A read-only remount of the images' disk for `outage` while uploads keep coming, with a window of 4 images
/// and a keep-alive of `keep_alive_secs`: the window is full for the whole outage. Then read-write again.
pub fn disk_outage_with_a_full_window(seed: u64, keep_alive_secs: u64, outage: Duration) -> Outage {
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let disk = Tmpfs::mount(16);
    let client_id = format!("imaged-outage-{seed}");
    let extra = format!(
        "[broker]\nclient_id = \"{client_id}\"\nkeep_alive_secs = {keep_alive_secs}\n\
         [storage]\ndir = \"{}/images\"\nstate_dir = \"{{dir}}/state\"\n\
         [limits]\ninflight_images = 4\n",
        disk.path.display()
    );
    let mut daemon = Daemon::start_with(broker.port, &extra, &[]);
    daemon.images = disk.path.join("images");
    daemon.wait_ready();
    disk.remount("ro");
    let imgs = images(seed, 12, 2_000, 20_000);
    let acked = publish_all(broker.port, UPLOAD, &imgs, 32, Duration::from_secs(60));
    wait_until(
        "imaged says the disk fails",
        Duration::from_secs(10),
        || daemon.log().contains("Storage is failing"),
    );
    std::thread::sleep(outage);
    disk.remount("rw");
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    let broker_dropped = broker
        .log()
        .lines()
        .filter(|l| {
            l.contains(&client_id) && (l.contains("timeout") || l.contains("disconnecting"))
        })
        .map(str::to_string)
        .collect();
    let imaged_lost = daemon
        .log()
        .lines()
        .filter(|l| l.contains("Lost the connection"))
        .map(str::to_string)
        .collect();
    Outage {
        broker_dropped,
        imaged_lost,
        ledger,
    }
}

/// Fault 5: SIGSTOP of imaged for longer than the broker's keep-alive, then SIGCONT.
pub fn sigstops(seed: u64, n_images: usize, n_faults: usize) -> Run {
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let extra = format!(
        "[broker]\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"imaged-stop-{seed}\"\nkeep_alive_secs = 1\n",
        broker.port
    );
    let mut daemon = Daemon::start_with(broker.port, &extra, &[]);
    daemon.wait_ready();
    let imgs = images(seed, n_images, 2_000, 80_000);
    let mut faults = 0;
    let acked = under_load(broker.port, &imgs, || {
        while faults < n_faults {
            pause(&mut rng, 100, 500);
            signal(daemon.pid(), libc::SIGSTOP);
            // The broker gives up on a client after 1.5 keep-alives (1.5 s here).
            pause(&mut rng, 2_000, 2_500);
            signal(daemon.pid(), libc::SIGCONT);
            faults += 1;
        }
    });
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);
    Run {
        kind: "SIGSTOP > keep-alive",
        faults,
        ledger,
    }
}

/// A payload that must be refused, and the reason imaged must give.
pub fn hostile_payloads(seed: u64, n: usize, max: usize) -> Vec<(Vec<u8>, &'static str)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| match i % 6 {
            0 => (
                (0..rng.usize(1..3000))
                    .map(|_| rng.u8(..))
                    .collect::<Vec<u8>>(),
                "not a JPEG",
            ),
            1 => {
                let whole = jpeg(seed + i as u64, 5000);
                (
                    whole[..rng.usize(3..4990)].to_vec(),
                    "does not end with FF D9",
                )
            }
            2 => {
                let mut bad = jpeg(seed + i as u64, 5000);
                bad[0] = 0x00;
                (bad, "does not start with FF D8 FF")
            }
            3 => (Vec::new(), "the payload is empty"),
            4 => (
                jpeg(seed + i as u64, max + 1 + rng.usize(0..1000)),
                "is over storage.max_image_bytes",
            ),
            _ => {
                let mut bad = jpeg(seed + i as u64, 4000);
                let last = bad.len() - 1;
                bad[last] = 0xD8;
                (bad, "does not end with FF D9")
            }
        })
        .collect()
}

/// Topic names a hostile client can publish under `image/upload/#`.
pub fn hostile_topics() -> Vec<String> {
    vec![
        "image/upload/../../../etc/passwd".into(),
        "image/upload/..".into(),
        "image/upload/a//b///".into(),
        // Mosquitto refuses control characters in topics (MQTT says they should not be used), so they never
        // reach imaged; these are the odd ones it lets through.
        "image/upload/ spaces and %2e%2e%2f/\u{200d}\u{1f4f7}".into(),
        "image/upload/\u{feff}/\u{202e}gpj.exe".into(),
        format!("image/upload/{}", "x".repeat(60_000)),
        format!("image/upload/{}", "../".repeat(100)),
    ]
}

/// Fault 6: hostile input on the live daemon: random bytes, truncated and corrupted JPEGs, empty payloads,
/// images at and over the size limit, hostile topic names, interleaved with good images.
pub fn hostile_input(seed: u64, n_bad: usize, n_good: usize) -> Run {
    const MAX: usize = 50_000;
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let extra = format!(
        "[topics]\nupload = \"image/upload/#\"\n[storage]\ndir = \"{{dir}}/images\"\nmax_image_bytes = {MAX}\n"
    );
    let mut daemon = Daemon::start_with(broker.port, &extra, &[]);
    daemon.wait_ready();
    let mut good = images(seed, n_good, 1_000, 20_000);
    good.push(jpeg(seed ^ 0xABCD, MAX)); // exactly at the limit: an image
    let bad = hostile_payloads(seed, n_bad, MAX);
    let topics = hostile_topics();
    let mut all = Vec::new();
    let mut all_topics = Vec::new();
    let mut bi = bad.iter();
    for (i, image) in good.iter().enumerate() {
        all.push(image.clone());
        all_topics.push(topics[i % topics.len()].clone());
        for _ in 0..n_bad.div_ceil(good.len()) {
            if let Some((payload, _)) = bi.next() {
                all.push(payload.clone());
                all_topics.push(topics[(i + 3) % topics.len()].clone());
            }
        }
    }
    for (payload, _) in bi {
        all.push(payload.clone());
        all_topics.push(UPLOAD.into());
    }
    let outside_before = std::fs::read_dir(&daemon.dir).unwrap().count();
    let acked = publish_each(broker.port, &all_topics, &all, 32, Duration::from_secs(300));
    assert!(acked.iter().all(|a| *a), "the broker took every message");
    let good_acked = vec![true; good.len()];
    let ledger = settle(&daemon, &broker, &observer, &good, &good_acked);
    wait_until(
        "every bad payload is rejected",
        Duration::from_secs(60),
        || {
            daemon.log_count("rejected from topic") + daemon.log_count("refused from topic")
                >= bad.len()
        },
    );
    let log = daemon.log();
    for (_, reason) in &bad {
        assert!(log.contains(reason), "reason {reason:?} is logged");
    }
    assert!(daemon.try_wait().is_none(), "imaged is still running");
    assert_eq!(
        std::fs::read_dir(&daemon.dir).unwrap().count(),
        outside_before,
        "nothing outside the store"
    );
    for name in daemon.stored().keys() {
        assert!(
            name.starts_with("image_") && name.len() < 40,
            "plain name: {name:?}"
        );
    }
    Run {
        kind: "hostile input",
        faults: bad.len() + topics.len(),
        ledger,
    }
}

/// Resident memory of a process: (current, peak) in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The documented memory bound (README, "Memory") for a config.
pub fn memory_bound(inflight_bytes: u64, max_image: u64) -> u64 {
    2 * inflight_bytes + 10 * max_image + 32 * 1024 * 1024
}

/// Fault 8: a flood of the largest allowed images; the peak RSS stays within the documented bound, and the
/// RSS a few idle seconds after each round of the same load does not keep growing.
pub fn memory_flood(seed: u64, rounds: usize, per_round: usize) -> (Run, u64, u64, Vec<u64>) {
    const MAX: usize = 4 * 1024 * 1024;
    const INFLIGHT: usize = 16 * 1024 * 1024;
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    let extra = format!(
        "[storage]\ndir = \"{{dir}}/images\"\nmax_image_bytes = {MAX}\n[limits]\ninflight_bytes = {INFLIGHT}\n"
    );
    let mut daemon = Daemon::start_with(broker.port, &extra, &[]);
    daemon.wait_ready();
    let mut all = Vec::new();
    let mut acked = Vec::new();
    let mut after_round = Vec::new();
    for round in 0..rounds {
        let imgs: Vec<Vec<u8>> = (0..per_round)
            .map(|i| jpeg(seed + (round * per_round + i) as u64, MAX))
            .collect();
        acked.extend(publish_all(
            broker.port,
            UPLOAD,
            &imgs,
            64,
            Duration::from_secs(300),
        ));
        all.extend(imgs);
        wait_until("the round is stored", Duration::from_secs(120), || {
            daemon.stored_count() >= all.len()
        });
        // A few idle seconds: what the round freed goes back to the system, so what is left is what stays.
        std::thread::sleep(Duration::from_millis(2_500));
        after_round.push(rss(daemon.pid()).0);
    }
    let (_, peak) = rss(daemon.pid());
    let ledger = settle(&daemon, &broker, &observer, &all, &acked);
    let bound = memory_bound(INFLIGHT as u64, MAX as u64);
    (
        Run {
            kind: "memory flood",
            faults: 0,
            ledger,
        },
        peak,
        bound,
        after_round,
    )
}

/// The summary table of several runs.
pub fn table(runs: &[Run]) -> String {
    let row = |kind: &str, run: &Run| {
        let l = &run.ledger;
        let cells = [
            run.faults,
            l.sent,
            l.acked,
            l.stored,
            l.lost.len(),
            l.duplicated,
            l.partial,
        ];
        format!(
            "| {kind} | {} |\n",
            cells.map(|c| c.to_string()).join(" | ")
        )
    };
    let mut by_kind: Vec<Run> = Vec::new();
    let mut all = Run {
        kind: "**all**",
        faults: 0,
        ledger: Ledger::default(),
    };
    for run in runs {
        match by_kind.iter_mut().find(|k| k.kind == run.kind) {
            Some(total) => total.add(run),
            None => by_kind.push(run.clone()),
        }
        all.add(run);
    }
    let mut out = String::from(
        "| fault | injected | images sent | acked | stored | lost | duplicated | partial |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for run in &by_kind {
        out += &row(run.kind, run);
    }
    out += &row(all.kind, &all);
    if all.ledger.lost_by_broker > 0 {
        out += &format!(
            "\n{} republishes the broker confirmed were lost by the broker itself (killed before it saved them).\n",
            all.ledger.lost_by_broker
        );
    }
    out
}

impl Run {
    fn add(&mut self, other: &Run) {
        self.faults += other.faults;
        let (t, l) = (&mut self.ledger, &other.ledger);
        t.sent += l.sent;
        t.acked += l.acked;
        t.stored += l.stored;
        t.lost.extend(l.lost.iter().cloned());
        t.duplicated += l.duplicated;
        t.partial += l.partial;
        t.lost_by_broker += l.lost_by_broker;
    }
}

/// What a run of power cuts found: the ledger under the cuts, the one after a last cut at rest, what each cut
/// kept, and what `.imaged/subscription` held at the end.
pub struct PowerCuts {
    pub run: Run,
    pub at_rest: Ledger,
    pub history: Vec<String>,
    pub subscription: Option<String>,
}

/// Fault 6: imaged on the power-cut filesystem (tests/powercut), killed -9 and the power cut at random moments
/// under a stream of images, `cuts` times, then started again on what survived. `None` where the filesystem
/// cannot be used (it says why).
pub fn power_cuts(seed: u64, cuts: usize) -> Option<PowerCuts> {
    let bin = usable()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = Broker::start();
    let observer = Observer::start(broker.port, STORED);
    // The mount is the storage folder itself (so the state folder, <dir>/.imaged, is on it too), where the
    // harness looks for stored images.
    let mut daemon = Daemon::prepare(broker.port, "", &[]);
    let backing = daemon.dir.join("backing");
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&daemon.images).unwrap();
    let mut power = Power::on(&bin, &backing, &daemon.images);
    daemon.spawn();
    daemon.wait_ready();

    // A batch per cut, published while imaged runs, so the cut lands while it works through the batch (or,
    // after a longer pause, once it is idle again). Batches of very different sizes: a large backlog is what
    // makes imaged hold many acknowledged uploads whose republish is not confirmed yet.
    let sizes: Vec<usize> = (0..cuts).map(|_| rng.usize(20..=400)).collect();
    let imgs = images(seed, sizes.iter().sum(), 1_000, 30_000);
    let mut acked = Vec::new();
    let mut history = Vec::new();
    let mut rest = &imgs[..];
    for (cut, size) in sizes.iter().enumerate() {
        let cut = cut + 1;
        let (batch, later) = rest.split_at(*size);
        rest = later;
        let publisher = {
            let (port, batch) = (broker.port, batch.to_vec());
            std::thread::spawn(move || {
                publish_all(port, UPLOAD, &batch, 32, Duration::from_secs(120))
            })
        };
        std::thread::sleep(Duration::from_millis(rng.u64(20..=400)));
        daemon.kill9();
        let report = power.cut_and_reboot();
        history.push(format!(
            "cut {cut:2}: {}, {} .jpg kept; {}",
            state_folder(&backing),
            jpgs(&backing),
            report.trim_start_matches("powercut-fs: power cut: ")
        ));
        // The broker acknowledges the sender whether imaged runs or not.
        acked.extend(publisher.join().unwrap());
        daemon.spawn();
        daemon.wait_ready_n(cut + 1);
    }
    let ledger = settle(&daemon, &broker, &observer, &imgs, &acked);

    // And once more at rest: what imaged reported stored must survive a cut too.
    daemon.kill9();
    let report = power.cut_and_reboot();
    history.push(format!(
        "final cut: {}, {} .jpg kept; {}",
        state_folder(&backing),
        jpgs(&backing),
        report.trim_start_matches("powercut-fs: power cut: ")
    ));
    let at_rest = Ledger::count(
        &imgs,
        &acked,
        &daemon.images,
        &observer.seen(),
        &confirmed_republishes(&daemon),
    );
    let subscription = fs::read_to_string(backing.join(".imaged/subscription")).ok();
    drop(power);
    Some(PowerCuts {
        run: Run {
            kind: "power cut",
            faults: cuts + 1,
            ledger,
        },
        at_rest,
        history,
        subscription,
    })
}

/// What the state folder held after a cut, for the report.
fn state_folder(backing: &Path) -> String {
    let dir = backing.join(".imaged");
    let Ok(entries) = fs::read_dir(&dir) else {
        return ".imaged MISSING".into();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!("{} ({len} B)", e.file_name().to_string_lossy())
        })
        .collect();
    names.sort();
    if !names.iter().any(|n| n.starts_with("index.log ")) {
        names.push("index.log MISSING".into());
    }
    format!(".imaged: {}", names.join(", "))
}

fn jpgs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jpg"))
                .count()
        })
        .unwrap_or(0)
}
