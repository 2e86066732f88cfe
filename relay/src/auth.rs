//! Users (`[auth]`): `Proxy-Authorization: Basic` checked against a file of
//! argon2id hashes, and client-certificate users from TLS.
//!
//! Argon2 is slow by design, so a successful verification is remembered
//! (keyed by a hash of the credential header, bounded) and a keep-alive
//! client pays for it once. The cache belongs to the configuration it was
//! made with: a reload brings a new, empty one.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use argon2::password_hash::PasswordHash;
use base64::Engine;
use blake2::{Blake2s256, Digest};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::Collector;
use crate::error::{ErrorKind, RelayError};
use crate::secret::{self, Secret};

/// Remembered successful verifications, at most.
const CACHE_ENTRIES: usize = 4096;

/// `[auth]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// File of `name:hash` lines (`porthole-relay passwd NAME` writes one).
    users_file: Option<String>,
    /// Every request needs a user: a password or a client certificate.
    #[serde(default)]
    required: bool,
    /// The realm named in `Proxy-Authenticate`.
    #[serde(default = "default_realm")]
    realm: String,
    /// `[auth.groups]`: `ops = ["alice", "bob"]`, used in rules as `group:ops`.
    #[serde(default)]
    pub groups: HashMap<String, Vec<String>>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            users_file: None,
            required: false,
            realm: default_realm(),
            groups: HashMap::new(),
        }
    }
}

fn default_realm() -> String {
    "porthole".into()
}

/// The validated `[auth]` settings.
#[derive(Debug, Clone)]
pub struct Auth {
    pub required: bool,
    pub realm: String,
    /// User name to password hash; `None` without a users file.
    users: Option<Arc<HashMap<String, Secret>>>,
    cache: Arc<Cache>,
}

impl Auth {
    /// Whether a users file is configured.
    pub fn has_users(&self) -> bool {
        self.users.is_some()
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            required: false,
            realm: default_realm(),
            users: None,
            cache: Arc::default(),
        }
    }
}

struct Cache {
    /// Hash of a `Proxy-Authorization` value that verified, to its user name.
    /// A plain mutex: lookups and inserts never await.
    ok: Mutex<HashMap<[u8; 32], String>>,
    /// Argon2 runs on blocking threads, a few at a time, so a flood of wrong
    /// passwords cannot take every thread.
    verifying: Semaphore,
}

impl Default for Cache {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Cache {
            ok: Mutex::new(HashMap::new()),
            verifying: Semaphore::new(cpus),
        }
    }
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cache")
    }
}

impl RawAuth {
    pub(crate) fn validate(&self, c: &mut Collector) -> Auth {
        let realm = self.realm.trim().to_string();
        // The realm goes into a header inside quotes.
        if realm.is_empty()
            || !realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            c.push(
                "auth.realm",
                "must be printable ASCII without quotes or backslashes",
            );
        }
        for (group, members) in &self.groups {
            if group.is_empty() || members.iter().any(|m| m.trim().is_empty()) {
                c.push(format!("auth.groups.{group}"), "empty group or member name");
            }
        }
        let users = self
            .users_file
            .as_deref()
            .map(|path| match load_users(Path::new(path)) {
                Ok(users) => Arc::new(users),
                Err(e) => {
                    c.push("auth.users_file", e);
                    Arc::default()
                }
            });
        Auth {
            required: self.required,
            realm,
            users,
            cache: Arc::default(),
        }
    }
}

/// Reads `name:hash` lines; `#` comments and blank lines are skipped. Errors
/// name the file and the line, never the hash.
pub fn load_users(path: &Path) -> Result<HashMap<String, Secret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let Some((name, hash)) = line.split_once(':') else {
            return Err(format!("{}: not a name:hash line", at()));
        };
        if !valid_user_name(name) {
            return Err(format!("{}: `{name}` is not a user name", at()));
        }
        match PasswordHash::new(hash) {
            Ok(h) if h.algorithm.as_str() == "argon2id" => {}
            _ => {
                return Err(format!(
                    "{}: the hash for {name} is not an argon2id hash",
                    at()
                ))
            }
        }
        if users.insert(name.to_string(), Secret::new(hash)).is_some() {
            return Err(format!("{}: {name} is listed twice", at()));
        }
    }
    Ok(users)
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name
            .chars()
            .any(|c| c.is_control() || c == ':' || c.is_whitespace())
}

/// `Basic` credentials: the user name and the password.
#[derive(Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// Parses a `Proxy-Authorization` value of the `Basic` scheme (RFC 7617).
pub fn parse_basic(value: &[u8]) -> Option<Credentials> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim_start())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    if !valid_user_name(user) {
        return None;
    }
    Some(Credentials {
        user: user.to_string(),
        password: Secret::new(password),
    })
}

/// Who is asking: the user from `Proxy-Authorization` when the relay has
/// users and the header is present (it must then be right), else the
/// client-certificate user. `Err` is a `407`.
pub async fn authenticate(
    auth: &Auth,
    header: Option<&[u8]>,
    cert_user: Option<&str>,
) -> Result<Option<String>, RelayError> {
    let refuse = |why: &'static str| {
        RelayError::new(ErrorKind::ProxyAuthRequired {
            realm: auth.realm.clone(),
            why,
        })
    };
    let (Some(users), Some(header)) = (&auth.users, header) else {
        return match cert_user {
            Some(user) => Ok(Some(user.to_string())),
            None if auth.required => Err(refuse("credentials required")),
            None => Ok(None),
        };
    };
    let key: [u8; 32] = Blake2s256::digest(header).into();
    if let Some(user) = auth
        .cache
        .ok
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
    {
        return Ok(Some(user.clone()));
    }
    let creds = parse_basic(header).ok_or_else(|| refuse("malformed Basic credentials"))?;
    let Credentials { user, password } = creds;
    let hash = users.get(&user).cloned();
    let verified = {
        let _permit = auth.cache.verifying.acquire().await;
        tokio::task::spawn_blocking(move || verify(hash.as_ref(), &password))
            .await
            .unwrap_or(false)
    };
    if !verified {
        return Err(refuse("wrong user name or password"));
    }
    let mut ok = auth.cache.ok.lock().unwrap_or_else(|p| p.into_inner());
    if ok.len() >= CACHE_ENTRIES {
        ok.clear(); // crude but bounded; the next requests verify again
    }
    ok.insert(key, user.clone());
    Ok(Some(user))
}

/// Checks a password against a stored hash. An unknown user is checked
/// against a fixed hash, so timing does not tell which names exist.
fn verify(hash: Option<&Secret>, password: &Secret) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| secret::hash("not a password").unwrap_or_default());
    let (hash, known) = match hash {
        Some(h) => (h.expose(), true),
        None => (dummy.as_str(), false),
    };
    secret::verify(hash, password.expose()) && known
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn basic_headers_by_table() {
        let creds = |u: &str, p: &str| {
            Some(Credentials {
                user: u.into(),
                password: Secret::new(p),
            })
        };
        let cases: Vec<(String, Option<Credentials>)> = vec![
            (
                format!("Basic {}", b64("alice:secret")),
                creds("alice", "secret"),
            ),
            (
                format!("basic {}", b64("alice:secret")),
                creds("alice", "secret"),
            ),
            (format!("BASIC   {}", b64("alice:")), creds("alice", "")),
            (format!("Basic {}", b64("bob:a:b")), creds("bob", "a:b")),
            (format!("Basic {}", b64("nocolon")), None),
            (format!("Basic {}", b64(":pw")), None),
            (format!("Bearer {}", b64("alice:secret")), None),
            ("Basic !!!".to_string(), None),
            ("Basic".to_string(), None),
            (String::new(), None),
        ];
        for (header, want) in cases {
            assert_eq!(parse_basic(header.as_bytes()), want, "{header}");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = parse_basic(format!("Basic {}", b64("alice:hunter2")).as_bytes()).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
    }

    #[test]
    fn passwd_lines_verify() {
        let line = secret::passwd_line("alice", "secret").unwrap();
        let (name, hash) = line.split_once(':').unwrap();
        assert_eq!(name, "alice");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let stored = Secret::new(hash);
        assert!(verify(Some(&stored), &Secret::new("secret")));
        assert!(!verify(Some(&stored), &Secret::new("wrong")));
        assert!(!verify(None, &Secret::new("secret")));
    }

    #[test]
    fn users_file_errors_name_file_and_line_but_not_hash() {
        let dir = std::env::temp_dir().join(format!("porthole-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        std::fs::write(
            &path,
            "# users\n\nalice:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$abcd\n",
        )
        .unwrap();
        let err = load_users(&path).unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains("abcd"), "{err}");
        let good = secret::passwd_line("bob", "pw").unwrap();
        std::fs::write(&path, format!("{good}\n")).unwrap();
        let users = load_users(&path).unwrap();
        assert!(users.contains_key("bob"));
        assert!(!format!("{users:?}").contains("argon2"));
    }
}
