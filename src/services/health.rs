//! Worker 0's health service: a probing task per target of every upstream with a
//! `health_check`, and the ejector (`upstream::health::ejection`) when some upstream has an
//! `outlier` section. Its verdicts go to every worker (`upstream::health::apply`).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

use crate::config::{Config, HealthCheck, Probe, TargetId, UpstreamId};
use crate::upstream::client::{self, Request};
use crate::upstream::health::{ejection, Change, HealthStatus, HealthUpdate, TargetHealth};
use crate::worker::Worker;

/// The service's state on worker 0.
pub struct Health {
    workers: Rc<[Sender<HealthUpdate>]>,
    reports: Receiver<ejection::Report>,
    status: Arc<HealthStatus>,
    /// Raised by each reload: probers started for an older config stop at their next wake.
    epoch: Rc<Cell<u32>>,
    ejector: Option<ejection::Ejector>,
}

impl Health {
    pub fn start(
        w: &Rc<Worker>,
        config: &Config,
        workers: Vec<Sender<HealthUpdate>>,
        reports: Receiver<ejection::Report>,
        status: Arc<HealthStatus>,
    ) -> Health {
        let mut health = Health {
            workers: workers.into(),
            reports,
            status,
            epoch: Rc::new(Cell::new(0)),
            ejector: None,
        };
        health.configure(w, config, false);
        health
    }

    /// Starts probing and ejecting for `config` (worker 0 has installed its generation). On a
    /// reload (`announce`), each target starts from the state it had, carried by name, and every
    /// worker is told every target's state under the new generation's ids.
    pub fn configure(&mut self, w: &Rc<Worker>, config: &Config, announce: bool) {
        let epoch = self.epoch.get().wrapping_add(1);
        self.epoch.set(epoch);
        let gen = w.generation();
        let before = self.status.snapshot();
        let mut rows = Vec::new();
        let mut tasks = Vec::new();
        // Per upstream: its first row in `status`, when it is watched.
        let mut first_row = Vec::with_capacity(config.upstreams.len());
        for (u, up) in config.upstreams.iter().enumerate() {
            let watched = up.health_check.is_some() || up.outlier.is_some();
            first_row.push(watched.then_some(rows.len()));
            if !watched {
                continue;
            }
            for (t, target) in up.targets.iter().enumerate() {
                let healthy = gen.upstreams[u].is_healthy(TargetId(t));
                let old = before
                    .iter()
                    .find(|r| r.upstream == up.name && r.target == target.name);
                rows.push(TargetHealth {
                    upstream: up.name.clone(),
                    target: target.name.clone(),
                    backup: t >= up.primaries,
                    healthy: up.health_check.as_ref().map(|_| healthy),
                    ejected: false,
                    ejections: old.map_or(0, |o| o.ejections),
                    last: old.map_or_else(|| "not probed yet".into(), |o| o.last.clone()),
                    ok: old.map_or(0, |o| o.ok),
                    failed: old.map_or(0, |o| o.failed),
                });
                let Some(check) = &up.health_check else {
                    continue;
                };
                let host = match &check.probe {
                    Probe::Http { host: Some(h), .. } => h.clone(),
                    _ => target.name.clone(),
                };
                tasks.push(Prober {
                    generation: gen.id,
                    epoch,
                    upstream: UpstreamId(u as u16),
                    target: TargetId(t),
                    row: rows.len() - 1,
                    host,
                    check: Rc::new(check.clone()),
                    healthy,
                });
            }
        }
        if let Ok(mut all) = self.status.0.lock() {
            *all = rows;
        }
        for p in tasks {
            if announce {
                p.send(&self.workers, p.healthy);
            }
            let (w, workers) = (Rc::clone(w), Rc::clone(&self.workers));
            let (status, current) = (Arc::clone(&self.status), Rc::clone(&self.epoch));
            monoio::spawn(async move { p.run(&w, &workers, &status, &current).await });
        }
        self.ejector = ejection::Ejector::new(
            config,
            gen.id,
            self.ejector.as_ref(),
            self.reports.clone(),
            Rc::clone(&self.workers),
            Arc::clone(&self.status),
            first_row,
        );
        if let (true, Some(e)) = (announce, &self.ejector) {
            e.announce_all();
        }
    }

    /// Worker 0's tick: the ejector takes the workers' reports.
    pub fn poll(&mut self, now: std::time::Instant) {
        if let Some(e) = &mut self.ejector {
            e.poll(now);
        }
    }
}

struct Prober {
    /// The generation whose ids `upstream` and `target` are, and the service's epoch it runs in.
    generation: u32,
    epoch: u32,
    /// The state it starts from.
    healthy: bool,
    upstream: UpstreamId,
    target: TargetId,
    /// Its row in `HealthStatus`.
    row: usize,
    host: String,
    check: Rc<HealthCheck>,
}

impl Prober {
    async fn run(
        self,
        w: &Worker,
        workers: &[Sender<HealthUpdate>],
        status: &HealthStatus,
        epoch: &Cell<u32>,
    ) {
        let (mut healthy, mut streak) = (self.healthy, 0u32);
        while epoch.get() == self.epoch {
            let verdict = self.probe(w).await;
            if epoch.get() != self.epoch {
                // A reload replaced this prober while it waited.
                break;
            }
            let ok = verdict.is_ok();
            // `streak` counts probes in a row that disagree with the current state.
            streak = if ok != healthy { streak + 1 } else { 0 };
            let needed = if healthy {
                self.check.unhealthy_threshold
            } else {
                self.check.healthy_threshold
            };
            if streak >= needed {
                healthy = ok;
                streak = 0;
                self.announce(w, workers, healthy, &verdict);
            }
            status.update(self.row, |t| {
                t.healthy = Some(healthy);
                match &verdict {
                    Ok(()) => {
                        t.ok += 1;
                        "ok".clone_into(&mut t.last);
                    }
                    Err(why) => {
                        t.failed += 1;
                        t.last.clone_from(why);
                    }
                }
            });
            monoio::time::sleep(self.check.interval).await;
        }
    }

    /// Tells every worker what the active checks now say of this target.
    fn send(&self, workers: &[Sender<HealthUpdate>], healthy: bool) {
        for tx in workers {
            let update = HealthUpdate {
                generation: self.generation,
                upstream: self.upstream,
                target: self.target,
                change: Change::Probed(healthy),
            };
            if tx.try_send(update).is_err() {
                warn!("a worker is not taking health updates");
            }
        }
    }

    /// One probe: `Ok` when the target is healthy, else why not.
    async fn probe(&self, w: &Worker) -> Result<(), String> {
        let gen = w.generation();
        let up = gen
            .upstreams
            .get(usize::from(self.upstream.0))
            .ok_or("the upstream is gone")?;
        let Probe::Http { path, expect, .. } = &self.check.probe else {
            return client::probe(&w.upstream_ctx(), up, self.target, None, self.check.timeout)
                .await
                .map(drop);
        };
        let request = Request {
            method: b"GET",
            target: path.as_bytes(),
            host: self.host.as_bytes(),
            headers: b"user-agent: ringway-health-check\r\nconnection: close\r\n",
        };
        let resp = client::probe(
            &w.upstream_ctx(),
            up,
            self.target,
            Some(&request),
            self.check.timeout,
        )
        .await?;
        let status = resp.map_or(0, |r| r.head.status);
        let good = if expect.is_empty() {
            (200..400).contains(&status)
        } else {
            expect.contains(&status)
        };
        good.then_some(())
            .ok_or_else(|| format!("answered {status}"))
    }

    fn announce(
        &self,
        w: &Worker,
        workers: &[Sender<HealthUpdate>],
        healthy: bool,
        verdict: &Result<(), String>,
    ) {
        let gen = w.generation();
        if let Some(up) = gen.upstreams.get(usize::from(self.upstream.0)) {
            let target = &up.target(self.target).name;
            match verdict {
                Ok(()) => info!(upstream = %up.name, %target, "target healthy again"),
                Err(why) => warn!(upstream = %up.name, %target, reason = %why,
                    "target unhealthy: no requests go to it until it passes its probes"),
            }
        }
        self.send(workers, healthy);
    }
}
