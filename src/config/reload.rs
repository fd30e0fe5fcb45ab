//! What a reload (SIGHUP, `systemctl reload imaged`) changes: the keys that apply at once, and those that
//! keep their old values until a restart (they shape the connection, the folders or the memory bounds).
//! And the answer the daemon leaves for `imaged reload`, which sent the signal and waits for it ([`Answer`]).

use std::path::{Path, PathBuf};

use super::{Broker, Config, HomeAssistant, Limits, Log, Retention, Storage, Topics};

/// A new config, measured against the running one.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The config to run with now: the new values of the keys that apply at once, the old ones of the rest.
    pub config: Config,
    /// Keys that changed and apply now.
    pub applied: Vec<&'static str>,
    /// Keys that changed and wait for a restart.
    pub restart: Vec<&'static str>,
}

/// Sorts the keys that differ between `running` and `new` into the two classes. Every key is named here,
/// so that a key added to the config does not compile until it is given its class.
#[expect(
    clippy::too_many_lines,
    reason = "one line per config key: a key added to the config is classified here"
)]
pub fn plan(running: &Config, new: &Config) -> Plan {
    let mut config = running.clone();
    config.path.clone_from(&new.path);
    let mut applied = Vec::new();
    let mut restart = Vec::new();
    macro_rules! key {
        (now $section:ident . $key:ident) => {
            if running.$section.$key != *$key {
                config.$section.$key = $key.clone();
                applied.push(concat!(stringify!($section), ".", stringify!($key)));
            }
        };
        (restart $section:ident . $key:ident) => {
            if running.$section.$key != *$key {
                restart.push(concat!(stringify!($section), ".", stringify!($key)));
            }
        };
    }

    let Config {
        path: _,
        broker,
        topics,
        storage,
        retention,
        limits,
        log,
        homeassistant,
    } = new;
    let Broker {
        host,
        port,
        client_id,
        username,
        password_file,
        keep_alive_secs,
        connect_timeout_secs,
        protocol,
        session_expiry,
        tls,
    } = broker;
    key!(restart broker.host);
    key!(restart broker.port);
    key!(restart broker.client_id);
    key!(restart broker.username);
    key!(restart broker.password_file);
    key!(restart broker.keep_alive_secs);
    key!(restart broker.connect_timeout_secs);
    key!(restart broker.protocol);
    key!(restart broker.session_expiry);
    // TLS is read once, as a whole, when the client is built.
    key!(restart broker.tls);

    let Topics {
        upload,
        stored,
        retain_stored,
        events,
        status,
    } = topics;
    key!(now topics.upload);
    key!(now topics.stored);
    key!(now topics.retain_stored);
    key!(now topics.events);
    // The status topic is the last will's, which is set when the client is built.
    key!(restart topics.status);

    let Storage {
        dir,
        quarantine_dir,
        state_dir,
        max_image_bytes,
        file_mode,
        writers,
        dedup_window,
        path,
        quarantine_max_size,
        accept_base64,
    } = storage;
    key!(restart storage.dir);
    key!(restart storage.quarantine_dir);
    key!(restart storage.state_dir);
    // The MQTT client's packet limit is set when it is built.
    key!(restart storage.max_image_bytes);
    key!(restart storage.file_mode);
    key!(restart storage.writers);
    key!(restart storage.dedup_window);
    key!(now storage.path);
    key!(restart storage.quarantine_max_size);
    // It sets the MQTT client's packet limit, like max_image_bytes.
    key!(restart storage.accept_base64);

    let Retention {
        max_size,
        max_age,
        min_free,
    } = retention;
    key!(now retention.max_size);
    key!(now retention.max_age);
    key!(now retention.min_free);

    let Limits {
        inflight_images,
        inflight_bytes,
    } = limits;
    key!(restart limits.inflight_images);
    key!(restart limits.inflight_bytes);

    let Log { level } = log;
    key!(now log.level);

    // Discovery subscribes to Home Assistant's birth topic and announces on the status topic: a restart.
    let HomeAssistant {
        enabled,
        discovery_prefix,
    } = homeassistant;
    key!(restart homeassistant.enabled);
    key!(restart homeassistant.discovery_prefix);

    Plan {
        config,
        applied,
        restart,
    }
}

/// The outcome of one reload, as the daemon writes it to [`answer_file`] once the reload is done (the new
/// upload filter subscribed) and `imaged reload` reads it: one line, `<pid> <started> applied|refused <log
/// line>`. `started` is when the daemon began to read the file, on the monotonic clock all processes of a
/// boot share, so an answer from a reload that began before the signal was sent is never taken for its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub pid: u32,
    /// Microseconds on CLOCK_MONOTONIC.
    pub started: u64,
    pub applied: bool,
    /// What the daemon logged about it.
    pub line: String,
}

impl Answer {
    pub fn to_line(&self) -> String {
        let outcome = if self.applied { "applied" } else { "refused" };
        // One line, whatever the log line holds.
        let line = self.line.replace('\n', " ");
        format!("{} {} {outcome} {line}\n", self.pid, self.started)
    }

    pub fn parse(text: &str) -> Option<Answer> {
        let mut fields = text.trim_end().splitn(4, ' ');
        let pid = fields.next()?.parse().ok()?;
        let started = fields.next()?.parse().ok()?;
        let applied = match fields.next()? {
            "applied" => true,
            "refused" => false,
            _ => return None,
        };
        Some(Answer {
            pid,
            started,
            applied,
            line: fields.next().unwrap_or_default().to_string(),
        })
    }

    /// Whether this is the answer to a SIGHUP sent to `pid` at `sent` (monotonic microseconds): from that
    /// process, of a reload that began no earlier. A reload that began later read the file as it was when
    /// the signal was sent, or newer, so it answers for it even when another signal started it.
    pub fn answers(&self, pid: u32, sent: u64) -> bool {
        self.pid == pid && self.started >= sent
    }
}

/// Where the daemon leaves its [`Answer`]: in the unit's runtime directory when systemd gives one
/// (`RuntimeDirectory=`, `$RUNTIME_DIRECTORY`; the ExecReload= process is given it too, so it is found
/// whatever the edited file says about the folders), else in the state folder.
pub fn answer_file(runtime_directory: Option<&str>, state_dir: &Path) -> PathBuf {
    match runtime_directory
        .and_then(|dirs| dirs.split(':').next())
        .filter(|d| !d.is_empty())
    {
        Some(dir) => Path::new(dir).join("reload"),
        None => state_dir.join("reload"),
    }
}

/// CLOCK_MONOTONIC in microseconds: the clock [`Answer::started`] is on.
pub fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given; CLOCK_MONOTONIC always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1000;
    secs * 1_000_000 + micros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reads_back_as_written_and_a_torn_or_foreign_line_is_none() {
        let answer = Answer {
            pid: 812,
            started: 5_000_123,
            applied: false,
            line: "Reload refused: /etc/imaged.toml:4: topics.uplod: unknown field\nmore".into(),
        };
        let line = answer.to_line();
        assert_eq!(
            line,
            "812 5000123 refused Reload refused: /etc/imaged.toml:4: topics.uplod: unknown field more\n"
        );
        assert_eq!(
            Answer::parse(&line).map(|a| a.line),
            Some("Reload refused: /etc/imaged.toml:4: topics.uplod: unknown field more".into())
        );
        assert!(Answer::parse(&line).is_some_and(|a| !a.applied && a.pid == 812));
        for bad in [
            "",
            "812",
            "812 5000123",
            "812 x applied ok",
            "812 1 maybe ok",
        ] {
            assert_eq!(Answer::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_a_reload_of_that_process_that_began_at_or_after_the_signal_answers_it() {
        let answer = |pid, started| Answer {
            pid,
            started,
            applied: true,
            line: String::new(),
        };
        let sent = 1_000;
        assert!(answer(7, 1_000).answers(7, sent));
        assert!(
            answer(7, 2_500).answers(7, sent),
            "a later reload read the file as it was"
        );
        assert!(
            !answer(7, 999).answers(7, sent),
            "a reload under way at the signal may have read the file before it was changed"
        );
        assert!(
            !answer(8, 5_000).answers(7, sent),
            "another process, an earlier daemon"
        );
    }

    #[test]
    fn the_answer_is_left_in_the_runtime_directory_when_systemd_gives_one() {
        let state = Path::new("/var/lib/imaged/images/.imaged");
        assert_eq!(
            answer_file(Some("/run/imaged"), state),
            Path::new("/run/imaged/reload")
        );
        assert_eq!(
            answer_file(Some("/run/imaged:/run/other"), state),
            Path::new("/run/imaged/reload")
        );
        assert_eq!(answer_file(None, state), state.join("reload"));
        assert_eq!(answer_file(Some(""), state), state.join("reload"));
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/imaged.toml")).unwrap()
    }

    #[test]
    fn the_same_file_again_changes_nothing() {
        let text = include_str!("../../config/imaged.toml");
        let plan = plan(&parse(text), &parse(text));
        assert!(
            plan.applied.is_empty() && plan.restart.is_empty(),
            "{plan:?}"
        );
        assert_eq!(plan.config, parse(text));
    }

    #[test]
    fn topics_template_retention_and_log_level_apply_at_once() {
        let old = parse("");
        let new = parse(
            "[topics]\nupload = \"cams/+/jpeg\"\nstored = \"cams/stored\"\n\
             [storage]\npath = \"{camera}/%Y/image_%H%M%S.jpg\"\n\
             [retention]\nmax_size = \"1GB\"\nmax_age = \"7d\"\nmin_free = \"1%\"\n[log]\nlevel = \"debug\"\n",
        );
        let plan = plan(&old, &new);
        assert_eq!(
            plan.applied,
            [
                "topics.upload",
                "topics.stored",
                "storage.path",
                "retention.max_size",
                "retention.max_age",
                "retention.min_free",
                "log.level"
            ]
        );
        assert!(plan.restart.is_empty());
        assert_eq!(plan.config, new);
    }

    #[test]
    fn of_the_consumer_keys_retain_and_events_apply_at_once_and_status_home_assistant_and_base64_wait(
    ) {
        let old = parse("");
        let new = parse(
            "[topics]\nretain_stored = true\nevents = \"imaged/events\"\nstatus = \"cams/{client_id}\"\n\
             [storage]\naccept_base64 = true\n[homeassistant]\nenabled = true\ndiscovery_prefix = \"ha\"\n",
        );
        let plan = plan(&old, &new);
        assert_eq!(plan.applied, ["topics.retain_stored", "topics.events"]);
        assert_eq!(
            plan.restart,
            [
                "topics.status",
                "storage.accept_base64",
                "homeassistant.enabled",
                "homeassistant.discovery_prefix"
            ]
        );
        assert_eq!(plan.config.topics.events, "imaged/events");
        assert_eq!(plan.config.topics.status, old.topics.status);
        assert!(!plan.config.storage.accept_base64 && !plan.config.homeassistant.enabled);
    }

    #[test]
    fn keys_that_need_a_restart_are_named_and_keep_their_old_values() {
        let old = parse("");
        let new = parse(
            "[broker]\nhost = \"elsewhere\"\nport = 8883\nprotocol = \"5\"\nsession_expiry = \"1d\"\n[broker.tls]\n\
             [storage]\ndir = \"/srv/images\"\nmax_image_bytes = 1000\nwriters = 2\n\
             [limits]\ninflight_images = 10\n[log]\nlevel = \"warn\"\n",
        );
        let plan = plan(&old, &new);
        assert_eq!(
            plan.restart,
            [
                "broker.host",
                "broker.port",
                "broker.protocol",
                "broker.session_expiry",
                "broker.tls",
                "storage.dir",
                "storage.max_image_bytes",
                "storage.writers",
                "limits.inflight_images"
            ]
        );
        assert_eq!(plan.applied, ["log.level"]);
        let mut expected = old.clone();
        expected.log.level = new.log.level;
        assert_eq!(plan.config, expected);
    }
}
