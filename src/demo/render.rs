//! Renders the scene into I420: glyph coverage is rasterised once per text change and blended
//! straight into the planes, so there is no RGB-to-YUV pass.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-Bold.ttf");

/// A frame in I420 (YUV 4:2:0, planar).
pub(crate) struct I420 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// A rasterised line of text: coverage 0-255, `width` x `height`.
pub(crate) struct TextMask {
    pub width: usize,
    pub height: usize,
    coverage: Vec<u8>,
}

impl TextMask {
    /// Rasterises `text` at `px` pixels high.
    pub(crate) fn new(text: &str, px: f32) -> Self {
        let Ok(font) = FontRef::try_from_slice(FONT) else {
            return Self {
                width: 1,
                height: 1,
                coverage: vec![0],
            };
        };
        let scaled = font.as_scaled(PxScale::from(px));
        let mut caret = 0.0f32;
        let mut glyphs = Vec::new();
        let mut previous = None;
        for c in text.chars().take(200) {
            let id = scaled.glyph_id(c);
            if let Some(p) = previous {
                caret += scaled.kern(p, id);
            }
            glyphs.push(id.with_scale_and_position(px, point(caret, scaled.ascent())));
            caret += scaled.h_advance(id);
            previous = Some(id);
        }
        let width = (caret.ceil() as usize).clamp(1, 4096);
        let height = ((scaled.ascent() - scaled.descent()).ceil() as usize).max(1);
        let mut coverage = vec![0u8; width * height];
        for glyph in glyphs {
            if let Some(outlined) = font.outline_glyph(glyph) {
                let bounds = outlined.px_bounds();
                outlined.draw(|gx, gy, c| {
                    let x = bounds.min.x as i32 + gx as i32;
                    let y = bounds.min.y as i32 + gy as i32;
                    if x >= 0 && y >= 0 && (x as usize) < width && (y as usize) < height {
                        let slot = &mut coverage[y as usize * width + x as usize];
                        *slot = (*slot).max((c * 255.0) as u8);
                    }
                });
            }
        }
        Self {
            width,
            height,
            coverage,
        }
    }
}

/// Background and text colours (BT.601 limited range): a steady scheme, no flicker.
const BACKGROUND: (u8, u8, u8) = (41, 172, 116);
const TEXT: (u8, u8, u8) = (210, 100, 150);

impl I420 {
    pub(crate) fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * 3 / 2],
        }
    }

    /// Clears to the background and draws `mask` (and `overlay`, small, top-left) on it.
    pub(crate) fn draw(&mut self, mask: &TextMask, x: usize, y: usize, overlay: &TextMask) {
        let (w, h) = (self.width, self.height);
        let (luma, chroma) = self.data.split_at_mut(w * h);
        luma.fill(BACKGROUND.0);
        let (u, v) = chroma.split_at_mut(w * h / 4);
        u.fill(BACKGROUND.1);
        v.fill(BACKGROUND.2);
        for (mask, x, y) in [(mask, x, y), (overlay, 8, 8)] {
            blend(luma, u, v, w, h, mask, x, y);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn blend(
    luma: &mut [u8],
    u: &mut [u8],
    v: &mut [u8],
    w: usize,
    h: usize,
    mask: &TextMask,
    x0: usize,
    y0: usize,
) {
    let mix =
        |from: u8, to: u8, c: u8| (from as i32 + (to as i32 - from as i32) * c as i32 / 255) as u8;
    for my in 0..mask.height {
        let y = y0 + my;
        if y >= h {
            break;
        }
        for mx in 0..mask.width {
            let x = x0 + mx;
            if x >= w {
                break;
            }
            let c = mask.coverage[my * mask.width + mx];
            if c == 0 {
                continue;
            }
            luma[y * w + x] = mix(BACKGROUND.0, TEXT.0, c);
            if x.is_multiple_of(2) && y.is_multiple_of(2) {
                let i = (y / 2) * (w / 2) + x / 2;
                u[i] = mix(BACKGROUND.1, TEXT.1, c);
                v[i] = mix(BACKGROUND.2, TEXT.2, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_the_frame() {
        let mask = TextMask::new("Hypha RTC", 64.0);
        assert!(mask.width > 100 && mask.height > 40);
        assert!(mask.coverage.iter().any(|&c| c > 200));
        let mut frame = I420::new(320, 180);
        // Partly outside: clipped, never a panic.
        frame.draw(&mask, 300, 170, &TextMask::new("1", 12.0));
        frame.draw(&mask, 10, 10, &TextMask::new("", 12.0));
        assert!(frame.data[..320 * 180].contains(&TEXT.0));
    }
}
