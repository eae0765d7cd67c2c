//! `${VAR}` expansion of command lines from an instance's environment.
//!
//! Only the braced form is recognised; `$${` writes a literal `${`, and any other `$` is
//! kept as it is (so shell code such as `kill $$` or `$1` passes through untouched). A reference to a variable the environment does not have is an error rather
//! than an empty string: a silently empty argument is a classic source of "works on my
//! machine".

/// An expansion failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("command argument {index} refers to ${{{var}}}, which is not set in the instance environment")]
    Unset { index: usize, var: String },
    #[error("command argument {index} has an unterminated ${{...}}")]
    Unterminated { index: usize },
}

/// Expands one argument.
pub fn expand<'a>(
    index: usize,
    arg: &str,
    lookup: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or(ExpandError::Unterminated { index })?;
            let var = &body[..end];
            let value = lookup(var).ok_or_else(|| ExpandError::Unset {
                index,
                var: var.to_owned(),
            })?;
            out.push_str(value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands every argument of `argv` against `env` (later entries win).
pub fn expand_argv(argv: &[String], env: &[(String, String)]) -> Result<Vec<String>, ExpandError> {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    argv.iter()
        .enumerate()
        .map(|(i, a)| expand(i, a, lookup))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("PORT".into(), "8080".into()),
            ("NAME".into(), "web".into()),
        ]
    }

    #[test]
    fn expands_braced_variables() {
        let argv = vec![
            "--port=${PORT}".into(),
            "${NAME}-${PORT}".into(),
            "$${HOME}".into(),
            "$x".into(),
            "kill $$ $1".into(),
        ];
        assert_eq!(
            expand_argv(&argv, &env()).unwrap(),
            vec!["--port=8080", "web-8080", "${HOME}", "$x", "kill $$ $1"]
        );
    }

    #[test]
    fn unset_and_unterminated_are_errors() {
        assert_eq!(
            expand_argv(&["a".into(), "${NOPE}".into()], &env()),
            Err(ExpandError::Unset {
                index: 1,
                var: "NOPE".into()
            })
        );
        assert_eq!(
            expand_argv(&["${PORT".into()], &env()),
            Err(ExpandError::Unterminated { index: 0 })
        );
    }
}
