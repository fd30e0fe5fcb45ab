//! imaged: an MQTT store-and-forward daemon for camera images.
//!
//! Cameras publish JPEG bytes on the upload topic. imaged writes each image atomically and durably to disk
//! and republishes it on the stored topic; the upload is acknowledged to the broker only once its file is
//! durable and its republish is either confirmed or recorded in the on-disk outbox.
//!
//! # Data flow
//!
//! ```text
//!  broker ──PUBLISH──▶ daemon::session ──Upload──▶ daemon::pipeline: writers (hash, unnamed file, fsync)
//!    ▲                   │  ▲                           │
//!    │                   │  └──Settled──────────────────┤ committer: dedup, index fsync, link, dir fsync
//!    └──PUBACK───────────┘  └──Republish────────────────┘        (in arrival order, one group at a time)
//!    └──PUBLISH image/stored ◀─ session ──PUBACK──▶ committer: outbox entry done (daemon::index)
//!    └──PUBLISH event, status, stats, discovery ◀─ session (daemon::consumers, daemon::status)
//! ```
//!
//! # Modules
//!
//! The parts, each a folder:
//! * [`daemon`]: the service. `session` owns the broker connection; `pipeline` writes and settles uploads
//!   (writer threads and one committer); `index` is the append-only log that is both the dedup index and
//!   the outbox of republishes and image events; `consumers` decides what is published per stored image
//!   (its per-camera topic, retain, the event); `status` is online/offline, the last will, the stats and
//!   the cameras seen, and `homeassistant` their discovery messages; `retention` is the thread that deletes
//!   the oldest images; `health` and `systemd` are signs of life, counters, READY, STATUS and the watchdog;
//!   `reload` reads the config again at SIGHUP and hands each part what changed; `shutdown` is the stop
//!   signal.
//! * [`mqtt`]: client code shared by the daemon and the tools: one client for MQTT 3.1.1 and 5 (MQTT 5's
//!   events read as 3.1.1's; 3.1.1 through a relay that drops an oversized publish unread), connect
//!   options, credentials, TLS, the event
//!   loop as a backing-off stream, the [`mqtt::PublishWindow`], connection errors in words, and the check of
//!   a local Mosquitto's settings.
//! * [`tools`]: `imaged send`, `imaged receive`, `imaged check-config`, `imaged prune`, `imaged reload`
//!   (SIGHUP, then the daemon's answer) and `generate-assets`.
//!
//! Shared by all of them, at the top:
//! * [`config`]: the TOML file, its defaults and its validation; errors name the file and `section.key`;
//!   which keys a reload applies at once, and the answer the daemon leaves for `imaged reload`
//!   ([`config::reload`]).
//! * [`storage`]: names, the JPEG check, the atomic never-replacing durable write, free space; errors name
//!   the path. [`layout`]: where an image goes.
//! * [`retention`]: the catalog of stored images, the policy, and the pass that deletes the oldest (the
//!   daemon's thread and `imaged prune` both run it). [`clock`]: the time images are stamped and judged by.
//! * [`topic`]: MQTT topic rules. [`backoff`]: retry delays. [`logging`]: where log lines go, and how many.
//! * [`cli`]: the command line's definition; [`exit`]: the exit codes. `main` dispatches and maps each
//!   command's error to its exit code.
//!
//! Imports go one way: `cli` and the tools use `config`; the daemon and the tools use `mqtt`, `storage` and
//! `retention`; nothing at the top uses a part (`imaged prune` is handed the daemon's reader of its outbox by
//! `main`, so the tools do not use the daemon either).

mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod layout;
pub mod logging;
pub mod mqtt;
pub mod retention;
mod storage;
pub mod tools;
mod topic;
