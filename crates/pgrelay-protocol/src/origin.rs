//! The `origin` a transaction carries when a client wrote it: not the
//! client's id (which would let every other client open sessions and write
//! as it) but a one-way tag of it, which only its owner, knowing its id,
//! recognises. The server also tells each client its tag in the welcome,
//! for clients that would rather not hash.

use sha2::{Digest, Sha256};

/// The origin tag of `client_id`: 32 hex digits of SHA-256 over a fixed
/// prefix and the id.
pub fn origin_tag(client_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"pgrelay origin\0");
    hasher.update(client_id.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_stable_and_names_no_id() {
        let tag = origin_tag("client-1");
        assert_eq!(tag, origin_tag("client-1"));
        assert_ne!(tag, origin_tag("client-2"));
        assert_eq!(tag.len(), 32);
        assert!(!tag.contains("client"));
    }
}
