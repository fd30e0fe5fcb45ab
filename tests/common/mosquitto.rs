//! A real Mosquitto on a free loopback port (never 1883), with its own config file, persistence folder and
//! log: the one broker launcher of the tests and the benchmarks. Its guard kills it, by PID, on drop.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{mosquitto_pub, scratch};

/// A free port on 127.0.0.1 (bound to port 0, then released for the broker to take).
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port != 1883 {
            return port;
        }
    }
}

/// Makes sure Mosquitto and its clients are installed (the Makefile installs them; this says so clearly).
pub fn require_mosquitto() {
    for tool in ["mosquitto", "mosquitto_pub", "mosquitto_sub"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .unwrap()
            .status
            .success()
            || Path::new("/usr/sbin").join(tool).exists();
        assert!(
            found,
            "{tool} is not installed: run `make test`, which installs it"
        );
    }
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// Broker settings a test may change.
#[derive(Clone)]
pub struct BrokerOptions {
    /// Keep sessions and queued messages across a restart, saved after every change.
    pub persistent: bool,
    pub max_inflight: u32,
    pub max_queued: u32,
    /// Extra lines for mosquitto.conf.
    pub extra: String,
    /// Replaces the plain listener (e.g. a TLS listener); `{port}` is filled in.
    pub listener: Option<String>,
    /// Log only errors and warnings (dropped messages among them): a benchmark does not measure logging.
    pub quiet: bool,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            persistent: false,
            max_inflight: 100,
            max_queued: 1_000_000,
            extra: String::new(),
            listener: None,
            quiet: false,
        }
    }
}

/// A real Mosquitto on a free loopback port, with its own config, persistence folder and log.
pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    options: BrokerOptions,
    child: Option<Child>,
    _scratch: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::with(BrokerOptions::default())
    }

    pub fn persistent() -> Broker {
        Broker::with(BrokerOptions {
            persistent: true,
            ..BrokerOptions::default()
        })
    }

    pub fn with(options: BrokerOptions) -> Broker {
        require_mosquitto();
        let scratch = scratch();
        let mut broker = Broker {
            port: 0,
            dir: scratch.path().to_path_buf(),
            options,
            child: None,
            _scratch: scratch,
        };
        for _ in 0..20 {
            broker.port = free_port();
            if broker.spawn() {
                return broker;
            }
        }
        panic!(
            "mosquitto did not start; see {}",
            broker.dir.join("mosquitto.log").display()
        );
    }

    /// The broker's mosquitto.conf.
    pub fn config(&self) -> String {
        let o = &self.options;
        let listener = match &o.listener {
            Some(l) => l.replace("{port}", &self.port.to_string()),
            None => format!("listener {} 127.0.0.1\nallow_anonymous true\n", self.port),
        };
        let logs = if o.quiet {
            "log_type error\nlog_type warning\n"
        } else {
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n"
        };
        let mut c = format!(
            "{listener}\n\
             log_dest file {dir}/mosquitto.log\n\
             {logs}\
             max_inflight_messages {}\nmax_queued_messages {}\nmax_queued_bytes 0\n\
             set_tcp_nodelay true\n\
             # The test runs as root; keep the broker as root so its own files stay writable.\n\
             user root\n",
            o.max_inflight,
            o.max_queued,
            dir = self.dir.display(),
        );
        if o.persistent {
            c += &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\nautosave_on_changes true\n",
                self.dir.display()
            );
        }
        c += &o.extra;
        c
    }

    /// Starts the process; false when the port was taken or it died at once.
    fn spawn(&mut self) -> bool {
        let conf = self.dir.join("mosquitto.conf");
        fs::write(&conf, self.config()).unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same persistence.
    pub fn restart(&mut self) {
        self.kill9();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mosquitto did not restart on port {}", self.port);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Publishes one payload with mosquitto_pub at QoS 1; true when the broker acknowledged it.
    pub fn mosquitto_pub(&self, topic: &str, payload: &[u8]) -> bool {
        mosquitto_pub(self.port, topic, payload, &[])
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}
