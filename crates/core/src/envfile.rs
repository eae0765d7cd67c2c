//! Environment files (`env_file:`), in the dotenv format, parsed without I/O (the daemon
//! reads the file at each start and hands its text here).
//!
//! - one `KEY=value` per line; `export KEY=value` is accepted; spaces around `=` are
//!   allowed;
//! - blank lines and lines starting with `#` are skipped; in an unquoted value, a `#`
//!   after a space starts a comment; surrounding spaces are trimmed;
//! - `'single quotes'`: the text as is; `"double quotes"`: `\n`, `\t`, `\r`, `\"`, `\\`
//!   and `\$` are escapes, any other backslash stays; both may span lines;
//! - no `$VAR` substitution (nothing of the daemon's environment leaks into a value);
//! - a later line wins over an earlier one.
//!
//! Errors name the line and never quote a value (env files hold secrets).
//!
//! Why not the `dotenvy` crate: its parse error carries the offending line's text and a
//! column but no line number, it substitutes `$VAR` from the daemon's own environment,
//! and its convenient entry points write into the process environment.

use std::fmt;

/// A line of an env file is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFileError {
    /// From 1.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for EnvFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for EnvFileError {}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses an env file's text into its variables, in order of appearance (duplicates
/// kept: the caller applies them in order, so the last one wins).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.split('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let err = |reason: String| EnvFileError {
            line: start,
            reason,
        };
        let line = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
        i += 1;
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let t = t
            .strip_prefix("export")
            .filter(|r| r.starts_with([' ', '\t']))
            .map(str::trim_start)
            .unwrap_or(t);
        let Some((key, rest)) = t.split_once('=') else {
            return Err(err("expected KEY=value".into()));
        };
        let key = key.trim_end();
        if !valid_key(key) {
            return Err(err(
                "the name may only contain ASCII letters, digits and '_', not starting with a digit"
                    .into(),
            ));
        }
        let rest = rest.trim_start();
        let value = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => {
                // The value runs to the closing quote, across lines if need be.
                let mut value = String::new();
                let mut chars: Vec<char> = rest[1..].chars().collect();
                let mut pos = 0;
                let tail;
                loop {
                    if pos == chars.len() {
                        if i == lines.len() {
                            return Err(err(format!("the value's {q} quote is never closed")));
                        }
                        value.push('\n');
                        let next = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
                        i += 1;
                        chars = next.chars().collect();
                        pos = 0;
                        continue;
                    }
                    let c = chars[pos];
                    pos += 1;
                    if c == q {
                        tail = chars[pos..].iter().collect::<String>();
                        break;
                    }
                    if q == '"' && c == '\\' && pos < chars.len() {
                        let e = chars[pos];
                        pos += 1;
                        match e {
                            'n' => value.push('\n'),
                            't' => value.push('\t'),
                            'r' => value.push('\r'),
                            '"' | '\\' | '$' => value.push(e),
                            other => {
                                value.push('\\');
                                value.push(other);
                            }
                        }
                        continue;
                    }
                    value.push(c);
                }
                let tail = tail.trim_start();
                if !(tail.is_empty() || tail.starts_with('#')) {
                    return Err(err(
                        "unexpected text after the closing quote (quote the whole value)".into(),
                    ));
                }
                value
            }
            _ => {
                let v = match rest.find(" #").or_else(|| rest.find("\t#")) {
                    Some(c) => &rest[..c],
                    None => rest,
                };
                v.trim_end().to_owned()
            }
        };
        if value.contains('\0') {
            return Err(err("the value contains a NUL byte".into()));
        }
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_usual_forms_parse() {
        let text = "# a comment\n\nA=1\nexport B=two words  # trailing comment\n  C = spaced \nD=\n\
                    E='single $HOME \\n'\nF=\"tab\\there \\\"q\\\" \\$X \\\\ \\z\"\nG=a#b\r\nexportH=x\n";
        assert_eq!(
            kv(text),
            pairs(&[
                ("A", "1"),
                ("B", "two words"),
                ("C", "spaced"),
                ("D", ""),
                ("E", "single $HOME \\n"),
                ("F", "tab\there \"q\" $X \\ \\z"),
                ("G", "a#b"),
                ("exportH", "x"),
            ])
        );
    }

    #[test]
    fn quoted_values_may_span_lines() {
        assert_eq!(
            kv("K=\"one\ntwo\"\nL='x\ny' # c\nM=3\n"),
            pairs(&[("K", "one\ntwo"), ("L", "x\ny"), ("M", "3")])
        );
    }

    #[test]
    fn errors_name_the_line_and_quote_no_value() {
        let e = parse("A=1\n\n# c\nnot a pair\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert_eq!(e.to_string(), "line 4: expected KEY=value");
        let e = parse("A=1\n1BAD=x\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("A=1\nB=\"secret\nC=2\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = parse("A='x' y\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse("A=\"x\ny\" junk\n").unwrap_err();
        assert_eq!(e.line, 1, "the entry's first line");
        let e = parse("BAD-KEY=1\n").unwrap_err();
        assert!(e.reason.contains("letters"), "{e}");
    }
}
