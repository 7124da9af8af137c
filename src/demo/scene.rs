//! The demo's moving text: position moves by time (pixels per second), bouncing inside the
//! frame so the text never leaves it.

/// Where the text is and where it is going.
#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub text: String,
    /// Pixels per second along each axis.
    pub speed: f32,
    pub x: f32,
    pub y: f32,
    dx: f32,
    dy: f32,
}

/// The largest speed accepted; faster values are clamped.
pub(crate) const MAX_SPEED: f32 = 2000.0;

impl Scene {
    pub(crate) fn new(text: &str, speed: f32) -> Self {
        Self {
            text: text.to_string(),
            speed: speed.clamp(0.0, MAX_SPEED),
            x: 40.0,
            y: 40.0,
            dx: 1.0,
            dy: 0.6,
        }
    }

    /// Moves the text by `seconds`, bouncing off the frame edges; `(w, h)` is the room left for
    /// the text's top-left corner (frame size minus text size).
    pub(crate) fn advance(&mut self, seconds: f32, room: (f32, f32)) {
        let step = self.speed * seconds.clamp(0.0, 1.0);
        self.x = bounce(self.x + self.dx * step, room.0, &mut self.dx);
        self.y = bounce(self.y + self.dy * step, room.1, &mut self.dy);
    }
}

fn bounce(position: f32, room: f32, direction: &mut f32) -> f32 {
    let room = room.max(0.0);
    if position < 0.0 {
        *direction = direction.abs();
        (-position).min(room)
    } else if position > room {
        *direction = -direction.abs();
        (2.0 * room - position).max(0.0)
    } else {
        position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_inside_and_moves_by_time() {
        let mut scene = Scene::new("hello", 300.0);
        let room = (1280.0 - 200.0, 720.0 - 60.0);
        for _ in 0..10_000 {
            scene.advance(1.0 / 30.0, room);
            assert!((0.0..=room.0).contains(&scene.x) && (0.0..=room.1).contains(&scene.y));
        }
        // Same elapsed time, different frame rates: the same distance.
        let (mut a, mut b) = (Scene::new("t", 100.0), Scene::new("t", 100.0));
        (0..30).for_each(|_| a.advance(1.0 / 30.0, (1e6, 1e6)));
        (0..60).for_each(|_| b.advance(1.0 / 60.0, (1e6, 1e6)));
        assert!((a.x - b.x).abs() < 0.01);
        assert_eq!(Scene::new("t", -5.0).speed, 0.0);
        assert_eq!(Scene::new("t", 1e9).speed, MAX_SPEED);
    }
}
