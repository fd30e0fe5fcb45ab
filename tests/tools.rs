//! `imaged send` and `imaged receive` against real Mosquitto brokers, a running imaged, and the original's
//! own tools (mosquitto_pub, mosquitto_sub).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn imaged(args: &[&str]) -> Command {
    let mut cmd = Command::new(imaged_bin());
    // No /etc/imaged.toml of the host may leak into a test.
    cmd.args(["--config", "/dev/null"])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn send(port: u16, files: &[&Path], extra: &[&str]) -> Output {
    let port = port.to_string();
    let mut cmd = imaged(&["send", "--host", "127.0.0.1", "--port", &port]);
    cmd.args(extra).args(files);
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn send_publishes_a_file_that_a_running_imaged_stores() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample.jpg");
    let out = send(broker.port, &[&sample], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!(
        "Image sent: {} (2776 bytes) on topic 'image/upload'",
        sample.display()
    )));
    daemon.wait_stored(1, Duration::from_secs(10));
    assert_eq!(
        daemon.stored().values().next().unwrap(),
        &std::fs::read(&sample).unwrap()
    );
}

#[test]
fn a_folder_of_1000_images_goes_through_send_into_imaged_and_all_are_stored() {
    let broker = Broker::start();
    let observer = Observer::start(broker.port, "image/stored");
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let folder = scratch();
    let mut hashes = std::collections::HashSet::new();
    for i in 0..1000u64 {
        let image = jpeg(50_000 + i, 1000 + (i % 7) as usize * 500);
        hashes.insert(sha(&image));
        std::fs::write(folder.path().join(format!("cam-{i:04}.jpg")), image).unwrap();
    }
    let out = send(broker.port, &[folder.path()], &["--window", "64"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("sent 1000 images, "), "{}", text(&out));
    daemon.wait_stored(1000, Duration::from_secs(60));
    observer.wait_for(1000, Duration::from_secs(60));
    let stored = hashes_in(&daemon.images);
    assert_eq!(
        stored
            .keys()
            .copied()
            .collect::<std::collections::HashSet<_>>(),
        hashes
    );
    assert!(stored.values().all(|&n| n == 1));
}

#[test]
fn send_names_each_bad_file_sends_the_others_and_fails_the_exit_code() {
    let broker = Broker::start();
    let dir = scratch();
    let good = dir.path().join("good.jpg");
    std::fs::write(&good, jpeg(1, 4000)).unwrap();
    let text_file = dir.path().join("notes.txt");
    std::fs::write(&text_file, "not an image").unwrap();
    let big = dir.path().join("big.jpg");
    std::fs::write(&big, jpeg(2, 40_000_000)).unwrap();
    let missing = dir.path().join("missing.jpg");
    let out = send(broker.port, &[&missing, &text_file, &big, &good], &[]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("cannot read {}", missing.display())),
        "{t}"
    );
    assert!(t.contains("notes.txt: not a JPEG"), "{t}");
    assert!(
        t.contains("big.jpg is 40000000 bytes, over the limit of 33554432"),
        "{t}"
    );
    assert!(t.contains("sent 1 images"), "{t}");
}

#[test]
fn send_to_an_unreachable_broker_fails_clearly_and_quickly() {
    let port = free_port();
    let dir = scratch();
    let file = dir.path().join("a.jpg");
    std::fs::write(&file, jpeg(3, 1000)).unwrap();
    let start = Instant::now();
    let out = send(port, &[&file], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        text(&out).contains("is the broker running?"),
        "{}",
        text(&out)
    );
}

#[test]
fn send_with_an_interval_repeats_like_a_periodic_camera() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let dir = scratch();
    let file = dir.path().join("cam.jpg");
    std::fs::write(&file, jpeg(4, 2000)).unwrap();
    let out = send(
        broker.port,
        &[&file],
        &["--interval", "0.2", "--repeat", "3"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("Image sent:").count(), 3);
    // The same bytes three times: stored once, the repeats are duplicates.
    wait_until("three uploads are settled", Duration::from_secs(10), || {
        daemon.log_count("Image saved:") + daemon.log_count("not stored again") == 3
    });
    assert_eq!(daemon.stored_count(), 1);
}

#[test]
fn send_watch_sends_each_new_complete_jpeg_once() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let dir = scratch();
    std::fs::write(dir.path().join("before.jpg"), jpeg(5, 1000)).unwrap();
    let port = broker.port.to_string();
    let child = imaged(&["send", "--host", "127.0.0.1", "--port", &port, "--watch"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let images: Vec<Vec<u8>> = (0..3).map(|i| jpeg(600 + i, 3000)).collect();
    for (i, image) in images.iter().enumerate() {
        // Written in two steps, like a slow camera: only the complete file may go out.
        let path = dir.path().join(format!("shot-{i}.jpg"));
        std::fs::write(&path, &image[..1000]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(&path, image).unwrap();
    }
    daemon.wait_stored(3, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(1));
    signal(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stored = hashes_in(&daemon.images);
    assert_eq!(
        stored.len(),
        3,
        "the file present before the watch started is not new"
    );
    for image in &images {
        assert_eq!(
            stored.get(&sha(image)),
            Some(&1),
            "each new file whole, once"
        );
    }
}

#[test]
fn images_from_send_arrive_byte_identical_at_mosquitto_sub() {
    let broker = Broker::start();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "image/upload",
            "-q",
            "1",
            "-C",
            "1",
            "-N",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let dir = scratch();
    let file = dir.path().join("x.jpg");
    let image = jpeg(7, 300_000);
    std::fs::write(&file, &image).unwrap();
    assert!(send(broker.port, &[&file], &[]).status.success());
    let out = sub.wait_with_output().unwrap();
    assert_eq!(out.stdout, image);
}

#[test]
fn receive_keeps_the_latest_image_that_imaged_republished_and_exits_after_count() {
    let broker = Broker::start();
    let mut daemon = Daemon::start(&broker);
    daemon.wait_ready();
    let dir = scratch();
    let output = dir.path().join("latest_from_server.jpg");
    let port = broker.port.to_string();
    let receiver = imaged(&[
        "receive",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--count",
        "2",
        "--output",
    ])
    .arg(&output)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let first = jpeg(8, 5000);
    let second = jpeg(9, 6000);
    assert!(broker.mosquitto_pub("image/upload", &first));
    std::thread::sleep(Duration::from_millis(300));
    assert!(broker.mosquitto_pub("image/upload", &second));
    let out = receiver.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out)
            .matches("Received stored image from server:")
            .count(),
        2,
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read(&output).unwrap(), second);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temp file left: {leftovers:?}");
}

#[test]
fn receive_with_a_dir_keeps_every_image_under_its_own_name() {
    let broker = Broker::start();
    let dir = scratch();
    let port = broker.port.to_string();
    let receiver = imaged(&[
        "receive",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--count",
        "5",
        "--dir",
    ])
    .arg(dir.path().join("got"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let images: Vec<Vec<u8>> = (0..5).map(|i| jpeg(700 + i, 2000)).collect();
    for image in &images {
        assert!(broker.mosquitto_pub("image/stored", image));
    }
    let out = receiver.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let got = hashes_in(&dir.path().join("got"));
    assert_eq!(got.len(), 5);
    for image in &images {
        assert_eq!(got.get(&sha(image)), Some(&1));
    }
}

#[test]
fn receive_with_a_dir_and_a_path_keeps_the_folder_layout_of_each_camera() {
    let broker = Broker::start();
    let dir = scratch();
    let port = broker.port.to_string();
    let receiver = imaged(&[
        "receive",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--topic",
        "image/stored/+",
        "--count",
        "6",
        "--path",
        "{camera}/%Y-%m-%d/image_%Y%m%d-%H%M%S.jpg",
        "--dir",
    ])
    .arg(dir.path().join("got"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let images: Vec<Vec<u8>> = (0..6).map(|i| jpeg(750 + i, 2000)).collect();
    for (i, image) in images.iter().enumerate() {
        let topic = format!("image/stored/cam{}", i % 3 + 1);
        assert!(broker.mosquitto_pub(&topic, image));
    }
    let out = receiver.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let got = stored_in(&dir.path().join("got"));
    assert_eq!(got.len(), 6, "{:?}", got.keys());
    for (name, bytes) in &got {
        let i = images
            .iter()
            .position(|im| im == bytes)
            .expect("a sent image");
        let parts: Vec<&str> = name.split('/').collect();
        assert_eq!(parts.len(), 3, "camera/date/file: {name}");
        assert_eq!(parts[0], format!("cam{}", i % 3 + 1), "{name}");
        assert_eq!(parts[1].len(), "2026-12-01".len(), "{name}");
        assert!(parts[2].starts_with("image_"), "{name}");
    }
}

#[test]
fn every_tool_warns_about_a_password_file_every_user_can_read_and_log_level_quiets_it() {
    use std::os::unix::fs::PermissionsExt;
    let broker = Broker::start();
    let dir = scratch();
    let password = dir.path().join("password");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("imaged.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nhost = \"127.0.0.1\"\nport = {}\nusername = \"cam\"\npassword_file = \"{}\"\n",
            broker.port,
            password.display()
        ),
    )
    .unwrap();
    let image = dir.path().join("a.jpg");
    std::fs::write(&image, jpeg(7, 2000)).unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(imaged_bin())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        text(&out)
    };
    let warning = "is readable by every user on this host";
    let image_arg = image.to_str().unwrap();
    for args in [
        vec!["send", image_arg],
        vec!["check-config"],
        vec!["receive", "--count", "1", "--topic", "nothing/comes/here"],
    ] {
        // receive would wait for an image: it gets a moment to log, then the test moves on.
        let out = if args[0] == "receive" {
            let mut child = Command::new(imaged_bin())
                .arg("--config")
                .arg(&config)
                .args(&args)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            let _ = child.kill();
            text(&child.wait_with_output().unwrap())
        } else {
            run(&args, &[])
        };
        assert!(out.contains(warning), "imaged {args:?}:\n{out}");
    }
    assert!(!run(&["--log-level", "error", "send", image_arg], &[]).contains(warning));
    assert!(!run(&["send", image_arg], &[("RUST_LOG", "error")]).contains(warning));
}
