//! Single-flight: identical misses in flight at the same time share one
//! computation.
//!
//! The first request to [`SingleFlight::claim`] a key becomes its
//! [`Leader`] and computes the value; later claims of the same key, until
//! the leader completes, get a [`Follower`] that waits for the leader's
//! value. A leader that is dropped without completing (its client went
//! away) wakes its followers with `None`, and they compute on their own.
//!
//! A leader must publish its value to the cache *before* completing, and a
//! new leader must look in the cache again after claiming: then a request
//! that missed just before the previous leader finished still finds the
//! value instead of computing it a second time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::key::CacheKey;
use crate::sync::lock;

type Slot<V> = watch::Receiver<Option<V>>;

/// The table of computations in flight. Cloneable handle.
#[derive(Debug)]
pub struct SingleFlight<V> {
    inner: Arc<Mutex<HashMap<CacheKey, Slot<V>>>>,
}

impl<V> Clone for SingleFlight<V> {
    fn clone(&self) -> Self {
        SingleFlight {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        SingleFlight {
            inner: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// The outcome of a claim.
#[derive(Debug)]
pub enum Claim<V> {
    Leader(Leader<V>),
    Follower(Follower<V>),
}

/// The one claimant that computes the value.
#[derive(Debug)]
pub struct Leader<V> {
    key: CacheKey,
    tx: Option<watch::Sender<Option<V>>>,
    table: SingleFlight<V>,
}

/// A claimant that waits for the leader.
#[derive(Debug)]
pub struct Follower<V> {
    rx: Slot<V>,
}

impl<V: Clone> SingleFlight<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn claim(&self, key: CacheKey) -> Claim<V> {
        let mut table = lock(&self.inner);
        if let Some(rx) = table.get(&key) {
            return Claim::Follower(Follower { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(None);
        table.insert(key, rx);
        Claim::Leader(Leader {
            key,
            tx: Some(tx),
            table: self.clone(),
        })
    }

    /// Computations in flight.
    pub fn len(&self) -> usize {
        lock(&self.inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, key: &CacheKey) {
        lock(&self.inner).remove(key);
    }
}

impl<V: Clone> Leader<V> {
    pub fn key(&self) -> CacheKey {
        self.key
    }

    /// Hands `value` to every follower and ends the flight.
    pub fn complete(mut self, value: V) {
        self.table.remove(&self.key);
        if let Some(tx) = self.tx.take() {
            // No followers is fine: the value is in the cache already.
            let _ = tx.send(Some(value));
        }
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Abandoned: remove the entry so the next claim leads; dropping
            // the sender wakes the followers with `None`.
            lock(&self.table.inner).remove(&self.key);
        }
    }
}

impl<V: Clone> Follower<V> {
    /// The leader's value, or `None` when the leader gave up.
    pub async fn wait(mut self) -> Option<V> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(value) => value.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value_and_the_flight_ends() {
        let flights = SingleFlight::<u32>::new();
        let Claim::Leader(leader) = flights.claim(CacheKey(1)) else {
            panic!("first claim must lead")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match flights.claim(CacheKey(1)) {
                Claim::Follower(f) => tokio::spawn(f.wait()),
                Claim::Leader(_) => panic!("second claim must follow"),
            })
            .collect();
        assert!(matches!(flights.claim(CacheKey(2)), Claim::Leader(_)));
        leader.complete(7);
        for f in followers {
            assert_eq!(f.await.unwrap(), Some(7));
        }
        assert!(flights.is_empty());
        assert!(matches!(flights.claim(CacheKey(1)), Claim::Leader(_)));
    }

    #[tokio::test]
    async fn an_abandoned_leader_releases_its_followers() {
        let flights = SingleFlight::<u32>::new();
        let leader = flights.claim(CacheKey(1));
        let Claim::Follower(follower) = flights.claim(CacheKey(1)) else {
            panic!("second claim must follow")
        };
        drop(leader);
        assert_eq!(follower.wait().await, None);
        assert!(flights.is_empty());
    }
}
