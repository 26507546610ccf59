//! The Synthome API key a call is made with.
//!
//! A call's own `authorization: Bearer <key>` metadata wins; without it the gateway's
//! configured key is used. The key itself never leaves this type except into the upstream
//! request's `Authorization` header: `Debug` prints a placeholder, and everything that needs
//! to tell keys apart (cache slots, poller entries) uses the SHA-256 [`Fingerprint`].

use std::{fmt, sync::Arc};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

/// A Synthome API key. Cloning is cheap; the key is never printed.
#[derive(Clone)]
pub struct Credential {
    key: Arc<str>,
    fingerprint: Fingerprint,
}

/// SHA-256 of a key: identifies the key without revealing it. Two credentials share
/// cached state only when their fingerprints are equal.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

/// Why a call's `authorization` metadata could not be used. No variant carries the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "no API key: send `authorization: Bearer <key>` metadata (the gateway has no key of its own)"
    )]
    Missing,
    #[error("the `authorization` metadata must be `Bearer <key>` with a printable ASCII key")]
    Malformed,
}

impl Credential {
    /// Wraps a configured key; `None` when it is empty.
    pub fn new(key: &str) -> Option<Self> {
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        let fingerprint = Fingerprint(Sha256::digest(key.as_bytes()).into());
        Some(Self {
            key: Arc::from(key),
            fingerprint,
        })
    }

    /// The credential for a call: its own bearer key, else `fallback`.
    pub fn for_call(
        metadata: &MetadataMap,
        fallback: Option<&Credential>,
    ) -> Result<Self, CredentialError> {
        let Some(value) = metadata.get("authorization") else {
            return fallback.cloned().ok_or(CredentialError::Missing);
        };
        let value = value.to_str().map_err(|_| CredentialError::Malformed)?;
        let (scheme, key) = value.split_once(' ').ok_or(CredentialError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CredentialError::Malformed);
        }
        Self::new(key).ok_or(CredentialError::Malformed)
    }

    /// The value for an upstream `Authorization` header.
    pub fn bearer_header(&self) -> String {
        format!("Bearer {}", self.key)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// `text` with every occurrence of the key replaced, for text that came from elsewhere
    /// (an upstream error message could echo the key it refused). An echo is matched in any
    /// letter case and with any of its bytes percent-encoded (`%2F` or `%2f`), as a service
    /// that normalises or URL-encodes what it quotes would write it.
    pub fn redact(&self, text: &str) -> String {
        let key = self.key.as_bytes();
        let mut redacted = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match echo_len(rest.as_bytes(), key).filter(|&n| rest.is_char_boundary(n)) {
                Some(n) => {
                    redacted.push_str("<redacted>");
                    rest = &rest[n..];
                }
                None => {
                    redacted.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        redacted
    }
}

/// The length of the echo of `key` that `text` starts with, if it does: each key byte as it
/// is (ASCII letters in either case) or as `%XX`.
fn echo_len(text: &[u8], key: &[u8]) -> Option<usize> {
    let mut at = 0;
    for &expected in key {
        let found = *text.get(at)?;
        if found.eq_ignore_ascii_case(&expected) {
            at += 1;
        } else if found == b'%'
            && text
                .get(at + 1..at + 3)
                .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
                .is_some_and(|byte| byte.eq_ignore_ascii_case(&expected))
        {
            at += 3;
        } else {
            return None;
        }
    }
    Some(at)
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl fmt::Debug for Fingerprint {
    /// Eight hex digits are enough to tell keys apart in a debugger, and reveal nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..4]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(authorization: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", authorization.parse().unwrap());
        map
    }

    #[test]
    fn the_call_key_wins_over_the_fallback() {
        let fallback = Credential::new("sy_test_fallback").unwrap();
        let own = Credential::for_call(&metadata("Bearer sy_test_own"), Some(&fallback)).unwrap();
        assert_eq!(own.bearer_header(), "Bearer sy_test_own");
        assert_ne!(own.fingerprint(), fallback.fingerprint());
    }

    #[test]
    fn without_metadata_the_fallback_is_used_or_the_call_refused() {
        let fallback = Credential::new("sy_test_fallback").unwrap();
        let used = Credential::for_call(&MetadataMap::new(), Some(&fallback)).unwrap();
        assert_eq!(used.fingerprint(), fallback.fingerprint());
        assert_eq!(
            Credential::for_call(&MetadataMap::new(), None).unwrap_err(),
            CredentialError::Missing
        );
    }

    #[test]
    fn malformed_metadata_is_refused_without_falling_back() {
        let fallback = Credential::new("sy_test_fallback").unwrap();
        for bad in ["sy_test_key", "Basic abc", "Bearer ", "Bearer a b"] {
            assert_eq!(
                Credential::for_call(&metadata(bad), Some(&fallback)).unwrap_err(),
                CredentialError::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn redacts_the_key_from_foreign_text() {
        let credential = Credential::new("sy_live_secret").unwrap();
        assert_eq!(
            credential.redact("key sy_live_secret is inactive"),
            "key <redacted> is inactive"
        );
    }

    #[test]
    fn redacts_echoes_in_another_case_or_percent_encoded() {
        let credential = Credential::new("sy_live_Ab/+9=").unwrap();
        for echo in [
            "SY_LIVE_AB/+9=",
            "sy_live_ab/+9=",
            "sy_live_Ab%2F%2B9%3D",
            "sy_live_Ab%2f%2b9%3d",
            "sy%5Flive_Ab/%2B9=",
        ] {
            assert_eq!(
                credential.redact(&format!("key «{echo}» is inactive")),
                "key «<redacted>» is inactive",
                "{echo}"
            );
        }
        assert_eq!(credential.redact("sy_live_Ab/+9"), "sy_live_Ab/+9");
        assert_eq!(credential.redact("%2"), "%2");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let credential = Credential::new("sy_live_secret").unwrap();
        let printed = format!("{credential:?} {:?}", credential.fingerprint());
        assert!(!printed.contains("secret"), "{printed}");
    }
}
