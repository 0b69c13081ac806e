//! JSON Web Tokens (RFC 7519) checked against a provider's key set: the signature by
//! jsonwebtoken on aws-lc-rs, then `exp`/`nbf`/`iat` with leeway, `iss` and `aud`. A token's
//! `alg` must be one the provider allows and fit the key's type (an RSA public key is never
//! an HMAC secret; `none` is never allowed); `kid` picks the key.
//!
//! A verified token is cached per worker until it expires, keyed by the token itself, so the
//! common path is a hash and a comparison rather than a signature check.

use std::rc::Rc;

use ahash::{AHashMap, RandomState};
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

use crate::auth::Consumers;
use crate::config::{AuthId, ConsumerId, JwtSettings};
pub use crate::keyset::{KeySet, Lookup};

/// Longest token accepted (the value after `Bearer `).
pub const MAX_TOKEN: usize = 8 * 1024;
/// Verified tokens kept per worker.
const CACHE_ENTRIES: usize = 4096;
/// Longest claim value passed upstream as a header; longer ones are left out.
const MAX_CLAIM_VALUE: usize = 1024;

/// What a verified token tells the gateway, kept in the cache and carried by the exchange.
#[derive(Debug)]
pub struct Verified {
    /// The provider that verified it: a subject names someone only within its provider.
    pub provider: Rc<str>,
    /// The `[[consumers]]` entry `consumer_claim` named.
    pub consumer: Option<ConsumerId>,
    /// `sub`, or empty.
    pub subject: Box<str>,
    /// `claims_to_headers`, as header lines for the request going upstream.
    pub lines: Box<[u8]>,
    /// `exp`, in seconds since the epoch.
    pub expires: u64,
}

impl Verified {
    /// The name the gateway knows the caller by: the consumer's, or the token's subject.
    pub fn name<'a>(&'a self, consumers: &'a Consumers) -> &'a str {
        self.consumer.map_or(&self.subject, |id| consumers.name(id))
    }
}

/// Why a token was refused. Only `Expired` is told to the client apart from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Expired,
    UnknownKid,
    Invalid(&'static str),
}

/// A header name (lower-case) and the path of the claim it carries.
type ClaimHeader = (Box<[u8]>, Box<[String]>);

/// A provider's checks, built once per generation.
pub struct Checker {
    provider: Rc<str>,
    /// One per allowed algorithm: jsonwebtoken wants a validation's algorithms to be of the
    /// key's family, and the token's `alg` picks its own.
    validations: Box<[Validation]>,
    leeway: u64,
    hs_secret: Option<DecodingKey>,
    consumer_claim: Option<Box<[String]>>,
    claims: Box<[ClaimHeader]>,
}

impl Checker {
    pub fn new(s: &JwtSettings) -> Checker {
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = s.leeway_s;
            v.validate_nbf = true;
            v.validate_aud = !s.audiences.is_empty();
            let mut required = vec!["exp"];
            if !s.audiences.is_empty() {
                v.set_audience(&s.audiences);
                required.push("aud");
            }
            if let Some(iss) = &s.issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v
        };
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Box<[String]>>();
        Checker {
            provider: s.provider.as_str().into(),
            validations: s.algorithms.iter().map(|&a| validation(a)).collect(),
            leeway: s.leeway_s,
            hs_secret: s
                .hs_secret
                .as_ref()
                .and_then(|secret| DecodingKey::from_secret(secret.expose()).ok()),
            consumer_claim: s.consumer_claim.as_deref().map(path),
            claims: s
                .claims_to_headers
                .iter()
                .map(|(h, c)| (h.as_bytes().into(), path(c)))
                .collect(),
        }
    }

    /// Verifies `token` with `keys` at `now` (seconds since the epoch).
    pub fn verify(
        &self,
        token: &[u8],
        keys: &KeySet,
        consumers: &Consumers,
        now: u64,
    ) -> Result<Verified, Failure> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Failure::Invalid("malformed token"))?;
        let Some(validation) = self
            .validations
            .iter()
            .find(|v| v.algorithms[..] == [header.alg])
        else {
            return Err(Failure::Invalid("algorithm not allowed"));
        };
        let key = if header.alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            self.hs_secret
                .as_ref()
                .ok_or(Failure::Invalid("no secret for HMAC"))?
        } else {
            match keys.find(header.kid.as_deref(), header.alg) {
                Lookup::Found(k) => k,
                Lookup::UnknownKid => return Err(Failure::UnknownKid),
                Lookup::NoKey => return Err(Failure::Invalid("no key fits the token")),
            }
        };
        let data =
            jsonwebtoken::decode::<Value>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Failure::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    Failure::Invalid("bad signature")
                }
                _ => Failure::Invalid("claims or encoding invalid"),
            })?;
        let claims = data.claims;
        let number = |name: &str| claims.get(name).and_then(Value::as_f64);
        if number("iat").is_some_and(|iat| iat > (now + self.leeway) as f64) {
            return Err(Failure::Invalid("issued in the future"));
        }
        let expires = number("exp").map_or(0, |e| e.max(0.0) as u64);
        let consumer = match &self.consumer_claim {
            None => None,
            Some(path) => {
                let name = claim(&claims, path).and_then(Value::as_str);
                let id = name.and_then(|n| consumers.by_name(n));
                Some(id.ok_or(Failure::Invalid("no such consumer"))?)
            }
        };
        let mut lines = Vec::new();
        for (header, path) in self.claims.iter() {
            if let Some(value) = claim(&claims, path).and_then(header_value) {
                lines.extend_from_slice(header);
                lines.extend_from_slice(b": ");
                lines.extend_from_slice(value.as_bytes());
                lines.extend_from_slice(b"\r\n");
            }
        }
        let subject = match claims.get("sub") {
            None => String::new(),
            Some(sub @ Value::String(_)) => {
                header_value(sub).ok_or(Failure::Invalid("sub is not a valid header value"))?
            }
            Some(_) => return Err(Failure::Invalid("sub is not a string")),
        };
        Ok(Verified {
            provider: Rc::clone(&self.provider),
            consumer,
            subject: subject.into(),
            lines: lines.into(),
            expires,
        })
    }

    /// Whether a cached token is still within its `exp` (and leeway) at `now`.
    fn current(&self, v: &Verified, now: u64) -> bool {
        now <= v.expires.saturating_add(self.leeway)
    }
}

/// The value at `path` (`org.tenant`: member `tenant` of member `org`).
fn claim<'v>(claims: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(claims, |v, part| v.get(part))
}

/// A claim as a header value: strings as they are, numbers and booleans as JSON writes them,
/// arrays of those joined by commas. Nothing that would not be a valid, short field value.
fn header_value(v: &Value) -> Option<String> {
    let one = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    };
    let s = match v {
        Value::Array(items) => items.iter().map(one).collect::<Option<Vec<_>>>()?.join(","),
        v => one(v)?,
    };
    let clean =
        s.len() <= MAX_CLAIM_VALUE && s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    clean.then(|| s.trim().to_owned())
}

/// One worker's verified tokens: found by a keyed hash of the provider and the token's
/// signature, confirmed by comparing the token itself.
pub struct TokenCache {
    hasher: RandomState,
    entries: AHashMap<u64, Cached>,
}

struct Cached {
    provider: AuthId,
    token: Box<[u8]>,
    keys_version: u64,
    verified: Rc<Verified>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            hasher: RandomState::new(),
            entries: AHashMap::new(),
        }
    }
}

impl TokenCache {
    /// The table key: the provider, the length and the last 32 bytes, which are the signature's
    /// (unique per token). Hashing the whole token cost ~700 instructions per request for a
    /// 700-byte one; an entry is still confirmed by comparing the whole token, so a made-up
    /// token sharing a tail only misses.
    fn key(&self, provider: AuthId, token: &[u8]) -> u64 {
        let tail = &token[token.len().saturating_sub(32)..];
        self.hasher.hash_one((provider.0, token.len(), tail))
    }

    /// The cached result for `token`, if it was verified under `keys_version` and is current.
    pub fn get(
        &self,
        checker: &Checker,
        provider: AuthId,
        token: &[u8],
        keys_version: u64,
        now: u64,
    ) -> Option<&Rc<Verified>> {
        let c = self.entries.get(&self.key(provider, token))?;
        (c.provider == provider
            && c.keys_version == keys_version
            && *c.token == *token
            && checker.current(&c.verified, now))
        .then_some(&c.verified)
    }

    pub fn insert(
        &mut self,
        provider: AuthId,
        token: &[u8],
        keys_version: u64,
        verified: Rc<Verified>,
        now: u64,
    ) {
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.retain(|_, c| c.verified.expires >= now);
            if self.entries.len() >= CACHE_ENTRIES {
                self.entries.clear();
            }
        }
        let key = self.key(provider, token);
        self.entries.insert(
            key,
            Cached {
                provider,
                token: token.into(),
                keys_version,
                verified,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;

    /// An EC P-256 JWK (the point is not checked until a signature is verified).
    fn ec(kid: Option<&str>, alg: Option<&str>) -> Value {
        let mut k = serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        });
        if let Some(kid) = kid {
            k["kid"] = kid.into();
        }
        if let Some(alg) = alg {
            k["alg"] = alg.into();
        }
        k
    }

    fn set(keys: Vec<Value>) -> Result<(KeySet, Vec<String>), String> {
        KeySet::parse(serde_json::json!({ "keys": keys }).to_string().as_bytes())
    }

    #[test]
    fn keys_are_found_by_kid_and_must_fit_the_algorithm() {
        let (s, skipped) = set(vec![
            ec(Some("a"), None),
            ec(Some("b"), Some("ES256")),
            serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "h" }),
            serde_json::json!({ "kty": "EC", "crv": "P-256", "use": "enc", "x": "", "y": "" }),
        ])
        .expect("two usable keys");
        assert_eq!((s.len(), skipped.len()), (2, 2), "{skipped:?}");
        assert!(matches!(
            s.find(Some("a"), Algorithm::ES256),
            Lookup::Found(_)
        ));
        assert!(matches!(s.find(Some("a"), Algorithm::RS256), Lookup::NoKey));
        assert!(matches!(
            s.find(Some("h"), Algorithm::HS256),
            Lookup::UnknownKid
        ));
        assert!(matches!(
            s.find(Some("zz"), Algorithm::ES256),
            Lookup::UnknownKid
        ));
        // Without a kid, only a single fitting key is tried.
        assert!(matches!(s.find(None, Algorithm::ES256), Lookup::NoKey));
        let (one, _) = set(vec![ec(None, None)]).expect("one key");
        assert!(matches!(one.find(None, Algorithm::ES256), Lookup::Found(_)));
        // A JWK whose alg does not fit its type is skipped; none usable is an error.
        let e = set(vec![ec(Some("c"), Some("RS256"))]).expect_err("no usable key");
        assert!(e.contains("does not fit"), "{e}");
        assert!(KeySet::parse(b"[]").is_err());
        // The version follows the content.
        let (again, _) = set(vec![
            ec(Some("a"), None),
            ec(Some("b"), Some("ES256")),
            serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "h" }),
            serde_json::json!({ "kty": "EC", "crv": "P-256", "use": "enc", "x": "", "y": "" }),
        ])
        .expect("the same set");
        assert_eq!(again.version, s.version);
        assert_ne!(one.version, s.version);
    }

    #[test]
    fn claims_become_header_values_only_when_clean() {
        assert_eq!(header_value(&"t-7".into()).as_deref(), Some("t-7"));
        assert_eq!(header_value(&serde_json::json!(42)).as_deref(), Some("42"));
        assert_eq!(
            header_value(&serde_json::json!(["a", "b", 3])).as_deref(),
            Some("a,b,3")
        );
        assert_eq!(header_value(&"a\r\nx-evil: 1".into()), None);
        assert_eq!(header_value(&serde_json::json!({ "o": 1 })), None);
        assert_eq!(header_value(&"x".repeat(2000).into()), None);
        let claims = serde_json::json!({ "org": { "tenant": "t" } });
        let path = ["org".to_owned(), "tenant".to_owned()];
        assert_eq!(claim(&claims, &path), Some(&Value::from("t")));
        assert_eq!(claim(&claims, &path[1..]), None);
    }

    #[test]
    fn the_token_cache_holds_a_token_for_its_keys_and_lifetime() {
        let settings = JwtSettings {
            realm: "r".into(),
            provider: "p".into(),
            issuer: None,
            audiences: Vec::new(),
            algorithms: vec![Algorithm::ES256],
            keys: crate::config::JwksSource::None,
            leeway_s: 10,
            consumer_claim: None,
            claims_to_headers: Vec::new(),
            hs_secret: None,
        };
        let checker = Checker::new(&settings);
        let verified = || {
            Rc::new(Verified {
                provider: "p".into(),
                consumer: None,
                subject: "s".into(),
                lines: Box::default(),
                expires: 1000,
            })
        };
        let mut cache = TokenCache::default();
        let token = b"header.payload.signature-with-32-or-more-bytes-at-its-end";
        cache.insert(AuthId(0), token, 7, verified(), 900);
        assert!(cache.get(&checker, AuthId(0), token, 7, 900).is_some());
        assert!(
            cache.get(&checker, AuthId(0), token, 7, 1010).is_some(),
            "leeway"
        );
        assert!(
            cache.get(&checker, AuthId(0), token, 7, 1011).is_none(),
            "expired"
        );
        assert!(
            cache.get(&checker, AuthId(0), token, 8, 900).is_none(),
            "keys changed"
        );
        assert!(
            cache.get(&checker, AuthId(1), token, 7, 900).is_none(),
            "another provider"
        );
        // Same length and tail, other bytes: found by the key, refused by the comparison.
        let forged = b"HEADER.payload.signature-with-32-or-more-bytes-at-its-end";
        assert!(cache.get(&checker, AuthId(0), forged, 7, 900).is_none());
        // Bounded: a full table drops what expired, then everything.
        for i in 0..CACHE_ENTRIES + 10 {
            let t = format!("token-{i:08}-padding-padding-padding-padding");
            cache.insert(AuthId(0), t.as_bytes(), 7, verified(), 900);
        }
        assert!(cache.len() <= CACHE_ENTRIES);
    }
}
