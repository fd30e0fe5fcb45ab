//! Connection errors in words: one cause, one sentence that says what to check.

use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, DisconnectReasonCode};
use rumqttc::{ConnectReturnCode, ConnectionError, StateError};

use super::client::{self, reason_words};
use super::tls::{describe_rustls, describe_tls, io_error, rustls_error};

/// Says in words what went wrong with the connection, for the one log line per episode. The words do not
/// depend on timing or attempt, so one cause makes one line however often it repeats.
pub fn describe(e: &client::ConnectionError, broker: &str) -> String {
    match e {
        client::ConnectionError::V4(e) => describe_v4(e, broker),
        client::ConnectionError::V5(e) => describe_v5(e, broker),
    }
}

/// What only MQTT 5 says: the reason codes of a refused CONNECT and of the broker's DISCONNECT.
fn describe_v5(e: &v5::ConnectionError, broker: &str) -> String {
    use v5::StateError as S5;
    let refused = |code: &Code5| {
        match code {
        Code5::BadUserNamePassword | Code5::NotAuthorized => format!(
            "the broker {broker} refused the login ({}): wrong or missing user name or password (broker.username, and broker.password_file or the systemd credential mqtt-password)",
            reason_words(code)
        ),
        Code5::ClientIdentifierNotValid | Code5::BadClientId => {
            format!("the broker {broker} refused the client id (broker.client_id)")
        }
        Code5::UnsupportedProtocolVersion | Code5::RefusedProtocolVersion => format!(
            "the broker {broker} does not speak MQTT 5 (broker.protocol = \"3.1.1\" speaks the older version)"
        ),
        other => format!(
            "the broker {broker} refused the connection: {}",
            reason_words(other)
        ),
    }
    };
    match e {
        v5::ConnectionError::ConnectionRefused(code)
        | v5::ConnectionError::MqttState(S5::ConnFail { reason: code }) => refused(code),
        v5::ConnectionError::MqttState(S5::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let why = reason_string
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let hint = match reason_code {
                DisconnectReasonCode::SessionTakenOver => {
                    ": another client connected with the same client id (broker.client_id)"
                }
                DisconnectReasonCode::PacketTooLarge => {
                    ": a message was larger than the broker's message_size_limit"
                }
                _ => "",
            };
            format!(
                "the broker {broker} closed the connection: {}{why}{hint}",
                reason_words(reason_code)
            )
        }
        v5::ConnectionError::NotConnAck(_) => {
            format!("{broker} did not answer like an MQTT broker: is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        v5::ConnectionError::MqttState(S5::OutgoingPacketTooLarge { pkt_size, max }) => format!(
            "a message of {pkt_size} bytes is larger than the {max} bytes the broker {broker} takes"
        ),
        v5::ConnectionError::MqttState(S5::Deserialization(bytes)) => {
            format!("{broker} sent something that is not MQTT ({bytes}): is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        other => format!("the connection to {broker} failed: {other}"),
    }
}

fn describe_v4(e: &ConnectionError, broker: &str) -> String {
    use rumqttc::mqttbytes::Error as Bytes;
    use std::io::ErrorKind;
    if let Some(tls) = rustls_error(e) {
        return describe_rustls(tls, broker);
    }
    match e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                format!("the broker {broker} refused the login: wrong user name or password (broker.username, and broker.password_file or the systemd credential mqtt-password)")
            }
            // What Mosquitto answers to a wrong password, and to a missing one when it requires one.
            ConnectReturnCode::NotAuthorized => {
                format!("the broker {broker} refused the login (not authorized): wrong or missing user name or password (broker.username, and broker.password_file or the systemd credential mqtt-password)")
            }
            ConnectReturnCode::BadClientId => {
                format!("the broker {broker} refused the client id (broker.client_id)")
            }
            ConnectReturnCode::ServiceUnavailable => format!("the broker {broker} is unavailable"),
            ConnectReturnCode::RefusedProtocolVersion => {
                format!("the broker {broker} does not speak MQTT 3.1.1")
            }
            ConnectReturnCode::Success => format!("the broker {broker} answered oddly"),
        },
        ConnectionError::Tls(tls) => describe_tls(tls, broker),
        ConnectionError::NetworkTimeout => {
            format!("no answer from {broker} within broker.connect_timeout_secs")
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            format!("the broker {broker} closed the connection")
        }
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            format!("the broker {broker} stopped answering (no reply to a keep-alive ping)")
        }
        ConnectionError::MqttState(StateError::Deserialization(Bytes::OutgoingPacketTooLarge {
            pkt_size,
            max,
        })) => format!(
            "a message of {pkt_size} bytes is larger than the {max} bytes this client may send to {broker}"
        ),
        // A TLS broker's answer to a plain CONNECT, read as MQTT.
        ConnectionError::MqttState(StateError::Deserialization(bytes))
            if !matches!(bytes, Bytes::Io(_)) =>
        {
            format!("{broker} sent something that is not MQTT ({bytes}): is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        ConnectionError::NotConnAck(_) => {
            format!("{broker} did not answer like an MQTT broker: is it a TLS port? (then imaged needs [broker.tls]; 8883 is the usual TLS port)")
        }
        other => match io_error(other) {
            Some(io) if io.kind() == ErrorKind::ConnectionRefused => {
                format!("nothing accepts connections at {broker} (is the broker running? broker.host, broker.port)")
            }
            // A TLS listener resets a plain client at its first bytes (a CONNECT is no ClientHello).
            Some(io) if io.kind() == ErrorKind::ConnectionReset => {
                format!("{broker} reset the connection (if it does so at every connect: is it a TLS port? then imaged needs [broker.tls]; 8883 is the usual TLS port)")
            }
            Some(io) => format!("the connection to {broker} failed: {io}"),
            None => format!("the connection to {broker} failed: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_problems_are_described_in_words() {
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert!(describe(&refused.into(), "b:1").contains("wrong user name or password"));
        let closed =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe(&closed.into(), "b:1").contains("is the broker running?"));
    }

    #[test]
    fn mqtt_5_reason_codes_are_described_in_words() {
        let refused = v5::ConnectionError::ConnectionRefused(Code5::NotAuthorized);
        assert!(describe(&refused.into(), "b:1").contains("refused the login (not authorized)"));
        let quota = v5::ConnectionError::ConnectionRefused(Code5::QuotaExceeded);
        assert_eq!(
            describe(&quota.into(), "b:1"),
            "the broker b:1 refused the connection: quota exceeded"
        );
        let taken = v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: None,
        });
        assert_eq!(
            describe(&taken.into(), "b:1"),
            "the broker b:1 closed the connection: session taken over: another client connected with the same client id (broker.client_id)"
        );
        // What both versions have is described alike.
        let io =
            v5::ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe(&io.into(), "b:1").contains("is the broker running?"));
    }
}
