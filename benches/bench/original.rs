//! The original: benches/original/mqtt_image_store_and_forward.py (paho-mqtt), at its QoS 0 default or
//! with MQTT_QOS=1. It neither fsyncs nor keeps two images of the same second, so besides its images/s the
//! benchmark counts how many of its files survived.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::payload::Gen;

pub struct Original {
    child: Child,
    pub dir: PathBuf,
}

/// Whether the script and paho-mqtt are there (`make bench` installs paho-mqtt with pip).
pub fn available(python: &str, script: &Path) -> Result<(), String> {
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    let ok = Command::new(python)
        .args(["-c", "import paho.mqtt.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{python} cannot import paho.mqtt (pip install paho-mqtt; make bench does)"
        ))
    }
}

impl Original {
    pub fn start(
        python: &str,
        script: &Path,
        port: u16,
        dir: &Path,
        qos: u8,
    ) -> Result<Original, String> {
        let images = dir.join("stored_images");
        let err = std::fs::File::create(dir.join("original.err")).map_err(|e| e.to_string())?;
        let child = Command::new(python)
            .arg(script)
            .env("MQTT_HOST", "127.0.0.1")
            .env("MQTT_PORT", port.to_string())
            .env("IMAGE_DIR", &images)
            .env("MQTT_QOS", qos.to_string())
            // Its two lines per image go nowhere: the cheapest place for them.
            .stdout(Stdio::null())
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {python} {}: {e}", script.display()))?;
        Ok(Original { child, dir: images })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (files left, files whose content is exactly one of the images sent).
    pub fn survivors(&self, gen: &Gen) -> (u64, u64) {
        let mut files = 0;
        let mut intact = 0;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if !e.file_name().to_string_lossy().ends_with(".jpg") {
                    continue;
                }
                files += 1;
                if std::fs::read(e.path()).is_ok_and(|b| gen.check(&b).is_ok()) {
                    intact += 1;
                }
            }
        }
        (files, intact)
    }
}

impl Drop for Original {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
