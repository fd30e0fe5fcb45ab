//! The publish window: QoS 1 publishes on their way to the broker, from rumqttc's request channel to the
//! broker's PUBACK. The daemon's republishes, `imaged send` and the tests' load generator all use it.
//!
//! rumqttc tells which packet id a publish got only when it writes the publish out (`Outgoing::Publish`, in
//! request order), and it forgets what it still had when the broker starts a new session. The window follows
//! each item through those two stages, so that a PUBACK names the right item and a lost session gives every
//! unconfirmed item back to be published again.
//!
//! With MQTT 5, rumqttc hands out packet ids 1 up to the broker's Receive Maximum (20 in Mosquitto) and
//! wraps. A publish whose id is still in use "collides": rumqttc keeps one colliding publish aside and lets a
//! second one replace it, silently. Publishes it sends again after a resumed session go out in packet-id
//! order, not publish order, and bypass its flow control together with what was still in the channel, so
//! after a reconnect that can happen. The window therefore hands rumqttc a publish only when the ids it and
//! those queued before it will get are all free ([`PublishWindow::ids_free`]).

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
    /// The last packet id rumqttc handed out (to a publish, subscribe or unsubscribe): the next is one more.
    last_id: u16,
}

/// Ids kept free beyond those of the queued publishes, for subscribes and unsubscribes queued among them
/// (each takes the next id too; the session sends one subscribe and few unsubscribes per connection).
const SPARE_IDS: usize = 4;

impl<T> PublishWindow<T> {
    /// A window of up to `capacity` publishes not yet confirmed.
    pub fn new(capacity: usize) -> PublishWindow<T> {
        PublishWindow {
            capacity: capacity.max(1),
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            numbered: 0,
            last_id: 0,
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
        if !self.has_room() || !client.packet_ids().is_none_or(|ids| self.ids_free(ids)) {
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

    /// Whether the publishes waiting for a packet id and one more would all get ids no publish on the wire
    /// holds, when rumqttc hands out ids 1 to `ids` in turn; [`SPARE_IDS`] more are kept free for subscribes
    /// as far as there are ids.
    fn ids_free(&self, ids: u16) -> bool {
        let needed = self.unnumbered.len() + 1;
        // A subscribe among them takes one more id, which must not wrap onto the first publish's.
        if needed > usize::from(ids).saturating_sub(SPARE_IDS).max(1) {
            return false;
        }
        let mut id = self.last_id;
        (0..(needed + SPARE_IDS).min(usize::from(ids))).all(|_| {
            id = if id >= ids { 1 } else { id + 1 };
            !self.by_pkid.contains_key(&id)
        })
    }

    /// rumqttc gave a subscribe or unsubscribe `pkid` (`Outgoing::Subscribe`, `Outgoing::Unsubscribe`).
    pub fn id_taken(&mut self, pkid: u16) {
        self.last_id = pkid;
    }

    /// rumqttc wrote a publish out with `pkid` (`Outgoing::Publish`).
    pub fn numbered(&mut self, pkid: u16) -> Numbered {
        if self.by_pkid.contains_key(&pkid) {
            return Numbered::Again;
        }
        self.last_id = pkid;
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

    fn on_wire(ids: &[u16], last_id: u16) -> PublishWindow<u16> {
        let mut w = PublishWindow::new(64);
        w.unnumbered.extend(ids);
        for &id in ids {
            w.numbered(id);
        }
        w.last_id = last_id;
        w
    }

    #[test]
    fn a_publish_waits_while_the_ids_rumqttc_would_give_it_are_in_use() {
        // Ids 1 to 20 (Mosquitto's Receive Maximum), 1 to 15 on the wire, 15 the last one handed out.
        let ids: Vec<u16> = (1..=15).collect();
        let mut w = on_wire(&ids, 15);
        assert!(w.ids_free(20), "16 to 20 are free");
        w.unnumbered.push_back(0);
        assert!(!w.ids_free(20), "16 to 20 would not be enough");
        w.acked(1);
        assert!(w.ids_free(20), "16 to 20, then 1 (wrapped)");
    }

    #[test]
    fn ids_wrap_after_the_last_one_rumqttc_hands_out() {
        // After a resumed session rumqttc sends again in id order: 19 and 20 may stay while 1 to 14 came and
        // went, so the next ids after 14 run into 19.
        let w = on_wire(&[19, 20], 13);
        assert!(w.ids_free(20));
        let w = on_wire(&[19, 20], 14);
        assert!(!w.ids_free(20));
        let w = on_wire(&[2], 20);
        assert!(!w.ids_free(20), "20 wraps to 1, then 2");
    }

    #[test]
    fn with_few_ids_every_id_must_be_free_and_one_publish_at_a_time_waits() {
        assert!(on_wire(&[], 3).ids_free(3));
        assert!(!on_wire(&[1], 3).ids_free(3));
        let mut w = on_wire(&[], 3);
        w.unnumbered.push_back(0);
        assert!(!w.ids_free(3));
    }

    #[test]
    fn publishes_waiting_for_ids_leave_room_for_subscribes_even_with_every_id_free() {
        // After a reconnect nothing may be on the wire; the resubscribe still takes an id among them.
        let mut w = on_wire(&[], 11);
        w.unnumbered.extend([0; 15]);
        assert!(w.ids_free(20));
        w.unnumbered.push_back(0);
        assert!(!w.ids_free(20));
    }

    #[test]
    fn subscribes_move_the_next_id_on() {
        let mut w = on_wire(&[9], 2);
        w.id_taken(3);
        assert!(w.ids_free(20));
        w.id_taken(4);
        assert!(!w.ids_free(20));
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
