//! Where the resources that move with agents are (the `move` binding), as this node knows it:
//! each one's [`ResourcePlace`], kept in `table_places` beside a table's entries, a value's
//! bytes (`moved_values`) or a dataset's files (`moved_datasets`), and changed only in the
//! transactions of the hop that moves it, so that a resource is at exactly one node whatever
//! crashes when:
//!
//! - an agent that binds a resource by move holds it ([`Batch::hold_resource`]): from then on
//!   only that agent uses it here, and it leaves with the agent (a value or a dataset of the
//!   node's configuration is copied into the store then, so that what leaves is in the store);
//! - the destination of the hop stores the resource's contents with the arriving agent
//!   ([`Batch::arrive_moved`], in the transaction of `accept_arrival`), as
//!   [`ResourcePlace::Arriving`]: not usable until the hop commits (`commit_arrival`, which makes
//!   it held), and dropped with the agent if it does not (`abort_arrival`, which puts back what
//!   the node knew before);
//! - the source drops the contents when the hop is complete (`depart`, in the transaction that
//!   deletes the agent), and remembers the resource as [`ResourcePlace::Gone`];
//! - an agent that ends lets go of what it holds ([`Batch::release_moved`]): the resources stay
//!   where it ended, usable by every agent granted them.
//!
//! A resource with no place is as the node's configuration says (there, or not).

use std::sync::atomic::Ordering;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::error::decode_cbor;
use super::moved_datasets::{moved_dataset_in, MovedDataset};
use super::schema::{MOVED_DATASETS, MOVED_VALUES, RESOURCE_PLACES};
use super::{Batch, Store, StoreError};

/// Where a resource that moves is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResourcePlace {
    /// Here; held by an agent (it leaves with it) or by none (any agent granted it may use it).
    Here {
        /// The agent holding it.
        holder: Option<String>,
    },
    /// Here as part of an agent's arrival that has not committed: not usable yet.
    Arriving {
        /// The arriving agent.
        holder: String,
        /// Where the node knew it to be before (put back if the hop does not commit).
        before: Option<Box<ResourcePlace>>,
    },
    /// Gone with an agent, to the node with this peer id.
    Gone {
        /// The node it went to.
        to: String,
    },
}

/// A table's entries as they move: (key, encoded value), in key order.
pub type TableEntries = Vec<(String, Vec<u8>)>;

/// A resource an agent holds, as [`Store::moved_with`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldResource {
    /// A table (its entries are in the store).
    Table,
    /// A value, encoded.
    Value(Vec<u8>),
    /// A dataset (its files are in the store).
    Dataset(MovedDataset),
}

/// What of a resource moves with its agent, as its destination stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceContents {
    /// A table's entries.
    Table(TableEntries),
    /// A value, encoded.
    Value(Vec<u8>),
    /// A dataset's files, in order.
    Dataset(Vec<Vec<u8>>),
}

impl ResourcePlace {
    /// Decodes `bytes` as a `table_places` value with the store's own decoder. It exists for
    /// fuzzing (`fuzz/`, target `store_record`), which needs the decoder without a database;
    /// the node never calls it.
    #[doc(hidden)]
    pub fn decode_place_value(bytes: &[u8]) -> Result<ResourcePlace, StoreError> {
        decode("", bytes)
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<ResourcePlace, StoreError> {
    decode_cbor("table_places", name, bytes)
}

impl Store {
    /// Where resource `name` is, if it ever moved (None: as configured).
    ///
    /// # Errors
    ///
    /// When the read fails or the record does not decode.
    pub fn resource_place(&self, name: &str) -> Result<Option<ResourcePlace>, StoreError> {
        if !self.shared.occupied.resource_places.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.read(|txn| match txn.open_table(RESOURCE_PLACES)?.get(name)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        })
    }

    /// Every resource whose place this node knows, by name.
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn resource_places(&self) -> Result<Vec<(String, ResourcePlace)>, StoreError> {
        self.read(|txn| {
            let mut places = Vec::new();
            for entry in txn.open_table(RESOURCE_PLACES)?.iter()? {
                let (name, bytes) = entry?;
                places.push((
                    name.value().to_string(),
                    decode(name.value(), bytes.value())?,
                ));
            }
            Ok(places)
        })
    }

    /// What resource `name`, bound by move and here (held, or let go by an agent that ended
    /// here), is: a value or a dataset if the store holds one of that name (one read of
    /// both), else a table.
    ///
    /// # Errors
    ///
    /// When the read fails or the dataset's record does not decode.
    pub fn held_as(&self, name: &str) -> Result<HeldResource, StoreError> {
        self.read(|txn| {
            if let Some(value) = txn.open_table(MOVED_VALUES)?.get(name)? {
                return Ok(HeldResource::Value(value.value().to_vec()));
            }
            Ok(
                match moved_dataset_in(&txn.open_table(MOVED_DATASETS)?, name)? {
                    Some(dataset) => HeldResource::Dataset(dataset),
                    None => HeldResource::Table,
                },
            )
        })
    }

    /// The names of the resources agent `agent` holds here, and what they are: what leaves
    /// with it (a table's entries are read as they are sent: `Store::table_each`).
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn moved_with(&self, agent: &str) -> Result<Vec<(String, HeldResource)>, StoreError> {
        if !self.shared.occupied.resource_places.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let held: Vec<String> = self
            .resource_places()?
            .into_iter()
            .filter(
                |(_, place)| matches!(place, ResourcePlace::Here { holder: Some(h) } if h == agent),
            )
            .map(|(name, _)| name)
            .collect();
        held.into_iter()
            .map(|name| {
                let held = self.held_as(&name)?;
                Ok((name, held))
            })
            .collect()
    }
}

impl Batch<'_> {
    fn place(&mut self, name: &str) -> Result<Option<ResourcePlace>, StoreError> {
        match self.txn.open_table(RESOURCE_PLACES)?.get(name)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        }
    }

    fn set_place(&mut self, name: &str, place: Option<&ResourcePlace>) -> Result<(), StoreError> {
        let mut places = self.txn.open_table(RESOURCE_PLACES)?;
        match place {
            Some(place) => {
                self.occupied.resource_places.store(true, Ordering::Relaxed);
                let mut bytes = Vec::new();
                ciborium::into_writer(place, &mut bytes).map_err(|source| StoreError::Encode {
                    table: "table_places",
                    key: name.to_owned(),
                    source,
                })?;
                places.insert(name, bytes.as_slice())?;
            }
            None => {
                places.remove(name)?;
            }
        }
        Ok(())
    }

    /// The tables whose place is `matching`, by name.
    fn places_where(
        &mut self,
        matching: impl Fn(&ResourcePlace) -> bool,
    ) -> Result<Vec<(String, ResourcePlace)>, StoreError> {
        let mut found = Vec::new();
        if !self.occupied.resource_places.load(Ordering::Relaxed) {
            return Ok(found);
        }
        for entry in self.txn.open_table(RESOURCE_PLACES)?.iter()? {
            let (name, bytes) = entry?;
            let place = decode(name.value(), bytes.value())?;
            if matching(&place) {
                found.push((name.value().to_string(), place));
            }
        }
        Ok(found)
    }

    /// Agent `agent` holds resource `name`, which is here: it leaves with the agent from now
    /// on. `configured` is the value or the dataset's files of the node's configuration, kept
    /// if it never moved (None for a table). Returns the holder that keeps it instead, if
    /// another agent holds it, or why it is not here.
    ///
    /// # Errors
    ///
    /// When the read or the write fails.
    pub fn hold_resource(
        &mut self,
        name: &str,
        agent: &str,
        configured: Option<&ResourceContents>,
    ) -> Result<Result<(), ResourcePlace>, StoreError> {
        match self.place(name)? {
            place @ (None | Some(ResourcePlace::Here { holder: None })) => {
                if let (None, Some(contents)) = (place, configured) {
                    self.put_contents(name, contents)?;
                }
                let held = ResourcePlace::Here {
                    holder: Some(agent.to_string()),
                };
                self.set_place(name, Some(&held))?;
                Ok(Ok(()))
            }
            Some(ResourcePlace::Here { holder: Some(h) }) if h == agent => Ok(Ok(())),
            Some(other) => Ok(Err(other)),
        }
    }

    /// Whether one of the resources `names`, arriving with agent `agent`, meets one this node
    /// holds otherwise (here, or arriving with another agent): why, if so. A resource the node
    /// never knew of is the caller's to check against its configuration.
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn resources_taken<'n>(
        &mut self,
        agent: &str,
        names: impl IntoIterator<Item = &'n String>,
    ) -> Result<Option<String>, StoreError> {
        for name in names {
            match self.place(name)? {
                None | Some(ResourcePlace::Gone { .. }) => {}
                Some(
                    ResourcePlace::Here {
                        holder: Some(holder),
                    }
                    | ResourcePlace::Arriving { holder, .. },
                ) if holder == agent => {}
                Some(_) => {
                    return Ok(Some(format!(
                        "this node has a resource '{name}' of its own"
                    )))
                }
            }
        }
        Ok(None)
    }

    /// Whether agent `agent` may change table `name` here now: it is here and held by no other
    /// agent (checked in the transaction that changes it).
    ///
    /// # Errors
    ///
    /// When the read fails or the record does not decode.
    pub fn table_usable_by(&mut self, name: &str, agent: &str) -> Result<bool, StoreError> {
        Ok(match self.place(name)? {
            None | Some(ResourcePlace::Here { holder: None }) => true,
            Some(ResourcePlace::Here {
                holder: Some(holder),
            }) => holder == agent,
            Some(ResourcePlace::Arriving { .. } | ResourcePlace::Gone { .. }) => false,
        })
    }

    /// Stores the resources arriving with agent `agent` from the node with peer id `from` (by
    /// a hop not yet committed, unless `committed`), replacing whatever was left of them.
    /// (Checked first with [`Batch::resources_taken`].)
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn arrive_moved(
        &mut self,
        agent: &str,
        from: &str,
        resources: &[(String, ResourceContents)],
        committed: bool,
    ) -> Result<(), StoreError> {
        for (name, contents) in resources {
            // Held here by this very agent, it is not here any more: the agent comes back
            // before this node completed its departure, and the resource is where the agent
            // comes from. Should this arrival not commit, that is where it stays.
            let before = match self.place(name)? {
                Some(ResourcePlace::Here {
                    holder: Some(holder),
                }) if holder == agent => Some(ResourcePlace::Gone {
                    to: from.to_string(),
                }),
                before => before,
            };
            self.drop_contents(name)?;
            self.put_contents(name, contents)?;
            let place = if committed {
                ResourcePlace::Here {
                    holder: Some(agent.to_string()),
                }
            } else {
                ResourcePlace::Arriving {
                    holder: agent.to_string(),
                    before: before.map(Box::new),
                }
            };
            self.set_place(name, Some(&place))?;
        }
        Ok(())
    }

    /// The resources arriving with agent `agent`, and their places.
    fn arriving_with(&mut self, agent: &str) -> Result<Vec<(String, ResourcePlace)>, StoreError> {
        self.places_where(
            |p| matches!(p, ResourcePlace::Arriving { holder, .. } if holder == agent),
        )
    }

    /// The arrival of agent `agent` committed: the resources that came with it are its own
    /// here.
    pub(super) fn commit_arriving_moved(&mut self, agent: &str) -> Result<(), StoreError> {
        let arrived = self.arriving_with(agent)?;
        for (name, _) in arrived {
            let held = ResourcePlace::Here {
                holder: Some(agent.to_string()),
            };
            self.set_place(&name, Some(&held))?;
        }
        Ok(())
    }

    /// The arrival of agent `agent` did not commit: the resources that came with it go, and
    /// the node knows of them what it knew before.
    pub(super) fn abort_arriving_moved(&mut self, agent: &str) -> Result<(), StoreError> {
        let arrived = self.arriving_with(agent)?;
        for (name, place) in arrived {
            self.drop_contents(&name)?;
            let ResourcePlace::Arriving { before, .. } = place else {
                continue;
            };
            self.set_place(&name, before.as_deref())?;
        }
        Ok(())
    }

    /// Agent `agent` left for `to`: the resources it held here went with it.
    pub(super) fn depart_moved(&mut self, agent: &str, to: &str) -> Result<(), StoreError> {
        let held = self
            .places_where(|p| matches!(p, ResourcePlace::Here { holder: Some(h) } if h == agent))?;
        for (name, _) in held {
            self.drop_contents(&name)?;
            let gone = ResourcePlace::Gone { to: to.to_string() };
            self.set_place(&name, Some(&gone))?;
        }
        Ok(())
    }

    /// Agent `agent` ended here: the resources it held stay, held by no agent.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn release_moved(&mut self, agent: &str) -> Result<(), StoreError> {
        let held = self
            .places_where(|p| matches!(p, ResourcePlace::Here { holder: Some(h) } if h == agent))?;
        for (name, _) in held {
            self.set_place(&name, Some(&ResourcePlace::Here { holder: None }))?;
        }
        Ok(())
    }

    /// Keeps `contents` as what this node holds of moved resource `name`.
    fn put_contents(&mut self, name: &str, contents: &ResourceContents) -> Result<(), StoreError> {
        match contents {
            ResourceContents::Table(entries) => self.table_set_all(name, entries),
            ResourceContents::Value(value) => self.put_moved_value(name, value),
            ResourceContents::Dataset(files) => self.put_moved_dataset(name, files),
        }
    }

    /// Keeps `value` as the bytes of value `name` bound by move.
    fn put_moved_value(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let old = self
            .txn
            .open_table(MOVED_VALUES)?
            .insert(name, value)?
            .map_or(0, |old| old.value().len());
        self.count(value.len(), old);
        Ok(())
    }

    /// Drops what this node holds of moved resource `name` (a table's entries, a value or a
    /// dataset's files).
    fn drop_contents(&mut self, name: &str) -> Result<(), StoreError> {
        self.table_clear(name)?;
        self.drop_moved_dataset(name)?;
        let old = self
            .txn
            .open_table(MOVED_VALUES)?
            .remove(name)?
            .map_or(0, |old| old.value().len());
        self.count(0, old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    fn entries(n: u8) -> TableEntries {
        (0..n).map(|i| (format!("k{i}"), vec![i])).collect()
    }

    fn place(store: &Store) -> Option<ResourcePlace> {
        store.resource_place("t").expect("read")
    }

    fn len(store: &Store) -> u64 {
        store.table_len("t").expect("read")
    }

    #[test]
    fn a_table_is_at_one_place_through_arrivals_departures_and_their_races() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).expect("opens");
        let t = vec![("t".to_string(), ResourceContents::Table(entries(3)))];
        let names = || vec!["t".to_string()];
        // Agent x arrives with it (not committed yet): y, arriving with a table of the same
        // name meanwhile, is refused inside its own transaction.
        store
            .batch(|b| {
                assert_eq!(b.resources_taken("x", &names())?, None);
                b.arrive_moved("x", "peer-a", &t, false)
            })
            .expect("arrives");
        let taken = store
            .batch(|b| b.resources_taken("y", &names()))
            .expect("read");
        assert!(taken.is_some_and(|why| why.contains("'t'")));
        assert!(!store.batch(|b| b.table_usable_by("t", "x")).expect("read"));
        // The hop commits: x holds it, and only x may change it.
        store
            .batch(|b| b.commit_arriving_moved("x"))
            .expect("commits");
        let held = ResourcePlace::Here {
            holder: Some("x".into()),
        };
        assert_eq!((place(&store), len(&store)), (Some(held.clone()), 3));
        assert!(store.batch(|b| b.table_usable_by("t", "x")).expect("read"));
        assert!(!store.batch(|b| b.table_usable_by("t", "y")).expect("read"));
        assert_eq!(
            store.moved_with("x").expect("read"),
            vec![("t".to_string(), HeldResource::Table)]
        );
        // x comes back from peer-c before this node completed its departure to peer-c, and
        // that return does not commit: the table is where x is, not here.
        store
            .batch(|b| {
                b.arrive_moved(
                    "x",
                    "peer-c",
                    &[("t".into(), ResourceContents::Table(entries(5)))],
                    false,
                )
            })
            .expect("arrives");
        assert_eq!(len(&store), 5);
        store
            .batch(|b| b.abort_arriving_moved("x"))
            .expect("aborts");
        let gone = ResourcePlace::Gone {
            to: "peer-c".into(),
        };
        assert_eq!((place(&store), len(&store)), (Some(gone.clone()), 0));
        // It comes back for good, and x leaves with it, for peer-d.
        store
            .batch(|b| b.arrive_moved("x", "peer-c", &t, true))
            .expect("arrives");
        assert_eq!((place(&store), len(&store)), (Some(held), 3));
        store
            .batch(|b| b.depart_moved("x", "peer-d"))
            .expect("departs");
        let gone = ResourcePlace::Gone {
            to: "peer-d".into(),
        };
        assert_eq!((place(&store), len(&store)), (Some(gone), 0));
        assert!(store.moved_with("x").expect("read").is_empty());
        // Back once more, and x ends here: the table stays, held by no agent.
        store
            .batch(|b| b.arrive_moved("x", "peer-d", &t, true))
            .expect("arrives");
        store.batch(|b| b.release_moved("x")).expect("releases");
        assert_eq!(
            (place(&store), len(&store)),
            (Some(ResourcePlace::Here { holder: None }), 3)
        );
        assert!(store.batch(|b| b.table_usable_by("t", "y")).expect("read"));
        assert_eq!(
            store
                .batch(|b| b.hold_resource("t", "y", None))
                .expect("holds"),
            Ok(())
        );
        assert_eq!(
            store
                .batch(|b| b.hold_resource("t", "z", None))
                .expect("reads"),
            Err(ResourcePlace::Here {
                holder: Some("y".into())
            })
        );
    }

    #[test]
    fn a_reopened_store_still_finds_the_tables_held_and_the_chunks_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("s.redb");
        let store = Store::open(&path, Durability::NoSync).expect("opens");
        // Nothing was ever held or kept: a departure finds nothing to take or drop.
        assert!(store.moved_with("x").expect("read").is_empty());
        store
            .batch(|b| {
                b.table_set("t", "k", &[1])?;
                assert_eq!(b.hold_resource("t", "x", None)?, Ok(()));
                b.cache_chunk("x", "d", 0, b"chunk")
            })
            .expect("writes");
        drop(store);
        // Opened again, the store knows both tables hold something before any write.
        let store = Store::open(&path, Durability::NoSync).expect("opens again");
        assert_eq!(
            store.moved_with("x").expect("read"),
            vec![("t".to_string(), HeldResource::Table)]
        );
        store.batch(|b| b.drop_cached_chunks("x")).expect("drops");
        assert_eq!(store.cached_chunk_count().expect("read"), 0);
    }

    /// A value of the configuration, bound by move, is copied into the store when first held,
    /// leaves with its agent (dropped here, remembered as gone), and where it arrives is the
    /// value that came, gone again if that arrival does not commit.
    #[test]
    fn a_value_moves_as_a_table_does() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).expect("opens");
        let value = |store: &Store| match store.held_as("v").expect("read") {
            HeldResource::Value(bytes) => Some(bytes),
            _ => None,
        };
        let configured = ResourceContents::Value(b"configured".to_vec());
        let held = store
            .batch(|b| b.hold_resource("v", "x", Some(&configured)))
            .expect("holds");
        assert_eq!(
            (held, value(&store)),
            (Ok(()), Some(b"configured".to_vec()))
        );
        assert_eq!(
            store.moved_with("x").expect("read"),
            vec![("v".to_string(), HeldResource::Value(b"configured".to_vec()))]
        );
        let carried = vec![(
            "v".to_string(),
            ResourceContents::Value(b"configured".to_vec()),
        )];
        let before = store.stored_bytes();
        store
            .batch(|b| b.depart_moved("x", "peer-b"))
            .expect("departs");
        assert_eq!(value(&store), None);
        assert_eq!(store.stored_bytes(), before - 10);
        assert_eq!(
            store.resource_place("v").expect("read"),
            Some(ResourcePlace::Gone {
                to: "peer-b".into()
            })
        );
        // Held again with the configuration's bytes, it would not be: it is gone.
        let again = store
            .batch(|b| b.hold_resource("v", "y", Some(&configured)))
            .expect("reads");
        assert!(matches!(again, Err(ResourcePlace::Gone { .. })));
        // It comes back, and that hop does not commit: gone it stays, with nothing kept.
        store
            .batch(|b| b.arrive_moved("x", "peer-b", &carried, false))
            .expect("arrives");
        assert_eq!(value(&store), Some(b"configured".to_vec()));
        store
            .batch(|b| b.abort_arriving_moved("x"))
            .expect("aborts");
        assert_eq!(value(&store), None);
        // It comes back for good, and x ends here: the value stays, for every agent.
        store
            .batch(|b| b.arrive_moved("x", "peer-b", &carried, true))
            .expect("arrives");
        store.batch(|b| b.release_moved("x")).expect("releases");
        assert_eq!(
            (store.resource_place("v").expect("read"), value(&store)),
            (
                Some(ResourcePlace::Here { holder: None }),
                Some(b"configured".to_vec())
            )
        );
    }
}
