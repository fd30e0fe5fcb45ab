//! `imaged reload`: the unit's ExecReload=. Sends SIGHUP to the daemon and waits until it has applied the
//! file, or refused it, and says which: systemd before 253 ends the reload job when this process exits, so
//! `systemctl reload imaged` returns only once the reload is done, and fails when the file was refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::ReloadArgs;
use crate::config::reload::{answer_file, monotonic_usec, Answer};
use crate::config::{Config, Storage};
use crate::exit::Exit;

/// How long to wait for the daemon's answer: less than the unit's TimeoutStartSec=30s, which bounds
/// ExecReload= too, so that the error is this one and not systemd's kill.
const ANSWER_WAIT: Duration = Duration::from_secs(25);

/// Why `imaged reload` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "which imaged to reload? Give --pid PID (systemd sets MAINPID for ExecReload=, the default)"
    )]
    NoPid,
    #[error("'{0}' is not a process id")]
    BadPid(String),
    #[error("cannot signal imaged (process {pid}): {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("imaged (process {pid}) ended before it answered; see its log")]
    Ended { pid: u32 },
    #[error(
        "imaged (process {pid}) did not answer within {}s in {}; see its log",
        ANSWER_WAIT.as_secs(),
        file.display()
    )]
    NoAnswer { pid: u32, file: PathBuf },
    /// The daemon read the file and keeps running on the configuration it had.
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::NoPid | Error::BadPid(_) => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

/// `config`: the file the daemon runs with, for its state folder when systemd gives no runtime directory.
pub fn run(config: &Path, args: &ReloadArgs) -> Result<(), Error> {
    let pid = match (args.pid, std::env::var("MAINPID")) {
        (Some(pid), _) => pid,
        (None, Ok(main)) => main.trim().parse().map_err(|_| Error::BadPid(main))?,
        (None, Err(_)) => return Err(Error::NoPid),
    };
    // kill(0, …) would signal this process's whole group.
    let target = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Error::BadPid(pid.to_string()))?;
    let file = answer_file(
        std::env::var("RUNTIME_DIRECTORY").ok().as_deref(),
        &state_dir(config),
    );
    let sent = monotonic_usec();
    // SAFETY: kill only sends a signal.
    if unsafe { libc::kill(target, libc::SIGHUP) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(Error::Signal { pid, source });
    }
    let started = Instant::now();
    loop {
        let answer = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| Answer::parse(&text))
            .filter(|a| a.answers(pid, sent));
        if let Some(answer) = answer {
            return if answer.applied {
                println!("{}", answer.line);
                Ok(())
            } else {
                Err(Error::Refused(answer.line))
            };
        }
        // SAFETY: signal 0 only asks whether the process is there.
        if unsafe { libc::kill(target, 0) } != 0 {
            return Err(Error::Ended { pid });
        }
        if started.elapsed() > ANSWER_WAIT {
            return Err(Error::NoAnswer { pid, file });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The state folder `config` names. A broken file (the very case to report) still names it: then only
/// `storage.dir` and `storage.state_dir` are read from it.
fn state_dir(config: &Path) -> PathBuf {
    if let Ok(config) = Config::load(config) {
        return config.state_dir();
    }
    let text = std::fs::read_to_string(config).unwrap_or_default();
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    let storage = table.get("storage").and_then(toml::Value::as_table);
    let key = |name| {
        storage
            .and_then(|s| s.get(name))
            .and_then(toml::Value::as_str)
    };
    let mut config = Config::default();
    config.storage = Storage {
        dir: key("dir").map_or(config.storage.dir, PathBuf::from),
        state_dir: key("state_dir").map(PathBuf::from),
        ..config.storage
    };
    config.state_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_file_still_names_its_state_folder() {
        let scratch = tempfile::tempdir().unwrap();
        let file = scratch.path().join("imaged.toml");
        std::fs::write(&file, "[storage]\ndir = \"/srv/cams\"\nuplod = 1\n").unwrap();
        assert_eq!(state_dir(&file), Path::new("/srv/cams/.imaged"));
        std::fs::write(&file, "[storage]\nstate_dir = \"/srv/state\"\n[topics\n").unwrap();
        assert_eq!(
            state_dir(&file),
            Path::new("/var/lib/imaged/images/.imaged"),
            "not even TOML: the defaults"
        );
        std::fs::write(
            &file,
            "[storage]\nstate_dir = \"/srv/state\"\nwriters = 0\n",
        )
        .unwrap();
        assert_eq!(state_dir(&file), Path::new("/srv/state"));
    }
}
