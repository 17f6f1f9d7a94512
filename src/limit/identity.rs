//! Who is calling: API key, then JWT subject, then IP address behind trusted proxies.
//!
//! Pure: no IO and no clock. Token expiry is checked against the `now_unix` the caller
//! passes, not the system clock, so tests and the simulator control time.
//!
//! - **API keys** (`X-API-Key` by default): the config holds SHA-256 hashes, never keys. The
//!   presented key is hashed and compared with every configured hash in constant time (no
//!   early exit), so timing reveals neither which key nor how much of it matched. An unknown
//!   key is an error (401), not an anonymous request: a client with a typo must learn it.
//! - **JWT** bearer tokens (HS256, RS256, ES256): signature, `exp`, `nbf`, `iss`, `aud`
//!   checked; `sub` and a tier claim are taken. A token that fails is an error (401). Without
//!   a `[identity.jwt]` config, `Authorization` is left alone for the upstream.
//! - **IP**: the peer address, unless the peer is a trusted proxy; then `X-Forwarded-For` is
//!   walked from the right, skipping trusted proxies, and the first untrusted hop is the
//!   client. Trusting the header from anyone would let a client pick its own bucket.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, header};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A configured API key: its name, SHA-256 hash and tier.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// Used in bucket keys, logs and metrics instead of the secret.
    pub name: String,
    /// SHA-256 of the key ([`hash_api_key`]); the key itself is never held.
    pub sha256: [u8; 32],
    /// The tier whose limits apply to this key's callers (`None`: the token's tier if any,
    /// else the policies' defaults).
    pub tier: Option<String>,
}

/// A key that verifies JWT signatures.
#[derive(Clone)]
pub struct JwtKey {
    /// Matched against the token header's `kid` when both are present.
    pub kid: Option<String>,
    /// The one algorithm this key verifies; a token whose header `alg` differs skips it.
    pub algorithm: Algorithm,
    /// The HMAC secret (HS256) or public key (RS256, ES256).
    pub key: DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// How bearer tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Candidate keys, tried in order; the first whose signature check passes is used.
    pub keys: Vec<JwtKey>,
    /// Required `iss` claim (`None`: not checked).
    pub issuer: Option<String>,
    /// Required `aud` claim, a string or one member of an array (`None`: not checked).
    pub audience: Option<String>,
    /// Claim holding the tier (`free`, `premium`, ...).
    pub tier_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

/// Everything identity extraction needs from the config.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Header carrying the API key (default `X-API-Key`).
    pub api_key_header: HeaderName,
    /// The accepted keys; empty means the API key header is not read at all.
    pub api_keys: Vec<ApiKey>,
    /// Bearer-token verification; `None` leaves `Authorization` alone for the upstream.
    pub jwt: Option<JwtConfig>,
    /// Networks whose `X-Forwarded-For` is believed ([`client_ip`]); empty means the peer
    /// is always the client.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            api_key_header: HeaderName::from_static("x-api-key"),
            api_keys: Vec::new(),
            jwt: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// The caller, as far as the gateway could establish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Client address (the peer, or from `X-Forwarded-For` behind trusted proxies).
    pub ip: IpAddr,
    /// Name and tier of the API key presented, if any.
    pub api_key: Option<(String, Option<String>)>,
    /// Subject and tier of a verified JWT, if any.
    pub jwt: Option<(String, Option<String>)>,
}

impl Identity {
    /// The tier: the API key's, else the token's, else none (the policy's default limits).
    pub fn tier(&self) -> Option<&str> {
        self.api_key
            .as_ref()
            .and_then(|(_, tier)| tier.as_deref())
            .or_else(|| self.jwt.as_ref().and_then(|(_, tier)| tier.as_deref()))
    }
}

/// Why a caller was refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The API key header's value matches no configured key.
    #[error("unknown API key")]
    UnknownApiKey,
    /// The API key header is not UTF-8, or is empty once trimmed.
    #[error("malformed API key header")]
    MalformedApiKey,
    /// The bearer token fails a check other than its validity period (header, signature,
    /// `iss`, `aud`, a missing `exp` or `sub`); holds the reason.
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    /// `now_unix` is past the token's `exp` plus the leeway.
    #[error("bearer token expired")]
    Expired,
    /// `now_unix` plus the leeway is still before the token's `nbf`.
    #[error("bearer token not valid yet")]
    NotYetValid,
}

/// SHA-256 of an API key, as stored in the config.
pub fn hash_api_key(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Establishes the caller's identity.
pub fn identify(
    config: &IdentityConfig,
    headers: &HeaderMap,
    peer: IpAddr,
    now_unix: u64,
) -> Result<Identity, IdentityError> {
    let api_key = match headers.get(&config.api_key_header) {
        Some(value) if !config.api_keys.is_empty() => {
            Some(match_api_key(&config.api_keys, value.as_bytes())?)
        }
        _ => None,
    };
    let jwt = match (&config.jwt, bearer_token(headers)) {
        (Some(jwt), Some(token)) => Some(verify_jwt(jwt, token, now_unix)?),
        _ => None,
    };
    Ok(Identity {
        ip: client_ip(headers, peer, &config.trusted_proxies),
        api_key,
        jwt,
    })
}

fn match_api_key(
    keys: &[ApiKey],
    presented: &[u8],
) -> Result<(String, Option<String>), IdentityError> {
    let presented = std::str::from_utf8(presented)
        .map_err(|_| IdentityError::MalformedApiKey)?
        .trim();
    if presented.is_empty() {
        return Err(IdentityError::MalformedApiKey);
    }
    let digest = hash_api_key(presented.as_bytes());
    // Compare against every key, keeping the match without branching on secret data.
    let mut found: Option<&ApiKey> = None;
    for key in keys {
        let equal: bool = key.sha256.ct_eq(&digest).into();
        if equal {
            found = Some(key);
        }
    }
    found
        .map(|key| (key.name.clone(), key.tier.clone()))
        .ok_or(IdentityError::UnknownApiKey)
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

fn verify_jwt(
    config: &JwtConfig,
    token: &str,
    now_unix: u64,
) -> Result<(String, Option<String>), IdentityError> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| IdentityError::InvalidToken(e.to_string()))?;
    let candidates = config.keys.iter().filter(|key| {
        key.algorithm == header.alg
            && match (&key.kid, &header.kid) {
                (Some(want), Some(got)) => want == got,
                _ => true,
            }
    });
    let mut last_error =
        IdentityError::InvalidToken(format!("no configured key for algorithm {:?}", header.alg));
    for key in candidates {
        let mut validation = Validation::new(key.algorithm);
        // Time is checked below against the caller's `now`, not the system clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => return check_claims(config, data.claims, now_unix),
            Err(e) => last_error = IdentityError::InvalidToken(e.to_string()),
        }
    }
    Err(last_error)
}

fn check_claims(
    config: &JwtConfig,
    claims: Claims,
    now_unix: u64,
) -> Result<(String, Option<String>), IdentityError> {
    let exp = claims
        .exp
        .ok_or_else(|| IdentityError::InvalidToken("no exp claim".into()))?;
    if now_unix > exp.saturating_add(config.leeway_secs) {
        return Err(IdentityError::Expired);
    }
    if let Some(nbf) = claims.nbf
        && now_unix.saturating_add(config.leeway_secs) < nbf
    {
        return Err(IdentityError::NotYetValid);
    }
    if let Some(audience) = &config.audience {
        let matches = match claims.rest.get("aud") {
            Some(serde_json::Value::String(aud)) => aud == audience,
            Some(serde_json::Value::Array(auds)) => {
                auds.iter().any(|a| a.as_str() == Some(audience))
            }
            _ => false,
        };
        if !matches {
            return Err(IdentityError::InvalidToken("wrong audience".into()));
        }
    }
    let sub = claims
        .sub
        .filter(|s| !s.is_empty())
        .ok_or_else(|| IdentityError::InvalidToken("no sub claim".into()))?;
    let tier = claims
        .rest
        .get(&config.tier_claim)
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    Ok((sub, tier))
}

/// The client address: `peer` unless it is a trusted proxy (see the module docs).
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    return ip;
                }
            }
            // Garbage in the chain: stop at the last hop we could verify.
            Err(_) => return client,
        }
    }
    client
}

/// Formatter output into a fixed buffer; writing past its end is an error, not a panic.
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl std::fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len.checked_add(text.len()).ok_or(std::fmt::Error)?;
        let room = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        room.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// An address printed on the stack, for hot paths (`X-Forwarded-For`, bucket keys): the
/// longest, an IPv4-mapped IPv6 address, is 45 bytes.
pub struct IpText {
    buf: [u8; 48],
}

impl Default for IpText {
    fn default() -> Self {
        Self { buf: [0; 48] }
    }
}

impl IpText {
    /// `ip` as `Display` writes it, borrowed from this buffer until the next call.
    pub fn format(&mut self, ip: IpAddr) -> &str {
        let len = match ip {
            // Most clients: four octets by hand, a tenth of what `Display` costs.
            IpAddr::V4(v4) => {
                let mut len = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf[len] = b'.';
                        len += 1;
                    }
                    if octet >= 100 {
                        self.buf[len] = b'0' + octet / 100;
                        len += 1;
                    }
                    if octet >= 10 {
                        self.buf[len] = b'0' + octet / 10 % 10;
                        len += 1;
                    }
                    self.buf[len] = b'0' + octet % 10;
                    len += 1;
                }
                len
            }
            IpAddr::V6(v6) => {
                use std::fmt::Write;
                let mut writer = SliceWriter {
                    buf: &mut self.buf,
                    len: 0,
                };
                // 48 bytes hold any address, so the write cannot run out of room.
                let _ = write!(writer, "{v6}");
                writer.len
            }
        };
        std::str::from_utf8(&self.buf[..len]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    proptest::proptest! {
        #[test]
        fn any_address_prints_as_display_does(bits: u128, v4: bool) {
            let ip = if v4 {
                IpAddr::V4(std::net::Ipv4Addr::from(bits as u32))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            };
            let mut text = IpText::default();
            proptest::prop_assert_eq!(text.format(ip), ip.to_string());
        }
    }

    const SECRET: &[u8] = b"test-secret-at-least-32-bytes-long!!";
    const NOW: u64 = 1_900_000_000;

    fn config() -> IdentityConfig {
        IdentityConfig {
            api_keys: vec![
                ApiKey {
                    name: "free".into(),
                    sha256: hash_api_key(b"free-key"),
                    tier: Some("free".into()),
                },
                ApiKey {
                    name: "premium".into(),
                    sha256: hash_api_key(b"premium-key"),
                    tier: Some("premium".into()),
                },
            ],
            jwt: Some(JwtConfig {
                keys: vec![JwtKey {
                    kid: None,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(SECRET),
                }],
                issuer: Some("issuer".into()),
                audience: Some("tollgate".into()),
                tier_claim: "tier".into(),
                leeway_secs: 0,
            }),
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..IdentityConfig::default()
        }
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn peer() -> IpAddr {
        "198.51.100.1".parse().unwrap()
    }

    #[test]
    fn api_keys_match_by_hash_and_carry_tier() {
        let id = identify(
            &config(),
            &headers(&[("x-api-key", "premium-key")]),
            peer(),
            NOW,
        )
        .unwrap();
        assert_eq!(id.api_key, Some(("premium".into(), Some("premium".into()))));
        assert_eq!(id.tier(), Some("premium"));
        let unknown = identify(&config(), &headers(&[("x-api-key", "nope")]), peer(), NOW);
        assert_eq!(unknown, Err(IdentityError::UnknownApiKey));
    }

    #[test]
    fn valid_jwt_gives_subject_and_tier() {
        let t = token(
            json!({"sub": "u-1", "tier": "premium", "exp": NOW + 60, "iss": "issuer", "aud": "tollgate"}),
            SECRET,
        );
        let id = identify(
            &config(),
            &headers(&[("authorization", &format!("Bearer {t}"))]),
            peer(),
            NOW,
        )
        .unwrap();
        assert_eq!(id.jwt, Some(("u-1".into(), Some("premium".into()))));
        assert_eq!(id.tier(), Some("premium"));
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_public_keys_from_config() {
        let cases = [
            (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(include_bytes!("testdata/rs256-private.pem")).unwrap(),
                DecodingKey::from_rsa_pem(include_bytes!("testdata/rs256-public.pem")).unwrap(),
            ),
            (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(include_bytes!("testdata/es256-private.pem")).unwrap(),
                DecodingKey::from_ec_pem(include_bytes!("testdata/es256-public.pem")).unwrap(),
            ),
        ];
        for (algorithm, signing, verifying) in cases {
            let mut config = config();
            if let Some(jwt) = config.jwt.as_mut() {
                jwt.keys = vec![JwtKey {
                    kid: Some("k1".into()),
                    algorithm,
                    key: verifying,
                }];
            }
            let mut header = Header::new(algorithm);
            header.kid = Some("k1".into());
            let claims = json!({"sub": "svc", "tier": "premium", "exp": NOW + 60, "iss": "issuer", "aud": "tollgate"});
            let token = encode(&header, &claims, &signing).unwrap();
            let bearer = format!("Bearer {token}");
            let id = identify(
                &config,
                &headers(&[("authorization", &bearer)]),
                peer(),
                NOW,
            )
            .unwrap();
            assert_eq!(
                id.jwt,
                Some(("svc".into(), Some("premium".into()))),
                "{algorithm:?}"
            );

            // A token signed with the other algorithm's key, or an HS256 token made with the
            // public key as the secret (the classic confusion attack), is refused.
            let hs = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(include_bytes!("testdata/rs256-public.pem")),
            )
            .unwrap();
            let confused = identify(
                &config,
                &headers(&[("authorization", &format!("Bearer {hs}"))]),
                peer(),
                NOW,
            );
            assert!(
                matches!(confused, Err(IdentityError::InvalidToken(_))),
                "{confused:?}"
            );
        }
    }

    #[test]
    fn bad_jwts_are_refused() {
        let cases = [
            (
                json!({"sub": "u", "exp": NOW - 1, "iss": "issuer", "aud": "tollgate"}),
                SECRET,
                IdentityError::Expired,
            ),
            (
                json!({"sub": "u", "exp": NOW + 60, "nbf": NOW + 30, "iss": "issuer", "aud": "tollgate"}),
                SECRET,
                IdentityError::NotYetValid,
            ),
        ];
        for (claims, secret, expected) in cases {
            let t = token(claims, secret);
            let got = identify(
                &config(),
                &headers(&[("authorization", &format!("Bearer {t}"))]),
                peer(),
                NOW,
            );
            assert_eq!(got, Err(expected));
        }
        for (claims, secret) in [
            (
                json!({"sub": "u", "exp": NOW + 60, "iss": "issuer", "aud": "tollgate"}),
                &b"another-secret-that-is-32-bytes-long"[..],
            ),
            (
                json!({"sub": "u", "exp": NOW + 60, "iss": "someone-else", "aud": "tollgate"}),
                SECRET,
            ),
            (
                json!({"sub": "u", "exp": NOW + 60, "iss": "issuer", "aud": "other"}),
                SECRET,
            ),
            (
                json!({"sub": "u", "iss": "issuer", "aud": "tollgate"}),
                SECRET,
            ),
        ] {
            let t = token(claims, secret);
            let got = identify(
                &config(),
                &headers(&[("authorization", &format!("Bearer {t}"))]),
                peer(),
                NOW,
            );
            assert!(
                matches!(got, Err(IdentityError::InvalidToken(_))),
                "{got:?}"
            );
        }
        let garbage = identify(
            &config(),
            &headers(&[("authorization", "Bearer not.a.jwt")]),
            peer(),
            NOW,
        );
        assert!(matches!(garbage, Err(IdentityError::InvalidToken(_))));
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(client_ip(&h, peer(), &config().trusted_proxies), peer());
    }

    #[test]
    fn forwarded_for_is_walked_from_the_right_behind_trusted_proxies() {
        let trusted = config().trusted_proxies;
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.7")]);
        // 1.1.1.1 may be spoofed by the client; 203.0.113.9 is what our proxy saw.
        assert_eq!(
            client_ip(&h, proxy, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let garbage = headers(&[("x-forwarded-for", "not-an-ip, 10.0.0.8")]);
        assert_eq!(
            client_ip(&garbage, proxy, &trusted),
            "10.0.0.8".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(&HeaderMap::new(), proxy, &trusted), proxy);
    }
}
