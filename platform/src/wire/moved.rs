//! The resources that move with an agent (its `move` bindings: tables, values, datasets), as
//! they follow its continuation on the hop's raw path: [`MovedResources`], bounded as it is read,
//! and written by the source straight from where they are kept
//! ([`MovedResources::encode_from`]).

use serde::{Deserialize, Serialize};

use super::{at_most, WireError};

/// The resources that move with an agent by a hop, as they follow its continuation: at most
/// [`MAX_MOVED_RESOURCES`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MovedResources(
    #[serde(deserialize_with = "at_most::<MAX_MOVED_RESOURCES, _, _>")] pub Vec<MovedResource>,
);

/// A table's entries as the source reads them from where they are kept, for
/// [`MovedResources::encode_from`].
pub trait TableEntriesSource {
    /// How many entries [`TableEntriesSource::each`] gives.
    fn count(&self) -> usize;

    /// Calls `each` with every entry (key, encoded value), in key order.
    ///
    /// # Errors
    ///
    /// Why the entries cannot be read.
    fn each(&self, each: &mut dyn FnMut(&str, &[u8])) -> Result<(), String>;
}

/// What of a resource moves, as [`MovedResources::encode_from`] writes it.
pub enum MovingContents<'a> {
    /// A table, its entries read as they are written.
    Table(Box<dyn TableEntriesSource + 'a>),
    /// A value, encoded.
    Value(&'a [u8]),
    /// A dataset's files, in order.
    Dataset(Vec<Vec<u8>>),
}

impl MovedResources {
    /// Their bytes (CBOR).
    ///
    /// # Errors
    ///
    /// [`WireError::Malformed`] if they do not encode.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        // Sized beforehand (CBOR adds at most 9 bytes to a string or a byte string, and 1 to a
        // pair): grown as it is written, a 10 MB buffer was copied into ever larger fresh
        // memory, a fifth of the time of a hop carrying a 10 MB table.
        let size: usize = self
            .0
            .iter()
            .map(|r| {
                let contents = match &r.contents {
                    MovedContents::Table(entries) => {
                        entries.iter().map(|(k, v)| k.len() + v.len() + 19).sum()
                    }
                    MovedContents::Value(value) => value.len() + 9,
                    MovedContents::Dataset(files) => files.iter().map(|f| f.len() + 9).sum(),
                };
                r.name.len() + contents + 32
            })
            .sum();
        let mut out = Vec::with_capacity(size + 16);
        ciborium::into_writer(self, &mut out).map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok(out)
    }

    /// Reads them from their bytes, with the bounds of [`MovedResource`].
    ///
    /// # Errors
    ///
    /// [`WireError::Malformed`] if they do not decode.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        ciborium::from_reader(bytes).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// The bytes of the [`MovedResources`] of `resources` (name, contents), each table's
    /// entries written as `source` reads them: the same bytes as [`MovedResources::encode`]
    /// gives, without a copy of every entry in memory first. `size` is about how many bytes
    /// they take (the buffer is sized for it).
    ///
    /// # Errors
    ///
    /// [`WireError::Malformed`] if a table cannot be read, or gives other than as many entries
    /// as it said.
    pub fn encode_from(
        resources: &[(&str, MovingContents<'_>)],
        size: usize,
    ) -> Result<Vec<u8>, WireError> {
        // The wire format's types, borrowed: their derived encodings are those of
        // `MovedResources`, `MovedResource` and `MovedContents` (the test below holds them to it).
        #[derive(Serialize)]
        struct Resources<'a>(Vec<Resource<'a>>);
        #[derive(Serialize)]
        struct Resource<'a> {
            name: &'a str,
            contents: Contents<'a>,
        }
        #[derive(Serialize)]
        enum Contents<'a> {
            Table(Entries<'a>),
            Value(#[serde(with = "serde_bytes")] &'a [u8]),
            Dataset(Vec<&'a serde_bytes::Bytes>),
        }
        struct Entries<'a>(&'a dyn TableEntriesSource);
        impl Serialize for Entries<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::{Error, SerializeSeq};
                let len = self.0.count();
                let mut seq = s.serialize_seq(Some(len))?;
                let (mut written, mut failed) = (0, None);
                self.0
                    .each(&mut |key, value| {
                        if failed.is_none() {
                            written += 1;
                            failed = seq
                                .serialize_element(&(key, serde_bytes::Bytes::new(value)))
                                .err();
                        }
                    })
                    .map_err(S::Error::custom)?;
                if let Some(e) = failed {
                    return Err(e);
                }
                if written != len {
                    return Err(S::Error::custom(format!(
                        "a table said it holds {len} entries, and gave {written}"
                    )));
                }
                seq.end()
            }
        }
        let resources = Resources(
            resources
                .iter()
                .map(|(name, contents)| Resource {
                    name,
                    contents: match contents {
                        MovingContents::Table(source) => Contents::Table(Entries(source.as_ref())),
                        MovingContents::Value(value) => Contents::Value(value),
                        MovingContents::Dataset(files) => Contents::Dataset(
                            files.iter().map(|f| serde_bytes::Bytes::new(f)).collect(),
                        ),
                    },
                })
                .collect(),
        );
        let mut out = Vec::with_capacity(size.saturating_add(16));
        ciborium::into_writer(&resources, &mut out)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        Ok(out)
    }
}

/// A resource moving with its agent: its name and what of it moves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MovedResource {
    /// The resource's name.
    pub name: String,
    /// Its contents.
    pub contents: MovedContents,
}

/// What of a resource moves with its agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MovedContents {
    /// A table's entries (key, encoded value), in key order, at most [`MAX_MOVED_ENTRIES`].
    Table(
        #[serde(deserialize_with = "at_most::<MAX_MOVED_ENTRIES, _, _>")]
        Vec<(String, serde_bytes::ByteBuf)>,
    ),
    /// A value, encoded.
    Value(serde_bytes::ByteBuf),
    /// A dataset's files, in order, at most [`MAX_MOVED_FILES`].
    Dataset(
        #[serde(deserialize_with = "at_most::<MAX_MOVED_FILES, _, _>")] Vec<serde_bytes::ByteBuf>,
    ),
}

/// Most files of one dataset that moves with a hop.
pub const MAX_MOVED_FILES: usize = 4096;

/// Most resources that move with one hop.
pub const MAX_MOVED_RESOURCES: usize = 8;

/// Most entries of one table that moves with a hop.
pub const MAX_MOVED_ENTRIES: usize = 16_384;

/// Most bytes of the resources that move with one hop ([`MovedResources`] encoded): they follow the
/// continuation on the raw path, so a table larger than a frame moves. The destination counts
/// them against its store quota as well.
pub const MAX_MOVED_BYTES: usize = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of entries in memory, as a source.
    struct Held(Vec<(String, Vec<u8>)>);

    impl TableEntriesSource for Held {
        fn count(&self) -> usize {
            self.0.len()
        }

        fn each(&self, each: &mut dyn FnMut(&str, &[u8])) -> Result<(), String> {
            self.0.iter().for_each(|(k, v)| each(k, v));
            Ok(())
        }
    }

    #[test]
    fn resources_written_from_their_source_are_the_bytes_of_moved_resources() {
        let table = Held(
            (0..300)
                .map(|i| (format!("k{i}"), vec![i as u8; i]))
                .collect(),
        );
        let moved = MovedResources(vec![
            MovedResource {
                name: "counts".into(),
                contents: MovedContents::Table(
                    table
                        .0
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone())))
                        .collect(),
                ),
            },
            MovedResource {
                name: "token".into(),
                contents: MovedContents::Value(serde_bytes::ByteBuf::from(b"abc".to_vec())),
            },
            MovedResource {
                name: "shard".into(),
                contents: MovedContents::Dataset(vec![
                    serde_bytes::ByteBuf::from(b"a\nb".to_vec()),
                    serde_bytes::ByteBuf::new(),
                ]),
            },
        ]);
        let written = MovedResources::encode_from(
            &[
                (
                    "counts",
                    MovingContents::Table(Box::new(Held(table.0.clone()))),
                ),
                ("token", MovingContents::Value(b"abc")),
                (
                    "shard",
                    MovingContents::Dataset(vec![b"a\nb".to_vec(), Vec::new()]),
                ),
            ],
            0,
        )
        .expect("writes");
        assert_eq!(written, moved.encode().expect("encodes"));
        assert_eq!(MovedResources::decode(&written).expect("decodes"), moved);
        // A source that gives fewer entries than it said is an error, not a short table.
        struct Short;
        impl TableEntriesSource for Short {
            fn count(&self) -> usize {
                2
            }
            fn each(&self, each: &mut dyn FnMut(&str, &[u8])) -> Result<(), String> {
                each("k", b"v");
                Ok(())
            }
        }
        let short =
            MovedResources::encode_from(&[("t", MovingContents::Table(Box::new(Short)))], 0);
        assert!(short.is_err_and(|e| e.to_string().contains("gave 1")));
    }
}
