//! The rate-limit filter: admits a request under every limit of its route (the admission
//! protocol lives in `ratelimit::admit`), or refuses it with 429 and `RateLimit-*` headers.

use super::{Ctx, RequestInfo};
use crate::auth::Identity;
use crate::config::{RateLimitId, RateLimitKey};
use crate::error::ProxyError;
use crate::ratelimit::{self, Limiter};

/// Separates subjects' buckets from consumers'.
const SUBJECT_KEYS: u64 = 0x5ab1_ec75_0000_0001;

pub struct RateLimit {
    ids: Box<[RateLimitId]>,
}

impl RateLimit {
    pub fn new(ids: &[RateLimitId]) -> RateLimit {
        RateLimit { ids: ids.into() }
    }

    pub fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        gateway_lines: &mut Vec<u8>,
        identity: Option<&Identity>,
    ) -> Result<(), ProxyError> {
        let key = |k: &RateLimitKey| match k {
            RateLimitKey::ClientIp => Limiter::hash_key(req.client_ip),
            RateLimitKey::Route => Limiter::hash_key(&req.route.0.to_le_bytes()),
            // Requests without a consumer (a route without auth) share one bucket; a token
            // without a consumer entry is keyed by its subject.
            RateLimitKey::Consumer => match identity {
                Some(Identity::Token(v)) if v.consumer.is_none() => {
                    Limiter::hash_key(v.subject.as_bytes()) ^ SUBJECT_KEYS
                }
                who => Limiter::hash_key(
                    &who.and_then(Identity::consumer)
                        .map_or(u32::MAX, |c| u32::from(c.0))
                        .to_le_bytes(),
                ),
            },
            RateLimitKey::Header(name) => {
                Limiter::hash_key(req.view.header(name.as_bytes()).unwrap_or_default())
            }
        };
        let admitted = ratelimit::admit(&mut cx.limiters.borrow_mut(), &self.ids, key);
        match admitted {
            Ok(Some(headroom)) => {
                headroom.write_headers(gateway_lines, false);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(refusal) => {
                req.metrics
                    .borrow_mut()
                    .record_ratelimited(req.route, refusal.limit);
                Err(ProxyError::RateLimited(refusal))
            }
        }
    }
}
