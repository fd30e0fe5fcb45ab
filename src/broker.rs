//! How imaged and its tools connect to the broker: MQTT options, credentials and TLS from the `[broker]`
//! section, shared by the daemon, `imaged send` and `imaged receive`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::warn;

use crate::config::{Broker, Tls, PASSWORD_CREDENTIAL};

/// A problem with the `[broker]` section found while building the connection: (`section.key`, what).
pub type KeyError = (String, String);

/// How a client uses its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The daemon: a persistent session (the broker queues uploads while imaged is down), manual acks.
    Daemon { inflight: u16 },
    /// `imaged send`: a clean session, up to `inflight` publishes waiting for their PUBACK.
    Sender { inflight: u16 },
    /// `imaged receive`: a clean session unless a client id is asked for.
    Receiver { persistent: bool },
}

/// Builds a client and its event loop for `broker`. `max_packet` bounds packets both ways.
pub fn connect(
    broker: &Broker,
    client_id: &str,
    max_packet: usize,
    role: Role,
) -> Result<(AsyncClient, EventLoop), KeyError> {
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options.set_keep_alive(Duration::from_secs(broker.keep_alive_secs));
    options.set_max_packet_size(max_packet, max_packet);
    match role {
        Role::Daemon { inflight } => {
            options.set_clean_session(false);
            options.set_manual_acks(true);
            options.set_inflight(inflight.max(1));
        }
        Role::Sender { inflight } => {
            options.set_clean_session(true);
            options.set_inflight(inflight.max(1));
        }
        Role::Receiver { persistent } => {
            options.set_clean_session(!persistent);
        }
    }
    if let Some(user) = &broker.username {
        options.set_credentials(user.clone(), password(broker)?.unwrap_or_default());
    }
    if let Some(tls) = broker.tls.as_ref().filter(|t| t.enabled) {
        let config = tls_config(tls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let mut network = eventloop.network_options();
    // Nagle's algorithm alone adds tens of milliseconds to every small image at low load.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(broker.connect_timeout_secs);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// The password: from `password_file`, else from the systemd credential `mqtt-password`
/// (`LoadCredential=mqtt-password:/path` in the unit). Never inline in the config.
pub fn password(broker: &Broker) -> Result<Option<String>, KeyError> {
    let (path, key) = match &broker.password_file {
        Some(path) => (path.clone(), "broker.password_file"),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => (
                PathBuf::from(dir).join(PASSWORD_CREDENTIAL),
                "broker.username",
            ),
            None => return Ok(None),
        },
    };
    if key == "broker.username" && !path.exists() {
        return Ok(None);
    }
    warn_if_others_can_read(&path);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        (
            key.to_string(),
            format!("cannot read the password from {}: {e}", path.display()),
        )
    })?;
    Ok(Some(text.lines().next().unwrap_or("").to_string()))
}

/// Secrets readable by every user on the host deserve a word in the log.
fn warn_if_others_can_read(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            warn!(
                "{} is readable by every user on this host; make it readable by imaged only (chmod 0640 or 0600)",
                path.display()
            );
        }
    }
}

/// The rustls configuration for `[broker.tls]`.
pub fn tls_config(tls: &Tls) -> Result<ClientConfig, KeyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = read_certs(path, "broker.tls.ca_file")?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    (
                        "broker.tls.ca_file".into(),
                        format!(
                            "{} holds a certificate rustls cannot use: {e}",
                            path.display()
                        ),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err((
                    "broker.tls.ca_file".into(),
                    "no CA certificates found on this system (install ca-certificates, or set broker.tls.ca_file)".into(),
                ));
            }
        }
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| {
            (
                "broker.tls.ca_file".to_string(),
                format!("cannot use these CA certificates: {e}"),
            )
        })?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("broker.tls".to_string(), e.to_string()))?;
    let builder = match &tls.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                (
                    "broker.tls.server_name".to_string(),
                    format!("{name:?} is not a valid name"),
                )
            })?;
            // Full verification as usual, only against the configured name instead of the host.
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier {
                    inner: verifier,
                    name,
                }))
        }
        None => builder.with_webpki_verifier(verifier),
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "broker.tls.cert_file")?;
            warn_if_others_can_read(key);
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                (
                    "broker.tls.key_file".to_string(),
                    format!("no usable private key (PEM) in {}: {e}", key.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                (
                    "broker.tls.key_file".to_string(),
                    format!("{} does not fit {}: {e}", key.display(), cert.display()),
                )
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let bytes = std::fs::read(path).map_err(|e| {
        (
            key.to_string(),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err((
            key.to_string(),
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// Verifies the broker's certificate against a configured name rather than the host connected to.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _host: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Says what a TLS failure means for the user, including the cases where rustls' own words mislead.
pub fn describe_tls(e: &rumqttc::TlsError, broker: &str) -> String {
    use rustls::{CertificateError, Error as R};
    let text = e.to_string();
    let rustls_error = match e {
        rumqttc::TlsError::TLS(r) => Some(r.clone()),
        rumqttc::TlsError::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<R>())
            .cloned(),
        _ => None,
    };
    match rustls_error {
        Some(R::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "the certificate of {broker} is not signed by a trusted CA (broker.tls.ca_file)"
        ),
        Some(R::InvalidCertificate(CertificateError::NotValidForName))
        | Some(R::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => format!(
            "the certificate of {broker} is not valid for that name (broker.host, or broker.tls.server_name when connecting by IP)"
        ),
        Some(R::InvalidCertificate(CertificateError::Expired))
        | Some(R::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            format!("the certificate of {broker} has expired")
        }
        Some(R::InvalidCertificate(CertificateError::NotValidYet))
        | Some(R::InvalidCertificate(CertificateError::NotValidYetContext { .. })) => {
            format!("the certificate of {broker} is not valid yet (is this host's clock right?)")
        }
        Some(R::InvalidCertificate(CertificateError::BadEncoding)) if text.contains("UnsupportedCertVersion") => {
            format!("the certificate of {broker} is an X.509 version 1 certificate; TLS needs version 3 (make it with extensions, e.g. openssl x509 -req -extfile)")
        }
        Some(R::AlertReceived(rustls::AlertDescription::CertificateRequired)) => format!(
            "{broker} requires a client certificate (broker.tls.cert_file and broker.tls.key_file)"
        ),
        Some(R::AlertReceived(alert)) => {
            format!("{broker} refused the TLS handshake ({alert:?}): is our client certificate signed by a CA the broker trusts?")
        }
        Some(R::InvalidMessage(_)) => {
            format!("{broker} did not answer with TLS: is it a plain MQTT port? (remove [broker.tls] or use the TLS port)")
        }
        _ if text.contains("UnsupportedCertVersion") => format!(
            "the certificate of {broker} is an X.509 version 1 certificate; TLS needs version 3 (make it with extensions, e.g. openssl x509 -req -extfile)"
        ),
        _ if text.contains("InvalidContentType") || text.contains("corrupt message") => {
            format!("{broker} did not answer with TLS: is it a plain MQTT port? (remove [broker.tls] or use the TLS port)")
        }
        _ => format!("TLS with {broker} failed: {text}"),
    }
}
