//! Test helpers: real Mosquitto brokers on free loopback ports, the real `imaged` binary, and an observer on
//! the stored topic. Every process a test starts is killed by its guard when the test ends, by PID.

#![allow(dead_code)]

pub mod config;
pub mod load;
pub mod mosquitto;
pub mod powercut;
pub mod scenarios;
pub mod store;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

// Each test binary uses its own part of the harness.
#[allow(unused_imports)]
pub use config::ImagedConfig;
#[allow(unused_imports)]
pub use mosquitto::{free_port, require_mosquitto, Broker, BrokerOptions};

pub type Hash = [u8; 32];

pub fn sha(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// A JPEG-shaped payload (FF D8 FF … FF D9) of `size` bytes whose content is unique to `seed`.
pub fn jpeg(seed: u64, size: usize) -> Vec<u8> {
    assert!(size >= 16);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    bytes.extend_from_slice(&seed.to_be_bytes());
    bytes.extend((0..size - 14).map(|_| rng.u8(..)));
    bytes.extend_from_slice(&[0xFF, 0xD9]);
    bytes
}

pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch folder readable by the broker's user (mkdtemp's 0700 is not).
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("imaged-test-")
        .tempdir()
        .unwrap();
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

pub fn signal(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Publishes every image with mosquitto_pub in a thread, retrying each until the broker acknowledges it (for
/// tests where the broker or imaged goes away mid-stream).
pub fn send_in_background(
    port: u16,
    topic: &str,
    images: &[Vec<u8>],
) -> std::thread::JoinHandle<()> {
    let (images, topic) = (images.to_vec(), topic.to_string());
    std::thread::spawn(move || {
        for image in &images {
            while !mosquitto_pub(port, &topic, image, &[]) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
}

/// Asserts that each image is stored in exactly one file of `dir`, and nothing else is.
pub fn assert_each_stored_once(dir: &Path, images: &[Vec<u8>]) {
    let stored = hashes_in(dir);
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            stored.get(&sha(image)),
            Some(&1),
            "image {i} must be stored exactly once"
        );
    }
    assert_eq!(
        stored.len(),
        images.len(),
        "nothing but the images sent is stored"
    );
}

/// mosquitto_pub exits 0 only after the PUBACK of a QoS 1 message: an independent witness of "acknowledged".
pub fn mosquitto_pub(port: u16, topic: &str, payload: &[u8], extra: &[&str]) -> bool {
    // `-n` for an empty payload: `-s` refuses empty input.
    let source = if payload.is_empty() { "-n" } else { "-s" };
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            source,
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub runs");
    let ok = child.stdin.take().unwrap().write_all(payload).is_ok();
    ok && child.wait().map(|s| s.success()).unwrap_or(false)
}

pub fn imaged_bin() -> &'static str {
    env!("CARGO_BIN_EXE_imaged")
}

/// The real imaged daemon with its own config, storage folder and log file.
pub struct Daemon {
    pub dir: PathBuf,
    pub images: PathBuf,
    pub config: PathBuf,
    pub log_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    _scratch: tempfile::TempDir,
}

impl Daemon {
    /// Config for `port`, with the keys of `extra` (TOML) set over the defaults. `{dir}` in `extra` stands
    /// for the daemon's scratch folder (images in `{dir}/images` stay where [`Daemon::stored`] looks).
    pub fn config_text(port: u16, dir: &Path, client_id: &str, extra: &str) -> String {
        let mut config = ImagedConfig::new(port, dir, client_id);
        config.set("broker", "keep_alive_secs", "5");
        // IMAGED_TEST_LOG=debug: a more talkative daemon, for a look at a failing scenario.
        if let Ok(level) = std::env::var("IMAGED_TEST_LOG") {
            config.set("log", "level", &format!("\"{level}\""));
        }
        config
            .merge(&extra.replace("{dir}", &dir.display().to_string()))
            .text()
    }

    pub fn start(broker: &Broker) -> Daemon {
        Daemon::start_with(broker.port, "", &[])
    }

    pub fn start_with(port: u16, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::prepare(port, extra, env);
        daemon.spawn();
        daemon
    }

    pub fn spawn(&mut self) {
        self.launch(None);
    }

    /// Starts imaged through `sh -c 'umask NNN; exec imaged --config …'`, as a service manager with that
    /// umask would. The guard's PID is imaged's own (exec).
    pub fn spawn_with_umask(&mut self, umask: u32) {
        self.launch(Some(umask));
    }

    fn launch(&mut self, umask: Option<u32>) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = match umask {
            None => Command::new(imaged_bin()),
            Some(umask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
                    .arg(imaged_bin());
                sh
            }
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start imaged");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sets an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Replaces `key = …` lines of the config file (and adds the keys of `extra` that are not there), for
    /// the next start.
    pub fn reconfigure(&self, extra: &str) {
        let mut config = ImagedConfig::default();
        config.merge(&fs::read_to_string(&self.config).unwrap());
        config.merge(&extra.replace("{dir}", &self.dir.display().to_string()));
        fs::write(&self.config, config.text()).unwrap();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits for the n-th "Ready:" line of this daemon's log (one per start).
    pub fn wait_ready_n(&mut self, n: usize) {
        let start = Instant::now();
        while self.log_count("Ready:") < n {
            if let Some(status) = self.try_wait() {
                panic!(
                    "imaged exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "imaged not ready after 30s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_ready(&mut self) {
        self.wait_ready_n(1);
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                panic!(
                    "imaged did not exit within 40s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Finished images in the storage folder: name → content.
    pub fn stored(&self) -> HashMap<String, Vec<u8>> {
        stored_in(&self.images)
    }

    pub fn stored_count(&self) -> usize {
        jpg_files(&self.images).len()
    }

    pub fn wait_stored(&self, n: usize, timeout: Duration) {
        wait_until(&format!("{n} images are stored"), timeout, || {
            self.stored_count() >= n
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- imaged log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// The `.jpg` files of a folder, name → content.
pub fn stored_in(dir: &Path) -> HashMap<String, Vec<u8>> {
    jpg_files(dir)
        .into_iter()
        .map(|path| {
            let name = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            (name, fs::read(&path).unwrap())
        })
        .collect()
}

/// The `.jpg` files under `dir`, in its camera and date folders too; hidden entries (imaged's state, the
/// quarantine, files being written) are skipped, as a viewer would.
pub fn jpg_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().to_string();
            let path = entry.path();
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                folders.push(path);
            } else if name.ends_with(".jpg") {
                out.push(path);
            }
        }
    }
    out
}

/// Content hashes of a folder's images, with how many files hold each.
pub fn hashes_in(dir: &Path) -> HashMap<Hash, usize> {
    let mut out = HashMap::new();
    for bytes in stored_in(dir).values() {
        *out.entry(sha(bytes)).or_insert(0) += 1;
    }
    out
}

/// A subscriber with a persistent session on a topic, counting what arrives by content hash. Started before
/// the daemon, it sees every republish even across its own reconnects.
pub struct Observer {
    seen: Arc<Mutex<HashMap<Hash, usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    pub fn start(port: u16, topic: &str) -> Observer {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let subscribed = Arc::new(AtomicBool::new(false));
        let (s, st, sub, topic) = (
            seen.clone(),
            stop.clone(),
            subscribed.clone(),
            topic.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Aborted only at the end: rumqttc's poll() must not be cancelled while in use.
                let task = tokio::spawn(observe(port, topic, s, sub));
                while !st.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                task.abort();
            });
        });
        wait_until(
            "the observer is subscribed",
            Duration::from_secs(10),
            || subscribed.load(Ordering::SeqCst),
        );
        Observer {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> HashMap<Hash, usize> {
        self.seen.lock().unwrap().clone()
    }

    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn wait_for(&self, n: usize, timeout: Duration) {
        wait_until(
            &format!("{n} distinct images are republished"),
            timeout,
            || self.distinct() >= n,
        );
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn observe(
    port: u16,
    topic: String,
    seen: Arc<Mutex<HashMap<Hash, usize>>>,
    subscribed: Arc<AtomicBool>,
) {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let mut options =
        MqttOptions::new(format!("observer-{}", fastrand::u64(..)), "127.0.0.1", port);
    options.set_clean_session(false);
    options.set_max_packet_size(64 << 20, 64 << 20);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => subscribed.store(true, Ordering::SeqCst),
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                *seen.lock().unwrap().entry(sha(&p.payload)).or_insert(0) += 1;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// Helpers for tests/tls.rs (issue 6): a daemon that starts under a given umask.
impl Daemon {
    /// Like [`Daemon::start_with`], but the process is not started yet: start it with [`Daemon::spawn`] or
    /// [`Daemon::spawn_with_umask`].
    pub fn prepare(port: u16, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let scratch = scratch();
        let dir = scratch.path().to_path_buf();
        let client_id = format!("imaged-test-{}", fastrand::u64(..));
        let config = dir.join("imaged.toml");
        fs::write(&config, Daemon::config_text(port, &dir, &client_id, extra)).unwrap();
        Daemon {
            images: dir.join("images"),
            log_path: dir.join("imaged.log"),
            dir,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            _scratch: scratch,
        }
    }
}
