//! A route's header transforms (`request_headers`, `response_headers`): names checked as
//! tokens that ringway does not manage itself, values checked as field values, and `${...}`
//! templates parsed once here so that a request only expands them.

use std::ops::Range;

use toml::Spanned;

use super::file::HeaderTransformFile;
use super::{ConfigError, Validator};

/// Edits to one direction's head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderTransform {
    /// Replace every field of the name (lower-case) with one line.
    pub set: Vec<(String, Template)>,
    /// Append a line, keeping the fields already there.
    pub add: Vec<(String, Template)>,
    /// Drop every field of the name (lower-case).
    pub remove: Vec<String>,
}

/// A field value with `${...}` variables, parsed at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    /// `${request_id}`
    RequestId,
    /// `${client_ip}`
    ClientIp,
    /// `${route}`: the route's name.
    Route,
    /// `${host}`: the request's Host (or absolute-form authority), empty without one.
    Host,
    /// `${consumer}`: the authenticated consumer's name, empty without one.
    Consumer,
    /// `${tls_sni}`, `${tls_version}`, `${tls_cipher}`, `${tls_client_subject}`,
    /// `${tls_client_san}`: empty on cleartext (and without a client certificate).
    Tls(TlsVar),
}

/// What a TLS connection negotiated, as a template variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVar {
    Sni,
    Version,
    Cipher,
    ClientSubject,
    ClientSan,
}

const VARIABLES: [(&str, TemplatePart); 10] = [
    ("consumer", TemplatePart::Consumer),
    ("request_id", TemplatePart::RequestId),
    ("client_ip", TemplatePart::ClientIp),
    ("route", TemplatePart::Route),
    ("host", TemplatePart::Host),
    ("tls_sni", TemplatePart::Tls(TlsVar::Sni)),
    ("tls_version", TemplatePart::Tls(TlsVar::Version)),
    ("tls_cipher", TemplatePart::Tls(TlsVar::Cipher)),
    (
        "tls_client_subject",
        TemplatePart::Tls(TlsVar::ClientSubject),
    ),
    ("tls_client_san", TemplatePart::Tls(TlsVar::ClientSan)),
];

/// Fields ringway writes or removes itself, so a transform could only corrupt the framing or
/// the connection handling: refused with a clear error.
const MANAGED: [&str; 10] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "host",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
    "x-request-id",
];

impl Validator<'_> {
    pub(super) fn header_transform(
        &self,
        t: &Spanned<HeaderTransformFile>,
        key: &str,
    ) -> Result<HeaderTransform, ConfigError> {
        let file = t.get_ref();
        let mut out = HeaderTransform::default();
        for (list, op) in [(&file.set, "set"), (&file.add, "add")] {
            for (name, value) in list {
                let k = format!("{key}.{op}");
                let lower = self.field_name(name, value.span(), &k)?;
                let template = self.template(value, &k)?;
                match op {
                    "set" => out.set.push((lower, template)),
                    _ => out.add.push((lower, template)),
                }
            }
        }
        for name in &file.remove {
            let k = format!("{key}.remove");
            let lower = self.field_name(name.get_ref(), name.span(), &k)?;
            if out.set.iter().chain(&out.add).any(|(n, _)| *n == lower) {
                return Err(self.err(
                    name.span(),
                    &k,
                    format!("{lower:?} is both removed and set or added"),
                ));
            }
            out.remove.push(lower);
        }
        if out.set.is_empty() && out.add.is_empty() && out.remove.is_empty() {
            return Err(self.err(t.span(), key, "give at least one of set, add and remove"));
        }
        Ok(out)
    }

    fn field_name(&self, name: &str, span: Range<usize>, key: &str) -> Result<String, ConfigError> {
        if !crate::http::is_token(name.as_bytes()) || name.len() > 255 {
            return Err(self.err(span, key, format!("{name:?} is not a valid header name")));
        }
        let lower = name.to_ascii_lowercase();
        if MANAGED.contains(&lower.as_str()) {
            return Err(self.err(
                span,
                key,
                format!(
                    "{name} is a framing, hop-by-hop or request-id field that ringway manages \
                     itself; it cannot be transformed"
                ),
            ));
        }
        Ok(lower)
    }

    fn template(&self, value: &Spanned<String>, key: &str) -> Result<Template, ConfigError> {
        let s = value.get_ref();
        let bad = |why: String| self.err(value.span(), key, why);
        if s.bytes()
            .any(|b| (b.is_ascii_control() && b != b'\t') || b == 0x7f)
        {
            return Err(bad(format!(
                "{s:?}: header values cannot contain control characters"
            )));
        }
        if s.starts_with([' ', '\t']) || s.ends_with([' ', '\t']) {
            return Err(bad(format!(
                "{s:?}: header values cannot start or end with white space"
            )));
        }
        let mut parts = Vec::new();
        let mut rest = s.as_str();
        while let Some(at) = rest.find("${") {
            if at > 0 {
                parts.push(TemplatePart::Literal(rest[..at].to_owned()));
            }
            let after = &rest[at + 2..];
            let Some(end) = after.find('}') else {
                return Err(bad(format!("{s:?}: \"${{\" without a closing \"}}\"")));
            };
            let name = &after[..end];
            let Some((_, part)) = VARIABLES.iter().find(|(n, _)| *n == name) else {
                let known: Vec<String> =
                    VARIABLES.iter().map(|(n, _)| format!("${{{n}}}")).collect();
                return Err(bad(format!(
                    "unknown variable ${{{name}}} (known: {})",
                    known.join(", ")
                )));
            };
            parts.push(part.clone());
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        Ok(Template { parts })
    }
}
