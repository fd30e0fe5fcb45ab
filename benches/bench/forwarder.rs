//! The broker floor: a forwarder that subscribes to the upload topic and republishes every image on the
//! stored topic, with no disk. It runs as a child process (the bench binary with `--forwarder PORT`) so that
//! its CPU is measured like imaged's, on one connection with a large in-flight window, current-thread
//! runtime, payloads passed on without a copy (`Bytes`).
//!
//! Two ways to acknowledge uploads: `auto` lets rumqttc acknowledge each upload as it is read (the acks of a
//! batch of reads go out in one write); `manual` acknowledges each one after its republish is queued, one
//! request each, as imaged must (it acknowledges only when the image is durable).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish, QoS};

pub const UPLOAD: &str = "image/upload";
pub const STORED: &str = "image/stored";

pub fn run(port: u16, manual_acks: bool) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(forward(port, manual_acks));
    std::process::ExitCode::SUCCESS
}

async fn forward(port: u16, manual_acks: bool) {
    let mut o = MqttOptions::new(
        format!("bench-forwarder-{:016x}", fastrand::u64(..)),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 << 20, 64 << 20);
    o.set_clean_session(true);
    o.set_inflight(1024);
    o.set_manual_acks(manual_acks);
    let (client, mut el) = AsyncClient::new(o, 4096);
    let mut n = el.network_options();
    n.set_tcp_nodelay(true);
    el.set_network_options(n);
    // What did not fit in rumqttc's request channel yet; tried again after every event.
    let mut to_publish: VecDeque<Publish> = VecDeque::new();
    let mut to_ack: VecDeque<Publish> = VecDeque::new();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.try_subscribe(UPLOAD, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => to_publish.push_back(p),
            Ok(_) => {}
            Err(e) => {
                eprintln!("forwarder: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while let Some(p) = to_publish.front() {
            let sent = client
                .publish_bytes(STORED, QoS::AtLeastOnce, false, p.payload.clone())
                .now_or_never();
            if !matches!(sent, Some(Ok(()))) {
                break;
            }
            let p = to_publish.pop_front().expect("front exists");
            if manual_acks {
                to_ack.push_back(p);
            }
        }
        while let Some(p) = to_ack.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            to_ack.pop_front();
        }
    }
}
