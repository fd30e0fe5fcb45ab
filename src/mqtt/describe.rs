//! Connection errors in words: one cause, one sentence that says what to check.

use rumqttc::{ConnectReturnCode, ConnectionError, StateError};

use super::tls::{describe_rustls, describe_tls, io_error, rustls_error};

/// Says in words what went wrong with the connection, for the one log line per episode. The words do not
/// depend on timing or attempt, so one cause makes one line however often it repeats.
pub fn describe(e: &ConnectionError, broker: &str) -> String {
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
        assert!(describe(&refused, "b:1").contains("wrong user name or password"));
        let closed =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(describe(&closed, "b:1").contains("is the broker running?"));
    }
}
