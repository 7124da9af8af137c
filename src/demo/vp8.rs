//! VP8 through the system's libvpx (Debian `libvpx-dev`, found with pkg-config), for builds with
//! the `vp8` feature. One encoder thread: with two on a two-core machine libvpx fell well short
//! of 30 fps at 1080p, with one it holds 30.

use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_uint, c_ulong};

use vpx_sys as vpx;

use super::render::I420;

use super::encode::EncodeError;

/// One VP8 encoder for one viewer.
pub(crate) struct Vp8 {
    ctx: Box<vpx::vpx_codec_ctx_t>,
    width: usize,
    height: usize,
    pts: i64,
}

// The encoder context is used by one viewer task at a time; libvpx keeps no thread affinity.
unsafe impl Send for Vp8 {}

fn check(what: &str, status: vpx::vpx_codec_err_t) -> Result<(), EncodeError> {
    if status == vpx::vpx_codec_err_t::VPX_CODEC_OK {
        Ok(())
    } else {
        Err(EncodeError(format!("VP8 {what} failed: {status:?}")))
    }
}

impl Vp8 {
    pub(crate) fn new(
        width: usize,
        height: usize,
        fps: u32,
        bitrate: u32,
    ) -> Result<Self, EncodeError> {
        // SAFETY: the interface pointer is libvpx's static VP8 encoder; the config is written by
        // libvpx before it is read, and the context lives in a Box that outlives every call.
        unsafe {
            let iface = vpx::vpx_codec_vp8_cx();
            let mut cfg = MaybeUninit::<vpx::vpx_codec_enc_cfg_t>::zeroed();
            check(
                "configuration",
                vpx::vpx_codec_enc_config_default(iface, cfg.as_mut_ptr(), 0),
            )?;
            let mut cfg = cfg.assume_init();
            cfg.g_w = width as c_uint;
            cfg.g_h = height as c_uint;
            cfg.g_timebase.num = 1;
            cfg.g_timebase.den = fps as c_int;
            cfg.g_threads = 1;
            cfg.g_lag_in_frames = 0;
            cfg.g_error_resilient = 1;
            cfg.rc_end_usage = vpx::vpx_rc_mode::VPX_CBR;
            cfg.rc_target_bitrate = (bitrate / 1000).max(100);
            cfg.rc_dropframe_thresh = 0;
            cfg.rc_min_quantizer = 4;
            cfg.rc_max_quantizer = 56;
            cfg.kf_mode = vpx::vpx_kf_mode::VPX_KF_AUTO;
            cfg.kf_max_dist = fps * 4;
            let mut ctx = Box::new(MaybeUninit::<vpx::vpx_codec_ctx_t>::zeroed().assume_init());
            check(
                "start",
                vpx::vpx_codec_enc_init_ver(
                    &mut *ctx,
                    iface,
                    &cfg,
                    0,
                    vpx::VPX_ENCODER_ABI_VERSION as c_int,
                ),
            )?;
            // Built before the control call, so a failure below still destroys the context.
            let mut this = Self {
                ctx,
                width,
                height,
                pts: 0,
            };
            // A fast real-time speed: this is moving text on a flat background.
            check(
                "speed setting",
                vpx::vpx_codec_control_(
                    &mut *this.ctx,
                    vpx::vp8e_enc_control_id::VP8E_SET_CPUUSED as c_int,
                    12 as c_int,
                ),
            )?;
            Ok(this)
        }
    }

    /// Encodes a frame into one VP8 frame; `keyframe` forces a key frame.
    pub(crate) fn encode(&mut self, frame: &I420, keyframe: bool) -> Result<Vec<u8>, EncodeError> {
        if (frame.width, frame.height) != (self.width, self.height) {
            return Err("the frame size changed under the VP8 encoder".into());
        }
        let flags = if keyframe {
            vpx::VPX_EFLAG_FORCE_KF as vpx::vpx_enc_frame_flags_t
        } else {
            0
        };
        let mut out = Vec::new();
        // SAFETY: the image wraps `frame.data` (I420, even width, so libvpx's strides match
        // the planes) and libvpx only reads it during vpx_codec_encode; packets returned by
        // vpx_codec_get_cx_data stay valid until the next encode call, and are copied before.
        unsafe {
            let mut image = MaybeUninit::<vpx::vpx_image_t>::zeroed();
            let wrapped = vpx::vpx_img_wrap(
                image.as_mut_ptr(),
                vpx::vpx_img_fmt::VPX_IMG_FMT_I420,
                self.width as c_uint,
                self.height as c_uint,
                1,
                frame.data.as_ptr() as *mut u8,
            );
            if wrapped.is_null() {
                return Err("VP8 cannot wrap the frame".into());
            }
            check(
                "encoding",
                vpx::vpx_codec_encode(
                    &mut *self.ctx,
                    wrapped,
                    self.pts,
                    1,
                    flags,
                    vpx::VPX_DL_REALTIME as c_ulong,
                ),
            )?;
            self.pts += 1;
            let mut iter: vpx::vpx_codec_iter_t = std::ptr::null();
            loop {
                let packet = vpx::vpx_codec_get_cx_data(&mut *self.ctx, &mut iter);
                if packet.is_null() {
                    break;
                }
                if (*packet).kind == vpx::vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                    let data = (*packet).data.frame;
                    let size = usize::try_from(data.sz)
                        .map_err(|_| EncodeError::from("VP8 produced an impossible frame size"))?;
                    out.extend_from_slice(std::slice::from_raw_parts(data.buf as *const u8, size));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Vp8 {
    fn drop(&mut self) {
        // SAFETY: the context was initialised in `new` and is destroyed once.
        unsafe {
            vpx::vpx_codec_destroy(&mut *self.ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_frames_on_request() {
        let mut encoder = Vp8::new(320, 180, 30, 500_000).unwrap();
        let frame = I420::new(320, 180);
        let first = encoder.encode(&frame, true).unwrap();
        // A VP8 key frame: bit 0 of the first byte is 0, then the start code 9d 01 2a.
        assert_eq!(first[0] & 1, 0);
        assert_eq!(&first[3..6], &[0x9d, 0x01, 0x2a]);
        let next = encoder.encode(&frame, false).unwrap();
        assert_eq!(next[0] & 1, 1, "an inter frame");
        let forced = encoder.encode(&frame, true).unwrap();
        assert_eq!(forced[0] & 1, 0, "a forced key frame");
    }
}
