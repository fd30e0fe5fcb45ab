//! Reload on SIGHUP against a real Mosquitto: what applies at once, what waits for a restart, a broken file,
//! the RELOADING=1 … READY=1 around it, and `imaged reload` (the unit's ExecReload=), which returns once the
//! reload is done and fails when the file was refused.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// The notify socket a test hands imaged, as systemd would.
struct Notify {
    socket: UnixDatagram,
    path: String,
    _scratch: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let scratch = scratch();
        let path = scratch.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Notify {
            socket,
            path: path.display().to_string(),
            _scratch: scratch,
        }
    }

    /// Reads messages up to the first that contains `what`, and returns it.
    fn until(&self, what: &str) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {what} within 20s: {e}"));
            let message = String::from_utf8_lossy(&buf[..n]).to_string();
            if message.contains(what) {
                return message;
            }
        }
    }

    /// SIGHUP, then RELOADING=1 (with the time systemd asks for) and READY=1: the reload is done.
    fn reload(&self, daemon: &Daemon) {
        signal(daemon.pid(), libc::SIGHUP);
        let reloading = self.until("RELOADING=1");
        assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
        self.until("READY=1");
    }
}

fn daemon_with_notify(broker: &Broker, extra: &str, notify: &Notify) -> Daemon {
    let mut daemon = Daemon::start_with(
        broker.port,
        extra,
        &[("NOTIFY_SOCKET", notify.path.as_str())],
    );
    daemon.wait_ready();
    notify.until("READY=1");
    daemon
}

fn files_under(dir: &Path) -> usize {
    jpg_files(dir).len()
}

#[test]
fn topics_and_the_path_template_changed_while_images_flow_lose_nothing() {
    let broker = Broker::persistent();
    let observer = Observer::start(broker.port, "image/stored2");
    let notify = Notify::new();
    let mut daemon =
        daemon_with_notify(&broker, "[topics]\nupload = \"cams/door/jpeg\"\n", &notify);
    let images: Vec<Vec<u8>> = (0..300).map(|i| jpeg(41_000 + i, 5000)).collect();
    let sender = send_in_background(broker.port, "cams/door/jpeg", &images);
    wait_until("some images are stored", Duration::from_secs(30), || {
        daemon.stored_count() >= 60
    });
    // More cameras, their own folders, another stored topic: the door camera keeps publishing throughout.
    daemon.reconfigure(
        "[topics]\nupload = \"cams/+/jpeg\"\nstored = \"image/stored2\"\n\
         [storage]\npath = \"{camera}/image_%Y%m%d-%H%M%S.jpg\"\n",
    );
    notify.reload(&daemon);
    sender.join().unwrap();
    daemon.wait_stored(300, Duration::from_secs(60));
    assert_each_stored_once(&daemon.images, &images);
    assert!(
        files_under(&daemon.images.join("door")) > 0,
        "images after the reload go where the new template says"
    );
    assert!(
        files_under(&daemon.images.join("door")) < 300,
        "images before it stayed where they were"
    );
    // Every image is republished, those after the reload on the new stored topic.
    wait_until(
        "republishes on the new topic",
        Duration::from_secs(30),
        || observer.distinct() > 0,
    );
    let log = daemon.log();
    assert!(
        log.contains("topics.upload, topics.stored, storage.path apply now"),
        "{log}"
    );
    wait_until(
        "the old filter is unsubscribed",
        Duration::from_secs(10),
        || daemon.log().contains("Unsubscribing from 'cams/door/jpeg'"),
    );
    // A new camera on the new filter.
    assert!(broker.mosquitto_pub("cams/gate/jpeg", &jpeg(41_999, 4000)));
    wait_until("the gate camera's image", Duration::from_secs(10), || {
        files_under(&daemon.images.join("gate")) == 1
    });
    assert!(daemon.try_wait().is_none(), "imaged runs on");
}

#[test]
fn a_reload_switches_the_upload_filter_log_level_and_retention_and_names_the_keys_that_need_a_restart(
) {
    let broker = Broker::start();
    let notify = Notify::new();
    let daemon = daemon_with_notify(&broker, "", &notify);
    let old: Vec<Vec<u8>> = (0..5).map(|i| jpeg(42_000 + i, 40_000)).collect();
    for image in &old {
        assert!(broker.mosquitto_pub("image/upload", image));
    }
    daemon.wait_stored(5, Duration::from_secs(10));

    daemon.reconfigure(
        "[topics]\nupload = \"cams/+/jpeg\"\n[log]\nlevel = \"warn\"\n\
         [retention]\nmax_size = \"100KB\"\n\
         [broker]\nkeep_alive_secs = 7\n[storage]\nwriters = 2\n",
    );
    notify.reload(&daemon);
    let log = daemon.log();
    let restart: Vec<&str> = log.lines().filter(|l| l.contains("next restart")).collect();
    assert_eq!(restart.len(), 1, "{log}");
    assert!(
        restart[0].contains("broker.keep_alive_secs, storage.writers"),
        "{}",
        restart[0]
    );
    // Retention deletes the oldest down to the new limit at once.
    wait_until("retention keeps 100 KB", Duration::from_secs(10), || {
        daemon.stored_count() <= 2
    });
    // (At level warn the unsubscription is not logged: the new filter's first image shows it is done.)
    let saved_before = daemon.log_count("Image saved");
    let new = jpeg(42_101, 3000);
    assert!(broker.mosquitto_pub("cams/door/jpeg", &new));
    wait_until(
        "the image on the new filter",
        Duration::from_secs(10),
        || hashes_in(&daemon.images).contains_key(&sha(&new)),
    );
    std::thread::sleep(Duration::from_millis(300));
    let gone = jpeg(42_100, 3000);
    assert!(broker.mosquitto_pub("image/upload", &gone));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !hashes_in(&daemon.images).contains_key(&sha(&gone)),
        "the old filter delivers nothing any more"
    );
    assert_eq!(
        daemon.log_count("Image saved"),
        saved_before,
        "at log level warn, no line per image"
    );
}

#[test]
fn a_broken_file_on_reload_is_named_with_line_and_key_and_the_old_config_keeps_running() {
    let broker = Broker::start();
    let notify = Notify::new();
    let mut daemon = daemon_with_notify(&broker, "", &notify);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!(
            "{config}[topics]\nupload = \"cams/+/jpeg\"\nstored = \"cams/stored\"\nuplod = 1\n"
        ),
    )
    .unwrap();
    let line = config.lines().count() + 4;
    notify.reload(&daemon);
    let log = daemon.log();
    let refused = log
        .lines()
        .find(|l| l.contains("Reload refused"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        refused.contains(&format!(
            "{}:{line}: topics.uplod: unknown field",
            daemon.config.display()
        )),
        "{refused}"
    );
    assert!(refused.contains("keeps running on the configuration it had"));
    assert!(daemon.try_wait().is_none(), "a reload never ends imaged");
    // Nothing of the broken file applies: the old upload topic still works.
    assert!(broker.mosquitto_pub("image/upload", &jpeg(43_000, 3000)));
    daemon.wait_stored(1, Duration::from_secs(10));

    // Fixed, the next reload applies it.
    std::fs::write(
        &daemon.config,
        format!("{config}[topics]\nupload = \"cams/+/jpeg\"\n"),
    )
    .unwrap();
    notify.reload(&daemon);
    assert!(daemon.log().contains("topics.upload apply now"));
    assert!(broker.mosquitto_pub("cams/door/jpeg", &jpeg(43_001, 3000)));
    daemon.wait_stored(2, Duration::from_secs(10));
}

#[test]
fn events_and_retained_republishes_switched_on_by_a_reload_apply_to_the_next_image() {
    let broker = Broker::start();
    let events = Observer::start(broker.port, "imaged/events");
    let notify = Notify::new();
    let daemon = daemon_with_notify(&broker, "", &notify);
    assert!(broker.mosquitto_pub("image/upload", &jpeg(44_000, 3000)));
    daemon.wait_stored(1, Duration::from_secs(10));

    daemon.reconfigure("[topics]\nevents = \"imaged/events\"\nretain_stored = true\n");
    notify.reload(&daemon);
    assert!(daemon
        .log()
        .contains("topics.retain_stored, topics.events apply now"));
    let image = jpeg(44_001, 3000);
    assert!(broker.mosquitto_pub("image/upload", &image));
    events.wait_for(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        events.distinct(),
        1,
        "an event for the image after the reload only"
    );
    // A viewer that subscribes later gets it at once: retained.
    let viewer = Observer::start(broker.port, "image/stored");
    viewer.wait_for(1, Duration::from_secs(5));
    assert!(viewer.seen().contains_key(&sha(&image)));
}

/// `imaged reload` as systemd's ExecReload= runs it, with `args`.
fn imaged_reload(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(imaged_bin())
        .arg("--config")
        .arg(&daemon.config)
        .arg("reload")
        .args(args)
        .env_remove("MAINPID")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("imaged reload runs")
}

#[test]
fn imaged_reload_returns_once_the_new_upload_filter_is_subscribed_so_an_upload_right_after_it_is_stored(
) {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let pid = daemon.pid().to_string();
    for round in 0..3u64 {
        let filter = format!("cams{round}/+/jpeg");
        daemon.reconfigure(&format!("[topics]\nupload = \"{filter}\"\n"));
        let out = imaged_reload(&daemon, &["--pid", &pid]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{out:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("topics.upload apply now"), "{stdout}");
        assert!(stdout.contains(&format!("uploads '{filter}'")), "{stdout}");
        // No wait for the log or anything else: once `imaged reload` returned, the new filter takes uploads.
        let image = jpeg(45_000 + round, 3000);
        assert!(broker.mosquitto_pub(&format!("cams{round}/door/jpeg"), &image));
        wait_until(
            "the image on the new filter",
            Duration::from_secs(10),
            || hashes_in(&daemon.images).contains_key(&sha(&image)),
        );
    }

    // The answer waits for the broker's SUBACK: with the broker stopped, `imaged reload` waits too.
    daemon.reconfigure("[topics]\nupload = \"late/+/jpeg\"\n");
    signal(broker.pid(), libc::SIGSTOP);
    let reload = {
        let (config, pid) = (daemon.config.clone(), pid.clone());
        std::thread::spawn(move || {
            Command::new(imaged_bin())
                .args(["--config".as_ref(), config.as_os_str()])
                .args(["reload", "--pid", &pid])
                .env_remove("RUNTIME_DIRECTORY")
                .status()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let waited = !reload.is_finished();
    signal(broker.pid(), libc::SIGCONT);
    assert!(
        waited,
        "imaged reload returned before the broker acknowledged the new filter"
    );
    assert!(reload.join().unwrap().success());
    assert!(daemon.try_wait().is_none(), "imaged runs on");
}

#[test]
fn imaged_reload_exits_1_naming_line_and_key_of_a_broken_file_and_the_daemon_runs_on_the_old_config(
) {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let pid = daemon.pid().to_string();

    let out = imaged_reload(&daemon, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Give --pid PID"),
        "{out:?}"
    );

    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("{config}[topics]\nupload = \"cams/+/jpeg\"\nuplod = 1\n"),
    )
    .unwrap();
    let line = config.lines().count() + 3;
    let out = imaged_reload(&daemon, &["--pid", &pid]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "imaged reload: Reload refused: {}:{line}: topics.uplod: unknown field",
            daemon.config.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("keeps running on the configuration it had"),
        "{stderr}"
    );
    assert!(
        daemon.try_wait().is_none(),
        "a refused reload never ends imaged"
    );
    assert!(broker.mosquitto_pub("image/upload", &jpeg(46_000, 3000)));
    daemon.wait_stored(1, Duration::from_secs(10));

    // Fixed, the next `imaged reload` hears the new reload's answer, not the refusal before it.
    std::fs::write(
        &daemon.config,
        format!("{config}[topics]\nupload = \"cams/+/jpeg\"\n"),
    )
    .unwrap();
    let out = imaged_reload(&daemon, &["--pid", &pid]);
    assert!(out.status.success(), "{out:?}");
    assert!(broker.mosquitto_pub("cams/door/jpeg", &jpeg(46_001, 3000)));
    daemon.wait_stored(2, Duration::from_secs(10));
}
