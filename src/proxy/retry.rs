//! What a retry needs besides the proxy's one retry loop (`forward::proxy`): the targets already
//! tried, the pause before the next attempt, and whether a failure may be retried at all.

use std::time::Duration;

use crate::config::RetryOn;
use crate::error::ProxyError;
use crate::http::Method;
use crate::rng::Rng;
use crate::upstream::{TargetId, UpstreamState};

/// The targets a request has been tried on (at most the first attempt and 5 retries).
#[derive(Default)]
pub(super) struct Tried {
    targets: [Option<TargetId>; 6],
    len: usize,
}

impl Tried {
    pub(super) fn push(&mut self, t: TargetId) {
        if let Some(slot) = self.targets.get_mut(self.len) {
            *slot = Some(t);
            self.len += 1;
        }
    }

    pub(super) fn contains(&self, t: TargetId) -> bool {
        self.targets[..self.len].contains(&Some(t))
    }
}

/// The pause before a retry: `backoff` jittered to between half and one and a half times it,
/// so that retries from many requests do not land together; never past the route's time
/// `left`. No timer at all for a zero backoff.
/// Takes a retry on `up`: counted against its attempts and its budget, after its backoff.
pub(super) async fn take(up: &UpstreamState, rng: &Rng, left: Option<Duration>, retries: &mut u32) {
    *retries += 1;
    up.spend_retry();
    if let Some(r) = &up.retries {
        wait(r.backoff, rng, left).await;
    }
}

async fn wait(backoff: Duration, rng: &Rng, left: Option<Duration>) {
    let ms = backoff.as_millis() as usize;
    if ms == 0 {
        return;
    }
    let pause = Duration::from_millis((ms / 2 + rng.below(ms + 1)) as u64);
    monoio::time::sleep(left.map_or(pause, |l| pause.min(l))).await;
}

/// Which failures of a sent request `on` lets a retry follow, for this method: a request that
/// reached the upstream is only sent again when sending it twice does no harm.
pub(super) fn after_send(on: RetryOn, method: Method) -> Option<RetryOn> {
    method.is_idempotent().then_some(on)
}

/// Whether `error`, met after the request was sent, is a failure `on` retries.
pub(super) fn retries_error(on: RetryOn, error: &ProxyError) -> bool {
    match error {
        ProxyError::UpstreamUnreachable(_) => on.reset,
        ProxyError::UpstreamTimeout => on.timeout,
        _ => false,
    }
}
