//! Microbenchmarks of authentication: an API-key check among 1,000 consumers, an address
//! against 1,000 CIDR rules, a JWT found in the per-worker cache of verified tokens (the
//! common path), and a full JWT verification with RS256, ES256 and EdDSA (a cache miss).

#[path = "../tests/jwt_support/mod.rs"]
mod jwt_support;

use std::hint::black_box;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::Algorithm;
use ringway::auth::jwt::{Checker, KeySet, TokenCache};
use ringway::auth::Consumers;
use ringway::config::{self, AuthId, JwksSource, JwtSettings};
use serde_json::json;

use jwt_support::{jwks, SigningKey};

fn api_keys_and_ip_rules(c: &mut Criterion) {
    let mut src = String::from("[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n");
    for i in 0..1000 {
        src.push_str(&format!(
            "[[consumers]]\nname = \"c{i}\"\napi_keys = [\"sha256:{}\"]\n",
            ringway::auth::digest(format!("key-number-{i:06}").as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
    }
    let config = config::parse(Path::new("bench.toml"), &src).expect("bench config");
    let consumers = Consumers::new(&config);
    c.bench_function("api key check (1000 consumers)", |b| {
        b.iter(|| consumers.by_api_key(black_box(b"key-number-000777")))
    });
    let rules: Vec<ringway::cidr::Cidr> = (0..1000u32)
        .map(|i| {
            let net = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8));
            ringway::cidr::Cidr::parse(&format!("{net}/24")).expect("a range")
        })
        .collect();
    let client: std::net::IpAddr = "203.0.113.7".parse().expect("an address");
    c.bench_function("ip rules: miss 1000 CIDRs", |b| {
        b.iter(|| ringway::cidr::any_contains(black_box(&rules), black_box(client)))
    });
}

fn jwt(c: &mut Criterion) {
    let keys = [
        SigningKey::new(Algorithm::RS256, "rsa"),
        SigningKey::new(Algorithm::ES256, "ec"),
        SigningKey::new(Algorithm::EdDSA, "ed"),
    ];
    let (set, _) = KeySet::parse(jwks(&keys.iter().collect::<Vec<_>>()).as_bytes()).expect("jwks");
    let set = Arc::new(set);
    let settings = JwtSettings {
        provider: "bench".into(),
        realm: "bench".into(),
        issuer: Some("https://idp.example.com/".into()),
        audiences: vec!["orders-api".into()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        keys: JwksSource::File(Arc::clone(&set)),
        leeway_s: 30,
        consumer_claim: None,
        claims_to_headers: vec![("x-user-id".into(), "sub".into())],
        hs_secret: None,
    };
    let checker = Checker::new(&settings);
    let config = config::parse(
        Path::new("bench.toml"),
        "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n",
    )
    .expect("bench config");
    let consumers = Consumers::new(&config);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    // A token of a typical size (about 800 bytes with RS256).
    let claims = json!({
        "iss": "https://idp.example.com/", "aud": "orders-api", "sub": "user-1234567890",
        "iat": now, "exp": now + 3600, "scope": "orders:read orders:write profile email",
        "org": { "tenant": "t-42", "plan": "enterprise" }, "jti": "0f8c1b4e-6f7d-4a57-9d2c",
    });
    for key in &keys {
        let token = key.sign(&claims);
        c.bench_function(
            &format!("jwt verify {:?} ({} bytes)", key.alg, token.len()),
            |b| {
                b.iter(|| {
                    checker
                        .verify(black_box(token.as_bytes()), &set, &consumers, now)
                        .expect("a valid token")
                })
            },
        );
    }
    let token = keys[0].sign(&claims);
    let verified = checker
        .verify(token.as_bytes(), &set, &consumers, now)
        .expect("a valid token");
    let mut cache = TokenCache::default();
    for i in 0..1000 {
        let other = format!("{token}{i}");
        cache.insert(
            AuthId(0),
            other.as_bytes(),
            set.version,
            Rc::new(clone(&verified)),
            now,
        );
    }
    cache.insert(
        AuthId(0),
        token.as_bytes(),
        set.version,
        Rc::new(verified),
        now,
    );
    c.bench_function("jwt cached check (1001 tokens cached)", |b| {
        b.iter(|| {
            cache
                .get(
                    &checker,
                    AuthId(0),
                    black_box(token.as_bytes()),
                    set.version,
                    now,
                )
                .is_some()
        })
    });
}

fn clone(v: &ringway::auth::jwt::Verified) -> ringway::auth::jwt::Verified {
    ringway::auth::jwt::Verified {
        provider: v.provider.clone(),
        consumer: v.consumer,
        subject: v.subject.clone(),
        lines: v.lines.clone(),
        expires: v.expires,
    }
}

criterion_group!(benches, api_keys_and_ip_rules, jwt);
criterion_main!(benches);
