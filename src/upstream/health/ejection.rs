//! Outlier ejection: each worker counts, per target, the failures in a row that its own traffic
//! met (connect errors, resets, timeouts, 5xx) and reports the count when it changes (on its
//! tick). Worker 0 sums the latest count of every worker, so two workers seeing 3 failures each
//! count as 6; when the sum reaches `consecutive_failures` the target is ejected for the whole
//! process, for `ejection_ms`, doubling with each consecutive ejection up to `max_ejection_ms`,
//! unless that would eject more than `max_ejection_percent` of the upstream's targets.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

use super::{Change, HealthStatus, HealthUpdate};
use crate::config::{Config, Outlier, UpstreamId};
use crate::upstream::TargetId;

/// A worker's failures in a row on one target, as of its last tick.
pub struct Report {
    /// The worker's generation, whose ids these are.
    pub generation: u32,
    pub worker: usize,
    pub upstream: UpstreamId,
    pub target: TargetId,
    pub streak: u32,
}

/// Worker 0's view of every upstream with an `outlier` section.
pub struct Ejector {
    /// The generation whose ids the workers' reports must use.
    generation: u32,
    reports: Receiver<Report>,
    workers: Rc<[Sender<HealthUpdate>]>,
    status: Arc<HealthStatus>,
    /// By `UpstreamId`; `None` without `outlier`.
    upstreams: Vec<Option<Watched>>,
}

struct Watched {
    name: String,
    settings: Outlier,
    first_row: usize,
    targets: Vec<TargetOutlier>,
}

struct TargetOutlier {
    name: String,
    /// Each worker's latest streak.
    streaks: Vec<u32>,
    ejected_until: Option<Instant>,
    /// Ejections in a row (the next lasts `ejection × 2^ejections`); forgotten after
    /// `max_ejection` without one.
    ejections: u32,
    back_since: Option<Instant>,
}

impl Ejector {
    /// `previous`: the ejector before a reload, whose targets' runs and ejections carry over by
    /// upstream and target name.
    pub fn new(
        config: &Config,
        generation: u32,
        previous: Option<&Ejector>,
        reports: Receiver<Report>,
        workers: Rc<[Sender<HealthUpdate>]>,
        status: Arc<HealthStatus>,
        first_row: Vec<Option<usize>>,
    ) -> Option<Ejector> {
        let n = workers.len();
        let upstreams: Vec<Option<Watched>> = config
            .upstreams
            .iter()
            .zip(first_row)
            .map(|(u, row)| {
                Some(Watched {
                    name: u.name.clone(),
                    settings: u.outlier.clone()?,
                    first_row: row?,
                    targets: u
                        .targets
                        .iter()
                        .map(|t| {
                            let kept = previous.and_then(|p| p.target(&u.name, &t.name));
                            TargetOutlier {
                                name: t.name.clone(),
                                streaks: kept.map_or_else(|| vec![0; n], |k| k.streaks.clone()),
                                ejected_until: kept.and_then(|k| k.ejected_until),
                                ejections: kept.map_or(0, |k| k.ejections),
                                back_since: kept.and_then(|k| k.back_since),
                            }
                        })
                        .collect(),
                })
            })
            .collect();
        upstreams.iter().any(Option::is_some).then_some(Ejector {
            generation,
            reports,
            workers,
            status,
            upstreams,
        })
    }

    fn target(&self, upstream: &str, target: &str) -> Option<&TargetOutlier> {
        let up = self
            .upstreams
            .iter()
            .flatten()
            .find(|u| u.name == upstream)?;
        up.targets.iter().find(|t| t.name == target)
    }

    /// Every target's ejection state, for the workers to start from after a reload.
    pub fn announce_all(&self) {
        for (u, up) in self.upstreams.iter().enumerate() {
            let Some(up) = up else { continue };
            for (t, target) in up.targets.iter().enumerate() {
                self.status.update(up.first_row + t, |s| {
                    s.ejected = target.ejected_until.is_some();
                    s.ejections = s.ejections.max(u64::from(target.ejections));
                });
                self.send(
                    UpstreamId(u as u16),
                    TargetId(t),
                    target.ejected_until.is_some(),
                );
            }
        }
    }

    fn send(&self, upstream: UpstreamId, target: TargetId, ejected: bool) {
        for tx in self.workers.iter() {
            let update = HealthUpdate {
                generation: self.generation,
                upstream,
                target,
                change: Change::Ejected(ejected),
            };
            if tx.try_send(update).is_err() {
                warn!("a worker is not taking health updates");
            }
        }
    }

    /// Takes the workers' reports, ejects the targets whose summed streak reached the
    /// threshold, and brings back those whose ejection is over (worker 0's tick).
    pub fn poll(&mut self, now: Instant) {
        for r in self.reports.try_iter() {
            if r.generation != self.generation {
                continue;
            }
            let Some(Some(up)) = self.upstreams.get_mut(usize::from(r.upstream.0)) else {
                continue;
            };
            if let Some(t) = up.targets.get_mut(r.target.0) {
                if let Some(s) = t.streaks.get_mut(r.worker) {
                    *s = r.streak;
                }
            }
        }
        let mut pending = Vec::new();
        for (u, up) in self.upstreams.iter_mut().enumerate() {
            let Some(up) = up else { continue };
            let upstream = UpstreamId(u as u16);
            for t in 0..up.targets.len() {
                let change = up.step(t, now);
                if let Some(ejected) = change {
                    self.status.update(up.first_row + t, |s| {
                        s.ejected = ejected;
                        s.ejections += u64::from(ejected);
                    });
                    pending.push((upstream, TargetId(t), ejected));
                }
            }
        }
        for (upstream, target, ejected) in pending {
            self.send(upstream, target, ejected);
        }
    }
}

impl Watched {
    /// Target `t`'s change at `now`: ejected (true), back (false), or none.
    fn step(&mut self, t: usize, now: Instant) -> Option<bool> {
        let ejected_now = self
            .targets
            .iter()
            .filter(|x| x.ejected_until.is_some())
            .count();
        let allowed = self.targets.len() * self.settings.max_ejection_percent as usize / 100;
        let settings = &self.settings;
        let target = &mut self.targets[t];
        if let Some(until) = target.ejected_until {
            if now < until {
                return None;
            }
            target.ejected_until = None;
            target.back_since = Some(now);
            info!(upstream = %self.name, target = %target.name, "ejection over: the target takes traffic again");
            return Some(false);
        }
        if target
            .back_since
            .is_some_and(|since| now.saturating_duration_since(since) > settings.max_ejection)
        {
            target.ejections = 0;
            target.back_since = None;
        }
        let sum: u32 = target.streaks.iter().sum();
        if sum < settings.consecutive_failures || ejected_now >= allowed {
            return None;
        }
        let length = settings
            .ejection
            .saturating_mul(1 << target.ejections.min(16))
            .min(settings.max_ejection);
        target.ejections += 1;
        target.ejected_until = Some(now + length);
        target.streaks.fill(0);
        warn!(upstream = %self.name, target = %target.name, failures = sum,
            ejection_ms = length.as_millis() as u64, "target ejected: failures in a row");
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ejections_in_a_row_double_up_to_the_maximum_and_respect_the_share() {
        let mut up = Watched {
            name: "u".into(),
            settings: Outlier {
                consecutive_failures: 4,
                ejection: Duration::from_millis(100),
                max_ejection: Duration::from_millis(250),
                max_ejection_percent: 50,
            },
            first_row: 0,
            targets: ["a", "b"]
                .iter()
                .map(|n| TargetOutlier {
                    name: (*n).into(),
                    streaks: vec![0; 2],
                    ejected_until: None,
                    ejections: 0,
                    back_since: None,
                })
                .collect(),
        };
        let mut now = Instant::now();
        let mut lengths = Vec::new();
        for _ in 0..3 {
            // Two workers' runs add up: 2 + 2 reaches 4.
            up.targets[0].streaks = vec![2, 2];
            assert_eq!(up.step(0, now), Some(true));
            let until = up.targets[0].ejected_until.unwrap();
            lengths.push(until - now);
            assert_eq!(up.targets[0].streaks, vec![0, 0], "runs start afresh");
            // While `a` is out, `b` may not follow: 1 of 2 targets is the 50% share.
            up.targets[1].streaks = vec![4, 0];
            assert_eq!(up.step(1, now), None);
            up.targets[1].streaks = vec![0, 0];
            now = until;
            assert_eq!(
                up.step(0, now),
                Some(false),
                "back when the ejection is over"
            );
        }
        let ms: Vec<u128> = lengths.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![100, 200, 250]);
        // After max_ejection without one, the next is short again.
        now += Duration::from_millis(300);
        up.targets[0].streaks = vec![4, 0];
        up.step(0, now);
        assert_eq!(
            up.targets[0].ejected_until.unwrap() - now,
            Duration::from_millis(100)
        );
    }
}
