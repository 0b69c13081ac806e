//! The header-transform filter: `set`, `add` and `remove` on the head going upstream or on every
//! response head, compiled at load into one encoded list of names to drop and a flat list of
//! byte runs and variables to append, so that a request with constant transforms costs two
//! copies per direction, and `${...}` values are expanded straight into the reused edit buffers.

use super::RequestInfo;
use crate::config::{HeaderTransform, TemplatePart, TlsVar};
use crate::http::HeaderEdits;

/// One direction's transforms, compiled from the config.
pub struct HeaderRules {
    /// Names to drop (`remove`, and `set`, which replaces), encoded for `HeaderEdits`.
    drop: Box<[u8]>,
    /// The lines to append (`set`, then `add`), as literal runs and variables: consecutive
    /// literals, names and line ends included, are merged into one run.
    append: Box<[Part]>,
}

enum Part {
    Literal(Box<[u8]>),
    RequestId,
    ClientIp,
    Route,
    Host,
    Consumer,
    Tls(TlsVar),
}

impl HeaderRules {
    pub fn new(t: &HeaderTransform) -> HeaderRules {
        let mut drop = Vec::new();
        for name in t.remove.iter().chain(t.set.iter().map(|(n, _)| n)) {
            HeaderEdits::encode_name(&mut drop, name.as_bytes());
        }
        let mut append = Vec::new();
        let mut literal = Vec::new();
        for (name, template) in t.set.iter().chain(&t.add) {
            literal.extend_from_slice(name.as_bytes());
            literal.extend_from_slice(b": ");
            for p in &template.parts {
                let var = match p {
                    TemplatePart::Literal(s) => {
                        literal.extend_from_slice(s.as_bytes());
                        continue;
                    }
                    TemplatePart::RequestId => Part::RequestId,
                    TemplatePart::ClientIp => Part::ClientIp,
                    TemplatePart::Route => Part::Route,
                    TemplatePart::Host => Part::Host,
                    TemplatePart::Consumer => Part::Consumer,
                    TemplatePart::Tls(v) => Part::Tls(*v),
                };
                if !literal.is_empty() {
                    append.push(Part::Literal(std::mem::take(&mut literal).into()));
                }
                append.push(var);
            }
            literal.extend_from_slice(b"\r\n");
        }
        if !literal.is_empty() {
            append.push(Part::Literal(literal.into()));
        }
        HeaderRules {
            drop: drop.into(),
            append: append.into(),
        }
    }

    pub fn apply(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        edits.remove_encoded(&self.drop);
        for p in self.append.iter() {
            edits.append_lines(match p {
                Part::Literal(s) => s,
                Part::RequestId => req.request_id,
                Part::ClientIp => req.client_ip,
                Part::Route => req.route_name.as_bytes(),
                Part::Host => req.view.host(),
                Part::Consumer => req.consumer.unwrap_or_default().as_bytes(),
                Part::Tls(v) => req.tls.map_or(&[][..], |t| t.var(*v)),
            });
        }
    }
}
