//! What the main thread and the workers tell each other: the main thread's orders (drain,
//! reload) and the workers' answers. Crossbeam channels carry them, one pair per worker.

use std::sync::Arc;

use crate::config::Config;
use crate::handover::Parcel;

/// From the main thread to a worker.
pub enum Control {
    /// Stop accepting, finish what is in flight and stop. `close_listeners`: shut the listening
    /// sockets down (false when a successor accepts from them too).
    Drain { close_listeners: bool },
    /// Take this config between requests (`reload`), and start accepting on `sockets`, the
    /// addresses it adds (sent ahead on the worker's `handover` link).
    Reload {
        config: Arc<Config>,
        sockets: Parcel,
    },
}

/// From a worker to the main thread.
pub enum Event {
    Started,
    Failed(String),
    Stopped {
        worker: usize,
        unfinished: usize,
    },
    /// The worker took the config of the last `Control::Reload`.
    Reloaded,
}
