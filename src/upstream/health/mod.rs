//! Upstream health for the whole process, decided on worker 0 and applied by every worker on its
//! next tick (within 25 ms), so the whole process routes alike:
//! - Active health checks: one probing task per target (the service: `services::health`),
//!   through the upstream client (so TLS and the connect timeout apply). A target turns
//!   unhealthy after `unhealthy_threshold` failed probes in a row and healthy again after
//!   `healthy_threshold` good ones.
//! - Outlier ejection (`ejection`): what real traffic shows, counted per worker and summed.
//!
//! Here: what every worker applies and reports, and the status the admin reads.

pub mod ejection;

use std::rc::Rc;
use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};

use super::{TargetId, UpstreamState};
use crate::config::UpstreamId;

/// A change to a target's health, for every worker.
pub struct HealthUpdate {
    /// The generation whose ids these are; a worker on another one ignores it (worker 0 sends
    /// every target's state afresh after a reload).
    pub generation: u32,
    pub upstream: UpstreamId,
    pub target: TargetId,
    pub change: Change,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// What the active checks now say.
    Probed(bool),
    /// Ejected for real traffic's failures (true), or back (false).
    Ejected(bool),
}

/// The process's health channels: one to every worker, and one from every worker to worker 0.
pub struct Links {
    pub updates: Vec<(Sender<HealthUpdate>, Receiver<HealthUpdate>)>,
    pub reports: (Sender<ejection::Report>, Receiver<ejection::Report>),
}

pub fn links(workers: usize) -> Links {
    Links {
        updates: (0..workers)
            .map(|_| crossbeam_channel::bounded(256))
            .collect(),
        reports: crossbeam_channel::bounded(workers * 1024),
    }
}

/// Applies worker 0's health changes to this worker's upstreams, those of its generation
/// `generation` (worker tick).
pub fn apply(generation: u32, upstreams: &[Rc<UpstreamState>], updates: &Receiver<HealthUpdate>) {
    for u in updates.try_iter().filter(|u| u.generation == generation) {
        if let Some(up) = upstreams.get(usize::from(u.upstream.0)) {
            match u.change {
                Change::Probed(healthy) => {
                    up.set_healthy(u.target, healthy);
                }
                Change::Ejected(ejected) => up.set_ejected(u.target, ejected),
            }
        }
    }
}

/// Sends worker 0 the failure streaks of worker `worker`'s upstreams (of its generation
/// `generation`) that changed since the last report.
pub fn report(
    generation: u32,
    worker: usize,
    upstreams: &[Rc<UpstreamState>],
    reports: &Sender<ejection::Report>,
) {
    for up in upstreams.iter().filter(|u| u.has_outlier()) {
        for (t, streak) in up.streaks_to_report() {
            let report = ejection::Report {
                generation,
                worker,
                upstream: up.id,
                target: t,
                streak,
            };
            if reports.try_send(report).is_ok() {
                up.streak_reported(t, streak);
            }
        }
    }
}

/// Each probed target's state, for `/status` and `/metrics`: written by the prober when a probe
/// ends (off the request path), read at scrape time.
#[derive(Default)]
pub struct HealthStatus(pub(crate) Mutex<Vec<TargetHealth>>);

pub use crate::metrics::status::TargetHealth;

impl HealthStatus {
    pub fn snapshot(&self) -> Vec<TargetHealth> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub(crate) fn update(&self, i: usize, f: impl FnOnce(&mut TargetHealth)) {
        if let Ok(mut all) = self.0.lock() {
            if let Some(t) = all.get_mut(i) {
                f(t);
            }
        }
    }
}
