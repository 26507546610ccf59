//! Execution ids, checked before anything reaches the upstream.
//!
//! Synthome's ids are 21-character nanoids over `0-9A-Za-z`; its documentation also shows
//! ids such as `exec_abc123`. The gateway accepts 1 to 128 characters of `[A-Za-z0-9_-]`:
//! loose enough for every id the service hands out, strict enough that an id can be put in
//! a URL path as it is, with no room for `/`, `..`, `?` or percent-encoded tricks.

use std::fmt;

/// The longest id accepted; Synthome's own ids are 21 characters.
pub const MAX_LEN: usize = 128;

/// An execution id that is safe to place in an upstream URL path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutionId(String);

/// Why an execution id was refused. The text is meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidExecutionId {
    #[error("execution_id is empty")]
    Empty,
    #[error("execution_id is {0} characters long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "execution_id may only contain A-Z, a-z, 0-9, '_' and '-'; found {0:?} at position {1}"
    )]
    BadCharacter(char, usize),
}

impl ExecutionId {
    pub fn parse(raw: &str) -> Result<Self, InvalidExecutionId> {
        if raw.is_empty() {
            return Err(InvalidExecutionId::Empty);
        }
        let length = raw.chars().count();
        if length > MAX_LEN {
            return Err(InvalidExecutionId::TooLong(length));
        }
        if let Some((position, bad)) = raw
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(InvalidExecutionId::BadCharacter(bad, position));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nanoids_and_documentation_ids() {
        for id in [
            "V1StGXR8Z5jdHi6BmyT12",
            "exec_abc123",
            "a",
            "x-y_z",
            &"a".repeat(128),
        ] {
            assert_eq!(ExecutionId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_path_tricks_and_oversized_ids() {
        assert_eq!(ExecutionId::parse(""), Err(InvalidExecutionId::Empty));
        assert_eq!(
            ExecutionId::parse(&"a".repeat(129)),
            Err(InvalidExecutionId::TooLong(129))
        );
        for (id, bad, at) in [
            ("../admin", '.', 0),
            ("a/b", '/', 1),
            ("abc?x=1", '?', 3),
            ("%2e%2e", '%', 0),
            ("ab c", ' ', 2),
            ("é", 'é', 0),
        ] {
            assert_eq!(
                ExecutionId::parse(id),
                Err(InvalidExecutionId::BadCharacter(bad, at)),
                "{id}"
            );
        }
    }
}
