//! `imaged receive`: save what imaged republishes, like the original receiver script, but atomically.
//!
//! By default every image replaces `latest_from_server.jpg` by a rename, so a viewer never opens half an
//! image. With `--dir` every image is kept under its own never-replacing name, durably, and acknowledged
//! only once written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use rumqttc::{Event, Incoming, Publish, QoS};

use crate::broker::{self, Role};
use crate::cli::{config_error, ReceiveArgs};
use crate::config::{self, Config};
use crate::send::apply_target;
use crate::session::{describe, events};
use crate::storage::{self, Namer, Persisted};

pub const DEFAULT_OUTPUT: &str = "latest_from_server.jpg";

pub fn run(mut config: Config, args: ReceiveArgs) -> ExitCode {
    apply_target(&mut config, &args.target);
    let topic = args
        .target
        .topic
        .clone()
        .unwrap_or_else(|| config.topics.stored.clone());
    if let Err(why) = config::check_topic_filter(&topic) {
        eprintln!("imaged receive: --topic {topic:?}: {why}");
        return ExitCode::from(2);
    }
    let sink = match &args.dir {
        Some(dir) => match storage::create_dir(dir, 0o750) {
            Ok(()) => Sink::Dir {
                dir: dir.clone(),
                names: Namer::images(),
                mode: config.file_mode(),
            },
            Err(e) => {
                eprintln!("imaged receive: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Sink::Latest(args.output.clone().unwrap_or_else(|| DEFAULT_OUTPUT.into())),
    };
    let persistent = args.client_id.is_some();
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| format!("imaged-receive-{}", fastrand::u64(..)));
    let (client, eventloop) = match broker::connect(
        &config.broker,
        &client_id,
        config.max_packet_bytes(),
        Role::Receiver { persistent },
    ) {
        Ok(pair) => pair,
        Err((key, message)) => return config_error(&config.error(&key, message)),
    };
    let broker_name = format!("{}:{}", config.broker.host, config.broker.port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime starts");
    runtime.block_on(async move {
        let mut events = events(eventloop, config.max_packet_bytes());
        let mut sink = sink;
        let mut received = 0u64;
        let mut ever_connected = false;
        let mut last_problem = None;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                Some((event, retry)) = events.next() => match event {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        ever_connected = true;
                        last_problem = None;
                        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                        if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            eprintln!("imaged receive: the broker {broker_name} refused the subscription to '{topic}' (ACL?)");
                            return ExitCode::FAILURE;
                        }
                        eprintln!("Subscribed to '{topic}' on {broker_name}");
                    }
                    Ok(Event::Incoming(Incoming::Publish(publish))) => {
                        match sink.save(&publish) {
                            Ok(path) => {
                                println!("Received stored image from server: {} ({} bytes)", path.display(), publish.payload.len());
                                received += 1;
                            }
                            // Not acknowledged: with a persistent session the broker sends it again.
                            Err(e) => {
                                eprintln!("imaged receive: {e}");
                                continue;
                            }
                        }
                        let _ = client.try_ack(&publish);
                        if args.count.is_some_and(|n| received >= n) {
                            // Let the acknowledgement go out before leaving.
                            let _ = client.try_disconnect();
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while let Some((event, _)) = events.next().await {
                                    if matches!(event, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) {
                                        break;
                                    }
                                }
                            })
                            .await;
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let problem = describe(&e, &broker_name);
                        if !ever_connected {
                            eprintln!("imaged receive: {problem}");
                            return ExitCode::FAILURE;
                        }
                        if last_problem.as_ref() != Some(&problem) {
                            let retry = retry.map(|d| format!("; retrying in {:.1}s", d.as_secs_f64())).unwrap_or_default();
                            eprintln!("imaged receive: {problem}{retry}");
                            last_problem = Some(problem);
                        }
                    }
                },
            }
        }
        ExitCode::SUCCESS
    })
}

enum Sink {
    Latest(PathBuf),
    Dir {
        dir: PathBuf,
        names: Namer,
        mode: u32,
    },
}

impl Sink {
    fn save(&mut self, publish: &Publish) -> Result<PathBuf, String> {
        match self {
            Sink::Latest(path) => {
                replace_atomically(path, &publish.payload).map_err(|e| e.to_string())?;
                Ok(path.clone())
            }
            Sink::Dir { dir, names, mode } => {
                let mut temp =
                    storage::write_temp(dir, &publish.payload, *mode).map_err(|e| e.to_string())?;
                loop {
                    let name = names.next(chrono::Utc::now());
                    match storage::persist(temp, dir, &name).map_err(|e| e.to_string())? {
                        Persisted::Done => {
                            storage::sync_dir(dir).map_err(|e| e.to_string())?;
                            return Ok(dir.join(name));
                        }
                        Persisted::Taken(t) => temp = t,
                    }
                }
            }
        }
    }
}

/// Writes `path` by a temp file in the same folder and a rename over the old one: a reader sees the old
/// image or the new one, never a mix.
fn replace_atomically(path: &Path, bytes: &[u8]) -> Result<(), storage::PathError> {
    use storage::Context;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = storage::write_temp(dir, bytes, 0o644)?;
    temp.persist(path).map_err(|e| e.error).at("replace", path)
}
