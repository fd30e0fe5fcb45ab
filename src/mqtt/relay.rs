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
use tokio::net::tcp;
use tokio::net::unix;
use tokio::net::{TcpStream, UnixListener, UnixStream};

use super::filter::Filter;
use super::splice::Pipe;

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
                Broker::Tcp(s) => relay_spliced(s, local, limit, &failure).await,
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
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
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
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The next connection from imaged's own process.
async fn accept(listener: &UnixListener) -> io::Result<UnixStream> {
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
    local: UnixStream,
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

/// As [`relay`], for a plain TCP connection: the bodies of publishes and everything rumqttc sends are spliced
/// (moved inside the kernel), only the rest passes through imaged.
async fn relay_spliced(
    broker: TcpStream,
    local: UnixStream,
    limit: usize,
    failure: &Mutex<Option<io::Error>>,
) {
    let (from_broker, mut to_broker) = broker.into_split();
    let (mut from_local, mut to_local) = local.into_split();
    let mut filtered = Filter::new(from_broker, limit).splicing();
    let ended = tokio::select! {
        down = down_spliced(&mut filtered, &mut to_local) => down,
        up = up_spliced(&mut from_local, &mut to_broker) => up,
    };
    // Here, not in the caller: the halves still hold both connections open until it is kept.
    if let Err(e) = ended {
        *failure.lock().expect("not poisoned") = Some(e);
    }
}

async fn down_spliced(
    from: &mut Filter<tcp::OwnedReadHalf>,
    to: &mut unix::OwnedWriteHalf,
) -> io::Result<()> {
    let mut pipe = Pipe::new().ok();
    let mut buf = vec![0u8; BUFFER];
    loop {
        if let (Some(p), Some(left)) = (&pipe, from.passing()) {
            match p.carry(from.get_ref().as_ref(), to.as_ref(), left).await {
                Ok(0) => return to.shutdown().await,
                Ok(n) => from.passed(n),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => pipe = None,
                Err(e) => return Err(e),
            }
            continue;
        }
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

async fn up_spliced(
    from: &mut unix::OwnedReadHalf,
    to: &mut tcp::OwnedWriteHalf,
) -> io::Result<()> {
    if let Ok(pipe) = Pipe::new() {
        loop {
            match pipe.carry(from.as_ref(), to.as_ref(), usize::MAX).await {
                Ok(0) => return to.shutdown().await,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Unsupported => break,
                Err(e) => return Err(e),
            }
        }
    }
    pump(from, to).await
}

/// Large enough that a megabyte image crosses in a few reads and writes, not sixteen of each.
const BUFFER: usize = 256 * 1024;

async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::super::filter::tests::publish;
    use super::super::filter::{cut_size, MARKER};
    use super::*;

    #[tokio::test]
    async fn a_spliced_relay_passes_what_both_sides_send_unchanged_and_still_cuts_a_publish_over_the_limit(
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, imaged) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        let (mut broker, _) = accepted.unwrap();
        let (local, mut rumqttc) = UnixStream::pair().unwrap();
        let failure = Mutex::new(None);

        let big = publish(1, "a", 1, &vec![0xAB; 300_000]);
        let ack = vec![0x40, 2, 0, 9];
        let small = publish(1, "c", 3, &[1, 2, 3]);
        let down = [
            big.clone(),
            ack.clone(),
            publish(1, "b", 2, &vec![0xCD; 600_000]),
            small.clone(),
            big.clone(),
        ]
        .concat();
        let up: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();

        let relay = relay_spliced(imaged.unwrap(), local, 500_000, &failure);
        let test = async {
            // rumqttc's side first, while the broker's stays open: either side's end ends the relay.
            let (mut from_broker, mut to_broker) = broker.split();
            let mut got_up = vec![0u8; up.len()];
            let (sent, got) =
                tokio::join!(rumqttc.write_all(&up), from_broker.read_exact(&mut got_up));
            sent.unwrap();
            got.unwrap();
            assert!(
                got_up == up,
                "what rumqttc sent reaches the broker unchanged"
            );

            let mut got_down = Vec::new();
            let (sent, got) = tokio::join!(
                async {
                    to_broker.write_all(&down).await?;
                    to_broker.shutdown().await
                },
                rumqttc.read_to_end(&mut got_down)
            );
            sent.unwrap();
            got.unwrap();
            got_down
        };
        let ((), got) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(relay, test) })
                .await
                .expect("the relay does not hang");

        let head = [big.as_slice(), &ack].concat();
        let tail = [small.as_slice(), &big].concat();
        assert!(got.starts_with(&head) && got.ends_with(&tail));
        let cut = &got[head.len()..got.len() - tail.len()];
        // First byte, one length byte, the topic "b" and packet id 2, then the marker for 600,000 bytes.
        assert_eq!(cut.len(), 7 + MARKER.len() + 8);
        assert_eq!(
            &cut[..7],
            &[0x32, u8::try_from(cut.len() - 2).unwrap(), 0, 1, b'b', 0, 2]
        );
        assert_eq!(cut_size(&cut[7..]), Some(600_000));
        assert!(failure.lock().unwrap().is_none());
    }
}
