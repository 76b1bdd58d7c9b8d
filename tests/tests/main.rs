//! Qepik's end-to-end tests, one binary (matklad's advice: one link step, shared helpers).
//!
//! - `engine`: the engine through its public handle: transfers, idempotency, concurrency, restart.

mod engine;
