//! Config errors name the file, the line:column and the dotted key they are about, whether serde
//! rejected the value or validation did. Both report a byte span; this module turns a span into
//! `file:line:col: key: message` by walking the document's spanned tree.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole (e.g. it cannot be read).
    pub line: usize,
    pub column: usize,
    /// Dotted path such as `routes[1].upstream`; empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: message.into(),
        }
    }

    /// An error at `span` of `source` about `key`; an empty `key` is found from the span.
    /// An empty span at 0 is a defaulted value: only the key can be named.
    pub fn at(
        file: &Path,
        source: &str,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Self {
        let (line, column) = if span.is_empty() && span.start == 0 {
            (0, 0)
        } else {
            line_column(source, span.start)
        };
        let key = if key.is_empty() {
            key_path(source, span.start).unwrap_or_default()
        } else {
            key.to_owned()
        };
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            key,
            message: message.into(),
        }
    }

    pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Self {
        let span = err.span().unwrap_or(0..0);
        let message = err.message().trim();
        let key = if message == "duplicate key" {
            duplicate_key_path(source, span.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let mut e = Self::at(file, source, span.clone(), &key, message);
        if e.line == 0 {
            // serde reports some errors (e.g. a missing field) without a span.
            e.line = 1;
            e.column = 1;
        }
        e
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The dotted key whose key or value covers byte `offset`, deepest first.
fn key_path(source: &str, offset: usize) -> Option<String> {
    let (doc, _) = DeTable::parse_recoverable(source);
    let mut path = String::new();
    walk_table(doc.get_ref(), offset, &mut path);
    (!path.is_empty()).then_some(path)
}

/// The parser drops a duplicate key, so its path is not in the tree: the key is the text at the
/// span, inside the table whose header comes last before it.
fn duplicate_key_path(source: &str, span: Range<usize>) -> Option<String> {
    let name = source.get(span.clone())?.trim().trim_matches(['"', '\'']);
    if name.is_empty() || name.contains('\n') {
        return None;
    }
    let before = &source[..span.start];
    let header = before
        .rmatch_indices('\n')
        .map(|(i, _)| i + 1)
        .chain(std::iter::once(0))
        .find(|&i| source[i..].trim_start().starts_with('['))
        .filter(|&i| i < span.start);
    let table = header.and_then(|h| {
        let inside = h + source[h..].find(|c: char| c != '[' && !c.is_whitespace())?;
        (inside < span.start)
            .then(|| key_path(source, inside))
            .flatten()
    });
    Some(match table {
        Some(t) => format!("{t}.{name}"),
        None => name.to_owned(),
    })
}

fn walk_table(table: &DeTable<'_>, offset: usize, path: &mut String) -> bool {
    for (key, value) in table.iter() {
        let in_key = key.span().contains(&offset);
        let in_value = contains(value, offset);
        if !(in_key || in_value) {
            continue;
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if in_value {
            walk_value(value.get_ref(), offset, path);
        }
        return true;
    }
    false
}

fn walk_value(value: &DeValue<'_>, offset: usize, path: &mut String) {
    match value {
        DeValue::Table(t) => {
            walk_table(t, offset, path);
        }
        DeValue::Array(items) => {
            // An array of tables spans from its first header; find the element whose table
            // holds the offset, or the last one that starts before it.
            let mut chosen = None;
            for (i, item) in items.iter().enumerate() {
                if contains(item, offset) || item.span().start <= offset {
                    chosen = Some(i);
                }
            }
            if let Some(i) = chosen {
                path.push_str(&format!("[{i}]"));
                walk_value(items[i].get_ref(), offset, path);
            }
        }
        _ => {}
    }
}

fn contains(value: &Spanned<DeValue<'_>>, offset: usize) -> bool {
    if value.span().contains(&offset) {
        return true;
    }
    // Tables from `[header]` sections have a span that covers only the header; look inside.
    match value.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .any(|(k, v)| k.span().contains(&offset) || contains(v, offset)),
        DeValue::Array(items) => items.iter().any(|v| contains(v, offset)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[runtime]\nworkers = 2\n\n[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nupstream = \"x\"\n";

    #[test]
    fn key_path_names_array_element_and_field() {
        let at = DOC.find("\"x\"").unwrap();
        assert_eq!(key_path(DOC, at).as_deref(), Some("routes[1].upstream"));
        let at = DOC.find("2").unwrap();
        assert_eq!(key_path(DOC, at).as_deref(), Some("runtime.workers"));
    }

    #[test]
    fn a_duplicate_key_is_named_with_its_table() {
        let doc = "top = 1\n[runtime]\nworkers = 1\nworkers = 2\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\nname = \"c\"\n";
        let err = |src: &str| {
            let e = toml::from_str::<toml::Table>(src).unwrap_err();
            ConfigError::from_toml(Path::new("f.toml"), src, &e).to_string()
        };
        assert_eq!(
            err(&doc[..doc.find("[[routes]]").unwrap()]),
            "f.toml:4:1: runtime.workers: duplicate key"
        );
        assert_eq!(err(doc), "f.toml:4:1: runtime.workers: duplicate key");
        let later = doc.replace("workers = 2\n", "");
        assert_eq!(err(&later), "f.toml:8:1: routes[1].name: duplicate key");
        assert_eq!(err("a = 1\na = 2\n"), "f.toml:2:1: a: duplicate key");
    }

    #[test]
    fn line_and_column_are_one_based() {
        let at = DOC.find("\"x\"").unwrap();
        assert_eq!(line_column(DOC, at), (9, 12));
    }
}
