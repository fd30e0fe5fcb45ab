//! Secure remote access (issue 6) against real Mosquitto brokers: TLS, mutual TLS, passwords and the ACL of
//! the shipped example (packaging/examples), set up with the commands of README's "Remote cameras" section;
//! every failure a user can run into, with the words imaged logs for it; file modes under any umask; hostile
//! topic names.
//!
//! Certificates are made with the openssl CLI, exactly as the README says (its blocks marked `tested` are run
//! from the README itself); the few broken certificates the README does not make are made here, next to them.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The name in the README's commands and config, replaced by `localhost` where the tests connect.
const README_BROKER: &str = "broker.example.org";

// ---------------------------------------------------------------------------------------------------------
// The README and the shipped examples
// ---------------------------------------------------------------------------------------------------------

/// The body of the block marked `<!-- tested: NAME … -->` in README's "Remote cameras" section.
fn readme_block(name: &str) -> String {
    let readme = fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = &readme[readme
        .find("\n## Remote cameras")
        .expect("README.md has a \"Remote cameras\" section")..];
    let marker = format!("<!-- tested: {name} ");
    let after = &section[section
        .find(&marker)
        .unwrap_or_else(|| panic!("README's Remote cameras section marks a block {marker}"))..];
    let fence = after
        .find("\n```")
        .expect("a code block follows the marker");
    let body = &after[fence + 1..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let end = body.find("\n```").expect("the code block ends");
    format!("{}\n", &body[..end])
}

/// Whether README's "Remote cameras" section documents `message` (with its own host and port).
fn assert_documented(message: &str) {
    let readme = fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = &readme[readme.find("\n## Remote cameras").unwrap()..];
    assert!(
        section.contains(message),
        "README's \"Remote cameras\" section does not show the message {message:?}"
    );
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in:\n{text}");
    text.replacen(from, to, 1)
}

/// Runs a shell script in `dir`; panics with its output when it fails.
fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "this script failed in {}:\n{script}\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy(from: &Path, to: &Path, mode: u32) {
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(mode)).unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// Certificates and passwords
// ---------------------------------------------------------------------------------------------------------

/// A folder where README's certificate and password blocks ran, plus imaged's files installed like README's
/// step 4 (`etc-imaged/` stands for `/etc/imaged/`).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = scratch();
        sh(dir.path(), &readme_block("certificates"));
        sh(dir.path(), &readme_block("passwords"));
        let pki = Pki { dir };
        let etc = pki.etc_imaged();
        fs::create_dir(&etc).unwrap();
        copy(&pki.path("ca.pem"), &etc.join("ca.pem"), 0o644);
        copy(&pki.path("imaged.pem"), &etc.join("imaged.pem"), 0o644);
        copy(&pki.path("imaged.key"), &etc.join("imaged.key"), 0o640);
        copy(
            &pki.path("imaged.password"),
            &etc.join("mqtt-password"),
            0o640,
        );
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn etc_imaged(&self) -> PathBuf {
        self.path("etc-imaged")
    }

    fn password(&self, user: &str) -> String {
        fs::read_to_string(self.path(&format!("{user}.password")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// mosquitto_pub's options for a client of the README setup, connecting to `localhost`.
    fn client_args(&self, user: &str) -> Vec<String> {
        vec![
            "-h".into(),
            "localhost".into(),
            "--cafile".into(),
            self.path("ca.pem").display().to_string(),
            "--cert".into(),
            self.path(&format!("{user}.pem")).display().to_string(),
            "--key".into(),
            self.path(&format!("{user}.key")).display().to_string(),
            "-u".into(),
            user.into(),
            "-P".into(),
            self.password(user),
        ]
    }

    /// Another CA, which signed nothing of this setup.
    fn other_ca(&self) -> PathBuf {
        if !self.path("other-ca.pem").exists() {
            sh(
                self.dir.path(),
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 \
                 -subj '/CN=some other CA' -keyout other-ca.key -out other-ca.pem 2>/dev/null",
            );
        }
        self.path("other-ca.pem")
    }

    /// The broker's key signed the way README warns against: `openssl x509 -req` without `-extfile` makes an
    /// X.509 version 1 certificate.
    fn server_v1(&self) -> PathBuf {
        sh(
            self.dir.path(),
            "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -sha256 \
             -out server-v1.pem 2>/dev/null",
        );
        self.path("server-v1.pem")
    }

    /// imaged's key in an X.509 version 1 certificate.
    fn imaged_v1(&self) -> PathBuf {
        sh(
            self.dir.path(),
            "openssl x509 -req -in imaged.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 -sha256 \
             -out imaged-v1.pem 2>/dev/null",
        );
        self.path("imaged-v1.pem")
    }

    /// imaged's key, certified by a CA the broker does not trust.
    fn imaged_from_other_ca(&self) -> PathBuf {
        self.other_ca();
        sh(
            self.dir.path(),
            "openssl x509 -req -in imaged.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -days 825 \
             -sha256 -extfile client.ext -out imaged-other-ca.pem 2>/dev/null",
        );
        self.path("imaged-other-ca.pem")
    }

    /// The broker's certificate as README makes it, but valid only during 2020 (`openssl ca` can date it).
    fn server_expired(&self) -> PathBuf {
        sh(
            self.dir.path(),
            "mkdir -p expired && touch expired/index.txt && echo 01 > expired/serial
             cat > expired/ca.cnf <<'EOF'
[ca]
default_ca = expired
[expired]
database = expired/index.txt
new_certs_dir = expired
serial = expired/serial
default_md = sha256
policy = any
x509_extensions = server
[any]
commonName = supplied
[server]
subjectAltName = DNS:broker.example.org, DNS:localhost
extendedKeyUsage = serverAuth
EOF
             openssl ca -config expired/ca.cnf -batch -notext -cert ca.pem -keyfile ca.key -in server.csr \
               -out server-expired.pem -startdate 20200101000000Z -enddate 20210101000000Z 2>/dev/null",
        );
        self.path("server-expired.pem")
    }
}

// ---------------------------------------------------------------------------------------------------------
// Brokers
// ---------------------------------------------------------------------------------------------------------

/// Mosquitto running packaging/examples/mosquitto-remote-cameras.conf and mosquitto-acl as shipped, with only
/// `/etc/mosquitto/` and the port replaced; its own folder stands for /etc/mosquitto.
struct RemoteBroker {
    broker: Broker,
    _etc: tempfile::TempDir,
}

impl RemoteBroker {
    fn start(pki: &Pki) -> RemoteBroker {
        RemoteBroker::with_certificate(pki, &pki.path("server.pem"))
    }

    /// With `server_pem` as the broker's certificate.
    fn with_certificate(pki: &Pki, server_pem: &Path) -> RemoteBroker {
        let etc = scratch();
        let e = etc.path();
        fs::create_dir(e.join("certs")).unwrap();
        // README step 3.
        copy(&pki.path("ca.pem"), &e.join("certs/ca.pem"), 0o644);
        copy(server_pem, &e.join("certs/server.pem"), 0o644);
        copy(&pki.path("server.key"), &e.join("certs/server.key"), 0o640);
        copy(&pki.path("passwd"), &e.join("passwd"), 0o640);
        copy(
            &Path::new(ROOT).join("packaging/examples/mosquitto-acl"),
            &e.join("acl"),
            0o644,
        );
        let shipped = fs::read_to_string(
            Path::new(ROOT).join("packaging/examples/mosquitto-remote-cameras.conf"),
        )
        .unwrap();
        let conf = shipped.replace("/etc/mosquitto/", &format!("{}/", e.display()));
        assert!(
            !conf.contains("/etc/"),
            "the example names a path this test does not provide:\n{conf}"
        );
        let conf = replace_once(&conf, "\nlistener 8883\n", "\nlistener {port}\n");
        let broker = Broker::with(BrokerOptions {
            listener: Some(conf),
            ..BrokerOptions::default()
        });
        RemoteBroker { broker, _etc: etc }
    }

    fn port(&self) -> u16 {
        self.broker.port
    }
}

/// A TLS listener of the test's own (not the shipped example): anonymous clients, no password file, and a
/// client certificate only when `require_certificate`.
fn test_tls_broker(pki: &Pki, require_certificate: bool) -> Broker {
    Broker::with(BrokerOptions {
        listener: Some(format!(
            "listener {{port}} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n\
             allow_anonymous true\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        )),
        ..BrokerOptions::default()
    })
}

// ---------------------------------------------------------------------------------------------------------
// imaged
// ---------------------------------------------------------------------------------------------------------

/// README step 4's imaged.toml, with the test's folder for /etc/imaged/, `localhost` for the broker's name
/// and the broker's free port.
fn readme_config(pki: &Pki, port: u16) -> String {
    let text = readme_block("imaged.toml");
    let text = text.replace("/etc/imaged/", &format!("{}/", pki.etc_imaged().display()));
    let text = replace_once(
        &text,
        &format!("host = \"{README_BROKER}\""),
        "host = \"localhost\"",
    );
    replace_once(&text, "port = 8883", &format!("port = {port}"))
}

/// Removes the lines of `config` that start with one of `keys`.
fn without(config: &str, keys: &[&str]) -> String {
    let mut out = String::new();
    for line in config.lines() {
        if !keys.iter().any(|k| line.trim_start().starts_with(k)) {
            out += line;
            out += "\n";
        }
    }
    assert_ne!(out.lines().count(), config.lines().count(), "{keys:?}");
    out
}

/// Replaces `key = …` in `config` by `key = value` (a TOML value).
fn set(config: &str, key: &str, value: &str) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("{key} is not in\n{config}"))
        .to_string();
    config.replace(&line, &format!("{key} = {value}"))
}

fn toml_path(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

fn sample() -> Vec<u8> {
    fs::read(Path::new(ROOT).join("sample.jpg")).unwrap()
}

/// Publishes `image` as camera1 with mosquitto_pub over mutual TLS with a password, and waits until the
/// daemon has stored it, byte for byte.
fn camera_image_is_stored(pki: &Pki, port: u16, daemon: &mut Daemon, image: &[u8]) {
    daemon.wait_ready();
    let args = pki.client_args("camera1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(
        mosquitto_pub(port, "image/upload/camera1", image, &args),
        "mosquitto_pub as camera1 was not acknowledged"
    );
    daemon.wait_stored(1, Duration::from_secs(10));
    assert_eq!(daemon.stored().values().next().unwrap(), image);
}

/// The line imaged logs when a connection attempt fails with `problem`.
fn cannot_connect(problem: &str) -> String {
    format!("Cannot connect: {problem}; retrying in ")
}

/// Starts imaged with `config` and debug logging, which shows each connection attempt.
fn start_debug(port: u16, config: &str) -> Daemon {
    Daemon::start_with(port, &format!("{config}\n[log]\nlevel = \"debug\"\n"), &[])
}

/// Waits for `line` in the log of a daemon started with [`start_debug`], then watches for five more seconds:
/// the line stays alone (no log spam), no other connection problem is logged, imaged keeps running, and it
/// retried with backoff (a few attempts, not hundreds).
fn reported_once(daemon: &mut Daemon, line: &str) {
    let start = Instant::now();
    while !daemon.log().contains(line) {
        if let Some(status) = daemon.try_wait() {
            panic!("imaged exited ({status}); log:\n{}", daemon.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {line:?} in the log after 20 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(5));
    let log = daemon.log();
    assert_eq!(
        log.matches(line).count(),
        1,
        "logged more than once:\n{log}"
    );
    assert_eq!(
        log.matches("Cannot connect").count(),
        1,
        "another problem was logged:\n{log}"
    );
    assert!(!log.contains("Ready:"), "{log}");
    assert!(daemon.try_wait().is_none(), "imaged exited:\n{log}");
    // Counted by imaged itself: other test suites' clients may reach a broker on a reused port.
    let attempts = 1 + log.matches("still cannot connect: ").count();
    assert!(
        (3..=20).contains(&attempts),
        "{attempts} connection attempts in about {:?}: imaged must keep retrying, with backoff:\n{log}",
        start.elapsed()
    );
}

/// Waits until `n` clients have logged in to `broker` as `user`, and a moment more for the subscription each
/// sends right after its CONNACK.
fn logged_in(broker: &Broker, user: &str, n: usize) {
    let login = format!("u'{user}')");
    wait_until(
        &format!("{n} clients logged in as {user}"),
        Duration::from_secs(10),
        || broker.log().matches(&login).count() >= n,
    );
    std::thread::sleep(Duration::from_millis(300));
}

/// Starts imaged with `config`, which must make it exit with a config error (78) saying `message`.
fn config_error(config: &str, message: &str) {
    let mut daemon = Daemon::start_with(free_port(), config, &[]);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "imaged still runs:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = daemon.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert_eq!(
        log.matches(message).count(),
        1,
        "{message:?} not in:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// What works
// ---------------------------------------------------------------------------------------------------------

#[test]
fn the_readme_setup_takes_a_camera_image_through_imaged_to_a_viewer() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let port = broker.port().to_string();
    let mut daemon = Daemon::start_with(broker.port(), &readme_config(&pki, broker.port()), &[]);
    daemon.wait_ready();

    // README step 5, as it is but for the host, the port and the image.
    let local = |block: &str| {
        let block = replace_once(block, &format!("-h {README_BROKER}"), "-h localhost");
        replace_once(&block, "-p 8883", &format!("-p {port}"))
    };
    let viewer = Command::new("sh")
        .arg("-ec")
        // `exec`: the guard's PID is mosquitto_sub's own.
        .arg(format!("exec {}", local(&readme_block("viewer"))))
        .current_dir(pki.dir.path())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut viewer = ChildGuard(viewer);
    logged_in(&broker.broker, "viewer", 1);
    let image = sample();
    fs::write(pki.path("snapshot.jpg"), &image).unwrap();
    sh(pki.dir.path(), &local(&readme_block("camera")));

    daemon.wait_stored(1, Duration::from_secs(10));
    let stored = daemon.stored();
    let (name, bytes) = stored.iter().next().unwrap();
    assert_eq!(bytes, &image);
    assert!(
        name.starts_with("image_") && name.ends_with(".jpg"),
        "{name}"
    );
    wait_until("the viewer has the image", Duration::from_secs(10), || {
        viewer.0.try_wait().unwrap().is_some()
    });
    assert_eq!(fs::read(pki.path("latest_from_server.jpg")).unwrap(), image);
    assert!(daemon
        .log()
        .contains(&format!("Connected to localhost:{port}")));
    assert!(!daemon.log().contains("WARN"), "{}", daemon.log());
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tls_with_only_a_ca_file_stores_an_image() {
    let pki = Pki::new();
    let broker = test_tls_broker(&pki, false);
    let config = format!(
        "[broker]\nhost = \"localhost\"\nport = {}\n[broker.tls]\nca_file = {}\n[topics]\nupload = \"image/upload/#\"\n",
        broker.port,
        toml_path(&pki.path("ca.pem"))
    );
    let mut daemon = Daemon::start_with(broker.port, &config, &[]);
    daemon.wait_ready();
    let ca = pki.path("ca.pem").display().to_string();
    let image = jpeg(1, 5000);
    assert!(mosquitto_pub(
        broker.port,
        "image/upload/cam",
        &image,
        &["-h", "localhost", "--cafile", &ca]
    ));
    daemon.wait_stored(1, Duration::from_secs(10));
    assert_eq!(daemon.stored().values().next().unwrap(), &image);
}

#[test]
fn mutual_tls_without_a_password_stores_an_image() {
    let pki = Pki::new();
    let broker = test_tls_broker(&pki, true);
    let config = format!(
        "[broker]\nhost = \"localhost\"\nport = {}\n[broker.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n\
         [topics]\nupload = \"image/upload/#\"\n",
        broker.port,
        toml_path(&pki.path("ca.pem")),
        toml_path(&pki.path("imaged.pem")),
        toml_path(&pki.path("imaged.key")),
    );
    let mut daemon = Daemon::start_with(broker.port, &config, &[]);
    daemon.wait_ready();
    let image = jpeg(2, 5000);
    let (ca, cert, key) = (
        pki.path("ca.pem").display().to_string(),
        pki.path("camera1.pem").display().to_string(),
        pki.path("camera1.key").display().to_string(),
    );
    assert!(mosquitto_pub(
        broker.port,
        "image/upload/cam",
        &image,
        &[
            "-h",
            "localhost",
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key
        ]
    ));
    daemon.wait_stored(1, Duration::from_secs(10));
    assert_eq!(daemon.stored().values().next().unwrap(), &image);
}

#[test]
fn mutual_tls_with_user_name_and_password_file_stores_an_image() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = readme_config(&pki, broker.port());
    assert!(config.contains("password_file") && config.contains("cert_file"));
    let mut daemon = Daemon::start_with(broker.port(), &config, &[]);
    camera_image_is_stored(&pki, broker.port(), &mut daemon, &jpeg(3, 8000));
}

#[test]
fn the_password_can_come_from_the_systemd_credentials_directory() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let credentials = scratch();
    copy(
        &pki.path("imaged.password"),
        &credentials.path().join("mqtt-password"),
        0o400,
    );
    let config = without(&readme_config(&pki, broker.port()), &["password_file"]);
    let dir = credentials.path().display().to_string();
    let mut daemon = Daemon::start_with(
        broker.port(),
        &config,
        &[("CREDENTIALS_DIRECTORY", dir.as_str())],
    );
    camera_image_is_stored(&pki, broker.port(), &mut daemon, &jpeg(4, 8000));
}

#[test]
fn connecting_by_ip_address_checks_the_certificate_against_server_name() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = set(&readme_config(&pki, broker.port()), "host", "\"127.0.0.1\"");
    let config = replace_once(
        &config,
        "[broker.tls]\n",
        &format!("[broker.tls]\nserver_name = \"{README_BROKER}\"\n"),
    );
    let mut daemon = Daemon::start_with(broker.port(), &config, &[]);
    camera_image_is_stored(&pki, broker.port(), &mut daemon, &jpeg(5, 8000));
    assert!(daemon
        .log()
        .contains(&format!("Connected to 127.0.0.1:{}", broker.port())));
}

#[test]
fn a_password_file_every_user_can_read_gets_a_warning_naming_it() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let password = pki.etc_imaged().join("mqtt-password");
    fs::set_permissions(&password, fs::Permissions::from_mode(0o644)).unwrap();
    let mut daemon = Daemon::start_with(broker.port(), &readme_config(&pki, broker.port()), &[]);
    camera_image_is_stored(&pki, broker.port(), &mut daemon, &jpeg(6, 8000));
    let warning = format!(
        "{} is readable by every user on this host; make it readable by imaged only (chmod 0640 or 0600)",
        password.display()
    );
    assert_eq!(daemon.log_count(&warning), 1, "{}", daemon.log());
}

#[test]
fn imaged_send_and_receive_go_through_mutual_tls_with_passwords() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let mut daemon = Daemon::start_with(broker.port(), &readme_config(&pki, broker.port()), &[]);
    daemon.wait_ready();
    // A camera's and a viewer's config: README step 4's keys with their own user, certificate and password.
    let tool_config = |user: &str| {
        let path = pki.path(&format!("{user}.toml"));
        let text = format!(
            "[broker]\nhost = \"localhost\"\nport = {}\nusername = \"{user}\"\npassword_file = {}\n\
             [broker.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
            broker.port(),
            toml_path(&pki.path(&format!("{user}.password"))),
            toml_path(&pki.path("ca.pem")),
            toml_path(&pki.path(&format!("{user}.pem"))),
            toml_path(&pki.path(&format!("{user}.key"))),
        );
        fs::write(&path, text).unwrap();
        path
    };
    let (camera, viewer) = (tool_config("camera1"), tool_config("viewer"));
    let received = pki.path("received.jpg");
    let receive = Command::new(imaged_bin())
        .arg("--config")
        .arg(&viewer)
        .args([
            "receive",
            "--topic",
            "image/stored",
            "--count",
            "1",
            "--output",
        ])
        .arg(&received)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut receive = ChildGuard(receive);
    logged_in(&broker.broker, "viewer", 1);
    let image = pki.path("snapshot.jpg");
    fs::write(&image, sample()).unwrap();
    let out = Command::new(imaged_bin())
        .arg("--config")
        .arg(&camera)
        .args(["send", "--topic", "image/upload/camera1"])
        .arg(&image)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.wait_stored(1, Duration::from_secs(10));
    assert_eq!(daemon.stored().values().next().unwrap(), &sample());
    wait_until(
        "imaged receive has the image",
        Duration::from_secs(10),
        || receive.0.try_wait().unwrap().is_some(),
    );
    assert_eq!(fs::read(&received).unwrap(), sample());
}

// ---------------------------------------------------------------------------------------------------------
// What fails, and what imaged says
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_wrong_password_is_logged_once_as_a_wrong_user_name_or_password() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let wrong = pki.path("wrong.password");
    fs::write(&wrong, "not-the-password\n").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let config = set(
        &readme_config(&pki, broker.port()),
        "password_file",
        &toml_path(&wrong),
    );
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "the broker {b} refused the login (not authorized): wrong or missing user name or password \
             (broker.username, and broker.password_file or the systemd credential mqtt-password)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_is_logged_once() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = set(
        &readme_config(&pki, broker.port()),
        "ca_file",
        &toml_path(&pki.other_ca()),
    );
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "the certificate of {b} is not signed by a CA imaged trusts: broker.tls.ca_file must hold the CA \
             that signed the broker's certificate (without ca_file, the system's CAs are used)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn connecting_by_ip_address_without_server_name_logs_the_name_mismatch_once() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = set(&readme_config(&pki, broker.port()), "host", "\"127.0.0.1\"");
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "the certificate of {b} is not valid for the name 127.0.0.1: it names broker.example.org, localhost \
             (set broker.host to one of those, or broker.tls.server_name when connecting by IP address)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("127.0.0.1:{}", broker.port()))),
    );
    assert_documented(&problem("127.0.0.1:8883"));
}

#[test]
fn an_expired_broker_certificate_is_logged_once_with_its_date() {
    let pki = Pki::new();
    let broker = RemoteBroker::with_certificate(&pki, &pki.server_expired());
    let mut daemon = start_debug(broker.port(), &readme_config(&pki, broker.port()));
    let problem = |b: &str| {
        format!(
            "the certificate of {b} expired on 2021-01-01 00:00 UTC: renew the broker's certificate (or is this \
             host's clock wrong?)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn an_x509_version_1_broker_certificate_is_logged_once_as_such_not_as_unsupported_cert_version() {
    let pki = Pki::new();
    let broker = RemoteBroker::with_certificate(&pki, &pki.server_v1());
    let mut daemon = start_debug(broker.port(), &readme_config(&pki, broker.port()));
    let problem = |b: &str| {
        format!(
            "the certificate of {b} is an X.509 version 1 certificate; TLS accepts only version 3: make it again \
             with extensions (openssl x509 -req … -extfile, see README \"Remote cameras\")"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert!(!daemon.log().contains("UnsupportedCertVersion"));
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn an_x509_version_1_client_certificate_is_a_config_error_naming_cert_file() {
    let pki = Pki::new();
    let v1 = pki.imaged_v1();
    let config = set(
        &readme_config(&pki, free_port()),
        "cert_file",
        &toml_path(&v1),
    );
    config_error(
        &config,
        &format!(
            "broker.tls.cert_file: {} is an X.509 version 1 certificate; TLS accepts only version 3: make it again \
             with extensions (openssl x509 -req … -extfile, see README \"Remote cameras\")",
            v1.display()
        ),
    );
    assert_documented("broker.tls.cert_file: /etc/imaged/imaged.pem is an X.509 version 1 certificate; TLS accepts only version 3: …");
}

#[test]
fn a_key_that_is_not_the_certificates_is_a_config_error_naming_key_file() {
    let pki = Pki::new();
    let config = set(
        &readme_config(&pki, free_port()),
        "key_file",
        &toml_path(&pki.path("viewer.key")),
    );
    let message = |key: &str, cert: &str| {
        format!("broker.tls.key_file: {key} is not the private key of the certificate in {cert}")
    };
    config_error(
        &config,
        &message(
            &pki.path("viewer.key").display().to_string(),
            &pki.etc_imaged().join("imaged.pem").display().to_string(),
        ),
    );
    assert_documented(&message("/etc/imaged/imaged.key", "/etc/imaged/imaged.pem"));
}

#[test]
fn a_missing_client_certificate_is_logged_once_when_the_broker_requires_one() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = without(
        &readme_config(&pki, broker.port()),
        &["cert_file", "key_file"],
    );
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "{b} requires a client certificate: set broker.tls.cert_file and broker.tls.key_file"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn a_client_certificate_from_a_ca_the_broker_does_not_trust_is_logged_once() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = set(
        &readme_config(&pki, broker.port()),
        "cert_file",
        &toml_path(&pki.imaged_from_other_ca()),
    );
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "{b} refused imaged's client certificate (UnknownCA): broker.tls.cert_file must be a current version 3 \
             certificate signed by the CA the broker trusts (its cafile)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn a_plain_client_against_the_tls_port_is_logged_once() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let config = readme_config(&pki, broker.port());
    let config = without(
        &config,
        &["[broker.tls]", "ca_file", "cert_file", "key_file"],
    );
    let mut daemon = start_debug(broker.port(), &config);
    let problem = |b: &str| {
        format!(
            "{b} reset the connection (if it does so at every connect: is it a TLS port? then imaged needs \
             [broker.tls]; 8883 is the usual TLS port)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port()))),
    );
    assert_documented(&problem("broker.example.org:8883"));
}

#[test]
fn a_tls_client_against_a_plain_port_is_logged_once() {
    let pki = Pki::new();
    let broker = Broker::start();
    let mut daemon = start_debug(broker.port, &readme_config(&pki, broker.port));
    let problem = |b: &str| {
        format!(
            "{b} closed the connection during the TLS handshake: is it a plain MQTT port? (use the broker's TLS \
             port, usually 8883, or remove [broker.tls] for a plain port, usually 1883)"
        )
    };
    reported_once(
        &mut daemon,
        &cannot_connect(&problem(&format!("localhost:{}", broker.port))),
    );
    assert_documented(&problem("broker.example.org:1883"));
}

/// Mosquitto's dynamic security plugin, which (unlike `acl_file`) checks subscriptions and answers a forbidden
/// one with a failure in the SUBACK.
fn dynamic_security_plugin() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mosquitto_dynamic_security.so (package mosquitto) is installed")
}

#[test]
fn a_subscription_the_broker_refuses_is_logged_once_and_retried_only_every_30_s() {
    // Anonymous clients may subscribe to image/stored only. Mosquitto's acl_file cannot show this: it grants
    // every subscription and withholds the messages instead (see the next test).
    let dir = scratch();
    let security = dir.path().join("dynamic-security.json");
    fs::write(
        &security,
        r#"{
  "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": true, "subscribe": false, "unsubscribe": true},
  "clients": [],
  "groups": [{"groupname": "anonymous", "roles": [{"rolename": "viewer"}], "clients": []}],
  "anonymousGroup": "anonymous",
  "roles": [{"rolename": "viewer", "acls": [{"acltype": "subscribePattern", "topic": "image/stored", "allow": true}]}]
}
"#,
    )
    .unwrap();
    let broker = Broker::with(BrokerOptions {
        extra: format!(
            "plugin {}\nplugin_opt_config_file {}\nlog_type debug\n",
            dynamic_security_plugin().display(),
            security.display()
        ),
        ..BrokerOptions::default()
    });
    let mut daemon =
        Daemon::start_with(broker.port, "[topics]\nupload = \"image/upload/#\"\n", &[]);
    let refused = |b: &str| {
        format!(
            "The broker {b} refused the subscription to 'image/upload/#': check its ACL for this user; trying \
             again in 30s"
        )
    };
    let line = refused(&format!("127.0.0.1:{}", broker.port));
    wait_until("the refusal is logged", Duration::from_secs(20), || {
        daemon.log().contains(&line)
    });
    let first = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let log = daemon.log();
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert_eq!(log.matches("Connected to").count(), 1, "{log}");
    assert!(!log.contains("Ready:"), "{log}");
    assert!(daemon.try_wait().is_none(), "imaged exited:\n{log}");
    let subscriptions = || broker.log().matches("Received SUBSCRIBE from").count();
    let sessions = || broker.log().matches("New client connected from").count();
    assert_eq!(subscriptions(), 1, "{}", broker.log());
    assert_eq!(sessions(), 1, "{}", broker.log());
    // The next attempt, 30 s later, on the same connection.
    wait_until("imaged subscribes again", Duration::from_secs(40), || {
        daemon.log().matches(&line).count() == 2
    });
    assert!(
        first.elapsed() >= Duration::from_secs(29),
        "{:?}",
        first.elapsed()
    );
    assert_eq!(subscriptions(), 2, "{}", broker.log());
    assert_eq!(sessions(), 1, "{}", broker.log());
    assert!(daemon.try_wait().is_none());
    assert_documented(&refused("broker.example.org:8883"));
}

#[test]
fn the_shipped_acl_lets_cameras_only_upload_and_viewers_only_read_stored_images() {
    let pki = Pki::new();
    let broker = RemoteBroker::start(&pki);
    let port = broker.port();
    let mut daemon = Daemon::start_with(port, &readme_config(&pki, port), &[]);
    daemon.wait_ready();
    let subscriber = |user: &str, topic: &str| {
        let mut args = pki.client_args(user);
        args.extend(
            [
                "-p",
                &port.to_string(),
                "-t",
                topic,
                "-q",
                "1",
                "-C",
                "1",
                "-W",
                "6",
                "-N",
            ]
            .map(String::from),
        );
        let child = Command::new("mosquitto_sub")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
    };
    // Subscriptions are granted either way; what the ACL forbids is withheld.
    let viewer = subscriber("viewer", "image/stored");
    let camera_reads_stored = subscriber("camera1", "image/stored");
    let viewer_reads_uploads = subscriber("viewer", "image/upload/#");
    logged_in(&broker.broker, "viewer", 2);
    logged_in(&broker.broker, "camera1", 1);

    let publish = |user: &str, topic: &str, image: &[u8]| {
        let args = pki.client_args(user);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(
            mosquitto_pub(port, topic, image, &args),
            "{user} on {topic}"
        );
    };
    // Not stored: the broker acknowledges a forbidden publish but drops it.
    publish("viewer", "image/upload/viewer", &jpeg(7, 3000));
    publish("camera1", "image/stored", &jpeg(8, 3000));
    let image = jpeg(9, 3000);
    publish("camera1", "image/upload/camera1", &image);
    daemon.wait_stored(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.stored_count(), 1);
    assert_eq!(daemon.stored().values().next().unwrap(), &image);

    let viewer = viewer.wait_with_output().unwrap();
    assert_eq!(
        viewer.stdout, image,
        "the viewer gets what imaged republished"
    );
    for (who, child) in [
        ("camera1 reading image/stored", camera_reads_stored),
        ("viewer reading image/upload/#", viewer_reads_uploads),
    ] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.stdout.is_empty(),
            "{who} got {} bytes",
            out.stdout.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Storage: modes and names
// ---------------------------------------------------------------------------------------------------------

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn images_and_quarantined_payloads_get_the_file_mode_and_folders_0750_whatever_the_umask() {
    // (umask, storage.file_mode or the default, the mode expected)
    for (umask, file_mode, expected) in [
        (0o077, None, 0o640),
        (0o000, None, 0o640),
        (0o000, Some("0600"), 0o600),
        (0o077, Some("0644"), 0o644),
    ] {
        let broker = Broker::start();
        let extra = file_mode.map_or(String::new(), |m| {
            format!("[storage]\nfile_mode = \"{m}\"\n")
        });
        let mut daemon = Daemon::prepare(broker.port, &extra, &[]);
        daemon.spawn_with_umask(umask);
        daemon.wait_ready();
        assert!(broker.mosquitto_pub("image/upload", &jpeg(umask as u64, 3000)));
        assert!(broker.mosquitto_pub("image/upload", b"GIF89a, not a JPEG"));
        daemon.wait_stored(1, Duration::from_secs(10));
        let quarantine = daemon.images.join(".quarantine");
        // Only the finished file: a write in progress is a `.incoming-*.part` file first.
        let rejected = || {
            files_in(&quarantine).into_iter().find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("rejected_")
            })
        };
        wait_until(
            "the payload is quarantined",
            Duration::from_secs(10),
            || rejected().is_some(),
        );
        let what = format!("umask {umask:03o}, file_mode {file_mode:?}");
        for dir in [
            daemon.images.clone(),
            quarantine.clone(),
            daemon.images.join(".imaged"),
        ] {
            assert_eq!(mode(&dir), 0o750, "{} with {what}", dir.display());
        }
        let image = &daemon.images.join(daemon.stored().keys().next().unwrap());
        assert_eq!(mode(image), expected, "{} with {what}", image.display());
        let rejected = rejected().unwrap();
        let name = rejected.file_name().unwrap().to_string_lossy().to_string();
        assert!(name.ends_with(".bin"), "{name}");
        assert_eq!(
            mode(&rejected),
            expected,
            "{} with {what}",
            rejected.display()
        );
    }
}

/// Publishes with rumqttc, which (unlike mosquitto_pub) sends any topic MQTT allows, control characters
/// included. True when the broker acknowledged it: Mosquitto drops a client whose topic it refuses.
fn publish_raw(port: u16, topic: &str, payload: &[u8]) -> bool {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut options =
            MqttOptions::new(format!("hostile-{}", fastrand::u64(..)), "127.0.0.1", port);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => return true,
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false);
        let _ = client.try_disconnect();
        acked
    })
}

fn is_image_name(name: &str) -> bool {
    let Some(stem) = name
        .strip_prefix("image_")
        .and_then(|n| n.strip_suffix(".jpg"))
    else {
        return false;
    };
    let (stamp, suffix) = match stem.get(15..) {
        Some("") => (stem, None),
        Some(rest) => match rest.strip_prefix('-') {
            Some(n) => (&stem[..15], Some(n)),
            None => return false,
        },
        None => return false,
    };
    let b = stamp.as_bytes();
    b.len() == 15
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_digit())
        && match suffix {
            None => true,
            Some(n) => !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()),
        }
}

/// Topics that would lead out of the storage folder, or into its hidden parts, if they became paths.
fn escaping_topics(tag: &str) -> Vec<String> {
    // Mosquitto refuses topics of more than 200 levels.
    let many_levels = format!("image/upload/{}{tag}", "a/".repeat(180));
    let long_level = format!("image/upload/{}", "x".repeat(60 * 1024));
    let dots = format!("image/upload/{}tmp/{tag}", "../".repeat(40));
    vec![
        format!("image/upload/../../../../../../../../tmp/{tag}"),
        dots,
        "image/upload/..".into(),
        "image/upload/.".into(),
        "image/upload/".into(),
        "image/upload//".into(),
        "image/upload///..//..//".into(),
        "image/upload/.imaged/index.log".into(),
        "image/upload/.quarantine/x".into(),
        format!("image/upload/..\\..\\..\\{tag}"),
        format!("image/upload/%2e%2e%2f%2e%2e%2f{tag}"),
        format!("image/upload/\u{2215}..\u{2215}..\u{2215}{tag}"),
        format!("image/upload/\u{202e}gpj.{tag}"),
        format!("image/upload/ {tag} .jpg"),
        format!("image/upload/~/{tag}"),
        many_levels,
        long_level,
    ]
}

#[test]
fn hostile_topic_names_never_become_paths_and_nothing_lands_outside_the_storage_folder() {
    let broker = Broker::start();
    let mut daemon =
        Daemon::start_with(broker.port, "[topics]\nupload = \"image/upload/#\"\n", &[]);
    daemon.wait_ready();
    let tag = format!("imaged-escape-{}", fastrand::u64(..));
    let mut topics = escaping_topics(&tag);
    // Control characters MQTT allows in a topic (only U+0000 is forbidden); Mosquitto refuses them itself.
    let controls: Vec<String> = ["\t", "\n", "\r", "\u{1b}[31m", "\u{7f}", "\u{85}", "\u{1}"]
        .iter()
        .map(|c| format!("image/upload/{c}{tag}{c}"))
        .collect();
    topics.extend(controls.iter().cloned());

    let mut accepted = 0;
    let mut refused = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        if publish_raw(broker.port, topic, &jpeg(100 + i as u64, 2000)) {
            accepted += 1;
        } else {
            refused.push(topic.clone());
        }
    }
    // Everything but the control characters reached imaged; what Mosquitto let through is stored too.
    for topic in &refused {
        assert!(
            controls.contains(topic),
            "the broker refused {:?}",
            topic.chars().take(80).collect::<String>()
        );
    }
    daemon.wait_stored(accepted, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));

    // Every image is in the storage folder under an image_YYYYMMDD-HHMMSS[-N].jpg name, and nothing else is.
    let mut names = HashSet::new();
    for entry in fs::read_dir(&daemon.images).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        match name.as_str() {
            ".imaged" | ".quarantine" | ".incoming" => assert!(entry.path().is_dir()),
            _ => {
                assert!(is_image_name(&name), "{name:?} in the storage folder");
                assert!(entry.path().is_file());
                names.insert(name);
            }
        }
    }
    assert_eq!(names.len(), accepted);
    assert_eq!(
        fs::read_dir(daemon.images.join(".quarantine"))
            .unwrap()
            .count(),
        0
    );
    // Nothing beside it in the daemon's folder, nothing under the storage folder but what imaged made, and
    // nothing where a topic joined to a path would have led.
    let mut beside: Vec<String> = fs::read_dir(&daemon.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    beside.sort();
    assert_eq!(beside, ["imaged.log", "imaged.toml", "images"]);
    for dir in [
        daemon.images.join(".imaged"),
        daemon.images.join(".quarantine"),
    ] {
        for entry in fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(&tag) && !name.contains("index.log/"),
                "{name}"
            );
        }
    }
    for path in [
        PathBuf::from(format!("/tmp/{tag}")),
        PathBuf::from(format!("/tmp/{tag}.jpg")),
        daemon.images.join("a"),
        daemon.images.join("x".repeat(255)),
    ] {
        assert!(!path.exists(), "{} exists", path.display());
    }
    assert!(
        daemon.try_wait().is_none(),
        "imaged exited:\n{}",
        daemon.log()
    );
}
