//! The `hypha-rtc` command: parse the command line, load settings, run.

use std::collections::HashMap;
use std::process::ExitCode;

use hypha_rtc::App;
use hypha_rtc::config::{LogFormat, Settings, SettingsError};
use hypha_rtc::logging::LogQueue;

/// mimalloc: fewer cycles per allocation than the system allocator on the request paths, and
/// it hands freed memory back to the system once connections leave.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `arena_eager_commit` option (its index in mimalloc 3's `mi_option_t`).
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
/// mimalloc's `arena_reserve` option (its index in mimalloc 3's `mi_option_t`), in KiB.
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_RESERVE: libmimalloc_sys::mi_option_t = 23;
/// Address space reserved per arena: mimalloc's smallest (its default is 1 GiB).
#[cfg(target_os = "linux")]
const ARENA_RESERVE_KIB: std::ffi::c_long = 32 * 1024;
/// mimalloc's `page_full_retain` option (its index in mimalloc 3's `mi_option_t`).
#[cfg(target_os = "linux")]
const MI_OPTION_PAGE_FULL_RETAIN: libmimalloc_sys::mi_option_t = 36;

/// Runs before `main` and before the first allocation: arenas of 32 MiB of address space,
/// committed as they are used (an idle server stays under 20 MiB), and no emptied pages kept
/// in reserve per size class (after 10,000 connections leave, 2 MiB more stays resident with
/// mimalloc's default of two). Without any arena every page of the heap was a `mmap` of its
/// own, given back with `munmap` when it emptied: 8 % of the server's CPU under HTTP load went
/// to mapping, faulting in and unmapping the same pages again.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static SMALL_ARENAS: extern "C" fn() = {
    extern "C" fn small_arenas() {
        // SAFETY: sets plain option values; mimalloc reads options when it needs them.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_RESERVE, ARENA_RESERVE_KIB);
            libmimalloc_sys::mi_option_set(MI_OPTION_PAGE_FULL_RETAIN, 0);
        }
    }
    small_arenas
};

/// Collects the calling thread's mimalloc heap, handing what it freed back to the system.
fn collect() {
    // SAFETY: takes no pointers; mimalloc collects only the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> ExitCode {
    hypha_rtc::memory::set_hand_back(collect);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(reclaim::on_park)
        .build();
    match runtime {
        Ok(runtime) => {
            reclaim::start(runtime.handle().clone());
            let code = runtime.block_on(serve());
            flush_log();
            code
        }
        Err(e) => {
            eprintln!("hypha-rtc: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let (cli, settings, warnings) = match hypha_rtc::config::load(std::env::args_os(), &env) {
        Ok(loaded) => loaded,
        // --help, --version and mistakes on the command line: clap prints and exits.
        Err(SettingsError::Command(e)) => e.exit(),
        Err(e) => {
            eprintln!("hypha-rtc: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    if let Some(hypha_rtc::config::Command::Doctor(options)) = &cli.command {
        let found =
            hypha_rtc::turn::doctor::run(&settings.turn, options, &mut std::io::stdout()).await;
        return if found.healthy() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    if let Some(command) = &cli.command {
        return admin(command, &settings).await;
    }
    let app = match App::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            flush_log();
            eprintln!("hypha-rtc: {e}");
            return ExitCode::from(1);
        }
    };
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            flush_log();
            eprintln!("hypha-rtc: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs an administration command against the store the server uses.
async fn admin(command: &hypha_rtc::config::Command, settings: &Settings) -> ExitCode {
    let store = match hypha_rtc::open_store(settings).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("hypha-rtc: {e}");
            return ExitCode::from(1);
        }
    };
    match hypha_rtc::admin::run(command, settings, &store, std::io::stdin().lock()).await {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hypha-rtc: {message}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let default = match settings.server.verbose {
        0 => "warn,hypha_rtc=info",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = settings.server.log_format == LogFormat::Json;
    match LogQueue::start(std::io::stderr(), hypha_rtc::logging::MAX_PENDING, json) {
        Ok(queue) => {
            let _ = LOG_QUEUE.set(queue.clone());
            install_logging(filter, queue, json);
        }
        // No thread for the log: each line is written by whoever logs it.
        Err(_) => install_logging(filter, std::io::stderr, json),
    }
}

/// Sets the global `tracing` subscriber: `filter`, lines (or JSON objects) into `writer`.
fn install_logging<W>(filter: tracing_subscriber::EnvFilter, writer: W, json: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// The log thread's queue, written out before the process ends.
static LOG_QUEUE: std::sync::OnceLock<LogQueue> = std::sync::OnceLock::new();

/// Writes out the log lines still queued (the last ones of a shutdown).
fn flush_log() {
    if let Some(queue) = LOG_QUEUE.get() {
        queue.close(std::time::Duration::from_secs(2));
    }
}

/// Handing freed memory back to the system. mimalloc keeps the pages a thread freed in that
/// thread's heap until the thread collects them, and returns emptied pages to the system only
/// after a delay, on a later allocation. A server whose crowd of connections has left goes
/// quiet and allocates nothing, so without a nudge it would keep their memory for good.
///
/// Every `EVERY` a new round starts; a runtime worker collects its heap when it next goes
/// idle in a round it has not collected in (a busy server's workers go idle often, so that
/// costs one collection per worker per round). A worker asleep since before the round is
/// woken by a short task, so that it collects too.
mod reclaim {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    const EVERY: Duration = Duration::from_secs(2);
    /// Workers whose rounds are tracked; a runtime with more leaves the rest to chance.
    const TRACKED: usize = 64;
    /// How long a waking task holds its worker, so that the next one wakes another worker
    /// instead of finding the same one free again.
    const HOLD: Duration = Duration::from_micros(200);

    static ROUND: AtomicU64 = AtomicU64::new(1);
    static WORKERS: AtomicUsize = AtomicUsize::new(0);
    static COLLECTED: [AtomicU64; TRACKED] = [const { AtomicU64::new(0) }; TRACKED];

    thread_local! {
        /// This worker's index in `COLLECTED`, given on its first park.
        static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// Called by a runtime worker about to go idle.
    pub(super) fn on_park() {
        let round = ROUND.load(Ordering::Relaxed);
        let slot = SLOT.with(|slot| {
            let index = slot
                .get()
                .unwrap_or_else(|| WORKERS.fetch_add(1, Ordering::Relaxed).min(TRACKED - 1));
            slot.set(Some(index));
            index
        });
        if COLLECTED[slot].swap(round, Ordering::Relaxed) != round {
            super::collect();
        }
    }

    /// Starts the rounds on a thread of their own.
    pub(super) fn start(runtime: tokio::runtime::Handle) {
        let workers = runtime.metrics().num_workers();
        let spawned = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EVERY);
                    let round = ROUND.fetch_add(1, Ordering::Relaxed) + 1;
                    // Busy workers collect on their own; look again after a moment.
                    std::thread::sleep(EVERY / 20);
                    let seen = WORKERS.load(Ordering::Relaxed).min(TRACKED);
                    let behind = (0..seen).any(|i| COLLECTED[i].load(Ordering::Relaxed) < round);
                    if behind || seen < workers {
                        for _ in 0..workers {
                            runtime.spawn(async { std::thread::sleep(HOLD) });
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("hypha-rtc: memory will not be handed back while idle: {e}");
        }
    }
}
