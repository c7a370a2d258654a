//! In-order acknowledgement: the flushed LSN reported to PostgreSQL.
//!
//! The pipeline is a chain of FIFO stages (source -> decode/plan -> sink), so
//! when the sink has applied a batch, everything before it was applied too.
//! Each batch carries the end LSN of the last transaction it completes (or the
//! position of an idle keepalive that reached it in stream order); the sink
//! hands it here after Redis confirmed the batch. The replication stream reads
//! the value for its standby status updates. It only ever moves forward.
//!
//! [`rule`] decides which position each batch acknowledges; [`Acknowledger`]
//! holds what the sink confirmed.

use tokio::sync::watch;

pub mod rule;

pub use rule::AckRule;

use crate::lsn::Lsn;

/// Owns the acknowledged LSN; the replication stream watches it.
#[derive(Debug)]
pub struct Acknowledger {
    confirmed: Lsn,
    tx: watch::Sender<Lsn>,
}

impl Acknowledger {
    /// Starts at `start` (the slot's confirmed position, or 0/0: PostgreSQL
    /// never moves a slot backwards, so reporting less is harmless).
    pub fn new(start: Lsn) -> (Self, watch::Receiver<Lsn>) {
        let (tx, rx) = watch::channel(start);
        (
            Acknowledger {
                confirmed: start,
                tx,
            },
            rx,
        )
    }

    /// Confirms everything up to `lsn`; returns whether the position moved.
    pub fn confirm(&mut self, lsn: Lsn) -> bool {
        if lsn <= self.confirmed {
            return false;
        }
        self.confirmed = lsn;
        self.tx.send_replace(lsn);
        true
    }

    /// The highest confirmed LSN.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Another receiver of the confirmed LSN.
    pub fn subscribe(&self) -> watch::Receiver<Lsn> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_moves_forward() {
        let (mut ack, rx) = Acknowledger::new(Lsn(100));
        assert!(!ack.confirm(Lsn(50)));
        assert_eq!(*rx.borrow(), Lsn(100));
        assert!(ack.confirm(Lsn(200)));
        assert!(!ack.confirm(Lsn(200)));
        assert!(!ack.confirm(Lsn(150)));
        assert_eq!(*rx.borrow(), Lsn(200));
        assert_eq!(ack.confirmed(), Lsn(200));
    }
}
