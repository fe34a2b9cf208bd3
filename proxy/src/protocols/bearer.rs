//! The admin API's bearer token (RFC 6750): read once from the environment variable
//! `admin_token_env` names, and compared with a request's `Authorization: Bearer <token>`
//! in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("${0} is not set")]
    Unset(String),
    #[error("${0} is empty")]
    Empty(String),
    #[error("${0} must be printable ASCII without spaces (it is sent in a header)")]
    NotPrintable(String),
}

/// The admin API's token. Only its SHA-256 is kept: comparing digests takes the same time
/// whatever the presented token's length, which comparing the tokens would reveal.
pub struct BearerToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// The token in `$var`, which must be set, non-empty and printable ASCII.
    pub fn from_env(var: &str) -> Result<BearerToken, TokenError> {
        let value = std::env::var_os(var).ok_or_else(|| TokenError::Unset(var.into()))?;
        Self::new(value.as_encoded_bytes()).map_err(|e| match e {
            TokenError::Empty(_) => TokenError::Empty(var.into()),
            _ => TokenError::NotPrintable(var.into()),
        })
    }

    /// `token` as the admin API's token; the error names no variable.
    pub fn new(token: &[u8]) -> Result<BearerToken, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty(String::new()));
        }
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(TokenError::NotPrintable(String::new()));
        }
        Ok(BearerToken {
            digest: Sha256::digest(token).into(),
        })
    }

    /// Whether an `Authorization` value is `Bearer <this token>` (the scheme in any case, as
    /// RFC 7235 has it).
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        let Some((scheme, token)) = authorization.split_first_chunk::<7>() else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"Bearer ") {
            return false;
        }
        let presented: [u8; 32] = Sha256::digest(token.trim_ascii()).into();
        presented.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_with_the_same_token_is_accepted() {
        let token = BearerToken::new(b"s3cret-token").unwrap();
        assert!(token.accepts(b"Bearer s3cret-token"));
        assert!(
            token.accepts(b"bearer s3cret-token"),
            "the scheme in any case"
        );
        for wrong in [
            &b"Bearer s3cret-tokeN"[..],
            b"Bearer s3cret-token2",
            b"Bearer s3cret-toke",
            b"Bearer ",
            b"Bearer",
            b"",
            b"Basic s3cret-token",
            b"s3cret-token",
        ] {
            assert!(
                !token.accepts(wrong),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
    }

    #[test]
    fn a_token_must_be_non_empty_printable_ascii() {
        assert_eq!(
            BearerToken::new(b"").unwrap_err(),
            TokenError::Empty(String::new())
        );
        for bad in [&b"two words"[..], b"tab\t", b"\xc3\xa9t\xc3\xa9"] {
            assert!(matches!(
                BearerToken::new(bad),
                Err(TokenError::NotPrintable(_))
            ));
        }
    }
}
