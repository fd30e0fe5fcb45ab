//! imaged: an MQTT store-and-forward daemon for camera images.
//!
//! Cameras publish JPEG bytes on the upload topic. imaged writes each image atomically and durably to disk
//! and republishes it on the stored topic; the upload is acknowledged to the broker only once its file is
//! durable and its republish is either confirmed or recorded in the on-disk outbox.
//!
//! # Data flow
//!
//! ```text
//!  broker ──PUBLISH──▶ session ──Upload──▶ pipeline: writers (hash, temp file, fsync)
//!    ▲                   │  ▲                   │
//!    │                   │  └──Settled──────────┤ committer: dedup, index fsync, rename, dir fsync
//!    └──PUBACK───────────┘  └──Republish────────┘        (in arrival order, one group at a time)
//!    └──PUBLISH image/stored ◀─ session ──PUBACK──▶ committer: outbox entry done
//! ```
//!
//! # Modules
//!
//! * [`config`]: the TOML file, its defaults and validation; errors name the file and `section.key`.
//! * [`storage`]: names, the JPEG check, the atomic never-replacing durable write.
//! * [`index`]: the append-only log that is both the dedup index and the republish outbox.
//! * [`pipeline`]: writer threads and the committer that settles uploads in order.
//! * [`session`]: the MQTT connection: reconnects, acks per connection, republishes.
//! * [`broker`]: MQTT options, credentials and TLS shared by the daemon and the tools.
//! * [`health`]: signs of life and counters; [`systemd`]: READY, STATUS, WATCHDOG, STOPPING.
//! * [`backoff`], [`shutdown`], [`logging`]: retry delays, the stop signal, where log lines go.
//! * [`daemon`], [`send`], [`receive`], [`check_config`], [`assets`]: one file per subcommand, and
//!   [`cli`], which parses the command line and dispatches.

pub mod assets;
pub mod backoff;
pub mod broker;
pub mod check_config;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod health;
pub mod index;
pub mod logging;
pub mod pipeline;
pub mod receive;
pub mod send;
pub mod session;
pub mod shutdown;
pub mod storage;
pub mod systemd;
