//! A private Mosquitto on a free loopback port (never 1883), with the settings a flood needs.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Unacknowledged QoS 1 deliveries per client (Mosquitto's default is 20). Above imaged's own window
/// (`limits.inflight_images`, 256 by default) so that imaged's window, not the broker's, is what is measured.
pub const MAX_INFLIGHT: u32 = 1000;
/// Messages queued per client beyond those in flight (default 1000, which drops messages for a slow
/// subscriber under a flood). With `max_queued_bytes 0` (no byte limit), nothing is dropped in a run.
pub const MAX_QUEUED: u32 = 1_000_000;

/// The mosquitto.conf the benchmark uses (also shown in docs/BENCHMARKS.md).
pub fn config(port: u16, dir: &Path) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_inflight_messages {MAX_INFLIGHT}\n\
         max_queued_messages {MAX_QUEUED}\n\
         max_queued_bytes 0\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         log_dest file {dir}/mosquitto.log\n\
         log_type error\n\
         log_type warning\n\
         # Started as root, Mosquitto would switch to the user mosquitto, which cannot write this folder.\n\
         user root\n",
        dir = dir.display()
    )
}

pub struct Mosquitto {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

fn binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// A free port on 127.0.0.1: bound to port 0, then released for the broker to take.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if port != 1883 {
            return port;
        }
    }
}

impl Mosquitto {
    /// Starts a broker whose files live in `dir`.
    pub fn start(dir: &Path) -> Result<Mosquitto, String> {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for _ in 0..20 {
            let port = free_port();
            let conf = dir.join("mosquitto.conf");
            fs::write(&conf, config(port, dir)).map_err(|e| e.to_string())?;
            let mut child = Command::new(binary())
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start mosquitto (make bench installs it): {e}"))?;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile, or a bad config: try another port
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Mosquitto {
                        port,
                        dir: dir.to_path_buf(),
                        child,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(format!(
            "mosquitto did not start; see {}",
            dir.join("mosquitto.log").display()
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Warnings and errors the broker logged (dropped messages show up here).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
