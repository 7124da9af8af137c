//! The server's side of hypha-rpc's `message_cache`: clients send a message larger than one
//! frame to the server in chunks (`create`, `append`/`set`, `process`). What a client may park
//! here is bounded per client (much lower for anonymous users) and in total, so no caller can
//! grow the server's memory without limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use super::RpcError as Error;
use super::frame::Frame;

/// What one client may park in the cache at once, by kind of user.
pub(crate) const MAX_BYTES_SIGNED_IN: usize = 256 * 1024 * 1024;
pub(crate) const MAX_BYTES_ANONYMOUS: usize = 16 * 1024 * 1024;
/// What all clients together may park.
pub(crate) const MAX_BYTES_TOTAL: usize = 1024 * 1024 * 1024;
/// Messages one client may assemble at once.
const MAX_MESSAGES_PER_CLIENT: usize = 32;
/// Longest message key accepted.
const MAX_KEY_LEN: usize = 256;
/// Highest chunk index accepted (a 64 MiB message has 256 chunks of 256 KiB).
const MAX_INDEX: u64 = 65_536;
/// What a held chunk costs besides its bytes (its entry), so that empty chunks are not free
/// (here and in the hub's chunks held ahead of their turn).
pub(crate) const CHUNK_COST: usize = 64;

/// What a chunk of `len` bytes is charged.
fn cost(len: usize) -> usize {
    len + CHUNK_COST
}

/// A message being assembled; `bytes` is what its chunks cost (see [`cost`]).
#[derive(Default)]
struct Message {
    chunks: BTreeMap<u64, Bytes>,
    bytes: usize,
}

#[derive(Default)]
struct Owner {
    messages: HashMap<String, Message>,
    bytes: usize,
}

/// The owners and what they hold together (kept as it changes, not summed per chunk).
#[derive(Default)]
struct Book {
    owners: HashMap<String, Owner>,
    total: usize,
}

/// Chunked messages being assembled, per client.
#[derive(Default)]
pub struct MessageCache {
    book: Mutex<Book>,
}

fn checked_key(key: &str) -> Result<&str, Error> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::BadRequest(format!(
            "message_cache keys have 1 to {MAX_KEY_LEN} characters"
        )));
    }
    Ok(key)
}

fn missing(key: &str) -> Error {
    Error::NotFound(format!(
        "Message with key {:?} does not exist",
        key.chars().take(80).collect::<String>()
    ))
}

impl MessageCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is held for all clients (bytes and entries).
    #[cfg(test)]
    pub(crate) fn total_bytes(&self) -> usize {
        let book = self.lock();
        debug_assert_eq!(
            book.total,
            book.owners.values().map(|o| o.bytes).sum::<usize>()
        );
        book.total
    }

    /// `message_cache.create`.
    pub(crate) fn create(&self, owner: &str, key: &str, overwrite: bool) -> Result<(), Error> {
        let key = checked_key(key)?;
        let mut book = self.lock();
        let Book { owners, total } = &mut *book;
        let entry = owners.entry(owner.to_string()).or_default();
        if let Some(old) = entry.messages.get(key) {
            if !overwrite {
                return Err(Error::BadRequest(format!(
                    "Message with the same key ({key}) already exists in the cache store"
                )));
            }
            entry.bytes -= old.bytes;
            *total -= old.bytes;
        } else if entry.messages.len() >= MAX_MESSAGES_PER_CLIENT {
            return Err(Error::Busy(format!(
                "too many chunked messages in flight (at most {MAX_MESSAGES_PER_CLIENT} per client)"
            )));
        }
        entry.messages.insert(key.to_string(), Message::default());
        Ok(())
    }

    /// `message_cache.set` (and `append` with `index = None`). `limit` is what this client
    /// may hold in all.
    pub(crate) fn put(
        &self,
        owner: &str,
        key: &str,
        index: Option<u64>,
        data: Bytes,
        limit: usize,
    ) -> Result<(), Error> {
        let mut book = self.lock();
        let Book { owners, total } = &mut *book;
        let entry = owners.get_mut(owner).ok_or_else(|| missing(key))?;
        let held = entry.bytes;
        let message = entry.messages.get_mut(key).ok_or_else(|| missing(key))?;
        let index = index.unwrap_or(message.chunks.len() as u64);
        if index > MAX_INDEX {
            return Err(Error::BadRequest(format!(
                "chunk index {index} is beyond the largest message this server assembles"
            )));
        }
        let replaced = message.chunks.get(&index).map_or(0, |c| cost(c.len()));
        let added = cost(data.len());
        let after = held - replaced + added;
        if after > limit {
            let freed = message.bytes;
            entry.messages.remove(key);
            entry.bytes -= freed;
            *total -= freed;
            return Err(Error::BadRequest(format!(
                "chunked message exceeds the limit of {limit} bytes this client may send to the server at once"
            )));
        }
        if *total + added.saturating_sub(replaced) > MAX_BYTES_TOTAL {
            return Err(Error::Unavailable(
                "the server is holding too many chunked messages; try again shortly".into(),
            ));
        }
        message.bytes = message.bytes - replaced + added;
        // Copied: a slice would keep the whole frame it came in alive, however small the
        // chunk (and the frame could be padded to its limit).
        message.chunks.insert(index, Bytes::copy_from_slice(&data));
        entry.bytes = after;
        *total = *total - replaced + added;
        Ok(())
    }

    /// `message_cache.remove`.
    pub(crate) fn remove(&self, owner: &str, key: &str) -> Result<(), Error> {
        let mut book = self.lock();
        let Book { owners, total } = &mut *book;
        let entry = owners.get_mut(owner).ok_or_else(|| missing(key))?;
        let message = entry.messages.remove(key).ok_or_else(|| missing(key))?;
        entry.bytes -= message.bytes;
        *total -= message.bytes;
        Ok(())
    }

    /// `message_cache.process`: takes the message out and reassembles it.
    pub(crate) fn take(&self, owner: &str, key: &str) -> Result<Frame, Error> {
        let message = {
            let mut book = self.lock();
            let Book { owners, total } = &mut *book;
            let entry = owners.get_mut(owner).ok_or_else(|| missing(key))?;
            let message = entry.messages.remove(key).ok_or_else(|| missing(key))?;
            entry.bytes -= message.bytes;
            *total -= message.bytes;
            message
        };
        let mut data = Vec::with_capacity(message.chunks.values().map(Bytes::len).sum());
        for (expected, (index, chunk)) in message.chunks.iter().enumerate() {
            if *index != expected as u64 {
                return Err(Error::BadRequest(format!(
                    "chunk {expected} of the message is missing"
                )));
            }
            data.extend_from_slice(chunk);
        }
        Frame::parse(Bytes::from(data)).map_err(|e| Error::BadRequest(e.to_string()))
    }

    /// Drops everything a client that went away had parked.
    pub(crate) fn forget(&self, owner: &str) {
        let mut book = self.lock();
        if let Some(gone) = book.owners.remove(owner) {
            book.total -= gone.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_bounded_each_and_cleaned_up() {
        let cache = MessageCache::default();
        cache.create("ws/a", "k", false).unwrap();
        assert!(cache.create("ws/a", "k", false).is_err());
        cache
            .put("ws/a", "k", None, Bytes::from(vec![0; 1000]), 1500)
            .unwrap();
        assert_eq!(cache.total_bytes(), 1000 + CHUNK_COST);
        let err = cache
            .put("ws/a", "k", None, Bytes::from(vec![0; 1000]), 1500)
            .unwrap_err();
        assert!(err.to_string().contains("limit of 1500"), "{err}");
        // The message that broke the limit is gone, and its bytes with it.
        assert_eq!(cache.total_bytes(), 0);
        assert!(cache.take("ws/a", "k").is_err());
        cache.create("ws/a", "k2", false).unwrap();
        cache
            .put("ws/a", "k2", Some(1), Bytes::from_static(b"\xc0"), 1500)
            .unwrap();
        let err = cache.take("ws/a", "k2").unwrap_err();
        assert!(err.to_string().contains("chunk 0"), "{err}");
        cache.create("ws/b", "k", false).unwrap();
        cache
            .put(
                "ws/b",
                "k",
                None,
                Bytes::from_static(b"\x81\xa2to\xa1x"),
                100,
            )
            .unwrap();
        assert_eq!(cache.total_bytes(), 6 + CHUNK_COST);
        cache.forget("ws/b");
        assert_eq!(cache.total_bytes(), 0);
        // Empty chunks are not free: a client's allowance ends their number too.
        cache.create("ws/d", "k", false).unwrap();
        let mut taken = 0;
        while cache
            .put("ws/d", "k", None, Bytes::new(), 100 * CHUNK_COST)
            .is_ok()
        {
            taken += 1;
            assert!(taken <= 100);
        }
        assert_eq!(taken, 100);
        assert_eq!(
            cache.total_bytes(),
            0,
            "the message past its limit is dropped"
        );
        assert!(cache.create("ws/c", &"k".repeat(300), false).is_err());
    }
}
