//! Where log lines go: a shared buffer that a background thread writes out in batches.
//!
//! A request thread appends its formatted line under a short lock and returns; it never
//! wakes another thread per line, allocates a line of its own, or makes a syscall. The
//! writer thread wakes every [`INTERVAL`] (or early, once the buffer passes
//! [`HIGH_WATER`]) and writes everything gathered with one `write`. Past [`MAX_BYTES`]
//! waiting, lines are dropped rather than stalling requests, and the next batch says how
//! many were.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How often the writer thread wakes.
pub const INTERVAL: Duration = Duration::from_millis(50);
/// Buffered bytes past which an appending thread wakes the writer early.
pub const HIGH_WATER: usize = 1024 * 1024;
/// Buffered bytes past which lines are dropped.
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    stop: AtomicBool,
    /// Set once the writer thread runs, so an append past the high water can wake it.
    writer: OnceLock<Thread>,
    woken: AtomicBool,
    interval: Duration,
}

/// The [`MakeWriter`] handed to the `tracing` subscriber.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread after a last write of everything buffered. Dropping it is
/// `flush` at exit.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer whose lines go to `out` from a thread of its own.
    pub fn new<W: Write + Send + 'static>(out: W) -> (BatchWriter, FlushGuard) {
        BatchWriter::with_interval(out, INTERVAL)
    }

    fn with_interval<W: Write + Send + 'static>(
        out: W,
        interval: Duration,
    ) -> (BatchWriter, FlushGuard) {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(64 * 1024)),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            writer: OnceLock::new(),
            woken: AtomicBool::new(false),
            interval,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || write_loop(&s, out))
            .expect("spawn the log writer thread");
        let _ = shared.writer.set(thread.thread().clone());
        (
            BatchWriter {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        )
    }

    /// Appends whole lines (the caller's bytes end with a newline).
    pub fn append(&self, line: &[u8]) {
        let len = {
            let mut buf = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
            if buf.len() + line.len() > MAX_BYTES {
                drop(buf);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            buf.extend_from_slice(line);
            buf.len()
        };
        if len > HIGH_WATER && !self.shared.woken.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.shared.writer.get() {
                t.unpark();
            }
        }
    }
}

fn write_loop<W: Write>(s: &Shared, mut out: W) {
    let mut spare: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let stopping = s.stop.load(Ordering::Acquire);
        if !stopping {
            std::thread::park_timeout(s.interval);
        }
        s.woken.store(false, Ordering::Release);
        {
            let mut buf = s.buf.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut *buf, &mut spare);
        }
        let dropped = s.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                spare,
                "log writer: {dropped} line(s) dropped: more than {MAX_BYTES} bytes were waiting"
            );
        }
        if !spare.is_empty() {
            // A failed write (a closed stdout) loses the batch; requests never wait on it.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            // A burst leaves a large buffer behind; do not keep it for ever.
            if spare.capacity() > 4 * HIGH_WATER {
                spare.shrink_to(64 * 1024);
            }
        }
        if stopping {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// One event's writer: the subscriber formats the whole line, then writes it here.
pub struct LineWriter<'a> {
    writer: &'a BatchWriter,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.writer.append(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter { writer: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes_and_all_of_them_at_flush() {
        let sink = Sink::default();
        let (w, guard) = BatchWriter::new(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        let mut lw = w.make_writer();
                        lw.write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.lines().count(), 8_000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2_000).collect::<Vec<_>>(), "thread {t}");
        }
        assert!(writes < 100, "{writes} writes for 8,000 lines");
    }

    #[test]
    fn past_the_bound_lines_are_dropped_and_counted_not_queued() {
        let sink = Sink::default();
        // A writer that only writes when stopped: nothing drains the buffer meanwhile (and
        // `woken` set keeps the high water from waking it).
        let (w, guard) = BatchWriter::with_interval(sink.clone(), Duration::from_secs(3600));
        w.shared.woken.store(true, Ordering::SeqCst);
        w.shared.buf.lock().unwrap().resize(MAX_BYTES - 10, b'x');
        let mut lw = w.make_writer();
        lw.write_all(b"fits\n").unwrap();
        lw.write_all(b"this one does not fit\n").unwrap();
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().0.clone()).unwrap();
        assert!(text.contains("fits\n"));
        assert!(!text.contains("does not fit"));
        assert!(
            text.contains("1 line(s) dropped"),
            "{}",
            &text[text.len() - 200..]
        );
    }
}
