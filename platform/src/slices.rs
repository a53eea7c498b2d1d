//! Where agent slices run: one thread per core, shared by the nodes of the process, with tokio's
//! blocking pool for what those threads cannot take at once.
//!
//! An agent slice (its code from one suspension to the next) runs off the async runtime, so a
//! busy agent never stalls networking. On tokio's blocking pool each slice wakes one of many idle
//! threads and puts it back to sleep after: with 200 agents hopping, a tenth of the CPU went to
//! those hand-offs, and the threads took turns on the two cores. Here a few long-lived threads
//! take slices from one queue and, while there is work, never sleep in between: 200 agents hop
//! about 20 % faster (interleaved runs of `bench_mesh concurrent`).
//!
//! A slice can run long (an agent computing for seconds), and it must not hold back the others.
//! So when every thread has been on its slice for [`SHORT_SLICE`] or longer, a new slice runs on
//! tokio's blocking pool, as before, and a watcher moves the slices already queued there too.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How long a thread may be on one slice and still count as about to take the next one: well
/// above what preemption adds (a slice of 100 µs shares the cores with the runtime's threads and
/// can take a few milliseconds; at 2 ms, busy runs sent slices to the blocking pool for nothing).
pub const SHORT_SLICE: Duration = Duration::from_millis(20);

/// The stack of each thread: room for Rhai's recursion, as on `tern`'s blocking threads.
const STACK: usize = 64 << 20;

/// The slice did not come back: it panicked (the message is in the log), or the runtime that was
/// to run it shut down.
#[derive(Debug, thiserror::Error)]
#[error("the agent slice did not complete (it panicked, or its runtime shut down)")]
pub struct SliceLost;

/// Runs `slice` on the slice threads (or tokio's blocking pool, see the module docs) and returns
/// what it returns. Called from a tokio runtime.
///
/// # Errors
///
/// [`SliceLost`] if `slice` panicked or could not be run.
pub async fn run<T: Send + 'static>(
    slice: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SliceLost> {
    start(slice)?.await.map_err(|_| SliceLost)
}

/// Queues `slice` at once; its result comes on the receiver.
fn start<T: Send + 'static>(
    slice: impl FnOnce() -> T + Send + 'static,
) -> Result<oneshot::Receiver<T>, SliceLost> {
    let (reply, result) = oneshot::channel();
    let job = Job {
        run: Box::new(move || {
            let _ = reply.send(slice());
        }),
        runtime: Handle::try_current().map_err(|_| SliceLost)?,
    };
    pool().submit(job);
    Ok(result)
}

/// One slice, and the runtime whose blocking pool takes it if the slice threads cannot.
struct Job {
    run: Box<dyn FnOnce() + Send>,
    runtime: Handle,
}

impl Job {
    fn run_here(self) {
        // A panic drops the reply, which reports it; the thread goes on.
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(self.run)) {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("an agent slice panicked: {what}");
        }
    }

    fn run_on_blocking_pool(self) {
        let runtime = self.runtime.clone();
        // If the runtime is shutting down the job is dropped, and with it the reply.
        drop(runtime.spawn_blocking(move || self.run_here()));
    }
}

struct Pool {
    state: Mutex<PoolState>,
    /// The threads wait here for slices.
    work: Condvar,
    /// The watcher waits here for slices to wait in the queue.
    watch: Condvar,
}

struct PoolState {
    queue: VecDeque<Job>,
    /// When each thread started the slice it is on (None: it waits for one).
    lanes: Vec<Option<Instant>>,
    /// Threads waiting for a slice.
    sleeping: usize,
    /// Whether the watcher waits for the queue to fill.
    watcher_sleeping: bool,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                lanes: vec![None; threads],
                sleeping: 0,
                watcher_sleeping: false,
            }),
            work: Condvar::new(),
            watch: Condvar::new(),
        }));
        // Lanes are numbered by the threads that started: the lanes past them are dropped.
        let mut started = 0;
        for _ in 0..threads {
            let lane = started;
            let spawned = std::thread::Builder::new()
                .name(format!("tern-slice-{lane}"))
                .stack_size(STACK)
                .spawn(move || pool.serve(lane));
            started += usize::from(spawned.is_ok());
        }
        pool.lock().lanes.truncate(started);
        if started > 0
            && std::thread::Builder::new()
                .name("tern-slice-watch".into())
                .spawn(move || pool.watch())
                .is_err()
        {
            // Without a watcher, nothing may wait: every slice goes to the blocking pool.
            pool.lock().lanes.clear();
        }
        pool
    })
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Nothing panics while the lock is held (the jobs run outside it).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn submit(&self, job: Job) {
        let mut state = self.lock();
        if state.stuck() {
            drop(state);
            job.run_on_blocking_pool();
            return;
        }
        state.queue.push_back(job);
        // Only a sleeping thread needs waking (a notification costs a system call), and the
        // watcher only when there are more slices queued than sleeping threads to take them: a
        // thread already notified counts as sleeping until it wakes, so `sleeping > 0` alone
        // would let a slice queued behind two just-notified threads wait for the slices they
        // take, however long.
        let wake_lane = state.sleeping > 0;
        let wake_watcher = state.queue.len() > state.sleeping && state.watcher_sleeping;
        drop(state);
        if wake_lane {
            self.work.notify_one();
        }
        if wake_watcher {
            self.watch.notify_one();
        }
    }

    /// A slice thread: takes slices from the queue, oldest first.
    fn serve(&self, lane: usize) {
        let mut state = self.lock();
        loop {
            match state.queue.pop_front() {
                Some(job) => {
                    state.lanes[lane] = Some(Instant::now());
                    drop(state);
                    job.run_here();
                    state = self.lock();
                    state.lanes[lane] = None;
                }
                None => {
                    state.sleeping += 1;
                    state = self
                        .work
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    state.sleeping -= 1;
                }
            }
        }
    }

    /// Moves the queued slices to the blocking pool whenever every thread is stuck on a long one.
    fn watch(&self) {
        let mut state = self.lock();
        loop {
            if state.queue.is_empty() {
                state.watcher_sleeping = true;
                state = self
                    .watch
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.watcher_sleeping = false;
            } else if state.stuck() {
                let stuck: Vec<Job> = state.queue.drain(..).collect();
                drop(state);
                for job in stuck {
                    job.run_on_blocking_pool();
                }
                state = self.lock();
            } else {
                state = self
                    .watch
                    .wait_timeout(state, SHORT_SLICE)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
    }
}

impl PoolState {
    /// Whether no thread can take a slice soon: each is on one it started over [`SHORT_SLICE`]
    /// ago (or there are no threads).
    fn stuck(&self) -> bool {
        self.lanes
            .iter()
            .all(|l| l.is_some_and(|t| t.elapsed() >= SHORT_SLICE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slices_return_their_results() {
        let results: Vec<_> = (0..100u64)
            .map(|i| tokio::spawn(run(move || i * i)))
            .collect();
        for (i, r) in (0..100u64).zip(results) {
            assert_eq!(r.await.unwrap().unwrap(), i * i);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_slice_is_reported_and_the_threads_go_on() {
        assert!(run(|| panic!("boom")).await.is_err());
        for _ in 0..10 {
            assert_eq!(run(|| 7).await.unwrap(), 7);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_slices_do_not_hold_back_short_ones() {
        // As many slices as there are slice threads start, and turn out long; the short slice
        // queued behind them must not wait for them (the watcher moves it), nor must one
        // submitted while they run.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Arc::new(Mutex::new(gate));
        let lanes = pool().lock().lanes.len();
        let long: Vec<_> = (0..lanes)
            .map(|_| {
                let gate = gate.clone();
                start(move || {
                    let _ = gate.lock().map(|g| g.recv_timeout(Duration::from_secs(30)));
                })
                .unwrap()
            })
            .collect();
        let queued = start(|| 1).unwrap();
        let queued = tokio::time::timeout(Duration::from_secs(10), queued).await;
        assert_eq!(
            queued
                .expect("a queued slice waited for long ones")
                .unwrap(),
            1
        );
        tokio::time::sleep(SHORT_SLICE * 2).await;
        let later = tokio::time::timeout(Duration::from_secs(10), run(|| 2)).await;
        assert_eq!(later.expect("a slice waited for long ones").unwrap(), 2);
        for _ in 0..long.len() {
            let _ = release.send(());
        }
        for l in long {
            l.await.unwrap();
        }
    }
}
