//! Header edits: fields to drop and lines to append, applied by the head writers while they copy
//! the kept lines, so that an edit costs no extra pass over the head. Filters fill them; only
//! `http::write` applies them. Both buffers are owned by the connection and reused, so a
//! request with edits allocates nothing once they have grown to their working size.

/// Edits to one head. `set` is a removal plus an appended line.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Lower-case names to drop, each followed by `\n`.
    remove: Vec<u8>,
    /// Complete header lines (`name: value\r\n`) to add after the kept ones.
    append: Vec<u8>,
}

impl HeaderEdits {
    pub fn clear(&mut self) {
        self.remove.clear();
        self.append.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.append.is_empty()
    }

    /// Drops every field named `lower` (a lower-case token).
    pub fn remove(&mut self, lower: &[u8]) {
        self.remove.extend_from_slice(lower);
        self.remove.push(b'\n');
    }

    /// Starts an appended line for `name`; the caller writes the value with `value_part` and
    /// ends it with `end_line`.
    pub fn begin_line(&mut self, name: &[u8]) {
        self.append.extend_from_slice(name);
        self.append.extend_from_slice(b": ");
    }

    pub fn value_part(&mut self, bytes: &[u8]) {
        self.append.extend_from_slice(bytes);
    }

    pub fn end_line(&mut self) {
        self.append.extend_from_slice(b"\r\n");
    }

    /// Appends complete header lines (each ending in CRLF).
    pub fn append_lines(&mut self, lines: &[u8]) {
        self.append.extend_from_slice(lines);
    }

    /// Whether any field is dropped: writers skip the name checks when none is.
    #[inline]
    pub fn removes_any(&self) -> bool {
        !self.remove.is_empty()
    }

    /// Whether the field `name` (any case) is dropped.
    #[inline]
    pub fn removes(&self, name: &[u8]) -> bool {
        self.remove
            .split(|&b| b == b'\n')
            .any(|r| r.len() == name.len() && r.eq_ignore_ascii_case(name))
    }

    /// The appended lines.
    pub fn appended(&self) -> &[u8] {
        &self.append
    }

    /// Appends the lines of `lines` (each ending in CRLF) whose field is not dropped.
    pub fn copy_kept(&self, out: &mut Vec<u8>, lines: &[u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_names_match_any_case_and_only_whole_names() {
        let mut e = HeaderEdits::default();
        e.remove(b"server");
        e.remove(b"x-powered-by");
        assert!(e.removes(b"Server"));
        assert!(e.removes(b"X-Powered-By"));
        assert!(!e.removes(b"serv"));
        assert!(!e.removes(b"servers"));
        let mut out = Vec::new();
        e.copy_kept(&mut out, b"Server: a\r\nx-keep: 1\r\nX-POWERED-BY: b\r\n");
        assert_eq!(out, b"x-keep: 1\r\n");
    }

    #[test]
    fn lines_are_built_in_place() {
        let mut e = HeaderEdits::default();
        assert!(e.is_empty());
        e.begin_line(b"x-env");
        e.value_part(b"pr");
        e.value_part(b"od");
        e.end_line();
        assert_eq!(e.appended(), b"x-env: prod\r\n");
        e.clear();
        assert!(e.is_empty());
    }
}
