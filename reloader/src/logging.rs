//! Where the controller's output goes: its own log records (tracing) and
//! the lines its servers write to stderr share one non-blocking, lossy
//! writer to the controller's stderr (tracing-appender). Whoever reads
//! that stderr — a terminal, journald, a pipe nobody reads — can never
//! stall the controller: when its buffer is full, lines are dropped and
//! counted ([`dropped_lines`], shown by `status` and a metric).

use std::{
    io::Write,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines buffered for the writer thread before new ones are dropped.
const BUFFERED_LINES: usize = 4096;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct Sink {
    writer: NonBlocking,
    /// The reports of dropped lines: a writer of their own, so a flood of
    /// server lines that keeps the main buffer full cannot drop the report
    /// that says lines are being dropped (it did: 25 s of a flood without
    /// one report, the report losing each race for a freed slot).
    reports: NonBlocking,
    dropped: ErrorCounter,
    format: LogFormat,
    /// Dropped lines already said, and when (ms since the sink began).
    reported: AtomicU64,
    reported_at_ms: AtomicU64,
    began: Instant,
}

/// How often, at most, dropped lines are said.
const REPORT_EVERY: Duration = Duration::from_secs(10);

static SINK: OnceLock<Sink> = OnceLock::new();

/// What flushes the log's buffers when dropped.
pub struct LogGuard {
    _lines: WorkerGuard,
    _reports: WorkerGuard,
}

/// Sets up logging to stderr; keep the guard until the process exits (it
/// flushes what is buffered, waiting at most about a second).
pub fn init(format: LogFormat) -> Option<LogGuard> {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("reloader-log")
        .finish(std::io::stderr());
    // One report every REPORT_EVERY at most: a few slots never fill.
    let (reports, reports_guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(8)
        .thread_name("reloader-log-drops")
        .finish(std::io::stderr());
    let filter = EnvFilter::try_from_env("RELOADER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
    // `try_init` also bridges the `log` records of aya and aya-log.
    let installed = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    if installed.is_err() {
        return None;
    }
    let dropped = writer.error_counter();
    let _ = SINK.set(Sink {
        writer,
        reports,
        dropped,
        format,
        reported: AtomicU64::new(0),
        reported_at_ms: AtomicU64::new(0),
        began: Instant::now(),
    });
    Some(LogGuard {
        _lines: guard,
        _reports: reports_guard,
    })
}

/// Forwards one line a server wrote to its stderr.
pub fn server_line(instance: &str, generation: u64, line: &str) {
    // Without a sink (unit tests) the line is only kept in the tail.
    let Some(sink) = SINK.get() else {
        return;
    };
    let mut text = match sink.format {
        LogFormat::Text => format!("[{instance} gen {generation}] {line}"),
        LogFormat::Json => serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "INFO",
            "target": "server",
            "fields": { "message": line, "generation": generation, "instance": instance },
        })
        .to_string(),
    };
    text.push('\n');
    // One write is one buffered message: never blocks, never interleaves.
    let _ = sink.writer.clone().write(text.as_bytes());
    report_dropped(sink);
}

/// Says (at most every [`REPORT_EVERY`]) how many lines were dropped since
/// it last said so, through the reports' own writer (at `warn`: shown
/// unless `RELOADER_LOG` hides warnings).
fn report_dropped(sink: &Sink) {
    let dropped = sink.dropped.dropped_lines() as u64;
    let reported = sink.reported.load(Ordering::Relaxed);
    if dropped <= reported {
        return;
    }
    let now = sink.began.elapsed().as_millis() as u64;
    let last = sink.reported_at_ms.load(Ordering::Relaxed);
    if reported > 0 && now.saturating_sub(last) < REPORT_EVERY.as_millis() as u64 {
        return;
    }
    if sink
        .reported
        .compare_exchange(reported, dropped, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    sink.reported_at_ms.store(now, Ordering::Relaxed);
    if !tracing::enabled!(tracing::Level::WARN) {
        return;
    }
    let message = "log lines dropped: the controller's stderr is not read as fast as the servers \
                   write (reloader never waits for it); `reloader status` and the metric \
                   reloader_log_lines_dropped_total count them";
    let timestamp = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    // As tracing's formatter writes a record, through the reports' writer.
    let mut text = match sink.format {
        LogFormat::Text => format!(
            "{timestamp}  WARN reloader::logging: {message} dropped={} total={dropped}",
            dropped - reported
        ),
        LogFormat::Json => serde_json::json!({
            "timestamp": timestamp.to_string(),
            "level": "WARN",
            "fields": { "message": message, "dropped": dropped - reported, "total": dropped },
            "target": "reloader::logging",
        })
        .to_string(),
    };
    text.push('\n');
    let _ = sink.reports.clone().write(text.as_bytes());
}

/// Lines (log records and server output) dropped because stderr was not
/// read fast enough.
pub fn dropped_lines() -> u64 {
    SINK.get().map_or(0, |s| s.dropped.dropped_lines() as u64)
}
