//! The built-in video producer: scene (text animation), render (text into I420), encode
//! (H.264), peer (one str0m session per viewer), page (HTML/JS at `/demo/`).

pub mod encode;
pub mod page;
pub mod peer;
pub mod render;
pub mod scene;

use std::net::IpAddr;

/// What the demo produces, validated at start-up.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    pub enabled: bool,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    /// Addresses advertised as host candidates.
    pub rtc_ips: Vec<IpAddr>,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            width: 1280,
            height: 720,
            fps: 30,
            rtc_ips: Vec::new(),
        }
    }
}
