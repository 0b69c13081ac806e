//! The process-wide services that run on worker 0, off the request path, and their channels to
//! every worker: the JWKS fetcher (remote JWT keys) and the upstream health decider (active
//! probes, outlier ejection). Each worker applies what they send on its tick; worker 0 also
//! runs them on its tick.

use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::admin::AdminState;
use crate::auth::jwks::{self, Ask, Fetcher, KeysUpdate};
use crate::config::{AuthKind, Config, JwksSource};
use crate::upstream::health::{self, ejection, HealthUpdate};
use crate::worker::Worker;

/// One worker's ends of the services' channels, and worker 0's services themselves.
pub struct WorkerLinks {
    /// Asks to the JWKS fetcher and its answers, when some provider fetches its keys.
    jwt: Option<(Sender<Ask>, Receiver<KeysUpdate>)>,
    health: Receiver<HealthUpdate>,
    /// This worker's failure runs, to worker 0 (outlier ejection).
    health_reports: Sender<ejection::Report>,
    /// Worker 0's.
    leader: Option<Leader>,
}

struct Leader {
    jwks: Option<JwksStart>,
    health: HealthStart,
}

/// The fetcher's ends: the workers' asks, every worker's update channel, the status it writes.
type JwksStart = (
    Receiver<Ask>,
    Vec<Sender<KeysUpdate>>,
    Arc<jwks::JwksStatus>,
);

/// The health decider's ends: every worker's update channel, the workers' failure reports, the
/// status it writes.
type HealthStart = (
    Vec<Sender<HealthUpdate>>,
    Receiver<ejection::Report>,
    Arc<health::HealthStatus>,
);

/// Every worker's links, worker 0's first.
pub fn links(config: &Config, workers: usize, admin: &AdminState) -> Vec<WorkerLinks> {
    let remote_jwks = config.auth.iter().any(
        |a| matches!(&a.kind, AuthKind::Jwt(s) if matches!(s.keys, JwksSource::Remote { .. })),
    );
    let (mut jwt_workers, mut jwks_leader) = (Vec::new(), None);
    if remote_jwks {
        let l = jwks::Links::new(workers);
        let (ask_tx, asks) = l.asks;
        let (updates, receivers): (Vec<_>, Vec<_>) = l.updates.into_iter().unzip();
        jwt_workers = receivers
            .into_iter()
            .map(|rx| Some((ask_tx.clone(), rx)))
            .collect();
        jwks_leader = Some((asks, updates, Arc::clone(&admin.jwks)));
    }
    jwt_workers.resize_with(workers, || None);
    let h = health::links(workers);
    let (report_tx, reports) = h.reports;
    let (update_txs, update_rxs): (Vec<_>, Vec<_>) = h.updates.into_iter().unzip();
    let mut leader = Some(Leader {
        jwks: jwks_leader,
        health: (update_txs, reports, Arc::clone(&admin.health)),
    });
    update_rxs
        .into_iter()
        .zip(jwt_workers)
        .map(|(health, jwt)| WorkerLinks {
            jwt,
            health,
            health_reports: report_tx.clone(),
            leader: leader.take(),
        })
        .collect()
}

/// The services as one worker runs them.
pub struct Running {
    jwt_updates: Option<Receiver<KeysUpdate>>,
    health: Receiver<HealthUpdate>,
    health_reports: Sender<ejection::Report>,
    /// Some upstream has `[outlier]`: failure runs are reported.
    outliers: bool,
    fetcher: Option<Fetcher>,
    ejector: Option<ejection::Ejector>,
}

impl Running {
    /// Links `worker` to the services, and on worker 0 starts them (probes begin at once).
    pub fn start(worker: &Rc<Worker>, config: &Config, links: WorkerLinks) -> Running {
        let jwt_updates = links.jwt.map(|(asks, updates)| {
            worker.jwt.link(asks);
            updates
        });
        let (mut fetcher, mut ejector) = (None, None);
        if let Some(leader) = links.leader {
            fetcher = leader
                .jwks
                .map(|(asks, updates, status)| Fetcher::new(config, asks, updates, status));
            let (updates, reports, status) = leader.health;
            ejector = health::start(worker, config, updates, reports, status);
        }
        Running {
            jwt_updates,
            health: links.health,
            health_reports: links.health_reports,
            outliers: config.upstreams.iter().any(|u| u.outlier.is_some()),
            fetcher,
            ejector,
        }
    }

    /// The worker's tick: worker 0's services take their input; every worker applies their
    /// answers and reports its failure runs.
    pub fn tick(&mut self, worker: &Rc<Worker>) {
        if let Some(fetcher) = &self.fetcher {
            fetcher.poll(worker);
        }
        if let Some(updates) = &self.jwt_updates {
            worker.jwt.apply(updates);
        }
        if self.outliers {
            health::report(worker, &self.health_reports);
        }
        if let Some(ejector) = &mut self.ejector {
            ejector.poll(worker.now());
        }
        health::apply(worker, &self.health);
    }
}
