//! Handing freed memory back to the system at the moments the server knows a large buffer
//! has just gone (argon2 works in 19 MiB), through whatever the binary's allocator offers.
//! The library does not choose the allocator: the binary sets the hook once, before `App`.

use std::sync::OnceLock;

static HAND_BACK: OnceLock<fn()> = OnceLock::new();

/// Sets what [`hand_back`] does (the binary's allocator's collect); the first call wins.
pub fn set_hand_back(hook: fn()) {
    let _ = HAND_BACK.set(hook);
}

/// Asks the allocator to give the calling thread's freed memory back to the system now
/// instead of after its own delay; does nothing where no hook is set.
pub fn hand_back() {
    if let Some(hook) = HAND_BACK.get() {
        hook();
    }
}
