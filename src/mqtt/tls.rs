//! TLS to the broker with rustls: the client configuration from `[broker.tls]`, and what a TLS failure means
//! in words a user can act on.

use std::path::Path;
use std::sync::Arc;

use rumqttc::{ConnectionError, StateError, TlsError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::credentials::warn_if_others_can_read;
use crate::config::{KeyError, Tls};

/// The rustls configuration for `[broker.tls]`.
pub fn tls_config(tls: &Tls) -> Result<ClientConfig, KeyError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(tls)?), provider.clone())
            .build()
            .map_err(|e| {
                KeyError::new(
                    "broker.tls.ca_file",
                    format!("cannot use these CA certificates: {e}"),
                )
            })?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KeyError::new("broker.tls", e.to_string()))?;
    let builder = match &tls.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                KeyError::new(
                    "broker.tls.server_name",
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
            let (chain, key_der) = client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| identity_error(&e, cert, key))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The CAs to trust: `ca_file`, else the system's.
fn roots(tls: &Tls) -> Result<RootCertStore, KeyError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_certs(path, "broker.tls.ca_file")? {
                roots.add(cert).map_err(|e| {
                    KeyError::new(
                        "broker.tls.ca_file",
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
                return Err(KeyError::new(
                    "broker.tls.ca_file",
                    "no CA certificates found on this system (install ca-certificates, or set broker.tls.ca_file)",
                ));
            }
        }
    }
    Ok(roots)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate chain and its key, for mutual TLS.
fn client_identity(cert: &Path, key: &Path) -> Result<Identity, KeyError> {
    let chain = read_certs(cert, "broker.tls.cert_file")?;
    warn_if_others_can_read(key);
    let pem = std::fs::read(key).map_err(|e| {
        KeyError::new(
            "broker.tls.key_file",
            format!("cannot read {}: {e}", key.display()),
        )
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        KeyError::new(
            "broker.tls.key_file",
            format!(
                "{} holds no private key in PEM (PKCS#8, RSA or EC)",
                key.display()
            ),
        )
    })?;
    Ok((chain, key_der))
}

/// Why rustls refused the certificate and key pair, naming the file to fix.
fn identity_error(e: &rustls::Error, cert: &Path, key: &Path) -> KeyError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => KeyError::new(
            "broker.tls.key_file",
            format!(
                "{} is not the private key of the certificate in {}",
                key.display(),
                cert.display()
            ),
        ),
        // rustls checks the pair by parsing the certificate, and names a bad one a "peer" certificate.
        e if e.to_string().contains("UnsupportedCertVersion") => KeyError::new(
            "broker.tls.cert_file",
            format!(
                "{} is an X.509 version 1 certificate; {V1_HINT}",
                cert.display()
            ),
        ),
        e => KeyError::new(
            "broker.tls.cert_file",
            format!(
                "{} with the key {} cannot be used: {e}",
                cert.display(),
                key.display()
            ),
        ),
    }
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let bytes = std::fs::read(path)
        .map_err(|e| KeyError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(KeyError::new(
            key,
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

/// The rustls error inside a connection error, wherever rumqttc put it: in the handshake (`Tls`), or in a
/// read after it. A TLS 1.3 server checks the client's certificate only after the client has finished its
/// half of the handshake, so "no client certificate" arrives as an alert while reading the CONNACK.
pub fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    match e {
        ConnectionError::Tls(TlsError::TLS(r)) => Some(r),
        ConnectionError::Tls(TlsError::Io(io)) => rustls_in_io(io),
        other => io_error(other).and_then(rustls_in_io),
    }
}

/// The I/O error inside a connection error, wherever rumqttc put it (the connect, a read, a write).
pub fn io_error(e: &ConnectionError) -> Option<&std::io::Error> {
    use rumqttc::mqttbytes::Error as Bytes;
    match e {
        ConnectionError::Io(io)
        | ConnectionError::Tls(TlsError::Io(io))
        | ConnectionError::MqttState(StateError::Io(io))
        | ConnectionError::MqttState(StateError::Deserialization(Bytes::Io(io))) => Some(io),
        _ => None,
    }
}

fn rustls_in_io(io: &std::io::Error) -> Option<&rustls::Error> {
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What to do about an X.509 version 1 certificate.
const V1_HINT: &str =
    "TLS accepts only version 3: make it again with extensions (openssl x509 -req … -extfile, \
     see README \"Remote cameras\")";

/// Says what a TLS failure of rumqttc means, in words a user can act on.
pub fn describe_tls(e: &TlsError, broker: &str) -> String {
    match e {
        TlsError::TLS(r) => describe_rustls(r, broker),
        TlsError::Io(io) => match rustls_in_io(io) {
            Some(r) => describe_rustls(r, broker),
            None => match io.kind() {
                // A plain MQTT broker reads the ClientHello as a malformed packet and hangs up.
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => format!(
                    "{broker} closed the connection during the TLS handshake: is it a plain MQTT port? \
                     (use the broker's TLS port, usually 8883, or remove [broker.tls] for a plain port, usually 1883)"
                ),
                _ => format!("TLS with {broker} failed: {io}"),
            },
        },
        TlsError::DNSName(_) => format!(
            "{broker}: the host is not a name TLS can check (broker.host, or broker.tls.server_name)"
        ),
        other => format!("TLS with {broker} failed: {other}"),
    }
}

/// Says what a rustls error means, including the cases where rustls' own words mislead.
pub fn describe_rustls(r: &rustls::Error, broker: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    match r {
        R::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => format!(
                "the certificate of {broker} is not signed by a CA imaged trusts: broker.tls.ca_file must hold \
                 the CA that signed the broker's certificate (without ca_file, the system's CAs are used)"
            ),
            C::NotValidForNameContext { expected, presented } => format!(
                "the certificate of {broker} is not valid for the name {}: it names {} (set broker.host to one \
                 of those, or broker.tls.server_name when connecting by IP address)",
                server_name(expected),
                presented_names(presented)
            ),
            C::NotValidForName => format!(
                "the certificate of {broker} is not valid for that name (set broker.host to a name in the \
                 certificate, or broker.tls.server_name when connecting by IP address)"
            ),
            // Without the current time: a message that changed every minute would be logged every minute.
            C::ExpiredContext { not_after, .. } => format!(
                "the certificate of {broker} expired on {}: renew the broker's certificate (or is this host's \
                 clock wrong?)",
                utc(not_after)
            ),
            C::Expired => format!("the certificate of {broker} has expired: renew it"),
            C::NotValidYetContext { not_before, .. } => format!(
                "the certificate of {broker} is valid only from {}: is this host's clock wrong?",
                utc(not_before)
            ),
            C::NotValidYet => {
                format!("the certificate of {broker} is not valid yet: is this host's clock right?")
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => format!(
                "the certificate of {broker} is not meant for a TLS server (extendedKeyUsage must allow serverAuth)"
            ),
            C::Revoked => format!("the certificate of {broker} has been revoked"),
            C::BadSignature => format!(
                "the certificate of {broker} has a bad signature: it is not really signed by the CA it names"
            ),
            other if format!("{other:?}").contains("UnsupportedCertVersion") => format!(
                "the certificate of {broker} is an X.509 version 1 certificate; {V1_HINT}"
            ),
            other => format!("the certificate of {broker} is not acceptable: {other:?}"),
        },
        R::AlertReceived(A::CertificateRequired) => format!(
            "{broker} requires a client certificate: set broker.tls.cert_file and broker.tls.key_file"
        ),
        R::AlertReceived(A::CertificateExpired) => format!(
            "{broker} refused imaged's client certificate: it has expired (broker.tls.cert_file)"
        ),
        R::AlertReceived(
            alert @ (A::UnknownCA
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::AccessDenied),
        ) => format!(
            "{broker} refused imaged's client certificate ({alert:?}): broker.tls.cert_file must be a current \
             version 3 certificate signed by the CA the broker trusts (its cafile)"
        ),
        R::AlertReceived(
            alert @ (A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity),
        ) => format!(
            "{broker} and imaged have no TLS version or cipher in common ({alert:?}): the broker must offer \
             TLS 1.2 or 1.3"
        ),
        R::AlertReceived(alert) => format!("{broker} ended the TLS connection ({alert:?})"),
        R::InvalidMessage(_) | R::InappropriateHandshakeMessage { .. } | R::InappropriateMessage { .. } => format!(
            "{broker} did not answer with TLS: is it a plain MQTT port? (use the broker's TLS port, usually \
             8883, or remove [broker.tls] for a plain port, usually 1883)"
        ),
        other if other.to_string().contains("UnsupportedCertVersion") => format!(
            "the certificate of {broker} is an X.509 version 1 certificate; {V1_HINT}"
        ),
        other => format!("TLS with {broker} failed: {other}"),
    }
}

fn server_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// webpki lists the certificate's names as `DnsName("a")`, `IpAddress(1.2.3.4)`: plain names read better.
fn presented_names(presented: &[String]) -> String {
    if presented.is_empty() {
        return "no names (subjectAltName is missing)".into();
    }
    presented
        .iter()
        .map(|p| {
            let inner = p
                .strip_prefix("DnsName(")
                .or_else(|| p.strip_prefix("IpAddress("))
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or(p);
            inner.trim_matches('"').to_string()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn utc(time: &UnixTime) -> String {
    chrono::DateTime::from_timestamp(time.as_secs() as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| format!("{} s after 1970", time.as_secs()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use rustls::{AlertDescription, CertificateError, Error as R, OtherError};

    /// What webpki's error for a version 1 certificate looks like inside rustls.
    #[derive(Debug)]
    struct UnsupportedCertVersion;

    impl std::fmt::Display for UnsupportedCertVersion {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl std::error::Error for UnsupportedCertVersion {}

    #[test]
    fn a_version_1_certificate_is_called_that_not_unsupported_cert_version() {
        let e = R::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            UnsupportedCertVersion,
        ))));
        let text = describe_rustls(&e, "b:8883");
        assert!(
            text.contains("is an X.509 version 1 certificate; TLS accepts only version 3"),
            "{text}"
        );
        assert!(!text.contains("UnsupportedCertVersion"), "{text}");
    }

    #[test]
    fn an_expiry_message_does_not_change_with_the_clock() {
        let at = |now: u64| {
            describe_rustls(
                &R::InvalidCertificate(CertificateError::ExpiredContext {
                    time: UnixTime::since_unix_epoch(Duration::from_secs(now)),
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_609_459_200)),
                }),
                "b:8883",
            )
        };
        assert_eq!(at(1_800_000_000), at(1_800_000_600));
        assert!(at(1_800_000_000).contains("expired on 2021-01-01 00:00 UTC"));
    }

    #[test]
    fn the_names_a_certificate_holds_are_listed_plainly() {
        assert_eq!(
            presented_names(&[
                "DnsName(\"broker.example.org\")".into(),
                "IpAddress(192.0.2.1)".into()
            ]),
            "broker.example.org, 192.0.2.1"
        );
        assert_eq!(presented_names(&[]), "no names (subjectAltName is missing)");
    }

    #[test]
    fn a_tls_alert_inside_a_read_error_is_found() {
        // How a TLS 1.3 broker's "certificate required" reaches rumqttc: while reading the CONNACK.
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            R::AlertReceived(AlertDescription::CertificateRequired),
        );
        let e = ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(io),
        ));
        assert_eq!(
            rustls_error(&e),
            Some(&R::AlertReceived(AlertDescription::CertificateRequired))
        );
        assert!(describe_rustls(rustls_error(&e).unwrap(), "b:8883")
            .starts_with("b:8883 requires a client certificate"));
    }
}
