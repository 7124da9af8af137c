//! Log lines go out from a thread of their own. A runtime worker that logs only appends its
//! formatted line to a bounded buffer; the log thread writes whatever gathered meanwhile in one
//! system call, then lingers a moment so that the next lines gather too (a worker wakes it
//! only when it is asleep on an empty buffer). A slow or stalled log reader (a pipe nobody drains, a busy journal) then never
//! holds up a connection, and a burst of lines (a crowd connecting) costs one write per batch
//! instead of one per line. When the buffer is full, lines are dropped and counted, and the
//! count is written (in the log's format) with the next batch.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bytes of lines waiting to be written, at most; a line that does not fit is dropped.
pub const MAX_PENDING: usize = 1024 * 1024;
/// The log thread's own buffer is given back when a burst left it larger than this.
const KEEP: usize = 64 * 1024;
/// How long the log thread lets lines gather after a write: under a burst, at most one write
/// and no wakeups per this long; a line waits at most this long besides the write itself.
const LINGER: Duration = Duration::from_millis(1);

/// A handle to the log thread: a `tracing_subscriber` writer (cheap to clone).
#[derive(Clone)]
pub struct LogQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a line lands while the log thread sleeps on an empty buffer, and when
    /// closing.
    wake: Condvar,
    /// Signalled each time the log thread has written a batch.
    written: Condvar,
    bound: usize,
    /// Whether the log is JSON lines (the dropped-lines note is then one too).
    json: bool,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    dropped: u64,
    /// A batch is being written (taken out of `pending`, not yet in the sink).
    writing: bool,
    /// The log thread waits on `wake` (and nobody has woken it yet).
    asleep: bool,
    /// The log thread has ended (after `close`): lines are dropped at once.
    finished: bool,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes and counters: still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LogQueue {
    /// Starts the log thread writing into `sink`, with at most `bound` bytes waiting; `json`
    /// when the lines are JSON objects.
    pub fn start(
        sink: impl Write + Send + 'static,
        bound: usize,
        json: bool,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            written: Condvar::new(),
            bound,
            json,
        });
        let own = shared.clone();
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || write_until_closed(&own, sink))?;
        Ok(Self { shared })
    }

    /// Queues one formatted line (or several); drops it when the queue is full.
    pub fn push(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if state.finished {
            return;
        }
        if state.pending.len() + line.len() > self.shared.bound {
            state.dropped += 1;
            return;
        }
        state.pending.extend_from_slice(line);
        let wake = std::mem::take(&mut state.asleep);
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Writes out what is queued and stops the log thread; waits at most `limit` (returns at
    /// once when the thread has already ended). Lines pushed afterwards are written while the
    /// thread still runs, dropped once it has ended. Returns whether everything queued was
    /// written.
    pub fn close(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_one();
        while !state.finished && (!state.pending.is_empty() || state.writing) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The log thread: waits for lines, writes each batch with one call, until closed and empty.
fn write_until_closed(shared: &Shared, mut sink: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && !state.closing {
            state.asleep = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.asleep = false;
        if state.pending.is_empty() {
            state.finished = true;
            drop(state);
            shared.written.notify_all();
            return;
        }
        std::mem::swap(&mut batch, &mut state.pending);
        let dropped = std::mem::take(&mut state.dropped);
        state.writing = true;
        drop(state);
        // Nothing is left to report a failing sink to: its errors are ignored.
        let _ = sink.write_all(&batch);
        if dropped > 0 {
            let note = "log lines were dropped: the log output did not keep up";
            let _ = if shared.json {
                writeln!(
                    sink,
                    r#"{{"level":"WARN","fields":{{"message":"{note}","dropped":{dropped}}},"target":"hypha_rtc::logging"}}"#
                )
            } else {
                writeln!(sink, "hypha-rtc: {dropped} {note}")
            };
        }
        let _ = sink.flush();
        batch.clear();
        if batch.capacity() > KEEP {
            batch = Vec::new();
        }
        let closing = {
            let mut state = shared.lock();
            state.writing = false;
            state.closing
        };
        shared.written.notify_all();
        if !closing {
            std::thread::sleep(LINGER);
        }
    }
}

/// One event's writer: appends to the queue.
pub struct QueueWriter<'a>(&'a LogQueue);

impl Write for QueueWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = QueueWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        QueueWriter(self)
    }
}

/// A log site that speaks at most once per interval and counts what it left out: under a
/// flood (every request refused while the store is down) the workers neither format nor queue
/// a line per occurrence, and the log still says how many there were.
pub struct Sampled {
    every: Duration,
    /// When the next line may go out, in milliseconds since [`Sampled::since`]'s start.
    next_ms: std::sync::atomic::AtomicU64,
    skipped: std::sync::atomic::AtomicU64,
}

impl Sampled {
    /// A site that writes at most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            next_ms: std::sync::atomic::AtomicU64::new(0),
            skipped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// For one occurrence: `Some(left_out)` when it is to be logged (with the number left out
    /// since the last line), `None` when it is to be left out (and counted).
    pub fn take(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Self::since();
        let next = self.next_ms.load(Relaxed);
        let every = u64::try_from(self.every.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now.saturating_add(every), Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Relaxed));
        }
        self.skipped.fetch_add(1, Relaxed);
        None
    }

    /// Milliseconds since the first call in this process (a clock that never goes back).
    fn since() -> u64 {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::mpsc;

    /// A flood is logged once per interval, with the count of what was left out; every
    /// occurrence is either logged or counted.
    #[test]
    fn a_sampled_site_speaks_once_per_interval_and_counts_the_rest() {
        use std::sync::atomic::Ordering::Relaxed;
        let site = Sampled::new(Duration::from_secs(3600));
        assert_eq!(site.take(), Some(0));
        for _ in 0..1000 {
            assert_eq!(site.take(), None);
        }
        // The next line, once the interval is over, says how many were left out.
        site.next_ms.store(0, Relaxed);
        assert_eq!(site.take(), Some(1000));
        assert_eq!(site.take(), None);
        let quick = Sampled::new(Duration::ZERO);
        assert_eq!(quick.take(), Some(0));
        assert_eq!(quick.take(), Some(0));
        // Four threads at once: one line; every other occurrence counted, in that line's
        // count (a thread may count between the winner's two steps) or still waiting.
        let shared = Sampled::new(Duration::from_secs(3600));
        let (logged, reported) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000).fold((0u64, 0u64), |(n, r), _| match shared.take() {
                            Some(k) => (n + 1, r + k),
                            None => (n, r),
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
        });
        assert_eq!(logged, 1);
        assert_eq!(reported + shared.skipped.load(Relaxed), 3999);
    }

    /// A sink the test reads back; it can be held shut to act as a stalled log reader.
    #[derive(Clone)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        /// Shut (true): writes wait until it opens.
        gate: Arc<(Mutex<bool>, Condvar)>,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (shut, opened) = &*self.gate;
            let _open = opened
                .wait_while(shut.lock().unwrap(), |shut| *shut)
                .unwrap();
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Polls the queue's state until `done` says so, for at most 10 s.
    fn wait_for(queue: &LogQueue, done: impl Fn(&State) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&queue.shared.lock()) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    /// A queue of `bound` bytes whose log thread took `first` and is blocked on its shut sink.
    fn stalled(bound: usize, json: bool, first: &[u8]) -> (Sink, LogQueue) {
        let out = sink();
        *out.gate.0.lock().unwrap() = true;
        let queue = LogQueue::start(out.clone(), bound, json).unwrap();
        queue.push(first);
        wait_for(
            &queue,
            |state| state.writing,
            "the log thread never took a batch",
        );
        (out, queue)
    }

    impl Sink {
        fn open(&self) {
            *self.gate.0.lock().unwrap() = false;
            self.gate.1.notify_all();
        }
    }

    fn sink() -> Sink {
        Sink {
            bytes: Arc::default(),
            gate: Arc::default(),
            writes: Arc::default(),
        }
    }

    #[test]
    fn every_line_from_every_thread_arrives_whole_and_in_order_per_thread() {
        let out = sink();
        let queue = LogQueue::start(out.clone(), MAX_PENDING, false).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let mut writer = tracing_subscriber::fmt::MakeWriter::make_writer(&queue);
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(queue.close(Duration::from_secs(10)));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4000);
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(own, expected);
        }
        // Batched: far fewer writes than lines.
        let writes = out.writes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(writes < 4000, "{writes} writes for 4000 lines");
    }

    #[test]
    fn a_stalled_reader_never_blocks_a_logger_and_drops_are_counted() {
        let (out, queue) = stalled(100, false, b"first\n");
        // Meanwhile loggers fill the queue and go on: 10 lines of 10 bytes fit, 5 do not.
        let (done, finished) = mpsc::channel();
        let logger = queue.clone();
        std::thread::spawn(move || {
            for i in 0..15 {
                logger.push(format!("line {i:04}\n").as_bytes());
            }
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("a logger was held up by the stalled reader");
        out.open();
        assert!(queue.close(Duration::from_secs(10)));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let expected: String = std::iter::once("first\n".to_string())
            .chain((0..10).map(|i| format!("line {i:04}\n")))
            .chain(std::iter::once(
                "hypha-rtc: 5 log lines were dropped: the log output did not keep up\n".to_string(),
            ))
            .collect();
        assert_eq!(text, expected);
        // Closed: a second close returns at once, later lines are dropped.
        let again = Instant::now();
        assert!(queue.close(Duration::from_secs(10)));
        assert!(again.elapsed() < Duration::from_secs(1));
        wait_for(&queue, |state| state.finished, "the log thread did not end");
        queue.push(b"late\n");
        assert!(queue.shared.lock().pending.is_empty());
    }

    #[test]
    fn the_dropped_lines_note_is_json_in_a_json_log() {
        let (out, queue) = stalled(10, true, b"{\"a\":1}\n");
        queue.push(b"{\"b\":2}\n");
        queue.push(b"{\"c\":3}\n");
        out.open();
        assert!(queue.close(Duration::from_secs(10)));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[2]["fields"]["dropped"], 1);
    }
}
