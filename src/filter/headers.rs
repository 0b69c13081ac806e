//! The header-transform filter: `set`, `add` and `remove` on the head going upstream or on every
//! response head, with `${...}` values expanded per request straight into the reused edit
//! buffers.

use super::RequestInfo;
use crate::config::{HeaderTransform, TemplatePart};
use crate::http::HeaderEdits;

/// One direction's transforms, compiled from the config.
pub struct HeaderRules {
    /// Lower-case names to drop: `remove`, and `set` (which replaces).
    drop: Box<[Box<[u8]>]>,
    /// Lines to append: `set`, then `add`.
    append: Box<[Line]>,
}

/// A line to append: its name and its value's parts.
type Line = (Box<[u8]>, Box<[Part]>);

enum Part {
    Literal(Box<[u8]>),
    RequestId,
    ClientIp,
    Route,
    Host,
}

impl HeaderRules {
    pub fn new(t: &HeaderTransform) -> HeaderRules {
        let drop = t
            .remove
            .iter()
            .chain(t.set.iter().map(|(n, _)| n))
            .map(|n| n.as_bytes().into())
            .collect();
        let append = t
            .set
            .iter()
            .chain(&t.add)
            .map(|(name, template)| {
                let parts = template
                    .parts
                    .iter()
                    .map(|p| match p {
                        TemplatePart::Literal(s) => Part::Literal(s.as_bytes().into()),
                        TemplatePart::RequestId => Part::RequestId,
                        TemplatePart::ClientIp => Part::ClientIp,
                        TemplatePart::Route => Part::Route,
                        TemplatePart::Host => Part::Host,
                    })
                    .collect();
                (name.as_bytes().into(), parts)
            })
            .collect();
        HeaderRules { drop, append }
    }

    pub fn apply(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        for name in self.drop.iter() {
            edits.remove(name);
        }
        for (name, parts) in self.append.iter() {
            edits.begin_line(name);
            for p in parts.iter() {
                edits.value_part(match p {
                    Part::Literal(s) => s,
                    Part::RequestId => req.request_id,
                    Part::ClientIp => req.client_ip,
                    Part::Route => req.route_name.as_bytes(),
                    Part::Host => req.view.host(),
                });
            }
            edits.end_line();
        }
    }
}
