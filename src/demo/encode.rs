//! H.264 (Constrained Baseline, for packetization-mode 1) with openh264 built from its bundled
//! source. Its defaults are unusable for live video, so every rate setting is explicit.

use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, Profile,
    RateControlMode, UsageType,
};
use openh264::formats::YUVSlices;

use super::render::I420;

/// One H.264 encoder for one viewer.
pub struct H264 {
    encoder: Encoder,
}

impl H264 {
    pub fn new(fps: u32, bitrate: u32) -> Result<Self, String> {
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
            .map_err(|e| format!("cannot start the H.264 encoder: {e}"))?;
        Ok(Self { encoder })
    }

    /// Encodes a frame into one Annex-B access unit; `keyframe` forces an IDR.
    pub fn encode(&mut self, frame: &I420, keyframe: bool) -> Result<Vec<u8>, String> {
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
            .map_err(|e| format!("encoding failed: {e}"))?;
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
