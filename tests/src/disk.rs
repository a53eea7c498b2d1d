//! A disk for redb (`redb::StorageBackend`) that the tests control: it can start failing at
//! any moment, as a full or dying disk does, and it can lose power at any point of what it was
//! asked, keeping only what reached it: everything before the last `sync_data`, and any subset
//! of the writes after it, the last one possibly torn. The store's claims (a committed write survives, a write
//! that did not commit leaves nothing, a failing disk stops the node without losing an agent)
//! are tested on it.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the disk does with one call that changes it.
#[derive(Debug, Clone)]
enum Change {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

impl Change {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Change::Write { offset, data } => {
                if image.len() < offset + data.len() {
                    image.resize(offset + data.len(), 0);
                }
                image[*offset..offset + data.len()].copy_from_slice(data);
            }
            Change::SetLen(len) => image.resize(*len, 0),
        }
    }

    /// The first `bytes` of a write (a sector that got only partly out), or the change whole.
    fn torn(&self, bytes: usize) -> Change {
        match self {
            Change::Write { offset, data } => Change::Write {
                offset: *offset,
                data: data[..bytes.min(data.len())].to_vec(),
            },
            other => other.clone(),
        }
    }
}

/// What the disk was asked, in order, since [`SimulatedDisk::record`].
#[derive(Debug, Clone)]
enum Event {
    Change(Change),
    Sync,
}

#[derive(Debug, Default)]
struct State {
    /// What a reader sees now.
    image: Vec<u8>,
    /// What survives a power loss for sure: the image at the last `sync_data`.
    durable: Vec<u8>,
    /// The changes since, in order.
    pending: Vec<Change>,
    /// Since [`SimulatedDisk::record`]: the durable image and pending changes then, and every
    /// event after.
    recorded: Option<(Vec<u8>, Vec<Change>, Vec<Event>)>,
}

/// A simulated disk (cheap to clone: clones share it).
#[derive(Debug, Clone, Default)]
pub struct SimulatedDisk {
    state: Arc<Mutex<State>>,
    failing: Arc<AtomicBool>,
}

impl SimulatedDisk {
    /// An empty disk.
    pub fn new() -> SimulatedDisk {
        SimulatedDisk::default()
    }

    /// From now on every write, resize and sync fails (reads still work), or, with `false`,
    /// none does.
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Starts recording what the disk is asked, so that [`SimulatedDisk::after_power_loss`]
    /// can cut the power at any point from here on.
    pub fn record(&self) {
        let mut state = self.lock();
        state.recorded = Some((state.durable.clone(), state.pending.clone(), Vec::new()));
    }

    /// How many events (writes, resizes, syncs) were recorded.
    pub fn recorded(&self) -> usize {
        self.lock().recorded.as_ref().map_or(0, |r| r.2.len())
    }

    /// A new disk holding what this one would after losing power right after the first `at`
    /// recorded events: what was synced by then, and of the changes after that sync a subset
    /// `seed` picks: 0 all of them, in order; 1 none; any other seed a pseudo-random subset
    /// (disks may write unsynced blocks in any order), the last write kept cut in half when the
    /// seed is odd. The database on this disk is left as it is.
    pub fn after_power_loss(&self, at: usize, seed: u64) -> SimulatedDisk {
        let (mut durable, mut pending) = {
            let state = self.lock();
            let Some((durable, pending, events)) = &state.recorded else {
                panic!("after_power_loss needs record() first");
            };
            let (mut durable, mut pending) = (durable.clone(), pending.clone());
            let mut image = durable.clone();
            for change in &pending {
                change.apply(&mut image);
            }
            for event in events.iter().take(at) {
                match event {
                    Event::Change(c) => {
                        c.apply(&mut image);
                        pending.push(c.clone());
                    }
                    Event::Sync => {
                        durable = image.clone();
                        pending.clear();
                    }
                }
            }
            (durable, pending)
        };
        let mut random = seed;
        let mut next = move || {
            // splitmix64: a fixed sequence per seed, so a failing case can be run again.
            random = random.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = random;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        pending = match seed {
            0 => pending,
            1 => Vec::new(),
            _ => pending.into_iter().filter(|_| next() % 2 == 0).collect(),
        };
        if seed > 1 && seed % 2 == 1 {
            if let Some(last) = pending.pop() {
                let half = match &last {
                    Change::Write { data, .. } => data.len() / 2,
                    Change::SetLen(_) => 0,
                };
                pending.push(last.torn(half));
            }
        }
        for change in &pending {
            change.apply(&mut durable);
        }
        let image = durable;
        SimulatedDisk {
            state: Arc::new(Mutex::new(State {
                durable: image.clone(),
                image,
                pending: Vec::new(),
                recorded: None,
            })),
            failing: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            Err(io::Error::other("simulated disk failure"))
        } else {
            Ok(())
        }
    }

    fn change(&self, change: Change) -> io::Result<()> {
        self.check()?;
        let mut state = self.lock();
        change.apply(&mut state.image);
        if let Some((.., events)) = &mut state.recorded {
            events.push(Event::Change(change.clone()));
        }
        state.pending.push(change);
        Ok(())
    }
}

impl redb::StorageBackend for SimulatedDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().image.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let source = state
            .image
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Change::SetLen(
            usize::try_from(len).map_err(io::Error::other)?,
        ))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        let mut state = self.lock();
        state.durable = state.image.clone();
        state.pending.clear();
        if let Some((.., events)) = &mut state.recorded {
            events.push(Event::Sync);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change(Change::Write {
            offset: usize::try_from(offset).map_err(io::Error::other)?,
            data: data.to_vec(),
        })
    }
}
