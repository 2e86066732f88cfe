//! Secrets: salted argon2id hashes in `name:hash` lines (what
//! `porthole-relay passwd NAME` prints), verification, and a type whose
//! `Debug` never shows the secret.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// A secret held in memory; `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself: only for sending it or checking it, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The `Proxy-Authorization` value (`Basic ...`) from a file of one
/// `user:password` line: a relay route's `via_credentials_file`, the shim's
/// `credentials_file`. Errors name the file, never its content.
pub fn basic_credentials_file(path: &str) -> Result<Secret, String> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let line = text.lines().next().unwrap_or("").trim_end();
    if !line.contains(':') {
        return Err(format!("{path}: one line `user:password` expected"));
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(line);
    Ok(Secret::new(format!("Basic {encoded}")))
}

/// `N` bytes from the operating system's random source (salts, ids, keys).
pub fn random<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes)?;
    Ok(bytes)
}

/// Hashes a secret with a fresh random salt (argon2id, default parameters).
pub fn hash(secret: &str) -> Result<String, String> {
    let random = random::<16>().map_err(|e| format!("no randomness for a salt: {e}"))?;
    let salt = SaltString::encode_b64(&random).map_err(|e| format!("salt: {e}"))?;
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

/// The `name:hash` line `porthole-relay passwd NAME` prints.
pub fn passwd_line(name: &str, secret: &str) -> Result<String, String> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{name}` is not a user or uplink name (no ':' or spaces)"
        ));
    }
    Ok(format!("{name}:{}", hash(secret)?))
}

/// Checks a stored hash: a PHC string (`$argon2id$...`), optionally prefixed
/// by `name:` as `passwd` prints it. Returns the error text for a bad hash.
pub fn parse_hash(stored: &str) -> Result<String, String> {
    let phc = match stored.split_once(':') {
        Some((_, rest)) if rest.starts_with('$') => rest,
        _ => stored,
    };
    PasswordHash::new(phc)
        .map_err(|e| format!("not an argon2 hash from `porthole-relay passwd` ({e})"))?;
    Ok(phc.to_string())
}

/// Whether `secret` matches the PHC hash (slow by design).
pub fn verify(phc: &str, secret: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A fresh random identifier (128 bits, hex): session ids.
pub fn random_id() -> String {
    let bytes = random::<16>().unwrap_or_else(|_| {
        // No OS randomness: the clock's nanoseconds keep ids unique.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            .to_le_bytes()
    });
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_verify() {
        let line = passwd_line("plant-3", "s3cret").unwrap();
        assert!(line.starts_with("plant-3:$argon2id$"));
        let phc = parse_hash(&line).unwrap();
        assert!(verify(&phc, "s3cret"));
        assert!(!verify(&phc, "wrong"));
        assert!(parse_hash("plant-3:nothash").is_err());
        assert!(passwd_line("a:b", "x").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn ids_are_random_hex() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_id());
    }
}
