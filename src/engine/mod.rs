//! The copy engine: copies one disk from a source NBD server to a target NBD
//! server, full or incremental, with progress, checkpoints, retries, cancellation
//! and optional verification.
//!
//! Library code in all but name: it knows nothing of actix, diesel, the admin
//! socket or the command line, so a test can drive it alone. The entry point is
//! [`Copier`]; [`plan`] and [`zero`] are the pure rules it applies.
//!
//! - `nbd/`: the libnbd FFI and the safe `Handle` (the only module allowed raw pointers and FFI calls)
//! - `plan`: which ranges to read, zero or skip
//! - `zero`: zero detection in 4 KiB blocks
//! - `spec`: what a copy is asked to do (`CopySpec`, `Tuning`, `CancelToken`), shared by `copy` and `verify`
//! - `copy/`: the executor (server pair, extents, dispatcher, workers, flushes, durable watermark)
//! - `fence`: the write fence, a deadline after which nothing is sent to the target
//! - `limit`: bandwidth limits (token buckets in a tree, changed while copies run)
//! - `progress`: counters and the rate estimate
//! - `retry`: the backoff policy
//! - `verify`: the post-copy comparison

pub mod copy;
pub mod error;
pub mod fence;
pub mod limit;
pub mod nbd;
pub mod plan;
pub mod progress;
pub mod retry;
pub mod spec;
pub mod verify;
pub mod zero;

pub use copy::{Copier, Event, PlanInfo, Summary};
pub use error::{CopyError, Role};
pub use fence::Fence;
pub use limit::Limit;
pub use progress::{Progress, Snapshot, Stage};
pub use retry::RetryPolicy;
pub use spec::{CancelToken, Changes, CopySpec, Tuning};
