//! Token verification: staff JWTs and diners' table tokens.
//!
//! Owns what a token must contain and how it is checked; knows nothing of
//! sockets or the hub. Verification yields a [`StaffIdentity`] or a
//! [`DinerIdentity`], all the rest of the gateway learns from a token. Errors carry no token text,
//! so nothing secret can reach a log line through them.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{Config, JwtAlgorithm};

// Ids are aliases, not newtypes: they are read from JSON, written to Redis
// keys, Lua arguments and SQL parameters, and compared in the hub's
// indices; a mix-up between them would route across a tenant or a branch,
// which the routing tables and property tests (tests/it/routing.rs,
// tests/it/property_routing.rs) check end to end. Newtypes were weighed and
// left: 118 uses, each needing a conversion at those edges, for a class of
// bug the tests already catch.
pub type TenantId = i64;
pub type BranchId = i64;
pub type UserId = i64;
pub type SessionId = i64;
pub type SectorId = i64;

/// The four WebSocket endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Waiter,
    Kitchen,
    Admin,
    Diner,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Waiter,
        Endpoint::Kitchen,
        Endpoint::Admin,
        Endpoint::Diner,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Waiter => "waiter",
            Endpoint::Kitchen => "kitchen",
            Endpoint::Admin => "admin",
            Endpoint::Diner => "diner",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The query parameter that carries this endpoint's token.
    pub fn token_param(self) -> &'static str {
        match self {
            Endpoint::Diner => "table_token",
            _ => "token",
        }
    }

    /// Whether a staff token with these roles may open this endpoint.
    pub fn allows(self, roles: Roles) -> bool {
        let allowed = match self {
            Endpoint::Waiter => Roles::WAITER | Roles::MANAGER | Roles::ADMIN,
            Endpoint::Kitchen => Roles::KITCHEN | Roles::MANAGER | Roles::ADMIN,
            Endpoint::Admin => Roles::ADMIN | Roles::MANAGER,
            Endpoint::Diner => 0,
        };
        roles.0 & allowed != 0
    }
}

/// The staff roles a token holds, as a small bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    pub const ADMIN: u8 = 1;
    pub const MANAGER: u8 = 2;
    pub const KITCHEN: u8 = 4;
    pub const WAITER: u8 = 8;

    /// Reads role names; names it does not know are ignored.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Roles {
        Roles(names.into_iter().fold(0, |acc, name| {
            acc | match name {
                "ADMIN" => Self::ADMIN,
                "MANAGER" => Self::MANAGER,
                "KITCHEN" => Self::KITCHEN,
                "WAITER" => Self::WAITER,
                _ => 0,
            }
        }))
    }

    /// MANAGER and ADMIN see every sector of their branches.
    pub fn sees_all_sectors(self) -> bool {
        self.0 & (Self::ADMIN | Self::MANAGER) != 0
    }
}

/// A verified staff token.
#[derive(Debug, Clone, PartialEq)]
pub struct StaffIdentity {
    pub user_id: UserId,
    pub tenant_id: TenantId,
    pub branch_ids: Vec<BranchId>,
    pub roles: Roles,
    /// Expiry, Unix seconds.
    pub exp: u64,
    pub jti: Option<String>,
}

/// A verified table token.
#[derive(Debug, Clone, PartialEq)]
pub struct DinerIdentity {
    pub tenant_id: TenantId,
    pub branch_id: BranchId,
    pub table_id: i64,
    pub session_id: SessionId,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Why a token was refused. Deliberately without the token's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token missing")]
    Missing,
    #[error("token invalid")]
    Invalid,
    #[error("token expired")]
    Expired,
}

/// Longest token accepted; anything longer is refused before decoding.
const MAX_TOKEN_BYTES: usize = 8192;

/// Checks staff and table tokens with the configured keys.
pub struct Verifier {
    staff_key: Option<DecodingKey>,
    staff_validation: Validation,
    table_key: Option<DecodingKey>,
    table_validation: Validation,
}

/// Why a [`Verifier`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the JWT public key file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the JWT public key file {path} is not a valid PEM key: {reason}")]
    Malformed { path: String, reason: String },
}

impl Verifier {
    pub fn new(config: &Config) -> Result<Verifier, KeyError> {
        let (staff_key, algorithm) = match config.jwt_algorithm {
            JwtAlgorithm::Hs256 => (
                config
                    .jwt_secret
                    .as_ref()
                    .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
                Algorithm::HS256,
            ),
            alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) => {
                let key = match &config.jwt_public_key_file {
                    Some(path) => Some(read_public_key(path, alg)?),
                    None => None,
                };
                let algorithm = if alg == JwtAlgorithm::Rs256 {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                (key, algorithm)
            }
        };
        Ok(Verifier {
            staff_key,
            staff_validation: staff_validation(algorithm, config),
            table_key: config
                .table_token_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            table_validation: validation(Algorithm::HS256, config.jwt_leeway_s),
        })
    }

    /// Verifies a staff JWT (§1.2).
    pub fn staff(&self, token: Option<&str>) -> Result<StaffIdentity, AuthError> {
        let claims: StaffClaims = decode(token, &self.staff_key, &self.staff_validation)?;
        if claims.branch_ids.is_empty() {
            return Err(AuthError::Invalid);
        }
        Ok(StaffIdentity {
            user_id: claims.sub,
            tenant_id: claims.tenant_id,
            branch_ids: dedup(claims.branch_ids),
            roles: Roles::from_names(claims.roles.iter().map(String::as_str)),
            exp: claims.exp,
            jti: claims.jti,
        })
    }

    /// Verifies a diner's table token (§1.2).
    pub fn table(&self, token: Option<&str>) -> Result<DinerIdentity, AuthError> {
        let c: TableClaims = decode(token, &self.table_key, &self.table_validation)?;
        Ok(DinerIdentity {
            tenant_id: c.tenant_id,
            branch_id: c.branch_id,
            table_id: c.table_id,
            session_id: c.session_id,
            exp: c.exp,
        })
    }

    /// Whether a token that expires at `exp` is still acceptable now.
    /// Saturating: `exp` is the token's, and may be near `u64::MAX`.
    pub fn still_valid(&self, exp: u64) -> bool {
        exp.saturating_add(self.staff_validation.leeway) >= unix_now()
    }
}

fn read_public_key(path: &std::path::Path, alg: JwtAlgorithm) -> Result<DecodingKey, KeyError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| KeyError::Unreadable {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let key = if alg == JwtAlgorithm::Rs256 {
        DecodingKey::from_rsa_pem(&pem)
    } else {
        DecodingKey::from_ec_pem(&pem)
    };
    key.map_err(|e| KeyError::Malformed {
        path: shown,
        reason: e.to_string(),
    })
}

/// The table token's checks plus the token binding of §1.2: with
/// `WSGATEWAY_JWT_ISSUER` / `WSGATEWAY_JWT_AUDIENCE` set, a staff token
/// must carry that `iss` / an `aud` (string or array, RFC 7519 §4.1.3)
/// holding that value; absent counts as wrong. Table tokens are not bound.
fn staff_validation(algorithm: Algorithm, config: &Config) -> Validation {
    let mut v = validation(algorithm, config.jwt_leeway_s);
    let mut required = vec!["exp"];
    if let Some(issuer) = &config.jwt_issuer {
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(audience) = &config.jwt_audience {
        v.set_audience(&[audience]);
        v.validate_aud = true;
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn validation(algorithm: Algorithm, leeway: u64) -> Validation {
    let mut v = Validation::new(algorithm);
    v.leeway = leeway;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    v
}

fn decode<T: serde::de::DeserializeOwned>(
    token: Option<&str>,
    key: &Option<DecodingKey>,
    validation: &Validation,
) -> Result<T, AuthError> {
    let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
    let key = key.as_ref().ok_or(AuthError::Invalid)?;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Invalid);
    }
    jsonwebtoken::decode::<T>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        })
}

fn dedup(mut ids: Vec<i64>) -> Vec<i64> {
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The claims of a staff JWT, as the backend issues them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaffClaims {
    /// User id: an integer, or a string holding one.
    #[serde(deserialize_with = "int_or_numeric_string")]
    pub sub: UserId,
    pub tenant_id: TenantId,
    pub branch_ids: Vec<BranchId>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// The claims of a table token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableClaims {
    pub tenant_id: TenantId,
    pub branch_id: BranchId,
    pub table_id: i64,
    pub session_id: SessionId,
    pub exp: u64,
}

fn int_or_numeric_string<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Sub {
        Int(i64),
        Text(String),
    }
    match Sub::deserialize(d)? {
        Sub::Int(n) => Ok(n),
        Sub::Text(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom("sub is not numeric")),
    }
}

/// Signs claims with an HS256 secret: for `wsgateway token`, `dev` and tests.
pub fn mint<T: Serialize>(secret: &str, claims: &T) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of serializable claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "staff-secret";
    const TABLE: &str = "table-secret";

    fn verifier() -> Verifier {
        Verifier::new(&Config::with_secrets(SECRET, TABLE)).unwrap()
    }

    fn in_an_hour() -> u64 {
        unix_now() + 3600
    }

    fn staff(claims: serde_json::Value) -> Result<StaffIdentity, AuthError> {
        verifier().staff(Some(&mint(SECRET, &claims)))
    }

    #[test]
    fn a_valid_staff_token_gives_its_identity() {
        let id = staff(json!({"sub": "7", "tenant_id": 1, "branch_ids": [5, 6, 5],
            "roles": ["WAITER", "JANITOR"], "exp": in_an_hour()}))
        .unwrap();
        assert_eq!(id.user_id, 7);
        assert_eq!(id.tenant_id, 1);
        assert_eq!(id.branch_ids, vec![5, 6]);
        assert!(Endpoint::Waiter.allows(id.roles));
        assert!(!Endpoint::Kitchen.allows(id.roles));
        assert!(!Endpoint::Admin.allows(id.roles));
    }

    #[test]
    fn malformed_staff_tokens_are_invalid() {
        let exp = in_an_hour();
        let bad = [
            json!({"tenant_id": 1, "branch_ids": [5], "exp": exp}),
            json!({"sub": 7, "branch_ids": [5], "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "branch_ids": [], "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "branch_ids": [5]}),
            json!({"sub": 7, "tenant_id": "1", "branch_ids": [5], "exp": exp}),
            json!({"sub": "seven", "tenant_id": 1, "branch_ids": [5], "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "branch_ids": ["5"], "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "roles": "ADMIN", "exp": exp}),
            json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "exp": exp, "nbf": exp}),
        ];
        for claims in bad {
            assert_eq!(staff(claims.clone()), Err(AuthError::Invalid), "{claims}");
        }
        let expired = json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "exp": unix_now() - 60});
        assert_eq!(staff(expired), Err(AuthError::Expired));
    }

    #[test]
    fn wrong_secret_algorithm_or_none_is_invalid() {
        let claims = json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "exp": in_an_hour()});
        let v = verifier();
        assert_eq!(
            v.staff(Some(&mint("other", &claims))),
            Err(AuthError::Invalid)
        );
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.staff(Some(&hs384)), Err(AuthError::Invalid));
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64_url(&claims.to_string())
        );
        assert_eq!(v.staff(Some(&none)), Err(AuthError::Invalid));
        assert_eq!(v.staff(None), Err(AuthError::Missing));
        assert_eq!(v.staff(Some("")), Err(AuthError::Missing));
        assert_eq!(v.staff(Some(&"a".repeat(100_000))), Err(AuthError::Invalid));
        // A table token is not a staff token.
        let table = mint(TABLE, &claims);
        assert_eq!(v.staff(Some(&table)), Err(AuthError::Invalid));
    }

    #[test]
    fn issuer_and_audience_bind_staff_tokens_only() {
        let mut config = Config::with_secrets(SECRET, TABLE);
        config.jwt_issuer = Some("https://auth.example".into());
        config.jwt_audience = Some("wsgateway".into());
        let v = Verifier::new(&config).unwrap();
        let exp = in_an_hour();
        let with = |extra: serde_json::Value| {
            let mut claims = json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "exp": exp});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v.staff(Some(&mint(SECRET, &claims))).map(|id| id.user_id)
        };
        let iss = "https://auth.example";
        assert_eq!(with(json!({"iss": iss, "aud": "wsgateway"})), Ok(7));
        assert_eq!(
            with(json!({"iss": iss, "aud": ["other", "wsgateway"]})),
            Ok(7)
        );
        for bad in [
            json!({"aud": "wsgateway"}),
            json!({"iss": "https://evil.example", "aud": "wsgateway"}),
            json!({"iss": iss}),
            json!({"iss": iss, "aud": "other"}),
            json!({"iss": iss, "aud": ["other", "more"]}),
            json!({"iss": iss, "aud": []}),
        ] {
            assert_eq!(with(bad.clone()), Err(AuthError::Invalid), "{bad}");
        }
        let table =
            json!({"tenant_id": 1, "branch_id": 5, "table_id": 12, "session_id": 77, "exp": exp});
        assert!(v.table(Some(&mint(TABLE, &table))).is_ok());
        // Unset, neither is checked (the default).
        assert_eq!(
            verifier()
                .staff(Some(&mint(
                    SECRET,
                    &json!({"sub": 7, "tenant_id": 1,
                    "branch_ids": [5], "exp": exp, "iss": "x", "aud": "y"})
                )))
                .map(|id| id.user_id),
            Ok(7)
        );
    }

    #[test]
    fn table_tokens() {
        let v = verifier();
        let good = json!({"tenant_id": 1, "branch_id": 5, "table_id": 12, "session_id": 77, "exp": in_an_hour()});
        let id = v.table(Some(&mint(TABLE, &good))).unwrap();
        assert_eq!(
            (id.tenant_id, id.branch_id, id.session_id, id.table_id),
            (1, 5, 77, 12)
        );
        assert_eq!(v.table(Some(&mint(SECRET, &good))), Err(AuthError::Invalid));
        let partial = json!({"tenant_id": 1, "branch_id": 5, "exp": in_an_hour()});
        assert_eq!(
            v.table(Some(&mint(TABLE, &partial))),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn endpoint_roles() {
        let r = |names: &[&str]| Roles::from_names(names.iter().copied());
        assert!(Endpoint::Admin.allows(r(&["MANAGER"])));
        assert!(!Endpoint::Admin.allows(r(&["WAITER", "KITCHEN"])));
        assert!(Endpoint::Kitchen.allows(r(&["ADMIN"])));
        assert!(!Endpoint::Waiter.allows(r(&[])));
        assert!(!Endpoint::Waiter.allows(r(&["waiter"])));
    }

    fn base64_url(s: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |acc, &c| (acc << 8) | c as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
