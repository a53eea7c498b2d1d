//! Where the `table` resources that move with agents are (the `move` binding), as this node
//! knows it: each such table's [`TablePlace`], kept in `table_places` beside the tables'
//! entries, and changed only in the transactions of the hop that moves it, so that a table is
//! at exactly one node whatever crashes when:
//!
//! - an agent that binds a table by move holds it ([`Batch::hold_table`]): from then on only
//!   that agent uses it here, and it leaves with the agent;
//! - the destination of the hop stores the table's entries with the arriving agent
//!   ([`Batch::arrive_tables`], in the transaction of `accept_arrival`), as
//!   [`TablePlace::Arriving`]: not usable until the hop commits (`commit_arrival`, which makes
//!   it held), and dropped with the agent if it does not (`abort_arrival`, which puts back what
//!   the node knew before);
//! - the source drops the entries when the hop is complete (`depart`, in the transaction that
//!   deletes the agent), and remembers the table as [`TablePlace::Gone`];
//! - an agent that ends lets go of what it holds ([`Batch::release_tables`]): the tables stay
//!   where it ended, usable by every agent granted them.
//!
//! A table with no place is as the node's configuration says (there, or not).

use std::sync::atomic::Ordering;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::schema::TABLE_PLACES;
use super::{Batch, Store, StoreError};

/// Where a table that moves is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TablePlace {
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
        before: Option<Box<TablePlace>>,
    },
    /// Gone with an agent, to the node with this peer id.
    Gone {
        /// The node it went to.
        to: String,
    },
}

/// A table's entries as they move: (key, encoded value), in key order.
pub type TableEntries = Vec<(String, Vec<u8>)>;

fn decode(name: &str, bytes: &[u8]) -> Result<TablePlace, StoreError> {
    ciborium::from_reader(bytes).map_err(|source| StoreError::Decode {
        table: "table_places",
        key: name.to_owned(),
        source,
    })
}

impl Store {
    /// Where table `name` is, if it ever moved (None: as configured).
    ///
    /// # Errors
    ///
    /// When the read fails or the record does not decode.
    pub fn table_place(&self, name: &str) -> Result<Option<TablePlace>, StoreError> {
        self.read(|txn| match txn.open_table(TABLE_PLACES)?.get(name)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        })
    }

    /// Every table whose place this node knows, by name.
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn table_places(&self) -> Result<Vec<(String, TablePlace)>, StoreError> {
        self.read(|txn| {
            let mut places = Vec::new();
            for entry in txn.open_table(TABLE_PLACES)?.iter()? {
                let (name, bytes) = entry?;
                places.push((
                    name.value().to_string(),
                    decode(name.value(), bytes.value())?,
                ));
            }
            Ok(places)
        })
    }

    /// The names of the tables agent `agent` holds here, and their entries: what leaves with
    /// it.
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn tables_held_by(&self, agent: &str) -> Result<Vec<(String, TableEntries)>, StoreError> {
        if !self.shared.occupied.table_places.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let held: Vec<String> = self
            .table_places()?
            .into_iter()
            .filter(
                |(_, place)| matches!(place, TablePlace::Here { holder: Some(h) } if h == agent),
            )
            .map(|(name, _)| name)
            .collect();
        held.into_iter()
            .map(|name| {
                let mut entries = Vec::new();
                self.table_each(&name, |key, value| {
                    entries.push((key.to_string(), value.to_vec()));
                    true
                })?;
                Ok((name, entries))
            })
            .collect()
    }
}

impl Batch<'_> {
    fn place(&mut self, name: &str) -> Result<Option<TablePlace>, StoreError> {
        match self.txn.open_table(TABLE_PLACES)?.get(name)? {
            Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
            None => Ok(None),
        }
    }

    fn set_place(&mut self, name: &str, place: Option<&TablePlace>) -> Result<(), StoreError> {
        let mut places = self.txn.open_table(TABLE_PLACES)?;
        match place {
            Some(place) => {
                self.occupied.table_places.store(true, Ordering::Relaxed);
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
        matching: impl Fn(&TablePlace) -> bool,
    ) -> Result<Vec<(String, TablePlace)>, StoreError> {
        let mut found = Vec::new();
        if !self.occupied.table_places.load(Ordering::Relaxed) {
            return Ok(found);
        }
        for entry in self.txn.open_table(TABLE_PLACES)?.iter()? {
            let (name, bytes) = entry?;
            let place = decode(name.value(), bytes.value())?;
            if matching(&place) {
                found.push((name.value().to_string(), place));
            }
        }
        Ok(found)
    }

    /// Agent `agent` holds table `name`, which is here: it leaves with the agent from now on.
    /// Returns the holder that keeps it instead, if another agent holds it, or why it is not
    /// here.
    ///
    /// # Errors
    ///
    /// When the read or the write fails.
    pub fn hold_table(
        &mut self,
        name: &str,
        agent: &str,
    ) -> Result<Result<(), TablePlace>, StoreError> {
        match self.place(name)? {
            None | Some(TablePlace::Here { holder: None }) => {
                let held = TablePlace::Here {
                    holder: Some(agent.to_string()),
                };
                self.set_place(name, Some(&held))?;
                Ok(Ok(()))
            }
            Some(TablePlace::Here { holder: Some(h) }) if h == agent => Ok(Ok(())),
            Some(other) => Ok(Err(other)),
        }
    }

    /// Whether one of the tables `names`, arriving with agent `agent`, meets one this node
    /// holds otherwise (here, or arriving with another agent): why, if so. A table the node
    /// never knew of is the caller's to check against its configuration.
    ///
    /// # Errors
    ///
    /// When the read fails or a record does not decode.
    pub fn tables_taken<'n>(
        &mut self,
        agent: &str,
        names: impl IntoIterator<Item = &'n String>,
    ) -> Result<Option<String>, StoreError> {
        for name in names {
            match self.place(name)? {
                None | Some(TablePlace::Gone { .. }) => {}
                Some(
                    TablePlace::Here {
                        holder: Some(holder),
                    }
                    | TablePlace::Arriving { holder, .. },
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
            None | Some(TablePlace::Here { holder: None }) => true,
            Some(TablePlace::Here {
                holder: Some(holder),
            }) => holder == agent,
            Some(TablePlace::Arriving { .. } | TablePlace::Gone { .. }) => false,
        })
    }

    /// Stores the tables arriving with agent `agent` from the node with peer id `from` (by a
    /// hop not yet committed, unless `committed`), replacing whatever entries were left of
    /// them. (Checked first with [`Batch::tables_taken`].)
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn arrive_tables(
        &mut self,
        agent: &str,
        from: &str,
        tables: &[(String, TableEntries)],
        committed: bool,
    ) -> Result<(), StoreError> {
        for (name, entries) in tables {
            // Held here by this very agent, it is not here any more: the agent comes back
            // before this node completed its departure, and the table is where the agent
            // comes from. Should this arrival not commit, that is where it stays.
            let before = match self.place(name)? {
                Some(TablePlace::Here {
                    holder: Some(holder),
                }) if holder == agent => Some(TablePlace::Gone {
                    to: from.to_string(),
                }),
                before => before,
            };
            self.table_clear(name)?;
            self.table_set_all(name, entries)?;
            let place = if committed {
                TablePlace::Here {
                    holder: Some(agent.to_string()),
                }
            } else {
                TablePlace::Arriving {
                    holder: agent.to_string(),
                    before: before.map(Box::new),
                }
            };
            self.set_place(name, Some(&place))?;
        }
        Ok(())
    }

    /// The arrival of agent `agent` committed: the tables that came with it are its own here.
    pub(super) fn commit_arriving_tables(&mut self, agent: &str) -> Result<(), StoreError> {
        let arrived = self.places_where(
            |p| matches!(p, TablePlace::Arriving { holder, .. } if holder == agent),
        )?;
        for (name, _) in arrived {
            let held = TablePlace::Here {
                holder: Some(agent.to_string()),
            };
            self.set_place(&name, Some(&held))?;
        }
        Ok(())
    }

    /// The arrival of agent `agent` did not commit: the tables that came with it go, and the
    /// node knows of them what it knew before.
    pub(super) fn abort_arriving_tables(&mut self, agent: &str) -> Result<(), StoreError> {
        let arrived = self.places_where(
            |p| matches!(p, TablePlace::Arriving { holder, .. } if holder == agent),
        )?;
        for (name, place) in arrived {
            self.table_clear(&name)?;
            let TablePlace::Arriving { before, .. } = place else {
                continue;
            };
            self.set_place(&name, before.as_deref())?;
        }
        Ok(())
    }

    /// Agent `agent` left for `to`: the tables it held here went with it.
    pub(super) fn depart_tables(&mut self, agent: &str, to: &str) -> Result<(), StoreError> {
        let held =
            self.places_where(|p| matches!(p, TablePlace::Here { holder: Some(h) } if h == agent))?;
        for (name, _) in held {
            self.table_clear(&name)?;
            let gone = TablePlace::Gone { to: to.to_string() };
            self.set_place(&name, Some(&gone))?;
        }
        Ok(())
    }

    /// Agent `agent` ended here: the tables it held stay, held by no agent.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn release_tables(&mut self, agent: &str) -> Result<(), StoreError> {
        let held =
            self.places_where(|p| matches!(p, TablePlace::Here { holder: Some(h) } if h == agent))?;
        for (name, _) in held {
            self.set_place(&name, Some(&TablePlace::Here { holder: None }))?;
        }
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

    fn place(store: &Store) -> Option<TablePlace> {
        store.table_place("t").expect("read")
    }

    fn len(store: &Store) -> u64 {
        store.table_len("t").expect("read")
    }

    #[test]
    fn a_table_is_at_one_place_through_arrivals_departures_and_their_races() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).expect("opens");
        let t = vec![("t".to_string(), entries(3))];
        let names = || vec!["t".to_string()];
        // Agent x arrives with it (not committed yet): y, arriving with a table of the same
        // name meanwhile, is refused inside its own transaction.
        store
            .batch(|b| {
                assert_eq!(b.tables_taken("x", &names())?, None);
                b.arrive_tables("x", "peer-a", &t, false)
            })
            .expect("arrives");
        let taken = store
            .batch(|b| b.tables_taken("y", &names()))
            .expect("read");
        assert!(taken.is_some_and(|why| why.contains("'t'")));
        assert!(!store.batch(|b| b.table_usable_by("t", "x")).expect("read"));
        // The hop commits: x holds it, and only x may change it.
        store
            .batch(|b| b.commit_arriving_tables("x"))
            .expect("commits");
        let held = TablePlace::Here {
            holder: Some("x".into()),
        };
        assert_eq!((place(&store), len(&store)), (Some(held.clone()), 3));
        assert!(store.batch(|b| b.table_usable_by("t", "x")).expect("read"));
        assert!(!store.batch(|b| b.table_usable_by("t", "y")).expect("read"));
        assert_eq!(store.tables_held_by("x").expect("read"), t);
        // x comes back from peer-c before this node completed its departure to peer-c, and
        // that return does not commit: the table is where x is, not here.
        store
            .batch(|b| b.arrive_tables("x", "peer-c", &[("t".into(), entries(5))], false))
            .expect("arrives");
        assert_eq!(len(&store), 5);
        store
            .batch(|b| b.abort_arriving_tables("x"))
            .expect("aborts");
        let gone = TablePlace::Gone {
            to: "peer-c".into(),
        };
        assert_eq!((place(&store), len(&store)), (Some(gone.clone()), 0));
        // It comes back for good, and x leaves with it, for peer-d.
        store
            .batch(|b| b.arrive_tables("x", "peer-c", &t, true))
            .expect("arrives");
        assert_eq!((place(&store), len(&store)), (Some(held), 3));
        store
            .batch(|b| b.depart_tables("x", "peer-d"))
            .expect("departs");
        let gone = TablePlace::Gone {
            to: "peer-d".into(),
        };
        assert_eq!((place(&store), len(&store)), (Some(gone), 0));
        assert!(store.tables_held_by("x").expect("read").is_empty());
        // Back once more, and x ends here: the table stays, held by no agent.
        store
            .batch(|b| b.arrive_tables("x", "peer-d", &t, true))
            .expect("arrives");
        store.batch(|b| b.release_tables("x")).expect("releases");
        assert_eq!(
            (place(&store), len(&store)),
            (Some(TablePlace::Here { holder: None }), 3)
        );
        assert!(store.batch(|b| b.table_usable_by("t", "y")).expect("read"));
        assert_eq!(
            store.batch(|b| b.hold_table("t", "y")).expect("holds"),
            Ok(())
        );
        assert_eq!(
            store.batch(|b| b.hold_table("t", "z")).expect("reads"),
            Err(TablePlace::Here {
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
        assert!(store.tables_held_by("x").expect("read").is_empty());
        store
            .batch(|b| {
                b.table_set("t", "k", &[1])?;
                assert_eq!(b.hold_table("t", "x")?, Ok(()));
                b.cache_chunk("x", "d", 0, b"chunk")
            })
            .expect("writes");
        drop(store);
        // Opened again, the store knows both tables hold something before any write.
        let store = Store::open(&path, Durability::NoSync).expect("opens again");
        assert_eq!(
            store.tables_held_by("x").expect("read"),
            vec![("t".to_string(), vec![("k".to_string(), vec![1])])]
        );
        store.batch(|b| b.drop_cached_chunks("x")).expect("drops");
        assert_eq!(store.cached_chunk_count().expect("read"), 0);
    }
}
