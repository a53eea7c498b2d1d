//! Where agent slices run: one thread per core, shared by the nodes of the process, with extra
//! threads for what those threads cannot take at once.
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
//! a thread of its own (up to [`MAX_EXTRA_THREADS`] at once), and a watcher moves the slices
//! already queued there too.
//!
//! Every thread that runs a slice has the stack the slice asks for: an agent's values can nest
//! as deep as its memory budget admits, and Rhai drops and clones them recursively
//! ([`agent_lang::Limits::slice_stack_bytes`]). The threads are made for the default limits, or
//! the largest a node asked for before they started ([`reserve_stack`]); a slice that needs more
//! runs on a thread of its own. (Tokio's blocking pool, which ran the
//! overflow before, has one stack size for the whole runtime.) A stack is address space: only
//! the pages a slice touches take memory.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long a thread may be on one slice and still count as about to take the next one: well
/// above what preemption adds (a slice of 100 µs shares the cores with the runtime's threads and
/// can take a few milliseconds; at 2 ms, busy runs sent slices to the blocking pool for nothing).
pub const SHORT_SLICE: Duration = Duration::from_millis(20);

/// Slice threads started outside the pool (long or oversized slices) at most at once; past it,
/// slices wait in the queue.
pub const MAX_EXTRA_THREADS: usize = 256;

/// The slice did not come back: it panicked (the message is in the log), or no thread could be
/// started for it.
#[derive(Debug, thiserror::Error)]
#[error("the agent slice did not complete (it panicked, or no thread could run it)")]
pub struct SliceLost;

thread_local! {
    /// Whether the slice running on this thread asked for the thread to be replaced after it.
    static RETIRE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Asks for the thread running this slice to be replaced once the slice ends. A slice that
/// dropped a value nested deep touched much of its thread's stack, and the pages stay with the
/// thread until it ends (glibc unmaps a stack this large when its thread ends).
pub fn retire_this_thread() {
    RETIRE.with(|r| r.set(true));
}

/// Whether the slice that just ran asked for its thread to be replaced (and clears it).
fn retiring() -> bool {
    RETIRE.with(|r| r.replace(false))
}

/// The largest stack asked for before the pool's threads started: theirs.
static RESERVED_STACK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Asks for the pool's threads to have stacks of at least `stack` bytes, if they have not
/// started yet (a node calls it when it starts, with what its limits need); slices that need
/// more than the threads have run on threads of their own.
pub fn reserve_stack(stack: usize) {
    RESERVED_STACK.fetch_max(stack, std::sync::atomic::Ordering::AcqRel);
}

/// Runs `slice` on a slice thread with a stack of at least `stack` bytes (see the module docs)
/// and returns what it returns.
///
/// # Errors
///
/// [`SliceLost`] if `slice` panicked or could not be run.
pub async fn run<T: Send + 'static>(
    stack: usize,
    slice: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SliceLost> {
    start(stack, slice).await.map_err(|_| SliceLost)
}

/// Queues `slice` at once; its result comes on the receiver.
fn start<T: Send + 'static>(
    stack: usize,
    slice: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (reply, result) = oneshot::channel();
    let job = Job {
        run: Box::new(move || {
            let _ = reply.send(slice());
        }),
        stack,
    };
    pool().submit(job);
    result
}

/// One slice, and the stack it needs.
struct Job {
    run: Box<dyn FnOnce() + Send>,
    stack: usize,
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
}

struct Pool {
    /// The stack of each of the pool's threads.
    stack: usize,
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
    /// Slices that need a larger stack than the pool's threads have, waiting for an extra
    /// thread.
    oversized: VecDeque<Job>,
    /// Extra threads running.
    extra: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let stack = agent_lang::Limits::default()
            .slice_stack_bytes()
            .max(RESERVED_STACK.load(std::sync::atomic::Ordering::Acquire));
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            stack,
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                lanes: vec![None; threads],
                sleeping: 0,
                watcher_sleeping: false,
                oversized: VecDeque::new(),
                extra: 0,
            }),
            work: Condvar::new(),
            watch: Condvar::new(),
        }));
        // Lanes are numbered by the threads that started: the lanes past them are dropped.
        let mut started = 0;
        for _ in 0..threads {
            started += usize::from(pool.start_lane(started));
        }
        pool.lock().lanes.truncate(started);
        if started > 0
            && std::thread::Builder::new()
                .name("tern-slice-watch".into())
                .spawn(move || pool.watch())
                .is_err()
        {
            // Without a watcher, nothing may wait: every slice goes to an extra thread.
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

    fn submit(&'static self, job: Job) {
        let mut state = self.lock();
        if job.stack > self.stack {
            if state.extra < MAX_EXTRA_THREADS {
                state.extra += 1;
                drop(state);
                self.start_extra(job);
            } else {
                state.oversized.push_back(job);
            }
            return;
        }
        if state.stuck() && state.extra < MAX_EXTRA_THREADS {
            state.extra += 1;
            drop(state);
            self.start_extra(job);
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

    /// Starts an extra thread (counted in `extra` already) with `job`. It goes on with the
    /// slices waiting for an extra thread, and with the queue while the pool's threads are
    /// stuck, then ends.
    fn start_extra(&'static self, job: Job) {
        let stack = job.stack.max(self.stack);
        let spawned = std::thread::Builder::new()
            .name("tern-slice-extra".into())
            .stack_size(stack)
            .spawn(move || {
                let mut job = job;
                loop {
                    job.run_here();
                    let retire = retiring();
                    let mut state = self.lock();
                    let next = match state.oversized.pop_front() {
                        Some(next) => Some(next),
                        None if state.stuck() => state.queue.pop_front(),
                        None => None,
                    };
                    match next {
                        Some(next) if next.stack <= stack && !retire => job = next,
                        // It needs a larger stack than this one, or this one is to go: a thread
                        // of its own.
                        Some(next) => {
                            drop(state);
                            self.start_extra(next);
                            return;
                        }
                        None => {
                            state.extra -= 1;
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // The job went with the closure: its reply is dropped, which reports the slice lost.
            self.lock().extra -= 1;
            tracing::error!("cannot start a thread for an agent slice: {e}");
        }
    }

    /// Starts the thread of `lane`; whether it started.
    fn start_lane(&'static self, lane: usize) -> bool {
        std::thread::Builder::new()
            .name(format!("tern-slice-{lane}"))
            .stack_size(self.stack)
            .spawn(move || self.serve(lane))
            .is_ok()
    }

    /// A slice thread: takes slices from the queue, oldest first. After a slice that asked
    /// ([`retire_this_thread`]), a new thread takes the lane over and this one ends.
    fn serve(&'static self, lane: usize) {
        let mut state = self.lock();
        loop {
            match state.queue.pop_front() {
                Some(job) => {
                    state.lanes[lane] = Some(Instant::now());
                    drop(state);
                    job.run_here();
                    if retiring() {
                        self.lock().lanes[lane] = None;
                        if self.start_lane(lane) {
                            return;
                        }
                    }
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

    /// Moves the queued slices to extra threads whenever every thread is stuck on a long one.
    fn watch(&'static self) {
        let mut state = self.lock();
        loop {
            if state.queue.is_empty() {
                state.watcher_sleeping = true;
                state = self
                    .watch
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.watcher_sleeping = false;
            } else if state.stuck() && state.extra < MAX_EXTRA_THREADS {
                let room = MAX_EXTRA_THREADS - state.extra;
                let moved: Vec<Job> = (0..room).map_while(|_| state.queue.pop_front()).collect();
                state.extra += moved.len();
                drop(state);
                for job in moved {
                    self.start_extra(job);
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
            .map(|i| tokio::spawn(run(0, move || i * i)))
            .collect();
        for (i, r) in (0..100u64).zip(results) {
            assert_eq!(r.await.unwrap().unwrap(), i * i);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_slice_is_reported_and_the_threads_go_on() {
        assert!(run(0, || panic!("boom")).await.is_err());
        for _ in 0..10 {
            assert_eq!(run(0, || 7).await.unwrap(), 7);
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
                start(0, move || {
                    let _ = gate.lock().map(|g| g.recv_timeout(Duration::from_secs(30)));
                })
            })
            .collect();
        let queued = start(0, || 1);
        let queued = tokio::time::timeout(Duration::from_secs(10), queued).await;
        assert_eq!(
            queued
                .expect("a queued slice waited for long ones")
                .unwrap(),
            1
        );
        tokio::time::sleep(SHORT_SLICE * 2).await;
        let later = tokio::time::timeout(Duration::from_secs(10), run(0, || 2)).await;
        assert_eq!(later.expect("a slice waited for long ones").unwrap(), 2);
        for _ in 0..long.len() {
            let _ = release.send(());
        }
        for l in long {
            l.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slice_gets_the_stack_it_asks_for() {
        // At least 1 MiB of stack in each of 450 frames: more than the pool's threads have
        // (384 MiB), less than what is asked for (2 GiB, room for a debug build's copies).
        fn deep(n: usize) -> u8 {
            let buf = std::hint::black_box([n as u8; 1 << 20]);
            if n == 0 {
                buf[7]
            } else {
                deep(n - 1).wrapping_add(buf[9])
            }
        }
        let asked = 2 << 30;
        assert!(pool().stack < 450 << 20);
        let expected = (1..=450u32).map(|n| n as u8).fold(0u8, u8::wrapping_add);
        assert_eq!(run(asked, || deep(450)).await.unwrap(), expected);
        for _ in 0..100 {
            if pool().lock().extra == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the extra thread did not end");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_asked_to_retire_runs_no_more_slices() {
        let retired = run(0, || {
            retire_this_thread();
            std::thread::current().id()
        })
        .await
        .unwrap();
        for _ in 0..200 {
            let id = run(0, || std::thread::current().id()).await.unwrap();
            assert_ne!(id, retired);
        }
    }
}
