//! Background revalidation of cache entries answered STALE (`stale-while-revalidate`): the
//! cache filter asks for one (`filter::Background`), and the worker runs it as its own task
//! through the buffered upstream client, off the request path, landing the entry's flight when
//! it ends.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use crate::cache::policy;
use crate::cache::record::{add_validators, new_entry, refreshed, Recorded, Request};
use crate::cache::Entry;
use crate::config::Implicit;
use crate::error::ProxyError;
use crate::filter::cache::Revalidation;
use crate::filter::Background;
use crate::upstream::client::{self, fetch};
use crate::upstream::UpstreamState;
use crate::worker::Worker;

impl Background for Rc<Worker> {
    fn revalidate(&self, job: Revalidation) {
        let w = Rc::clone(self);
        monoio::spawn(async move {
            let Revalidation {
                upstream,
                target,
                entry,
                flight,
            } = job;
            if let Err(e) = background_fetch(&w, &upstream, &target, &entry).await {
                debug!(error = ?e, "background revalidation failed");
            }
            if let Some(cache) = &w.cache {
                cache.land(flight);
            }
        });
    }
}

async fn background_fetch(
    w: &Worker,
    up: &UpstreamState,
    target: &[u8],
    entry: &Entry,
) -> Result<(), ProxyError> {
    let Some(cache) = &w.cache else { return Ok(()) };
    let mut headers = Vec::with_capacity(256);
    headers.extend_from_slice(&entry.request_headers);
    headers.extend_from_slice(&entry.replay);
    add_validators(&mut headers, entry);
    headers.extend_from_slice(b"x-cache-revalidation: 1\r\n");
    let request = client::Request {
        method: b"GET",
        target,
        host: &entry.host,
        headers: &headers,
    };
    let resp = fetch(
        &w.upstream_ctx(),
        up,
        entry.url,
        &request,
        cache.settings.max_entry_bytes,
    )
    .await?;
    let now = Instant::now();
    let rec = Recorded::from_head(&resp.raw_head, &resp.head);
    if resp.head.status == 304 {
        cache.insert(refreshed(entry, Some(rec), now));
        return Ok(());
    }
    // A new representation: store it if it is storable and was small enough to fetch whole.
    let Some(body) = resp.body else { return Ok(()) };
    if !policy::storable(&rec.facts(entry.authorized)) {
        return Ok(());
    }
    let request = Request {
        url: entry.url,
        partition: 0,
        replay: entry.replay.clone(),
        authorized: entry.authorized,
        variant_names: Vec::new(),
        host: entry.host.clone(),
        target: entry.target.clone(),
        headers: Vec::new(),
    };
    let mut stored = new_entry(
        &request,
        rec,
        Bytes::from(body),
        now,
        Implicit::ttl(entry.freshness),
    );
    stored.variant = entry.variant;
    stored.vary = entry.vary.clone();
    stored.request_headers = entry.request_headers.clone();
    cache.insert(Arc::new(stored));
    Ok(())
}
