//! The real imaged (target/release/imaged) with its own config, storage folder, log and notify socket.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imaged::config::Config;

use crate::common::ImagedConfig;

use crate::payload::{Bad, Gen};

/// The config the benchmark runs imaged with: its defaults (the shipped config/imaged.toml), a private broker
/// and folder, `log.level` (the default `info` writes two lines per image, `warn` none), and any
/// `--imaged-set section.key=value` given.
pub fn config_text(
    port: u16,
    dir: &Path,
    level: &str,
    sets: &[(String, String, String)],
) -> String {
    let client_id = format!("imaged-bench-{:016x}", fastrand::u64(..));
    let mut config = ImagedConfig::new(port, dir, &client_id);
    config.set("log", "level", &format!("\"{level}\""));
    for (section, key, value) in sets {
        config.set(section, key, value);
    }
    config.text()
}

pub struct Imaged {
    child: Option<Child>,
    pub images: PathBuf,
    pub log_path: PathBuf,
    drain_stop: Arc<AtomicBool>,
    drain: Option<JoinHandle<()>>,
}

impl Imaged {
    /// Starts imaged and waits for its READY=1 (sent once its subscription is acknowledged).
    pub fn start(
        bin: &Path,
        dir: &Path,
        port: u16,
        level: &str,
        sets: &[(String, String, String)],
    ) -> Result<Imaged, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let config_path = dir.join("imaged.toml");
        fs::write(&config_path, config_text(port, dir, level, sets)).map_err(|e| e.to_string())?;
        let config = Config::load(&config_path).map_err(|e| format!("bench config: {e}"))?;
        let notify_path = dir.join("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).map_err(|e| e.to_string())?;
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let log_path = dir.join("imaged.log");
        let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (make bench builds it)", bin.display()))?;
        let mut imaged = Imaged {
            child: Some(child),
            images: config.storage.dir.clone(),
            log_path,
            drain_stop: Arc::new(AtomicBool::new(false)),
            drain: None,
        };
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(status) = imaged
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "imaged exited ({status}) before READY; log:\n{}",
                    imaged.log()
                ));
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "imaged not READY after 30s; log:\n{}",
                    imaged.log()
                ));
            }
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    break;
                }
            }
        }
        // Keep reading the STATUS lines it sends every second: a full socket would block its sender.
        let stop = imaged.drain_stop.clone();
        imaged.drain = Some(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let _ = notify.recv(&mut buf);
            }
        }));
        Ok(imaged)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log lines at warn or above (the second word of a line is its level).
    pub fn warnings(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
            .count()
    }

    /// SIGTERM, and the exit status (SIGKILL after 30 s).
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        let result = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break if status.success() {
                    Ok(())
                } else {
                    Err(format!("imaged exited with {status}"))
                };
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break Err("imaged did not stop within 30s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.drain_stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.drain.take() {
            let _ = t.join();
        }
        result
    }
}

impl Drop for Imaged {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.drain_stop.store(true, Ordering::SeqCst);
    }
}

/// What the storage folder holds, compared with what was sent.
#[derive(Debug, Default, Clone)]
pub struct FileCheck {
    pub files: u64,
    /// Images sent and found exactly once, byte for byte.
    pub matched: u64,
    pub missing: u64,
    pub corrupt: u64,
    /// A sent image stored more than once.
    pub duplicates: u64,
    /// Files that are none of ours (the readiness probes of other subjects would be; imaged gets none).
    pub foreign: u64,
}

impl FileCheck {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.corrupt == 0
    }
}

/// Reads every `*.jpg` in `dir` and checks it against images `0..sent` of `gen`.
pub fn check_files(dir: &Path, gen: &Gen, sent: u64) -> FileCheck {
    let mut seen = vec![0u32; usize::try_from(sent).expect("a count of images in memory")];
    let mut c = FileCheck::default();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().ends_with(".jpg") {
                continue;
            }
            c.files += 1;
            let Ok(bytes) = fs::read(e.path()) else {
                c.corrupt += 1;
                continue;
            };
            match gen.check(&bytes) {
                Ok(seq) if seq < sent => seen[usize::try_from(seq).expect("below sent")] += 1,
                Ok(_) | Err(Bad::Corrupt(_)) => c.corrupt += 1,
                Err(Bad::Foreign) => c.foreign += 1,
            }
        }
    }
    for n in seen {
        match n {
            0 => c.missing += 1,
            1 => c.matched += 1,
            _ => {
                c.matched += 1;
                c.duplicates += u64::from(n - 1);
            }
        }
    }
    c
}

/// README, "Memory": `RSS <= 2 x limits.inflight_bytes + 10 x storage.max_image_bytes + 32 MiB`, from the
/// config the bench runs imaged with; and the same formula with `image` in place of the largest image allowed
/// (what a flood of `image`-byte images can reach).
pub fn memory_bound(config: &Config, image: usize) -> (u64, u64) {
    let ib = config.limits.inflight_bytes as u64;
    let max = config.storage.max_image_bytes as u64;
    let constant = 32u64 << 20;
    (
        2 * ib + 10 * max + constant,
        2 * ib + 10 * image as u64 + constant,
    )
}
