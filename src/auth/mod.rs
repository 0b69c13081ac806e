//! Who is calling: the consumers and their credentials, as one generation's lookup tables.
//! An API key is found by its SHA-256 digest, so the table holds no key and the lookup
//! compares digests (whose equality says nothing an attacker could use about the key).

pub mod basic;
pub mod jwks;
pub mod jwt;

use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;

use crate::config::{Config, ConsumerId};
/// SHA-256 of `bytes` (an API key is found by its digest).
pub use crate::hash::sha256 as digest;

/// Who the auth filter found the caller to be.
#[derive(Debug, Clone)]
pub enum Identity {
    Consumer(ConsumerId),
    /// A verified token: its subject, and the consumer its `consumer_claim` named.
    Token(Rc<jwt::Verified>),
}

impl Identity {
    pub fn consumer(&self) -> Option<ConsumerId> {
        match self {
            Identity::Consumer(id) => Some(*id),
            Identity::Token(v) => v.consumer,
        }
    }

    /// The consumer's name, or the token's subject.
    pub fn name<'a>(&'a self, consumers: &'a Consumers) -> &'a str {
        match self {
            Identity::Consumer(id) => consumers.name(*id),
            Identity::Token(v) => v.name(consumers),
        }
    }

    /// Header lines for the upstream request (`claims_to_headers`).
    pub fn lines(&self) -> &[u8] {
        match self {
            Identity::Consumer(_) => b"",
            Identity::Token(v) => &v.lines,
        }
    }
}

/// The consumers of one config, for the auth filters of its routes.
pub struct Consumers {
    names: Box<[Box<str>]>,
    by_key: AHashMap<[u8; 32], ConsumerId>,
    by_name: AHashMap<Box<str>, ConsumerId>,
    /// Basic credentials by user name: the consumer and its password hash.
    by_user: AHashMap<Box<[u8]>, (ConsumerId, Arc<str>)>,
}

impl Consumers {
    pub fn new(config: &Config) -> Consumers {
        let mut by_key = AHashMap::new();
        for (i, c) in config.consumers.iter().enumerate() {
            for k in &c.api_keys {
                by_key.insert(*k, ConsumerId(i as u16));
            }
        }
        let by_user = config
            .consumers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let (user, hash) = c.basic.as_ref()?;
                Some((
                    user.as_bytes().into(),
                    (ConsumerId(i as u16), Arc::clone(hash)),
                ))
            })
            .collect();
        Consumers {
            names: config
                .consumers
                .iter()
                .map(|c| c.name.as_str().into())
                .collect(),
            by_key,
            by_name: config
                .consumers
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.as_str().into(), ConsumerId(i as u16)))
                .collect(),
            by_user,
        }
    }

    /// The consumer holding API key `key`, as presented.
    pub fn by_api_key(&self, key: &[u8]) -> Option<ConsumerId> {
        self.by_key.get(&digest(key)).copied()
    }

    /// The consumer with Basic user name `user`, and its password hash.
    pub fn by_user(&self, user: &[u8]) -> Option<(ConsumerId, &Arc<str>)> {
        self.by_user.get(user).map(|(id, h)| (*id, h))
    }

    /// The consumer named `name`.
    pub fn by_name(&self, name: &str) -> Option<ConsumerId> {
        self.by_name.get(name).copied()
    }

    pub fn name(&self, id: ConsumerId) -> &str {
        self.names.get(usize::from(id.0)).map_or("", |n| n)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The value of query parameter `name` in `target` (an origin-form target), as sent.
pub fn query_param<'t>(target: &'t [u8], name: &[u8]) -> Option<&'t [u8]> {
    let q = target.iter().position(|&b| b == b'?')?;
    target[q + 1..].split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_found_by_exact_name() {
        let t = b"/p?a=1&api_key=s3cret&b";
        assert_eq!(query_param(t, b"api_key"), Some(&b"s3cret"[..]));
        assert_eq!(query_param(t, b"b"), Some(&b""[..]));
        assert_eq!(query_param(t, b"api"), None);
        assert_eq!(query_param(b"/p", b"a"), None);
    }
}
