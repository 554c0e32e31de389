//! A concurrent map with a hard bound on its entries, shared by the memory store (counters)
//! and the over-limit cache (retry times).
//!
//! Both face the same threat: request values can name an unbounded number of counters, and
//! memory must not grow with them. At the bound a new key is refused (the caller decides what
//! that means) while existing keys keep working, and expired entries are dropped by a sweep.
//!
//! The size is kept in an atomic rather than asked of the map: `DashMap::len` read-locks every
//! shard, which on the path of every new counter would serialise the whole map. The atomic is
//! reserved before an insert and given back if the insert does not happen, so the bound holds
//! exactly even when many requests create counters at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;

#[derive(Debug)]
pub struct BoundedMap<V> {
    map: DashMap<String, V>,
    len: AtomicUsize,
    max: usize,
    /// New keys refused because the map was full.
    refused: AtomicU64,
}

impl<V> BoundedMap<V> {
    pub fn new(max: usize) -> Self {
        Self {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
        }
    }

    /// Runs `update` on the entry of `key` (`None` when absent) under that entry's lock, so
    /// concurrent updates of one key apply one after the other, and stores the value it
    /// returns. When the map is full and `key` is new, `update` still runs on `None` but its
    /// value is not stored. The common case, an existing key, allocates nothing.
    pub fn update<R>(&self, key: &str, update: impl FnOnce(Option<&V>) -> (R, V)) -> R {
        if let Some(mut entry) = self.map.get_mut(key) {
            let (result, value) = update(Some(&*entry));
            *entry = value;
            return result;
        }
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return update(None).0;
        }
        // Another request may have created the key since the lookup: apply on top of it.
        match self.map.entry(key.to_owned()) {
            dashmap::Entry::Occupied(mut occupied) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                let (result, value) = update(Some(occupied.get()));
                occupied.insert(value);
                result
            }
            dashmap::Entry::Vacant(vacant) => {
                let (result, value) = update(None);
                vacant.insert(value);
                result
            }
        }
    }

    /// A copy of the value of `key`, if present.
    /// As [`BoundedMap::update`], but a new key at the bound is not judged at all: `None`
    /// says there was no room, for callers that must refuse rather than forget.
    pub fn try_update<R>(&self, key: &str, update: impl FnOnce(Option<&V>) -> (R, V)) -> Option<R> {
        if let Some(mut entry) = self.map.get_mut(key) {
            let (result, value) = update(Some(&*entry));
            *entry = value;
            return Some(result);
        }
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match self.map.entry(key.to_owned()) {
            dashmap::Entry::Occupied(mut occupied) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                let (result, value) = update(Some(occupied.get()));
                occupied.insert(value);
                Some(result)
            }
            dashmap::Entry::Vacant(vacant) => {
                let (result, value) = update(None);
                vacant.insert(value);
                Some(result)
            }
        }
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: &str) -> bool {
        let removed = self.map.remove(key).is_some();
        if removed {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Calls `f` with every key (one shard locked at a time; `f` must not touch the map).
    pub fn for_each_key(&self, mut f: impl FnMut(&str)) {
        for entry in self.map.iter() {
            f(entry.key());
        }
    }

    /// Calls `f` with every value (one shard locked at a time; `f` must not touch the map).
    pub fn for_each_value(&self, mut f: impl FnMut(&V)) {
        for entry in self.map.iter() {
            f(entry.value());
        }
    }

    pub fn get(&self, key: &str) -> Option<V>
    where
        V: Copy,
    {
        self.map.get(key).map(|v| *v)
    }

    /// Keeps only the entries `keep` approves; returns how many were dropped.
    pub fn retain(&self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let mut dropped = 0;
        self.map.retain(|_, v| {
            let kept = keep(v);
            if !kept {
                dropped += 1;
            }
            kept
        });
        self.len.fetch_sub(dropped, Ordering::AcqRel);
        dropped
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.max
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_holds_and_existing_keys_keep_updating() {
        let map = BoundedMap::new(2);
        for key in ["a", "b", "c"] {
            map.update(key, |v: Option<&u32>| ((), v.copied().unwrap_or(0) + 1));
        }
        assert_eq!(map.len(), 2);
        assert_eq!(map.refused(), 1);
        assert_eq!(map.get("c"), None);
        map.update("a", |v| ((), v.copied().unwrap_or(0) + 1));
        assert_eq!(map.get("a"), Some(2));
        assert_eq!(map.retain(|v| *v > 1), 1);
        assert_eq!(map.len(), 1);
        map.update("c", |v| ((), v.copied().unwrap_or(0) + 1));
        assert_eq!(map.get("c"), Some(1));
    }

    #[test]
    fn concurrent_inserts_never_pass_the_bound() {
        let map = std::sync::Arc::new(BoundedMap::new(100));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        map.update(&format!("{t}-{i}"), |_: Option<&u8>| ((), 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(map.len(), 100);
        assert_eq!(map.refused(), 3900);
    }
}
