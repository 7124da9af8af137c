//! A viewer's render-and-encode pipeline on a thread of its own. Encoding a 720p frame takes
//! milliseconds (the first keyframe, with the encoder's set-up, tens of them); on a tokio
//! worker that time held up the STUN, DTLS and signaling it shares the worker with, and so
//! every viewer's connection. The session hands the thread one frame to make at a time and
//! reads the encoded frame from a channel; the thread ends when the session drops its end.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::encode::{Codec, EncodeError, VideoEncoder};
use super::render::{I420, TextMask};

/// One frame to make: the text's coverage and where it goes, the overlay's text, and whether
/// it must be a keyframe.
pub(crate) struct FrameJob {
    pub mask: Arc<TextMask>,
    pub x: usize,
    pub y: usize,
    pub overlay: String,
    pub keyframe: bool,
}

/// What the encoder thread is set up with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderSettings {
    pub codec: Codec,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub bitrate: u32,
}

/// The session's end of its encoder thread. At most one frame is in the making: a frame asked
/// for while the last is unfinished is skipped (the encoder is behind), never queued.
pub(crate) struct Pipeline {
    jobs: std_mpsc::SyncSender<FrameJob>,
    done: mpsc::Receiver<Result<Vec<u8>, EncodeError>>,
    busy: bool,
    /// Never joined: dropping the channels ends the thread after at most the frame it makes
    /// (the tests watch it end).
    #[cfg_attr(not(test), allow(dead_code))]
    thread: std::thread::JoinHandle<()>,
}

impl Pipeline {
    /// Starts the thread; the encoder itself is made on it, with the first frame.
    pub(crate) fn start(settings: EncoderSettings) -> Result<Self, EncodeError> {
        let (jobs, inbox) = std_mpsc::sync_channel(1);
        let (outbox, done) = mpsc::channel(1);
        let thread = std::thread::Builder::new()
            .name("demo-encoder".into())
            .spawn(move || work(settings, inbox, outbox))
            .map_err(|e| EncodeError(format!("cannot start an encoder thread: {e}")))?;
        Ok(Self {
            jobs,
            done,
            busy: false,
            thread,
        })
    }

    /// Asks for a frame; `Ok(false)` (and nothing asked) while the last one is still being
    /// made, an error if the thread is gone.
    pub(crate) fn submit(&mut self, job: FrameJob) -> Result<bool, EncodeError> {
        if self.busy {
            return Ok(false);
        }
        // The thread takes a job only after it answered the last, so the channel has room;
        // it is closed only if the thread ended.
        self.jobs
            .try_send(job)
            .map_err(|_| EncodeError::from("the encoder thread stopped"))?;
        self.busy = true;
        Ok(true)
    }

    /// Whether a frame is being made.
    pub(crate) fn busy(&self) -> bool {
        self.busy
    }

    /// The frame asked for last, once it is encoded. Waits forever while nothing is asked
    /// (so it can sit in a `select!` behind `busy()`); an error if the thread is gone.
    pub(crate) async fn finished(&mut self) -> Result<Vec<u8>, EncodeError> {
        let result = self
            .done
            .recv()
            .await
            .unwrap_or_else(|| Err("the encoder thread stopped".into()));
        self.busy = false;
        result
    }
}

/// The thread: renders and encodes each job until the session drops its end.
fn work(
    settings: EncoderSettings,
    inbox: std_mpsc::Receiver<FrameJob>,
    outbox: mpsc::Sender<Result<Vec<u8>, EncodeError>>,
) {
    yield_to_the_network();
    let mut frame = I420::new(settings.width, settings.height);
    let mut encoder: Option<VideoEncoder> = None;
    while let Ok(job) = inbox.recv() {
        let overlay = TextMask::new(&job.overlay, 20.0);
        frame.draw(&job.mask, job.x, job.y, &overlay);
        let result = match &mut encoder {
            Some(encoder) => encoder.encode(&frame, job.keyframe),
            None => VideoEncoder::new(settings.codec, &frame, settings.fps, settings.bitrate)
                .and_then(|made| encoder.insert(made).encode(&frame, true)),
        };
        let failed = result.is_err();
        if outbox.blocking_send(result).is_err() || failed {
            break;
        }
    }
}

/// Lowers this thread's scheduling priority (nice 10; Linux sets it per thread), so when the
/// cores are busy the workers that answer packets, signaling and RPC run first and the encoders
/// take the time left: a late frame is better than a late answer to every client.
fn yield_to_the_network() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the calling thread.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(keyframe: bool) -> FrameJob {
        FrameJob {
            mask: Arc::new(TextMask::new("test", 32.0)),
            x: 10,
            y: 10,
            overlay: "#1".into(),
            keyframe,
        }
    }

    #[tokio::test]
    async fn frames_are_made_one_at_a_time_and_the_thread_ends_with_the_session() {
        let mut pipeline = Pipeline::start(EncoderSettings {
            codec: Codec::H264,
            width: 320,
            height: 240,
            fps: 30,
            bitrate: 500_000,
        })
        .unwrap();
        assert!(pipeline.submit(job(false)).unwrap());
        assert!(pipeline.busy());
        assert!(
            !pipeline.submit(job(false)).unwrap(),
            "a second frame while the first is unfinished must be skipped"
        );
        let first = pipeline.finished().await.unwrap();
        // The first frame is a keyframe whatever was asked: an IDR slice (NAL type 5).
        assert!(
            first
                .windows(4)
                .any(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 5),
            "the first frame is no IDR"
        );
        assert!(!pipeline.busy());
        assert!(pipeline.submit(job(false)).unwrap());
        assert!(!pipeline.finished().await.unwrap().is_empty());
        // Asked for a frame and dropped at once: the thread finishes it and ends.
        assert!(pipeline.submit(job(true)).unwrap());
        let Pipeline {
            jobs, done, thread, ..
        } = pipeline;
        drop((jobs, done));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the encoder thread outlived its session"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
