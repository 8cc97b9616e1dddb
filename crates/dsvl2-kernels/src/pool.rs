//! How the kernels use rayon's pool for many short parallel kernels (a decoding step runs about a
//! hundred, each tens of microseconds long) without paying for thread wake-ups in each.
//!
//! rayon parks an idle worker after a few dozen empty polls, and a thread waiting in `join` for a
//! stolen job parks the same way: both well under the length of one kernel, so each kernel paid for
//! futex wake-ups, and its first chunks ran on one thread. [`on_worker`] keeps the pool's workers
//! polling for the length of a model call, and [`for_each_task`] waits for a kernel's last tasks by
//! spinning. Measured (tiny, q8_0 GGUF, 2 threads, `perf stat`): 256 decoding steps after a short
//! prompt took 27 600 context switches before, 1 600 after; `dsvl2 bench` (1039-token prompt, 128
//! new tokens, i8 cache, 3 interleaved runs each, twice on different hours) decoded 31.5-31.6 and
//! 34.0-35.8 tok/s at batch 1 before, 35.1-36.3 and 40.0-40.7 after; batch 8, 134-136 and 142-152
//! before, 152-155 and 161-163 after.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Runs `f` on a worker thread of rayon's global pool (at once, if the caller is one), waiting for it,
/// while the pool's other workers stay awake, ready for `f`'s kernels.
///
/// Called from a thread outside the pool, each kernel's split would be handed to the pool while the
/// caller sleeps on a condition variable: two thread switches per kernel. On a worker, the split is
/// pushed onto its own queue for the others to take, and the other workers poll for work
/// ([`rayon::yield_now`], which runs what it finds) until `f` returns, or until they found nothing for
/// [`KEEP_AWAKE_PATIENCE`] (a long serial stretch in `f`). The call returns once every worker has
/// taken its job: a worker busy with a long job from elsewhere delays the return by what that job has
/// left (dsvl2's model calls come from one engine thread, one at a time). Wrap whole model calls in
/// this (a decoding step, a prompt), not work that waits for something other than the pool.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // One job per worker: the first to start runs `f`, the others keep polling until it is done.
    let f = std::sync::Mutex::new(Some(f));
    let done = AtomicBool::new(false);
    let results = rayon::broadcast(|_| {
        let Some(f) = f.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            keep_awake(&done);
            return None;
        };
        let _done = SetOnDrop(&done); // also when `f` panics (broadcast then passes the panic on)
        Some(f())
    });
    results
        .into_iter()
        .flatten()
        .next()
        .expect("one worker ran the closure")
}

/// How long a worker kept awake by [`on_worker`] goes on polling while it finds no work: longer than
/// the serial gaps between a step's kernels (microseconds), short enough that a long serial stretch
/// does not burn a core for long.
const KEEP_AWAKE_PATIENCE: Duration = Duration::from_millis(2);

/// Runs the pool's pending jobs as they appear until `done`, or until none came for the patience.
fn keep_awake(done: &AtomicBool) {
    let mut idle_since = Instant::now();
    let mut idle_polls = 0u32;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_polls = 0,
            Some(rayon::Yield::Idle) => {
                // The clock is read once per 64 empty polls (a poll takes ~0.1 µs).
                if idle_polls == 0 {
                    idle_since = Instant::now();
                } else if idle_polls.is_multiple_of(64) && idle_since.elapsed() >= KEEP_AWAKE_PATIENCE {
                    return;
                }
                idle_polls += 1;
                std::hint::spin_loop();
            }
            None => return,
        }
    }
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `task(i)` for every `i < n`, in parallel on the pool's threads, and returns when all have run.
///
/// Each thread takes a contiguous share of the indices and runs it in order, so that tasks over
/// consecutive memory (a matrix's row chunks) make one stream per thread, which the hardware
/// prefetchers follow across tasks; a thread done with its share takes the others' last tasks.
/// (Handing out indices from one shared counter interleaved the threads' tasks: summing 1 GiB in
/// 2 MiB pages as 152 KiB tasks ran at 30-31 GB/s that way, 35 GB/s this way, as fast as rayon's
/// splits, against 36-38 GB/s for one half per thread.) The caller, once nothing is left, spins until
/// the tasks the others took are done instead of parking as rayon's `join` would: so the threads that
/// [`on_worker`] keeps awake take their share at once, and nobody needs waking at the end. Tasks
/// should be short (microseconds to a millisecond). Outside the pool (or with one thread) this is
/// rayon's `for_each`.
pub fn for_each_task(n: usize, task: impl Fn(usize) + Sync) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 || rayon::current_thread_index().is_none() || n > u32::MAX as usize {
        (0..n).into_par_iter().for_each(&task);
        return;
    }
    let parts = threads.min(n);
    let shares: Vec<Share> = (0..parts)
        .map(|p| Share::new(p * n / parts, (p + 1) * n / parts))
        .collect();
    let next_part = AtomicUsize::new(1); // share 0 is the caller's
    let finished = AtomicUsize::new(0);
    let work = |me: usize| {
        // Counted here and added to `finished` once, on return or unwinding (a panicking task counts
        // too: the caller must not wait for it), not per task: that cache line would bounce between
        // the threads.
        let mut ran = CountOnDrop(&finished, 0);
        while let Some(i) = shares[me].take_first() {
            ran.1 += 1;
            task(i);
        }
        for other in (1..parts).map(|k| (me + k) % parts) {
            while let Some(i) = shares[other].take_last() {
                ran.1 += 1;
                task(i);
            }
        }
    };
    rayon::in_place_scope(|scope| {
        for _ in 1..parts {
            scope.spawn(|_| work(next_part.fetch_add(1, Ordering::Relaxed)));
        }
        work(0);
        let mut spins = 0u32;
        while finished.load(Ordering::Acquire) < n {
            // The last tasks run on other threads, for microseconds; yield the core only if the wait
            // grows long (their thread descheduled).
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Helpers that started after the last task was taken return at once; those still queued
        // here run now.
    });
}

/// The indices `first..end` not yet taken from one thread's share, as one atomic word (`first` in
/// the high half), taken from the front by their owner and from the back by the others. Aligned to
/// its own cache lines (two: the adjacent-line prefetcher), so that owners do not contend.
#[repr(align(128))]
struct Share(AtomicU64);

impl Share {
    fn new(first: usize, end: usize) -> Self {
        Share(AtomicU64::new(((first as u64) << 32) | end as u64))
    }

    fn take_first(&self) -> Option<usize> {
        self.take(|first, end| (first, first + 1, end))
    }

    fn take_last(&self) -> Option<usize> {
        self.take(|first, end| (end - 1, first, end - 1))
    }

    /// Takes the index `pick(first, end)` chooses, leaving `first'..end'`; `None` once empty.
    fn take(&self, pick: impl Fn(u64, u64) -> (u64, u64, u64)) -> Option<usize> {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let (first, end) = (current >> 32, current & u32::MAX as u64);
            if first >= end {
                return None;
            }
            let (taken, first, end) = pick(first, end);
            match self
                .0
                .compare_exchange_weak(current, (first << 32) | end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(taken as usize),
                Err(now) => current = now,
            }
        }
    }
}

/// Adds its count to its counter when dropped.
struct CountOnDrop<'a>(&'a AtomicUsize, usize);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(self.1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many times `for_each_task` ran each index.
    fn run_counts(n: usize) -> Vec<usize> {
        let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for_each_task(n, |i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        counts.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_task_runs_once_inside_and_outside_the_pool() {
        for n in [0, 1, 2, 3, 100] {
            assert_eq!(run_counts(n), vec![1; n], "outside, n = {n}");
            assert_eq!(on_worker(|| run_counts(n)), vec![1; n], "on a worker, n = {n}");
        }
        // More threads than the machine's cores; nested calls (a task that splits again).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(5).build().unwrap();
        pool.install(|| {
            assert_eq!(run_counts(1000), vec![1; 1000]);
            let nested: Vec<Vec<usize>> = (0..8).map(|_| Vec::new()).collect();
            let nested = std::sync::Mutex::new(nested);
            for_each_task(8, |i| {
                let counts = run_counts(50);
                nested.lock().unwrap()[i] = counts;
            });
            assert!(nested.into_inner().unwrap().iter().all(|c| *c == vec![1; 50]));
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_without_a_hang() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| {
                for_each_task(64, |i| {
                    if i == 37 {
                        panic!("task 37 failed");
                    }
                })
            })
        }));
        let message = result.expect_err("the panic must reach the caller");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"task 37 failed"));
        // The pool still works afterwards.
        pool.install(|| assert_eq!(run_counts(10), vec![1; 10]));
    }

    #[test]
    fn on_worker_returns_the_value_and_passes_panics_on() {
        assert!(on_worker(|| rayon::current_thread_index().is_some()));
        assert_eq!(on_worker(|| on_worker(|| 42)), 42);
        let result = std::panic::catch_unwind(|| on_worker(|| -> u32 { panic!("model call failed") }));
        assert_eq!(
            result.expect_err("panics").downcast_ref::<&str>(),
            Some(&"model call failed")
        );
        assert_eq!(on_worker(|| 7), 7);
    }
}
