//! `imaged receive`: save what imaged republishes, like the original receiver script, but atomically.
//!
//! By default every image replaces `latest_from_server.jpg` by a rename, so a viewer never opens half an
//! image. With `--dir` every image is kept under its own never-replacing name, durably, and acknowledged
//! only once written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use rumqttc::{Event, Incoming, Publish, QoS, SubAck};

use crate::cli::ReceiveArgs;
use crate::config::{Config, ConfigError};
use crate::exit::Exit;
use crate::layout;
use crate::mqtt::{self, Client, Events, Role};
use crate::storage::{self, Namer, PathError, Persisted};
use crate::topic::check_topic_filter;

pub const DEFAULT_OUTPUT: &str = "latest_from_server.jpg";

/// Why `imaged receive` stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Storage(#[from] PathError),
    /// The broker refused the subscription or could not be reached at all.
    #[error("{0}")]
    Broker(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Config,
            Error::Usage(_) => Exit::Usage,
            Error::Storage(_) | Error::Broker(_) => Exit::Failure,
        }
    }
}

pub fn run(mut config: Config, args: &ReceiveArgs) -> Result<(), Error> {
    args.target.apply(&mut config);
    let topic = args
        .target
        .topic
        .clone()
        .unwrap_or_else(|| config.topics.stored.clone());
    check_topic_filter(&topic).map_err(|why| Error::Usage(format!("--topic {topic:?}: {why}")))?;
    let sink = match &args.dir {
        Some(dir) => {
            storage::create_dir(dir, storage::DIR_MODE)?;
            Sink::Dir {
                dir: dir.clone(),
                names: Namer::new(args.path.clone().unwrap_or_default()),
                filter: topic.clone(),
                mode: config.storage.file_mode.0,
            }
        }
        None => Sink::Latest(args.output.clone().unwrap_or_else(|| DEFAULT_OUTPUT.into())),
    };
    let persistent = args.client_id.is_some();
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| format!("imaged-receive-{}", fastrand::u64(..)));
    let (client, eventloop) = mqtt::connect(
        &config.broker,
        &client_id,
        config.max_packet_bytes(),
        Role::Receiver { persistent },
        None,
    )
    .map_err(|e| config.error(e))?;
    let receiver = Receiver {
        client,
        topic,
        broker: config.broker_name(),
        sink,
        count: args.count,
        received: 0,
        ever_connected: false,
        last_problem: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    runtime.block_on(receiver.run(mqtt::events(eventloop)))
}

/// What `receive` is doing. Only its own task touches it.
struct Receiver {
    client: Client,
    topic: String,
    broker: String,
    sink: Sink,
    /// Stop after this many images.
    count: Option<u64>,
    received: u64,
    ever_connected: bool,
    last_problem: Option<String>,
}

/// What to do after an event.
enum Next {
    Go,
    Done,
}

impl Receiver {
    async fn run(mut self, mut events: Events) -> Result<(), Error> {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                Some((event, retry)) = events.next() => {
                    if let Next::Done = self.event(event, retry)? {
                        break;
                    }
                }
            }
        }
        // Let the last acknowledgement go out before leaving.
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some((event, _)) = events.next().await {
                if matches!(
                    event,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
                ) {
                    break;
                }
            }
        })
        .await;
        Ok(())
    }

    fn event(
        &mut self,
        event: Result<Event, mqtt::ConnectionError>,
        retry: Option<Duration>,
    ) -> Result<Next, Error> {
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                self.ever_connected = true;
                self.last_problem = None;
                let _ = self
                    .client
                    .try_subscribe(self.topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => self.subscribed(&ack)?,
            Ok(Event::Incoming(Incoming::Publish(publish))) => return Ok(self.received(&publish)),
            Ok(_) => {}
            Err(e) => {
                let problem = mqtt::describe(&e, &self.broker);
                if !self.ever_connected {
                    return Err(Error::Broker(problem));
                }
                if self.last_problem.as_ref() != Some(&problem) {
                    let retry = retry
                        .map(|d| format!("; retrying in {:.1}s", d.as_secs_f64()))
                        .unwrap_or_default();
                    eprintln!("imaged receive: {problem}{retry}");
                    self.last_problem = Some(problem);
                }
            }
        }
        Ok(Next::Go)
    }

    fn subscribed(&self, ack: &SubAck) -> Result<(), Error> {
        if ack
            .return_codes
            .iter()
            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
        {
            return Err(Error::Broker(format!(
                "the broker {} refused the subscription to '{}' (ACL?)",
                self.broker, self.topic
            )));
        }
        eprintln!("Subscribed to '{}' on {}", self.topic, self.broker);
        Ok(())
    }

    fn received(&mut self, publish: &Publish) -> Next {
        match self.sink.save(publish) {
            Ok(path) => {
                println!(
                    "Received stored image from server: {} ({} bytes)",
                    path.display(),
                    publish.payload.len()
                );
                self.received += 1;
            }
            // Not acknowledged: with a persistent session the broker sends it again.
            Err(e) => {
                eprintln!("imaged receive: {e}");
                return Next::Go;
            }
        }
        let _ = self.client.try_ack(publish.pkid, publish.qos);
        if self.count.is_some_and(|n| self.received >= n) {
            Next::Done
        } else {
            Next::Go
        }
    }
}

/// Where received images go.
enum Sink {
    /// One file, replaced by each new image.
    Latest(PathBuf),
    /// Every image under its own name; `filter`'s wildcards name the camera folder.
    Dir {
        dir: PathBuf,
        names: Namer,
        filter: String,
        mode: u32,
    },
}

impl Sink {
    fn save(&mut self, publish: &Publish) -> Result<PathBuf, PathError> {
        match self {
            Sink::Latest(path) => {
                replace_atomically(path, &publish.payload)?;
                Ok(path.clone())
            }
            Sink::Dir {
                dir,
                names,
                filter,
                mode,
            } => {
                let camera = layout::stored_camera(filter, &publish.topic);
                let mut temp = storage::write_image(dir, &publish.payload, *mode, &|| {})?;
                loop {
                    let name = names.next(chrono::Utc::now(), &camera);
                    let folder = dir.join(&name).parent().unwrap_or(dir).to_path_buf();
                    storage::create_dir(&folder, storage::DIR_MODE)?;
                    match storage::persist(temp, dir, &name)? {
                        Persisted::Done => {
                            storage::sync_dir(&folder)?;
                            return Ok(dir.join(name));
                        }
                        Persisted::Taken(t) | Persisted::NoFolder(t) => temp = t,
                    }
                }
            }
        }
    }
}

/// Writes `path` by a temp file in the same folder and a rename over the old one: a reader sees the old
/// image or the new one, never a mix.
fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<(), PathError> {
    use storage::Context;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = storage::write_temp(dir, bytes, 0o644)?;
    temp.persist(path).map_err(|e| e.error).at("replace", path)
}
