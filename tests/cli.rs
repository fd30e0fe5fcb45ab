//! The command line: config checking and exit codes.

mod common;

use std::process::Command;

use common::{imaged_bin, scratch};

fn check(config_text: &str) -> (Option<i32>, String) {
    let dir = scratch();
    let path = dir.path().join("imaged.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(imaged_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code(),
        text.replace(&path.display().to_string(), "FILE"),
    )
}

#[test]
fn the_shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/imaged.toml");
    let out = Command::new(imaged_bin())
        .args(["check-config", "--config", shipped])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

#[test]
fn check_config_into_a_reader_that_stopped_reading_ends_quietly_instead_of_panicking() {
    use std::os::unix::process::ExitStatusExt;
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/imaged.toml");
    let mut child = Command::new(imaged_bin())
        .args(["check-config", "--config", shipped])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before imaged has read its config, so its first line meets a pipe nobody reads.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn check_config_names_the_file_line_and_key_and_exits_78() {
    let (code, text) = check("[broker]\nhost = \"x\"\nprot = 8883\n");
    assert_eq!(code, Some(78));
    assert!(
        text.contains("config error: FILE:3: broker.prot: unknown field `prot`"),
        "{text}"
    );

    let (code, text) = check("[storage]\nmax_image_bytes = -5\n");
    assert_eq!(code, Some(78));
    assert!(text.contains("FILE:2: storage.max_image_bytes:"), "{text}");

    let (code, text) = check("[topics]\nupload = \"#\"\n");
    assert_eq!(code, Some(78));
    assert!(text.contains("topics.stored:"), "{text}");
}

#[test]
fn an_unreadable_password_file_is_a_config_error_naming_the_key() {
    let (code, text) = check("[broker]\nusername = \"cam\"\npassword_file = \"/nonexistent/pw\"\n");
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains("broker.password_file: cannot read the password from /nonexistent/pw"),
        "{text}"
    );
}

#[test]
fn the_daemon_exits_78_on_a_broken_config_without_starting() {
    let dir = scratch();
    let path = dir.path().join("imaged.toml");
    std::fs::write(&path, "[storage]\nwriters = 0\n").unwrap();
    let out = Command::new(imaged_bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("storage.writers: must be between 1 and 64")
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let out = Command::new(imaged_bin())
        .args(["check-config", "--config", "/nonexistent/imaged.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/imaged.toml: cannot read the config file"));
}
