//! MQTT client code shared by the daemon and the tools: one client for MQTT 3.1.1 and 5, how it connects
//! (options, credentials, TLS),
//! the event loop as a stream that backs off, the publish window, connection errors in words, and what a
//! local Mosquitto's configuration will do to imaged's images.

mod client;
mod credentials;
mod describe;
mod filter;
mod local_broker;
mod options;
mod poller;
mod relay;
mod splice;
mod tls;
mod window;

pub use client::{Client, ConnectionError, EventLoop, Properties};
pub use describe::describe;
pub use filter::cut_size;
pub use local_broker::local_broker_warnings;
pub use options::{connect, packet_id_space, window, Role, Will, MAX_WINDOW};
pub use poller::{after_failure, events, events_holding, Events, Holding, Polled};
pub use window::{Numbered, PublishWindow};
