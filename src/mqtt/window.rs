//! The publish window: QoS 1 publishes on their way to the broker, from rumqttc's request channel to the
//! broker's PUBACK. The daemon's republishes, `imaged send` and the tests' load generator all use it.
//!
//! rumqttc tells which packet id a publish got only when it writes the publish out (`Outgoing::Publish`, in
//! request order), and it forgets what it still had when the broker starts a new session. The window follows
//! each item through those two stages, so that a PUBACK names the right item and a lost session gives every
//! unconfirmed item back to be published again.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use futures_util::FutureExt;
use rumqttc::QoS;

use super::client::{Client, Properties};

/// What an `Outgoing::Publish` packet id meant to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbered {
    /// The oldest publish waiting for its id got this one.
    New,
    /// A publish already on the wire was sent again (a retransmission after a resumed session).
    Again,
    /// Nothing was waiting for an id: a publish the window does not know.
    Unknown,
}

#[derive(Debug)]
pub struct PublishWindow<T> {
    capacity: usize,
    /// In rumqttc's request channel, oldest first, waiting for the packet id they get when written out.
    unnumbered: VecDeque<T>,
    /// On the wire, waiting for the broker's PUBACK, with the order they were numbered in.
    by_pkid: HashMap<u16, (u64, T)>,
    numbered: u64,
}

impl<T> PublishWindow<T> {
    /// A window of up to `capacity` publishes not yet confirmed.
    pub fn new(capacity: usize) -> PublishWindow<T> {
        PublishWindow {
            capacity: capacity.max(1),
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            numbered: 0,
        }
    }

    /// Publishes not yet confirmed.
    pub fn len(&self) -> usize {
        self.unnumbered.len() + self.by_pkid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn has_room(&self) -> bool {
        self.len() < self.capacity
    }

    /// (waiting for a packet id, waiting for the PUBACK), for debug logs.
    pub fn stages(&self) -> (usize, usize) {
        (self.unnumbered.len(), self.by_pkid.len())
    }

    /// Puts a QoS 1 publish into rumqttc's request channel without waiting. Gives the item back when the
    /// window or the channel is full.
    ///
    /// Only the task that polls the event loop may call this: the channel's receiver runs inside that task,
    /// so a send that is not done at its first poll has not happened and will not, and dropping it is safe.
    pub fn try_publish(
        &mut self,
        client: &Client,
        topic: &str,
        retain: bool,
        payload: Bytes,
        properties: &Properties,
        item: T,
    ) -> Result<(), T> {
        if !self.has_room() {
            return Err(item);
        }
        match client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload, properties)
            .now_or_never()
        {
            Some(Ok(())) => {
                self.unnumbered.push_back(item);
                Ok(())
            }
            Some(Err(_)) | None => Err(item),
        }
    }

    /// rumqttc wrote a publish out with `pkid` (`Outgoing::Publish`).
    pub fn numbered(&mut self, pkid: u16) -> Numbered {
        if self.by_pkid.contains_key(&pkid) {
            return Numbered::Again;
        }
        match self.unnumbered.pop_front() {
            Some(item) => {
                self.numbered += 1;
                self.by_pkid.insert(pkid, (self.numbered, item));
                Numbered::New
            }
            None => Numbered::Unknown,
        }
    }

    /// The broker confirmed `pkid` (`Incoming::PubAck`): the item it belonged to, if any.
    pub fn acked(&mut self, pkid: u16) -> Option<T> {
        self.by_pkid.remove(&pkid).map(|(_, item)| item)
    }

    /// Everything not confirmed, in the order it was published: what rumqttc dropped with a lost session.
    pub fn take_all(&mut self) -> Vec<T> {
        let mut on_wire: Vec<(u64, T)> = self.by_pkid.drain().map(|(_, v)| v).collect();
        on_wire.sort_by_key(|(n, _)| *n);
        on_wire
            .into_iter()
            .map(|(_, item)| item)
            .chain(self.unnumbered.drain(..))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_with(items: &[&'static str]) -> PublishWindow<&'static str> {
        let mut w = PublishWindow::new(8);
        w.unnumbered.extend(items);
        w
    }

    #[test]
    fn packet_ids_go_to_publishes_in_the_order_they_were_queued() {
        let mut w = window_with(&["a", "b"]);
        assert_eq!(w.numbered(7), Numbered::New);
        assert_eq!(w.numbered(8), Numbered::New);
        assert_eq!(w.acked(8), Some("b"));
        assert_eq!(w.acked(7), Some("a"));
        assert!(w.is_empty());
    }

    #[test]
    fn a_retransmission_does_not_take_the_next_publishes_id() {
        let mut w = window_with(&["a", "b"]);
        w.numbered(7);
        assert_eq!(w.numbered(7), Numbered::Again);
        assert_eq!(w.stages(), (1, 1));
        assert_eq!(w.numbered(9), Numbered::New);
        assert_eq!(w.acked(9), Some("b"));
    }

    #[test]
    fn an_unknown_id_or_ack_changes_nothing() {
        let mut w = window_with(&[]);
        assert_eq!(w.numbered(3), Numbered::Unknown);
        assert_eq!(w.acked(3), None);
    }

    #[test]
    fn a_lost_session_gives_back_everything_unconfirmed_in_publish_order() {
        let mut w = window_with(&["a", "b", "c", "d"]);
        w.numbered(40);
        w.numbered(2);
        w.numbered(17);
        assert_eq!(w.acked(2), Some("b"));
        assert_eq!(w.take_all(), vec!["a", "c", "d"]);
        assert!(w.is_empty());
    }

    #[test]
    fn the_window_is_full_at_its_capacity() {
        let mut w: PublishWindow<u8> = PublishWindow::new(2);
        w.unnumbered.extend([1, 2]);
        assert!(!w.has_room());
        w.numbered(1);
        w.acked(1);
        assert!(w.has_room());
    }
}
