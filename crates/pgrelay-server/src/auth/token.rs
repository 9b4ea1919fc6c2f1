//! Verifies a client's JWT: signature with the one configured algorithm
//! (HS256 with a secret, RS256 or ES256 with a public key; a token naming
//! any other algorithm, `none` included, is refused), `exp` required and
//! checked, `nbf`, and issuer and audience when configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// How tokens are signed.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with this shared secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 (P-256), by the key's kind: a PEM public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

/// `--auth jwt`: how tokens are checked.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub key: JwtKey,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The text of `rules.toml`; `None`: every valid token reads and writes
    /// every table.
    pub rules: Option<String>,
    /// The claim that owns client ids (`--client-id-claim`): a client id
    /// first used with a token belongs to that token's value of it.
    pub owner_claim: String,
}

impl AuthConfig {
    pub fn new(key: JwtKey) -> AuthConfig {
        AuthConfig {
            key,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            rules: None,
            owner_claim: "sub".to_owned(),
        }
    }
}

/// Why a token was refused; the text is safe to send and to log (it never
/// holds the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenRefusal {
    pub(crate) expired: bool,
    pub(crate) reason: String,
}

pub(crate) struct Verified {
    pub(crate) claims: serde_json::Map<String, serde_json::Value>,
    pub(crate) subject: Option<String>,
    /// When the token stops being valid (`exp` plus the leeway).
    pub(crate) expires: SystemTime,
}

pub(crate) struct TokenVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    leeway: Duration,
}

impl TokenVerifier {
    pub(crate) fn new(config: &AuthConfig) -> Result<TokenVerifier, String> {
        let (key, algorithm) = match &config.key {
            JwtKey::Secret(secret) => {
                if secret.len() < 32 {
                    return Err(format!(
                        "the JWT secret is {} bytes; use at least 32 random bytes",
                        secret.len()
                    ));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            JwtKey::PublicKeyPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(pem) {
                    Ok(key) => (key, Algorithm::ES256),
                    Err(e) => {
                        return Err(format!(
                            "the JWT public key is neither an RSA nor an EC PEM public key: {e}"
                        ))
                    }
                },
            },
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &config.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(TokenVerifier {
            key,
            algorithm,
            validation,
            leeway: config.leeway,
        })
    }

    pub(crate) fn verify(&self, token: Option<&str>) -> Result<Verified, TokenRefusal> {
        let refuse = |reason: String| TokenRefusal {
            expired: false,
            reason,
        };
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("a token is required".to_owned()))?;
        // Name the algorithm a token asks for, `none` included (which the
        // JWT library cannot even parse), before verifying anything.
        if let Some(alg) = header_alg(token) {
            if alg != format!("{:?}", self.algorithm) {
                return Err(refuse(format!(
                    "token algorithm {:?} is not accepted; this server takes {:?}",
                    alg.chars().take(16).collect::<String>(),
                    self.algorithm
                )));
            }
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| {
            let expired = matches!(e.kind(), ErrorKind::ExpiredSignature);
            let reason = match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".to_owned(),
                ErrorKind::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => "token signature is not valid".to_owned(),
                ErrorKind::InvalidAlgorithm => format!(
                    "token algorithm is not accepted; this server takes {:?}",
                    self.algorithm
                ),
                ErrorKind::InvalidIssuer => "token issuer is not accepted".to_owned(),
                ErrorKind::InvalidAudience => "token audience is not accepted".to_owned(),
                ErrorKind::MissingRequiredClaim(c) => format!("token has no {c:?} claim"),
                _ => "token is malformed".to_owned(),
            };
            TokenRefusal { expired, reason }
        })?;
        let claims = data.claims;
        // `exp` is a NumericDate: seconds, possibly with a fraction.
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(whole_seconds)));
        // A signed `exp` may be any number: one past what a clock can hold
        // (2^63 seconds and up) is refused, not added with overflow.
        let expires = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp.unwrap_or(0)))
            .and_then(|t| t.checked_add(self.leeway))
            .ok_or_else(|| refuse("token exp is out of range".to_owned()))?;
        let subject = claims.get("sub").and_then(super::rules::claim_text);
        Ok(Verified {
            claims,
            subject,
            expires,
        })
    }
}

/// The server's token check for endpoints outside the row sync (the
/// LiveStore backend): a token's claims, or why it is refused (safe to send).
pub struct ClaimsVerifier(TokenVerifier);

impl ClaimsVerifier {
    pub fn new(config: &AuthConfig) -> Result<ClaimsVerifier, String> {
        TokenVerifier::new(config).map(ClaimsVerifier)
    }

    pub fn verify(
        &self,
        token: Option<&str>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        self.0
            .verify(token)
            .map(|verified| verified.claims)
            .map_err(|refusal| refusal.reason)
    }
}

/// The `alg` of a token's header, when the header decodes.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

/// A fractional NumericDate's whole seconds: negative is 0, and past
/// `u64::MAX` (or NaN) saturates, which the caller refuses as out of range.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "float to integer `as` saturates, which is what a date out of range needs"
)]
fn whole_seconds(seconds: f64) -> u64 {
    seconds.max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn sign(alg: Algorithm, claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier() -> TokenVerifier {
        let mut config = AuthConfig::new(JwtKey::Secret(SECRET.to_vec()));
        config.issuer = Some("me".into());
        TokenVerifier::new(&config).unwrap()
    }

    #[test]
    fn good_and_bad_tokens() {
        let v = verifier();
        let good = sign(
            Algorithm::HS256,
            json!({"sub": "u1", "exp": now() + 60, "iss": "me"}),
            SECRET,
        );
        let ok = v.verify(Some(&good)).unwrap();
        assert_eq!(ok.subject.as_deref(), Some("u1"));

        let reason = |token: &str| v.verify(Some(token)).err().unwrap();
        let wrong_key = sign(
            Algorithm::HS256,
            json!({"exp": now() + 60, "iss": "me"}),
            b"another secret, also 32 bytes long!",
        );
        assert_eq!(reason(&wrong_key).reason, "token signature is not valid");
        let expired = sign(
            Algorithm::HS256,
            json!({"exp": now() - 10, "iss": "me"}),
            SECRET,
        );
        assert!(reason(&expired).expired);
        let hs512 = sign(
            Algorithm::HS512,
            json!({"exp": now() + 60, "iss": "me"}),
            SECRET,
        );
        assert!(reason(&hs512).reason.contains("not accepted"));
        // alg none: header and claims, no signature.
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"exp": now() + 60, "iss": "me"}))
        );
        assert!(reason(&none).reason.contains("\"none\""));
        let no_exp = sign(Algorithm::HS256, json!({"iss": "me"}), SECRET);
        assert!(reason(&no_exp).reason.contains("exp"));
        let wrong_iss = sign(
            Algorithm::HS256,
            json!({"exp": now() + 60, "iss": "you"}),
            SECRET,
        );
        assert_eq!(reason(&wrong_iss).reason, "token issuer is not accepted");
        assert_eq!(v.verify(None).err().unwrap().reason, "a token is required");
        assert_eq!(reason("garbage").reason, "token is malformed");
        assert!(TokenVerifier::new(&AuthConfig::new(JwtKey::Secret(b"short".to_vec()))).is_err());
    }

    #[test]
    fn an_exp_past_what_a_clock_holds_is_refused_without_a_panic() {
        let v = verifier();
        for exp in [json!(1u64 << 63), json!(u64::MAX)] {
            let token = sign(Algorithm::HS256, json!({"exp": exp, "iss": "me"}), SECRET);
            let refused = v.verify(Some(&token)).err().unwrap();
            assert_eq!(refused.reason, "token exp is out of range", "exp {exp}");
        }
    }
}
