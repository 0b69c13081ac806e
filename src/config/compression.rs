//! A route's response compression (`compression = { algorithms, min_bytes, types }`).

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// A content coding the gateway can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];

    /// The token in `Accept-Encoding` and `Content-Encoding`, and the metric label.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    fn parse(s: &str) -> Option<Coding> {
        Coding::ALL.into_iter().find(|c| c.token() == s)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionFile {
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_bytes: Option<Spanned<u64>>,
    pub types: Option<Spanned<Vec<Spanned<String>>>>,
}

/// What a route compresses, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    /// In the gateway's order of preference, for ties between the client's q-values.
    pub algorithms: Vec<Coding>,
    /// A response whose Content-Length is smaller is sent as is.
    pub min_bytes: u64,
    /// Lower-case media types, `type/*` for a whole type.
    pub types: Vec<String>,
}

const DEFAULT_TYPES: [&str; 5] = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "image/svg+xml",
];

impl Validator<'_> {
    pub(super) fn compression(
        &self,
        c: &Spanned<CompressionFile>,
        key: &str,
    ) -> Result<Compression, ConfigError> {
        let f = c.get_ref();
        let algorithms = match &f.algorithms {
            None => Coding::ALL.to_vec(),
            Some(list) if list.get_ref().is_empty() => {
                return Err(self.err(
                    list.span(),
                    &format!("{key}.algorithms"),
                    "give at least one of \"zstd\", \"br\", \"gzip\"",
                ))
            }
            Some(list) => {
                let mut out = Vec::new();
                for a in list.get_ref() {
                    let coding = Coding::parse(a.get_ref()).ok_or_else(|| {
                        self.err(
                            a.span(),
                            &format!("{key}.algorithms"),
                            format!("{:?} is not one of \"zstd\", \"br\", \"gzip\"", a.get_ref()),
                        )
                    })?;
                    if out.contains(&coding) {
                        return Err(self.err(
                            a.span(),
                            &format!("{key}.algorithms"),
                            format!("{:?} is listed twice", a.get_ref()),
                        ));
                    }
                    out.push(coding);
                }
                out
            }
        };
        let types = match &f.types {
            None => DEFAULT_TYPES.iter().map(|t| t.to_string()).collect(),
            Some(list) => {
                let mut out = Vec::new();
                for t in list.get_ref() {
                    let s = t.get_ref().to_ascii_lowercase();
                    let token = |p: &str| {
                        !p.is_empty()
                            && p.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                    };
                    let ok = s
                        .split_once('/')
                        .is_some_and(|(ty, sub)| token(ty) && (sub == "*" || token(sub)));
                    if !ok {
                        return Err(self.err(
                            t.span(),
                            &format!("{key}.types"),
                            format!(
                                "{:?} is not a media type (type/subtype or type/*)",
                                t.get_ref()
                            ),
                        ));
                    }
                    out.push(s);
                }
                out
            }
        };
        Ok(Compression {
            algorithms,
            min_bytes: f.min_bytes.as_ref().map_or(1024, |m| *m.get_ref()),
            types,
        })
    }
}
