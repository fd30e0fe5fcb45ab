//! The relay under an MQTT 3.1.1 client: rumqttc connects to a socket of imaged's own, and the relay joins it
//! to a TCP (or TLS) connection to the broker, with the [`Filter`] on what the broker sends. rumqttc cannot
//! skip a packet over its limit (it fails the connection, and after the reconnect the broker sends the same
//! publish again), and it takes its network only from a connect it makes itself, so the filter has to sit in
//! a socket it connects to.
//!
//! The socket is in Linux's abstract namespace (no file) and takes only connections from imaged's own
//! process. The connection to the broker is made before rumqttc connects to the relay, so a broker that
//! cannot be reached fails with the same errors, in the same words, as without the relay.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{ConnectionError, TlsError};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;

use super::filter::Filter;

/// Where the broker is, and how the relay reaches it.
pub struct Relay {
    /// The abstract socket name rumqttc connects to, with its leading NUL.
    pub name: String,
    host: String,
    port: u16,
    tls: Option<Arc<ClientConfig>>,
    /// Publishes with a remaining length over this are cut.
    limit: usize,
    timeout: Duration,
    listener: Option<Arc<UnixListener>>,
    /// What ended the last connection to the broker, if it failed (set by the relay's task).
    failure: Arc<Mutex<Option<io::Error>>>,
}

impl Relay {
    pub fn new(
        host: String,
        port: u16,
        tls: Option<Arc<ClientConfig>>,
        limit: usize,
        timeout: Duration,
    ) -> Relay {
        Relay {
            name: format!("\0imaged-{}-{:016x}", std::process::id(), fastrand::u64(..)),
            host,
            port,
            tls,
            limit,
            timeout,
            listener: None,
            failure: Arc::default(),
        }
    }

    /// Connects to the broker, and leaves the connection for rumqttc's next connect to the relay.
    pub async fn open(&mut self) -> Result<(), ConnectionError> {
        let listener = match &self.listener {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(UnixListener::bind(&self.name)?);
                self.listener = Some(l.clone());
                l
            }
        };
        *self.failure.lock().expect("not poisoned") = None;
        let broker = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| ConnectionError::NetworkTimeout)??;
        let (limit, timeout, failure) = (self.limit, self.timeout, self.failure.clone());
        tokio::spawn(async move {
            let Ok(Ok(local)) = tokio::time::timeout(timeout, accept(&listener)).await else {
                return;
            };
            match broker {
                Broker::Tcp(s) => relay(s, local, limit, &failure).await,
                Broker::Tls(s) => relay(*s, local, limit, &failure).await,
            }
        });
        Ok(())
    }

    /// What ended the last connection to the broker, when the broker's side failed: the error to report
    /// instead of rumqttc's, which saw only the relay close.
    pub fn failure(&self) -> Option<io::Error> {
        self.failure.lock().expect("not poisoned").take()
    }

    async fn connect(&self) -> Result<Broker, ConnectionError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        // Nagle's algorithm alone adds tens of milliseconds to every small image at low load.
        tcp.set_nodelay(true)?;
        let Some(config) = &self.tls else {
            return Ok(Broker::Tcp(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| ConnectionError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // As rumqttc's own TLS connect reports a failed handshake.
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectionError::Tls(TlsError::Io(e)))?;
        Ok(Broker::Tls(Box::new(tls)))
    }
}

enum Broker {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// The next connection from imaged's own process.
async fn accept(listener: &UnixListener) -> io::Result<tokio::net::UnixStream> {
    let me = i32::try_from(std::process::id()).ok();
    loop {
        let (stream, _) = listener.accept().await?;
        if stream.peer_cred()?.pid() == me {
            return Ok(stream);
        }
    }
}

/// Copies both ways until one side ends; the broker's side through the filter. An error ends it too, and is
/// kept in `failure` before rumqttc's side closes, so the poller finds it when rumqttc reports the close.
async fn relay<B: AsyncRead + AsyncWrite + Unpin>(
    broker: B,
    local: tokio::net::UnixStream,
    limit: usize,
    failure: &Mutex<Option<io::Error>>,
) {
    let (from_broker, mut to_broker) = tokio::io::split(broker);
    let (mut from_local, mut to_local) = local.into_split();
    let mut filtered = Filter::new(from_broker, limit);
    let ended = tokio::select! {
        down = pump(&mut filtered, &mut to_local) => down,
        up = pump(&mut from_local, &mut to_broker) => up,
    };
    if let Err(e) = ended {
        *failure.lock().expect("not poisoned") = Some(e);
    }
    // Whichever way ended ends both: the halves close both connections as they go.
}

async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> io::Result<()> {
    // Large enough that a megabyte image crosses in a few reads and writes, not sixteen of each.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
