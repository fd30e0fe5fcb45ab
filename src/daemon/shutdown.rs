//! The shutdown signal as a future, so the parts that must stop take it as an argument.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves at the first SIGTERM (systemctl stop) or SIGINT (Ctrl-C).
pub async fn requested() {
    let mut term =
        signal(SignalKind::terminate()).expect("a SIGTERM handler can always be installed");
    let mut int =
        signal(SignalKind::interrupt()).expect("a SIGINT handler can always be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
