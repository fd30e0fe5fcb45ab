//! The broker password: from a file or a systemd credential, never inline in the config.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::{Broker, KeyError, PASSWORD_CREDENTIAL};

/// The password: from `password_file`, else from the systemd credential `mqtt-password`
/// (`LoadCredential=mqtt-password:/path` in the unit). Never inline in the config.
pub fn password(broker: &Broker) -> Result<Option<String>, KeyError> {
    let (path, key) = match &broker.password_file {
        Some(path) => (path.clone(), "broker.password_file"),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => (
                PathBuf::from(dir).join(PASSWORD_CREDENTIAL),
                "broker.username",
            ),
            None => return Ok(None),
        },
    };
    if key == "broker.username" && !path.exists() {
        return Ok(None);
    }
    warn_if_others_can_read(&path);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        KeyError::new(
            key,
            format!("cannot read the password from {}: {e}", path.display()),
        )
    })?;
    Ok(Some(text.lines().next().unwrap_or("").to_string()))
}

/// Secrets readable by every user on the host deserve a word in the log.
pub(super) fn warn_if_others_can_read(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            warn!(
                "{} is readable by every user on this host; make it readable by imaged only (chmod 0640 or 0600)",
                path.display()
            );
        }
    }
}
