//! Per-agent message queues: a message is queued durably where its agent is, and taken off the
//! queue in the transaction that stores what the agent did with it.

use redb::ReadableTable;

use super::schema::{AGENTS, MESSAGES, META, META_NEXT_SEQ, QUEUED};
use super::{Batch, Store, StoreError};

impl Store {
    /// The messages queued for agent `id`, oldest first, left in place (a hop carries them).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn messages(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in t.range(queue(id))? {
                out.push(entry?.1.value().to_vec());
            }
            Ok(out)
        })
    }

    /// How many messages are queued for agent `id`.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn message_count(&self, id: &str) -> Result<usize, StoreError> {
        self.read(|txn| Ok(queued_in(&txn.open_table(QUEUED)?, id)?.messages as usize))
    }

    /// The messages queued on this node for agents it does not hold (left behind by a hop, or
    /// by an arrival that did not commit), by agent: the sequence numbers of each, oldest
    /// first.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn left_behind(&self) -> Result<Vec<(String, Vec<u64>)>, StoreError> {
        self.read(|txn| {
            let queued = txn.open_table(QUEUED)?;
            let agents = txn.open_table(AGENTS)?;
            let messages = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in queued.iter()? {
                let id = entry?.0.value().to_string();
                if agents.get(id.as_str())?.is_some() {
                    continue;
                }
                let seqs = seqs_in(&messages, &id)?;
                out.push((id, seqs));
            }
            Ok(out)
        })
    }
}

/// The size of an agent's message queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSize {
    /// Messages queued.
    pub messages: u64,
    /// Their bytes, together.
    pub bytes: u64,
}

fn queued_in(
    t: &impl ReadableTable<&'static str, (u64, u64)>,
    id: &str,
) -> Result<QueueSize, StoreError> {
    Ok(t.get(id)?.map_or(QueueSize::default(), |v| {
        let (messages, bytes) = v.value();
        QueueSize { messages, bytes }
    }))
}

impl Batch<'_> {
    /// Appends a message to agent `id`'s queue and returns its sequence number. Sequence
    /// numbers come from one counter for the whole store, so they never repeat, even after a
    /// queue was emptied.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn push_message(&mut self, id: &str, message: &[u8]) -> Result<u64, StoreError> {
        let mut meta = self.txn.open_table(META)?;
        let seq = meta.get(META_NEXT_SEQ)?.map_or(0, |v| v.value());
        meta.insert(META_NEXT_SEQ, seq + 1)?;
        drop(meta);
        self.put_message(id, seq, message)?;
        Ok(seq)
    }

    /// Puts back a message taken off agent `id`'s queue ([`Batch::take_message`]) with its
    /// sequence number `seq`, in its place (it was not sent anywhere).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_message(&mut self, id: &str, seq: u64, message: &[u8]) -> Result<(), StoreError> {
        if self
            .txn
            .open_table(MESSAGES)?
            .insert((id, seq), message)?
            .is_some()
        {
            return Err(StoreError::Inconsistent {
                table: "messages",
                key: format!("{id} {seq}"),
                what: "a message is already queued with this sequence number",
            });
        }
        self.count(message.len(), 0);
        let mut queued = self.txn.open_table(QUEUED)?;
        let size = queued_in(&queued, id)?;
        queued.insert(id, (size.messages + 1, size.bytes + message.len() as u64))?;
        Ok(())
    }

    /// The size of agent `id`'s message queue.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn queued(&self, id: &str) -> Result<QueueSize, StoreError> {
        queued_in(&self.txn.open_table(QUEUED)?, id)
    }

    /// Removes and returns the oldest message queued for agent `id`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn pop_message(&mut self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let oldest = match self.txn.open_table(MESSAGES)?.range(queue(id))?.next() {
            Some(entry) => entry?.0.value().1,
            None => return Ok(None),
        };
        self.take_message(id, oldest)
    }

    /// Removes and returns the message with sequence number `seq` from agent `id`'s queue
    /// (None if it is not there).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn take_message(&mut self, id: &str, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(message) = self
            .txn
            .open_table(MESSAGES)?
            .remove((id, seq))?
            .map(|v| v.value().to_vec())
        else {
            return Ok(None);
        };
        self.count(0, message.len());
        let mut queued = self.txn.open_table(QUEUED)?;
        let size = queued_in(&queued, id)?;
        if size.messages <= 1 {
            queued.remove(id)?;
        } else {
            let bytes = size.bytes.saturating_sub(message.len() as u64);
            queued.insert(id, (size.messages - 1, bytes))?;
        }
        Ok(Some(message))
    }

    /// Removes the `n` oldest messages queued for agent `id` (those a hop took along) and
    /// returns the sequence numbers of those that stay, oldest first.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn drop_oldest_messages(&mut self, id: &str, n: u64) -> Result<Vec<u64>, StoreError> {
        let seqs = self.message_seqs(id)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(seqs.len());
        for &seq in &seqs[..n] {
            self.take_message(id, seq)?;
        }
        Ok(seqs[n..].to_vec())
    }

    /// The sequence numbers of the messages queued for agent `id`, oldest first.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn message_seqs(&self, id: &str) -> Result<Vec<u64>, StoreError> {
        seqs_in(&self.txn.open_table(MESSAGES)?, id)
    }

    /// Removes and returns every message queued for agent `id`, oldest first.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn take_messages(&mut self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut t = self.txn.open_table(MESSAGES)?;
        // Every entry must be read from the iterator to be removed, which `collect` does.
        let taken = t
            .extract_from_if(queue(id), |_, _| true)?
            .map(|entry| entry.map(|(_, v)| v.value().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        self.txn.open_table(QUEUED)?.remove(id)?;
        self.count(0, taken.iter().map(Vec::len).sum());
        Ok(taken)
    }
}

/// The sequence numbers of agent `id`'s messages in `t`, oldest first.
fn seqs_in(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    id: &str,
) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for entry in t.range(queue(id))? {
        seqs.push(entry?.0.value().1);
    }
    Ok(seqs)
}

/// The keys of agent `id`'s message queue, oldest first.
fn queue(id: &str) -> std::ops::RangeInclusive<(&str, u64)> {
    (id, 0)..=(id, u64::MAX)
}
