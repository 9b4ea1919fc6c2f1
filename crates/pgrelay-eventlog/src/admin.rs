//! Who may use the store admin API (`/admin/stores/...` and the 0.3
//! protocol's admin messages): a one-method interface the binary fills
//! in, so this crate never reaches into the server that hosts it.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// The answer to an admin request's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCheck {
    /// The admin API is off on this server.
    Off,
    /// Missing or wrong credentials.
    Refused,
    Allowed,
}

/// Decides whether a request may use the admin API.
pub trait AdminAuth: Send + Sync + 'static {
    /// `given` is the secret the request carries (the bearer token, or the
    /// 0.3 protocol's `adminSecret`), if any.
    fn check(&self, given: Option<&str>) -> AdminCheck;
}

/// The server's `--admin-token`: the admin API is off without one, and a
/// request must carry exactly this token (compared in constant time).
#[derive(Clone, Debug, Default)]
pub struct AdminToken(Option<SecretString>);

impl AdminToken {
    pub fn new(token: Option<SecretString>) -> AdminToken {
        AdminToken(token)
    }
}

impl AdminAuth for AdminToken {
    fn check(&self, given: Option<&str>) -> AdminCheck {
        match (&self.0, given) {
            (None, _) => AdminCheck::Off,
            (Some(expected), Some(given)) if secret_matches(given, expected.expose_secret()) => {
                AdminCheck::Allowed
            }
            (Some(_), _) => AdminCheck::Refused,
        }
    }
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn secret_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_allows_only_itself_and_is_off_without_one() {
        let token = AdminToken::new(Some(SecretString::from("admin-secret-for-tests")));
        assert_eq!(
            token.check(Some("admin-secret-for-tests")),
            AdminCheck::Allowed
        );
        assert_eq!(
            token.check(Some("admin-secret-for-tests!")),
            AdminCheck::Refused
        );
        assert_eq!(token.check(Some("")), AdminCheck::Refused);
        assert_eq!(token.check(None), AdminCheck::Refused);
        assert_eq!(AdminToken::new(None).check(Some("x")), AdminCheck::Off);
    }

    #[test]
    fn the_admin_token_is_not_printed() {
        let token = AdminToken::new(Some(SecretString::from("admin-secret-for-tests")));
        assert!(!format!("{token:?}").contains("admin-secret"));
    }
}
