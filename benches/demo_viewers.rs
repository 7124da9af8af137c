//! The demo's capacity: N viewers at once, each a str0m client on loopback that signals through
//! `POST /demo/offer` as the page does and counts the video frames it receives (depacketised,
//! not decoded, so the client costs little beside the server's encoders). Prints, for each N,
//! the frames per second each viewer got over the window, the server's CPU (% of one core) and
//! how long the server took meanwhile to answer `GET /health/liveness` (every 20 ms on a kept
//! connection): whether the encoders leave its workers free for everything else.
//!
//! `cargo bench --bench demo_viewers` starts the release `hypha-rtc` (scripts/bench-demo.sh runs
//! it); `-- --viewers 1,4,16 --seconds 10` chooses the steps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

mod common;

#[derive(Parser, Debug)]
struct Options {
    /// Viewer counts to measure, one after the other on the same server.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    viewers: Vec<usize>,
    /// Seconds each step is measured (after every viewer has its first frame and 2 s more).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Extra arguments for the server (e.g. "--demo-resolution 640x360").
    #[arg(long, default_value = "")]
    server_args: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One viewer's counters, shared with its task.
#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    stop: AtomicBool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = Options::parse();
    str0m::crypto::from_feature_flags().install_process_default();
    let port = common::free_port();
    let data = std::env::temp_dir().join(format!("hypha-rtc-demo-bench-{}", std::process::id()));
    let most = options.viewers.iter().copied().max().unwrap_or(1);
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_hypha-rtc"))
        .args(["--port", &port.to_string(), "--jwt-secret", "bench-secret"])
        // Every viewer comes from loopback, one address: let it have them all.
        .args(["--demo-max-viewers", &(most * 2).to_string()])
        .args(options.server_args.split_whitespace())
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start hypha-rtc");
    let pid = server.id();
    common::wait_listening(port).await;
    for &count in &options.viewers {
        let viewers: Vec<Arc<Counters>> = (0..count).map(|_| Arc::default()).collect();
        let mut tasks = Vec::new();
        for counters in &viewers {
            let counters = counters.clone();
            tasks.push(tokio::spawn(async move {
                let result = view(port, counters.clone()).await;
                counters.stop.store(true, Ordering::Relaxed);
                result
            }));
            // At most 4 sessions of one address may be connecting at once.
            let deadline = Instant::now() + Duration::from_secs(15);
            while counters_frames(&viewers) < tasks.len() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(
            counters_frames(&viewers),
            count,
            "not every viewer got video within 15 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before: Vec<u64> = viewers
            .iter()
            .map(|v| v.frames.load(Ordering::Relaxed))
            .collect();
        let ticks = cpu_ticks(pid);
        let started = Instant::now();
        // On a thread and runtime of its own, so the viewers' work in this process does not
        // delay the probe.
        let window = Duration::from_secs(options.seconds);
        let prober = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(probe(port, window)))
                .unwrap_or_default()
        });
        while !prober.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answers = prober.join().unwrap_or_default();
        let elapsed = started.elapsed().as_secs_f64();
        answers.sort();
        let at = |q: f64| {
            answers
                .get(((answers.len() as f64 * q) as usize).min(answers.len().saturating_sub(1)))
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        };
        let cpu = (cpu_ticks(pid) - ticks) as f64 / elapsed;
        let mut fps: Vec<f64> = viewers
            .iter()
            .zip(&before)
            .map(|(v, b)| (v.frames.load(Ordering::Relaxed) - b) as f64 / elapsed)
            .collect();
        fps.sort_by(f64::total_cmp);
        println!(
            "{count:>2} viewers: fps per viewer min {:.1} median {:.1} max {:.1}; server CPU {:.0} % of one core; liveness answered in p50 {:.2} ms, p99 {:.2} ms",
            fps[0],
            fps[fps.len() / 2],
            fps[fps.len() - 1],
            cpu,
            at(0.5),
            at(0.99)
        );
        for v in &viewers {
            v.stop.store(true, Ordering::Relaxed);
        }
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("a viewer failed: {e}"),
                other => panic!("a viewer did not end: {other:?}"),
            }
        }
        // The server frees a session when its client closes; wait until it has.
        let deadline = Instant::now() + Duration::from_secs(20);
        while live_viewers(port).await != Some(0) {
            assert!(Instant::now() < deadline, "sessions outlived their clients");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&data);
}

/// Asks `GET /health/liveness` every 20 ms on one kept connection for `window`; the times
/// each answer took.
async fn probe(port: u16, window: Duration) -> Vec<Duration> {
    let mut times = Vec::new();
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return times;
    };
    let _ = stream.set_nodelay(true);
    let request = b"GET /health/liveness HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut buf = vec![0u8; 4096];
    let end = Instant::now() + window;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < end {
        ticker.tick().await;
        let asked = Instant::now();
        if stream.write_all(request).await.is_err() {
            break;
        }
        // The answer is small and has a body: read until the head and its Content-Length body.
        let mut got = Vec::new();
        loop {
            let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            else {
                return times;
            };
            if n == 0 {
                return times;
            }
            got.extend_from_slice(&buf[..n]);
            if complete(&got) {
                break;
            }
        }
        times.push(asked.elapsed());
    }
    times
}

/// Whether `data` holds a whole HTTP answer (head and its Content-Length body).
fn complete(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        })
        .unwrap_or(0);
    body.len() >= length
}

/// How many viewers have had at least one frame.
fn counters_frames(viewers: &[Arc<Counters>]) -> usize {
    viewers
        .iter()
        .filter(|v| v.frames.load(Ordering::Relaxed) > 0)
        .count()
}

/// The server's user + system CPU time in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// `hypha_rtc_demo_viewers` from the server's metrics.
async fn live_viewers(port: u16) -> Option<u64> {
    let text = http(port, "GET", "/metrics", "").await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("hypha_rtc_demo_viewers "))
        .and_then(|v| v.trim().parse().ok())
}

/// One HTTP/1.1 request on a new connection; the body of a 200 answer.
async fn http(port: u16, method: &str, path: &str, body: &str) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}\n{body}"));
    }
    Ok(body.to_string())
}

/// A viewer: offers receive-only video and a data channel, counts frames until told to stop,
/// then closes gracefully (so the server frees the session at once).
async fn view(port: u16, counters: Arc<Counters>) -> Result<(), String> {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut rtc = Rtc::builder()
        .clear_codecs()
        .enable_h264(true)
        .enable_vp8(true)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(|e| e.to_string())?);
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_channel("controls".into());
    let (offer, pending) = api.apply().ok_or("no offer")?;
    let body = serde_json::json!({"sdp": offer.to_sdp_string(), "type": "offer"}).to_string();
    let answer = http(port, "POST", "/demo/offer", &body).await?;
    let answer: serde_json::Value = serde_json::from_str(&answer).map_err(|e| e.to_string())?;
    let sdp = answer["sdp"].as_str().ok_or("no sdp in the answer")?;
    let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| e.to_string())?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    let failed = |e: str0m::RtcError| e.to_string();
    while !counters.stop.load(Ordering::Relaxed) {
        let timeout = loop {
            match rtc.poll_output().map_err(failed)? {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::MediaData(_)) => {
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                }
                Output::Event(_) => {}
            }
        };
        let wait = timeout
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, source): (usize, SocketAddr) = received.map_err(|e| e.to_string())?;
                let Ok(contents) = buf[..n].try_into() else { continue };
                let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: local, contents });
                rtc.handle_input(input).map_err(failed)?;
            }
            _ = tokio::time::sleep(wait) => rtc.handle_input(Input::Timeout(Instant::now())).map_err(failed)?,
        }
    }
    // close() queues RTCP BYE and the DTLS close_notify: send them.
    rtc.close().map_err(failed)?;
    for _ in 0..4 {
        while let Ok(output) = rtc.poll_output() {
            match output {
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Timeout(_) => break,
                Output::Event(_) => {}
            }
        }
        let _ = rtc.handle_input(Input::Timeout(Instant::now()));
    }
    Ok(())
}
