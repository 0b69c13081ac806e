//! Signing keys generated per run, for tests and benches: RS256, ES256 and EdDSA key pairs
//! with their public JWKs, and tokens signed with them.
#![allow(dead_code)]

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A signing key of one algorithm, with its public JWK.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    pub key: EncodingKey,
    /// Ed25519's public key, base64url.
    ed_public: Option<String>,
}

impl SigningKey {
    pub fn new(alg: Algorithm, kid: &str) -> SigningKey {
        let rng = SystemRandom::new();
        let mut ed_public = None;
        let key = match alg {
            Algorithm::RS256 => {
                let pair =
                    aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
                let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().unwrap();
                EncodingKey::from_rsa_der(&pkcs1_of(pkcs8.as_ref()))
            }
            Algorithm::ES256 => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                        .unwrap();
                EncodingKey::from_ec_der(doc.as_ref())
            }
            Algorithm::EdDSA => {
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                ed_public = Some(
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(pair.public_key().as_ref()),
                );
                EncodingKey::from_ed_der(doc.as_ref())
            }
            other => panic!("no test key for {other:?}"),
        };
        SigningKey {
            alg,
            kid: kid.into(),
            key,
            ed_public,
        }
    }

    pub fn jwk(&self) -> Value {
        let mut jwk = match &self.ed_public {
            // jsonwebtoken derives RSA and EC public keys from the private one, not Ed25519's.
            Some(x) => json!({ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": x }),
            None => {
                serde_json::to_value(Jwk::from_encoding_key(&self.key, self.alg).unwrap()).unwrap()
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 document (what jsonwebtoken signs with).
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    // (tag, start of content, end of content) of the DER element at `at`.
    let tlv = |at: usize| -> (u8, usize, usize) {
        let first = pkcs8[at + 1] as usize;
        if first < 0x80 {
            return (pkcs8[at], at + 2, at + 2 + first);
        }
        let n = first & 0x7f;
        let len = pkcs8[at + 2..at + 2 + n]
            .iter()
            .fold(0usize, |l, &b| l << 8 | b as usize);
        (pkcs8[at], at + 2 + n, at + 2 + n + len)
    };
    let (_, body, _) = tlv(0);
    let (_, _, after_version) = tlv(body);
    let (_, _, after_alg) = tlv(after_version);
    let (tag, start, end) = tlv(after_alg);
    assert_eq!(tag, 0x04, "an OCTET STRING holds the key");
    pkcs8[start..end].to_vec()
}

pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// An HS256 token signed with `secret` for subject `sub` and claim `tenant`, issued now and
/// valid for ten minutes.
pub fn hs256(secret: &str, sub: &str, tenant: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": sub, "tenant": tenant, "iat": now, "exp": now + 600 }),
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}
