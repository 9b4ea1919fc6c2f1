//! Who may use which store: the host decides from the client's sync
//! payload (`syncPayload` in LiveStore, e.g. `{ authToken }`) and the store
//! id, before a socket is upgraded or an HTTP request is served. The binary
//! passes the server's JWT check in; this crate offers the open server and
//! the one shared token, and store id patterns.

use secrecy::{ExposeSecret, SecretString};

use super::admin::secret_matches;

/// Why a client may not use a store; the text is sent to the client (it
/// never holds a token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessRefusal {
    /// No usable credentials (HTTP 401).
    Unauthorized(String),
    /// Credentials that do not allow this store (HTTP 403).
    Forbidden(String),
}

/// Decides whether a client may read and write a store.
pub trait StoreAccess: Send + Sync + 'static {
    /// `payload` is the client's decoded sync payload, if it sent one.
    fn check(
        &self,
        store_id: &str,
        payload: Option<&serde_json::Value>,
    ) -> Result<(), AccessRefusal>;
}

/// The `authToken` of a sync payload, if it has one.
pub fn payload_token(payload: Option<&serde_json::Value>) -> Option<&str> {
    payload?.get("authToken")?.as_str()
}

/// Anyone who reaches the port uses any store (the operator asked for it).
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenAccess;

impl StoreAccess for OpenAccess {
    fn check(&self, _: &str, _: Option<&serde_json::Value>) -> Result<(), AccessRefusal> {
        Ok(())
    }
}

/// `--eventlog-auth-token`: one token for every store, compared in constant time.
#[derive(Clone, Debug)]
pub struct SharedToken(pub SecretString);

impl StoreAccess for SharedToken {
    fn check(&self, _: &str, payload: Option<&serde_json::Value>) -> Result<(), AccessRefusal> {
        match payload_token(payload) {
            None => Err(AccessRefusal::Unauthorized(
                "this server needs a token, give it as payload.authToken".to_owned(),
            )),
            Some(given) if secret_matches(given, self.0.expose_secret()) => Ok(()),
            Some(_) => Err(AccessRefusal::Forbidden(
                "payload.authToken is not this server's token".to_owned(),
            )),
        }
    }
}

/// Whether `store_id` matches `pattern`, where `*` stands for any run of
/// characters (`user-42-*`, `*`) and everything else for itself.
pub fn store_matches(pattern: &str, store_id: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = store_id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole id must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_match_whole_ids_with_stars_for_any_run() {
        assert!(store_matches("todos", "todos"));
        assert!(!store_matches("todos", "todos-2"));
        assert!(store_matches("user-42-*", "user-42-todos"));
        assert!(store_matches("user-42-*", "user-42-"));
        assert!(!store_matches("user-42-*", "user-421"));
        assert!(store_matches("*", "anything"));
        assert!(store_matches("a*b*c", "a-x-b-y-c"));
        assert!(!store_matches("a*b*c", "a-c"));
        assert!(!store_matches("ab*ba", "aba"));
        assert!(!store_matches("", "x"));
    }

    #[test]
    fn the_shared_token_allows_only_itself() {
        let token = SharedToken("t0ken-for-tests".into());
        let good = json!({"authToken": "t0ken-for-tests"});
        let bad = json!({"authToken": "other"});
        assert_eq!(token.check("s", Some(&good)), Ok(()));
        assert!(matches!(
            token.check("s", Some(&bad)),
            Err(AccessRefusal::Forbidden(_))
        ));
        assert!(matches!(
            token.check("s", None),
            Err(AccessRefusal::Unauthorized(_))
        ));
    }
}
