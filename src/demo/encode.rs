//! The demo's encoders: H.264 (Constrained Baseline, for packetization-mode 1) with openh264
//! built from its bundled source, and VP8 through libvpx in builds with the `vp8` feature.
//! openh264's defaults are unusable for live video, so every rate setting is explicit.

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, Profile,
    RateControlMode, UsageType,
};
use openh264::formats::YUVSlices;

use super::render::I420;

/// An encoder that could not start or encode a frame.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

impl From<&str> for EncodeError {
    fn from(message: &str) -> Self {
        EncodeError(message.to_string())
    }
}

/// The codec the demo streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    H264,
    Vp8,
}

impl Codec {
    /// Parses `--demo-codec`; VP8 only where the build has it.
    pub(crate) fn parse(text: &str) -> Result<Self, crate::options::InvalidValue> {
        match text.to_ascii_lowercase().as_str() {
            "h264" | "h.264" => Ok(Codec::H264),
            "vp8" if cfg!(feature = "vp8") => Ok(Codec::Vp8),
            "vp8" => Err(
                "this build has no VP8: build it with `--features vp8` (needs Debian's libvpx-dev)"
                    .into(),
            ),
            other => Err(format!("{other:?} is not a codec: h264 or vp8").into()),
        }
    }
}

/// A viewer's encoder, whichever the codec.
pub(crate) enum VideoEncoder {
    // openh264's encoder state is large (about 7 KB inline): keep the enum small.
    H264(Box<H264>),
    #[cfg(feature = "vp8")]
    Vp8(super::vp8::Vp8),
}

impl VideoEncoder {
    pub(crate) fn new(
        codec: Codec,
        frame: &I420,
        fps: u32,
        bitrate: u32,
    ) -> Result<Self, EncodeError> {
        match codec {
            Codec::H264 => H264::new(fps, bitrate).map(|e| VideoEncoder::H264(Box::new(e))),
            #[cfg(feature = "vp8")]
            Codec::Vp8 => {
                super::vp8::Vp8::new(frame.width, frame.height, fps, bitrate).map(VideoEncoder::Vp8)
            }
            #[cfg(not(feature = "vp8"))]
            Codec::Vp8 => {
                let _ = frame;
                Err("this build has no VP8".into())
            }
        }
    }

    /// Encodes a frame (an Annex-B access unit or a VP8 frame); `keyframe` forces one.
    pub(crate) fn encode(&mut self, frame: &I420, keyframe: bool) -> Result<Vec<u8>, EncodeError> {
        match self {
            VideoEncoder::H264(e) => e.encode(frame, keyframe),
            #[cfg(feature = "vp8")]
            VideoEncoder::Vp8(e) => e.encode(frame, keyframe),
        }
    }
}

/// One H.264 encoder for one viewer.
pub(crate) struct H264 {
    encoder: Encoder,
}

impl H264 {
    pub(crate) fn new(fps: u32, bitrate: u32) -> Result<Self, EncodeError> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .rate_control_mode(RateControlMode::Bitrate)
            .usage_type(UsageType::CameraVideoRealTime)
            .profile(Profile::Baseline)
            .complexity(Complexity::Low)
            .skip_frames(false)
            // Without this, coloured specks trail moving text on flat backgrounds until the next IDR.
            .background_detection(false)
            .intra_frame_period(IntraFramePeriod::from_num_frames(fps * 4))
            .num_threads(1);
        let encoder = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)
            .map_err(|e| EncodeError(format!("cannot start the H.264 encoder: {e}")))?;
        Ok(Self { encoder })
    }

    /// Encodes a frame into one Annex-B access unit; `keyframe` forces an IDR.
    pub(crate) fn encode(&mut self, frame: &I420, keyframe: bool) -> Result<Vec<u8>, EncodeError> {
        if keyframe {
            self.encoder.force_intra_frame();
        }
        let (w, h) = (frame.width, frame.height);
        let (y, chroma) = frame.data.split_at(w * h);
        let (u, v) = chroma.split_at(w * h / 4);
        let yuv = YUVSlices::new((y, u, v), (w, h), (w, w / 2, w / 2));
        let bitstream = self
            .encoder
            .encode(&yuv)
            .map_err(|e| EncodeError(format!("encoding failed: {e}")))?;
        Ok(bitstream.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_frame_is_an_idr_with_parameter_sets() {
        let mut encoder = H264::new(30, 1_000_000).unwrap();
        let frame = I420::new(320, 180);
        let unit = encoder.encode(&frame, true).unwrap();
        let nal_types: Vec<u8> = unit
            .windows(4)
            .filter(|w| w[..3] == [0, 0, 1])
            .map(|w| w[3] & 0x1f)
            .collect();
        assert!(
            nal_types.contains(&7) && nal_types.contains(&8) && nal_types.contains(&5),
            "{nal_types:?}"
        );
        let next = encoder.encode(&frame, false).unwrap();
        assert!(!next.is_empty());
    }
}
