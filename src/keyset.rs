//! A JWKS document's signing keys: parsed (keys ringway cannot use skipped, with the reason),
//! and looked up by a token's `kid` and `alg`. A leaf: `config` reads a `jwks_file` with it at
//! load, and the auth fetcher reads remote sets with it.

use std::str::FromStr;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// A provider's public keys, as its JWKS gave them.
pub struct KeySet {
    /// A digest of the JWKS document: it changes when the keys do, and a token cached under
    /// another version is checked again (a key the provider withdrew stops working at once).
    pub version: u64,
    keys: Vec<Key>,
}

struct Key {
    kid: Option<Box<str>>,
    /// The JWK's `alg`, when it names one: then only that algorithm may use the key.
    alg: Option<Algorithm>,
    /// The algorithms this key's type and curve can verify.
    fits: &'static [Algorithm],
    key: DecodingKey,
}

/// Which key verifies a token.
pub enum Lookup<'k> {
    Found(&'k DecodingKey),
    /// The token names a `kid` this set does not have (the provider may have rotated).
    UnknownKid,
    /// No key here can verify this token.
    NoKey,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("version", &self.version)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeySet {
    pub fn empty() -> KeySet {
        KeySet {
            version: 0,
            keys: Vec::new(),
        }
    }

    /// Reads a JWKS document. Keys ringway cannot use (encryption keys, symmetric keys, unknown
    /// types or curves) are skipped and described in the second value; a document that is not
    /// a JWKS, or leaves no usable key, is an error.
    pub fn parse(json: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err("the JWKS has no \"keys\" array".into());
        };
        let mut keys = Vec::with_capacity(entries.len());
        let mut skipped = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            match key(entry) {
                Ok(k) => keys.push(k),
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "the JWKS has no usable key ({})",
                if skipped.is_empty() {
                    "it is empty".to_owned()
                } else {
                    skipped.join("; ")
                }
            ));
        }
        let d = crate::hash::sha256(json);
        let version = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]).max(1);
        Ok((KeySet { version, keys }, skipped))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for a token signed with `alg`, named `kid`. Without a `kid` the set must hold
    /// exactly one key that fits, so that a token cannot make the gateway try every key.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        let fits = |k: &&Key| k.fits.contains(&alg) && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
                let Some(first) = named.next() else {
                    return Lookup::UnknownKid;
                };
                std::iter::once(first)
                    .chain(named)
                    .find(fits)
                    .map_or(Lookup::NoKey, |k| Lookup::Found(&k.key))
            }
            None => {
                let mut fitting = self.keys.iter().filter(fits);
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Lookup::Found(&k.key),
                    _ => Lookup::NoKey,
                }
            }
        }
    }
}

/// One JWK, if ringway can verify signatures with it.
fn key(entry: &Value) -> Result<Key, String> {
    if entry.get("use").and_then(Value::as_str) == Some("enc") {
        return Err("an encryption key (\"use\": \"enc\")".into());
    }
    let alg = match entry.get("alg").and_then(Value::as_str) {
        None => None,
        Some(a) => {
            Some(Algorithm::from_str(a).map_err(|_| format!("algorithm {a:?} is not supported"))?)
        }
    };
    let kty = entry.get("kty").and_then(Value::as_str).unwrap_or("");
    let crv = entry.get("crv").and_then(Value::as_str).unwrap_or("");
    let fits: &'static [Algorithm] = match (kty, crv) {
        ("RSA", _) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        ("EC", "P-256") => &[Algorithm::ES256],
        ("EC", "P-384") => &[Algorithm::ES384],
        ("OKP", "Ed25519") => &[Algorithm::EdDSA],
        ("oct", _) => return Err("a symmetric key has no place in a public JWKS".into()),
        _ => return Err(format!("key type {kty:?} {crv:?} is not supported")),
    };
    if alg.is_some_and(|a| !fits.contains(&a)) {
        return Err(format!("its \"alg\" does not fit a {kty} {crv} key"));
    }
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| format!("malformed: {e}"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable: {e}"))?;
    Ok(Key {
        kid: entry.get("kid").and_then(Value::as_str).map(|k| k.into()),
        alg,
        fits,
        key,
    })
}
