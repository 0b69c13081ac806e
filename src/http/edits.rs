//! Header edits: fields to drop and lines to append, applied by the head writers while they copy
//! the kept lines, so that an edit costs no extra pass over the head. Filters fill them; only
//! `http::write` applies them. Both buffers are owned by the connection and reused, so a
//! request with edits allocates nothing once they have grown to their working size.

/// A set of header names matched in any case, each encoded by `HeaderEdits::encode_name`.
/// Built at load (the names the gateway vouches for) or per request (a head's removals).
#[derive(Debug, Default, Clone)]
pub struct NameSet {
    encoded: Vec<u8>,
    /// Bit `len % 64` is set for the length of every name in the set: most fields are ruled
    /// out by their length alone, without walking the list.
    lengths: u64,
}

impl NameSet {
    /// The set of `names` (tokens of at most 255 bytes).
    pub fn of<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> NameSet {
        let mut list = Vec::new();
        for name in names {
            HeaderEdits::encode_name(&mut list, name);
        }
        let mut set = NameSet::default();
        set.extend_encoded(&list);
        set
    }

    /// Adds the names of `list` (built with `HeaderEdits::encode_name`).
    pub fn extend_encoded(&mut self, list: &[u8]) {
        self.encoded.extend_from_slice(list);
        let mut at = 0;
        while let Some(&len) = list.get(at) {
            self.lengths |= 1 << (len % 64);
            at += 1 + 2 * usize::from(len);
        }
    }

    pub fn clear(&mut self) {
        self.encoded.clear();
        self.lengths = 0;
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.lengths == 0
    }

    /// Whether `name` (any case) is in the set. The length bit rules out most names without
    /// comparing them (inlined: the parser asks for every header).
    #[inline(always)]
    pub fn contains(&self, name: &[u8]) -> bool {
        self.lengths & (1 << (name.len() % 64)) != 0 && self.compare(name)
    }

    /// `contains` past the length bit: the names are compared.
    #[inline(never)]
    fn compare(&self, name: &[u8]) -> bool {
        let mut rest = &self.encoded[..];
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            let Some((entry, next)) = tail.split_at_checked(2 * len) else {
                return false;
            };
            if len == name.len() && folded_eq(name, &entry[..len], &entry[len..]) {
                return true;
            }
            rest = next;
        }
        false
    }
}

/// Edits to one head. `set` is a removal plus an appended line.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Names to drop.
    remove: NameSet,
    /// Complete header lines (`name: value\r\n`) to add after the kept ones.
    append: Vec<u8>,
    /// Query parameters to drop from the target, each a length byte and the name.
    query_drop: Vec<u8>,
}

impl HeaderEdits {
    pub fn clear(&mut self) {
        self.remove.clear();
        self.append.clear();
        self.query_drop.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.append.is_empty() && self.query_drop.is_empty()
    }

    /// Drops every query parameter named `name` (at most 255 bytes) from the target sent
    /// upstream (a credential in the URL).
    pub fn drop_query_param(&mut self, name: &[u8]) {
        let name = &name[..name.len().min(usize::from(u8::MAX))];
        self.query_drop.push(name.len() as u8);
        self.query_drop.extend_from_slice(name);
    }

    /// Whether the query parameter `name` is dropped.
    pub fn drops_query_param(&self, name: &[u8]) -> bool {
        let mut rest = &self.query_drop[..];
        while let Some((&len, tail)) = rest.split_first() {
            let (entry, next) = tail.split_at(usize::from(len).min(tail.len()));
            if entry == name {
                return true;
            }
            rest = next;
        }
        false
    }

    pub fn drops_any_query_param(&self) -> bool {
        !self.query_drop.is_empty()
    }

    /// Appends `name` (a token of at most 255 bytes, which config validation guarantees) to an
    /// encoded list of names to drop: its length byte, the name in lower case, then a fold mask
    /// with 0x20 where the name has a letter, so that a field name matches when
    /// `byte | fold == lower` at every position (only a letter, in either case, can). Lists
    /// are built once, at load, and added to a request's edits whole with `remove_encoded`.
    pub fn encode_name(list: &mut Vec<u8>, name: &[u8]) {
        let name = &name[..name.len().min(usize::from(u8::MAX))];
        list.push(name.len() as u8);
        list.extend(name.iter().map(u8::to_ascii_lowercase));
        list.extend(
            name.iter()
                .map(|b| if b.is_ascii_alphabetic() { 0x20 } else { 0 }),
        );
    }

    /// Drops every field named in `list` (built with `encode_name`).
    pub fn remove_encoded(&mut self, list: &[u8]) {
        self.remove.extend_encoded(list);
    }

    /// Appends header lines (each ending in CRLF); a line may be written in pieces, as long as
    /// the pieces end whole lines before the head is written.
    pub fn append_lines(&mut self, lines: &[u8]) {
        self.append.extend_from_slice(lines);
    }

    /// The lines appended so far.
    #[inline]
    pub fn appended(&self) -> &[u8] {
        &self.append
    }

    /// Whether any field is dropped: writers skip the name checks when none is.
    #[inline]
    pub fn removes_any(&self) -> bool {
        !self.remove.is_empty()
    }

    /// Whether the field `name` (any case) is dropped.
    #[inline]
    pub fn removes(&self, name: &[u8]) -> bool {
        self.remove.contains(name)
    }

    /// Writes the appended lines to `out` (nothing at all, not even an empty copy, when there
    /// are none: the common case on the hot path).
    #[inline]
    pub fn write_appended(&self, out: &mut Vec<u8>) {
        if !self.append.is_empty() {
            out.extend_from_slice(&self.append);
        }
    }

    /// Appends the lines of `lines` (each ending in CRLF) whose field is not dropped.
    #[inline]
    pub fn copy_kept(&self, out: &mut Vec<u8>, lines: &[u8]) {
        if lines.is_empty() {
            return;
        }
        if !self.removes_any() {
            out.extend_from_slice(lines);
            return;
        }
        for line in lines.split_inclusive(|&b| b == b'\n') {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            if !self.removes(name) {
                out.extend_from_slice(line);
            }
        }
    }
}

/// Whether `name` equals the lower-case `lower` ignoring ASCII case, given `lower`'s fold mask
/// (see `encode_name`); eight bytes at a time. All three have the same length.
#[inline]
fn folded_eq(name: &[u8], lower: &[u8], fold: &[u8]) -> bool {
    let word = |s: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_ne_bytes(w)
    };
    let mut i = 0;
    while i + 8 <= name.len() {
        if word(name, i) | word(fold, i) != word(lower, i) {
            return false;
        }
        i += 8;
    }
    (i..name.len()).all(|j| name[j] | fold[j] == lower[j])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_names_match_any_case_and_only_whole_names() {
        let mut list = Vec::new();
        HeaderEdits::encode_name(&mut list, b"server");
        HeaderEdits::encode_name(&mut list, b"x-powered-by");
        let mut e = HeaderEdits::default();
        e.remove_encoded(&list);
        assert!(e.removes(b"Server"));
        assert!(e.removes(b"X-Powered-By"));
        assert!(!e.removes(b"serv"));
        assert!(!e.removes(b"servers"));
        assert!(!e.removes(b"x-powered_by"));
        assert!(!e.removes(b"x-powered-bz"));
        // Only letters fold: '~' | 0x20 is itself, '^' | 0x20 is '~', and neither is a letter.
        let mut odd = Vec::new();
        HeaderEdits::encode_name(&mut odd, b"x~long-name-over-8");
        let mut e2 = HeaderEdits::default();
        e2.remove_encoded(&odd);
        assert!(e2.removes(b"X~LONG-NAME-OVER-8"));
        assert!(!e2.removes(b"x^long-name-over-8"));
        assert!(!e2.removes(b"x~long-name-over-9"));
        let mut out = Vec::new();
        e.copy_kept(&mut out, b"Server: a\r\nx-keep: 1\r\nX-POWERED-BY: b\r\n");
        assert_eq!(out, b"x-keep: 1\r\n");
    }

    #[test]
    fn name_sets_match_any_case() {
        let set = NameSet::of([&b"X-Consumer"[..], b"x-user-id"]);
        assert!(set.contains(b"x-consumer") && set.contains(b"X-CONSUMER"));
        assert!(set.contains(b"X-User-Id"));
        assert!(!set.contains(b"x-consumers") && !set.contains(b"x-user-ie"));
        assert!(NameSet::default().is_empty() && !set.is_empty());
    }

    #[test]
    fn lines_are_built_in_place() {
        let mut e = HeaderEdits::default();
        assert!(e.is_empty());
        e.append_lines(b"x-env: pr");
        e.append_lines(b"od\r\n");
        let mut out = Vec::new();
        e.write_appended(&mut out);
        assert_eq!(out, b"x-env: prod\r\n");
        e.clear();
        assert!(e.is_empty());
    }
}
