//! Free text from untrusted sources (a workload's sd_notify `STATUS=`, probe output, file
//! names) on its way to a terminal.
//!
//! Two tools, used at the two boundaries:
//!
//! - [`sanitize`] where the daemon *stores* text a workload sent: bounded in length (on a
//!   character boundary), control characters and bidirectional-override marks replaced, so
//!   every client (the CLI, `-o json` scripts, a dashboard) gets harmless text.
//! - [`escape`] where the CLI *prints* text it did not write: whatever a daemon (of any
//!   version) sends, an escape sequence or a U+202E never reaches the terminal raw; it is
//!   shown as `\u{1b}`, `\n`, `\u{202e}`.

use std::borrow::Cow;

/// The longest `STATUS=` text the daemon keeps, in bytes.
pub const MAX_STATUS_BYTES: usize = 256;

/// What [`sanitize`] puts in place of a character it removes.
pub const REPLACEMENT: char = '\u{fffd}';

/// Marks that reorder or hide text on a terminal: the bidirectional embeddings, overrides
/// and isolates, the implicit direction marks, and the Unicode line and paragraph
/// separators.
pub fn is_bidi_or_separator(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// Whether `c` must not reach a terminal raw: a control character (C0, DEL, C1) or a mark
/// of [`is_bidi_or_separator`].
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || is_bidi_or_separator(c)
}

/// `s` made safe to store and show: at most `max_bytes` bytes (cut on a character
/// boundary), a tab turned into a space and every other [unsafe](is_unsafe) character
/// replaced by [`REPLACEMENT`].
pub fn sanitize(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars() {
        let c = match c {
            '\t' => ' ',
            c if is_unsafe(c) => REPLACEMENT,
            c => c,
        };
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

/// `s` with every [unsafe](is_unsafe) character escaped (`\n`, `\u{1b}`, `\u{202e}`);
/// borrowed when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_debug());
            // `escape_debug` leaves the separators and some marks as they are.
            if out.ends_with(c) {
                out.pop();
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape`] line by line: newlines stay (a multi-line message stays readable), every
/// other unsafe character is escaped.
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && is_unsafe(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(escape).collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str =
        "ok\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nx\u{202e}gnp.exe\u{9b}31m\u{2028}\u{0}";

    #[test]
    fn sanitize_replaces_controls_and_bidi_marks() {
        let s = sanitize(HOSTILE, MAX_STATUS_BYTES);
        assert!(!s.chars().any(is_unsafe), "{s:?}");
        assert!(s.starts_with("ok\u{fffd}[2J"), "{s:?}");
        assert_eq!(sanitize("a\tb", 10), "a b");
        assert_eq!(sanitize("plain text: 50%", 100), "plain text: 50%");
    }

    #[test]
    fn sanitize_bounds_on_a_char_boundary() {
        let s = sanitize(&"é".repeat(1000), MAX_STATUS_BYTES);
        assert_eq!(s.len(), 256);
        let s = sanitize(&format!("a{}", "é".repeat(1000)), MAX_STATUS_BYTES);
        assert_eq!(s.len(), 255, "never cuts inside a character");
        assert_eq!(sanitize(&"\u{1b}".repeat(1000), 9).chars().count(), 3);
    }

    #[test]
    fn escape_shows_every_unsafe_character() {
        let e = escape(HOSTILE);
        assert!(!e.chars().any(is_unsafe), "{e:?}");
        assert!(e.contains("\\u{1b}[2J") && e.contains("\\u{202e}") && e.contains("\\r\\n"));
        assert!(e.contains("\\u{2028}") && e.contains("\\u{9b}") && e.contains("\\0"));
        assert!(matches!(escape("fine, é ü"), Cow::Borrowed(_)));
    }

    #[test]
    fn escape_lines_keeps_newlines_only() {
        assert_eq!(escape_lines("a\nb\u{1b}c"), "a\nb\\u{1b}c");
        assert!(matches!(escape_lines("a\nb"), Cow::Borrowed(_)));
    }
}
