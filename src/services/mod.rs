//! The process-wide services that run on worker 0, off the request path, and their channels to
//! every worker: the JWKS fetcher (remote JWT keys) and the upstream health decider (active
//! probes, outlier ejection). Each worker applies what they send on its tick; worker 0 also
//! runs them on its tick.

mod health;
mod jwks_fetcher;

use health::Health;
use jwks_fetcher::Fetcher;

use std::rc::Rc;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::admin::AdminState;
use crate::auth::jwks::{self, Ask, KeysUpdate};
use crate::config::Config;
use crate::upstream::health::{self as upstream_health, ejection, HealthUpdate};
use crate::worker::Worker;

/// One worker's ends of the services' channels, and worker 0's services themselves.
pub struct WorkerLinks {
    /// Asks to the JWKS fetcher and its answers.
    jwt: (Sender<Ask>, Receiver<KeysUpdate>),
    health: Receiver<HealthUpdate>,
    /// This worker's failure runs, to worker 0 (outlier ejection).
    health_reports: Sender<ejection::Report>,
    /// Worker 0's.
    leader: Option<Leader>,
}

struct Leader {
    jwks: JwksStart,
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
    Arc<upstream_health::HealthStatus>,
);

/// Every worker's links, worker 0's first.
pub fn links(workers: usize, admin: &AdminState) -> Vec<WorkerLinks> {
    // Created whether or not a provider fetches its keys yet: a reload may add one.
    let l = jwks::Links::new(workers);
    let (ask_tx, asks) = l.asks;
    let (updates, receivers): (Vec<_>, Vec<_>) = l.updates.into_iter().unzip();
    let jwt_workers: Vec<_> = receivers
        .into_iter()
        .map(|rx| (ask_tx.clone(), rx))
        .collect();
    let jwks_leader = (asks, updates, Arc::clone(&admin.jwks));
    let h = upstream_health::links(workers);
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
    jwt_updates: Receiver<KeysUpdate>,
    health: Receiver<HealthUpdate>,
    health_reports: Sender<ejection::Report>,
    /// Some upstream has `[outlier]`: failure runs are reported.
    outliers: bool,
    fetcher: Option<Fetcher>,
    health_service: Option<Health>,
}

impl Running {
    /// Links `worker` to the services, and on worker 0 starts them (probes begin at once).
    pub fn start(worker: &Rc<Worker>, config: &Config, links: WorkerLinks) -> Running {
        let (asks, jwt_updates) = links.jwt;
        worker.generation().jwt.link(asks);
        let (mut fetcher, mut health_service) = (None, None);
        if let Some(leader) = links.leader {
            let (asks, updates, status) = leader.jwks;
            fetcher = Some(Fetcher::new(config, asks, updates, status));
            let (updates, reports, status) = leader.health;
            health_service = Some(Health::start(worker, config, updates, reports, status));
        }
        Running {
            jwt_updates,
            health: links.health,
            health_reports: links.health_reports,
            outliers: config.upstreams.iter().any(|u| u.outlier.is_some()),
            fetcher,
            health_service,
        }
    }

    /// Follows a reload (the worker has installed the new generation): worker 0's services
    /// take the new config, carrying their state over by name.
    pub fn reconfigure(&mut self, worker: &Rc<Worker>, config: &Config) {
        self.outliers = config.upstreams.iter().any(|u| u.outlier.is_some());
        if let Some(fetcher) = &mut self.fetcher {
            fetcher.configure(config);
        }
        if let Some(h) = &mut self.health_service {
            h.configure(worker, config, true);
        }
    }

    /// The worker's tick: worker 0's services take their input; every worker applies their
    /// answers and reports its failure runs.
    pub fn tick(&mut self, worker: &Rc<Worker>) {
        if let Some(fetcher) = &self.fetcher {
            fetcher.poll(worker);
        }
        worker.generation().jwt.apply(&self.jwt_updates);
        if self.outliers {
            let gen = worker.generation();
            upstream_health::report(gen.id, worker.id, &gen.upstreams, &self.health_reports);
        }
        if let Some(h) = &mut self.health_service {
            h.poll(worker.now());
        }
        let gen = worker.generation();
        upstream_health::apply(gen.id, &gen.upstreams, &self.health);
    }
}
