//! Publisher keys: Ed25519 key pairs in minisign's formats, so that an
//! administrator can also sign or check a document with the `minisign` tool.
//!
//! - `NAME.key`: the secret key, minisign's secret key box (unencrypted
//!   unless made by `minisign -G`; then the password comes from
//!   `SOMCAST_KEY_PASSWORD` or a prompt). Created 0600, never printed.
//! - `NAME.pub`: one line, the base64 public key (what `minisign -P` takes).
//!   A minisign `.pub` file (a comment line, then the key) is read too.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use minisign::{KeyPair, PublicKey, SecretKey, SecretKeyBox};
use thiserror::Error;

/// Why a key could not be made or read.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists: remove it first or choose another name (a key is never overwritten)")]
    Exists(PathBuf),
    #[error("{path}: not a minisign secret key ({reason})")]
    BadSecret { path: PathBuf, reason: String },
    #[error("{what}: not a minisign public key ({reason})")]
    BadPublic { what: String, reason: String },
    #[error("{0}: no public key in it")]
    NoKey(PathBuf),
    #[error("generating a key: {0}")]
    Generate(String),
}

/// The 8-byte key id minisign shows, as it shows it (hex of the
/// little-endian number, upper case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    fn of(keynum: &[u8]) -> KeyId {
        let mut id = [0u8; 8];
        let n = keynum.len().min(8);
        id[..n].copy_from_slice(&keynum[..n]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A public key an agent trusts.
#[derive(Clone)]
pub struct TrustedKey {
    pub id: KeyId,
    pub key: PublicKey,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({})", self.id)
    }
}

impl TrustedKey {
    /// Parses one base64 public key (a `.pub` file's key line).
    pub fn parse(text: &str) -> Result<TrustedKey, KeyError> {
        let bad = |reason: String| KeyError::BadPublic {
            what: format!("{:?}", text.chars().take(60).collect::<String>()),
            reason,
        };
        let key = PublicKey::from_base64(text.trim()).map_err(|e| bad(e.to_string()))?;
        if key.to_bytes().get(..2) != Some(b"Ed") {
            return Err(bad("not an Ed25519 minisign key".into()));
        }
        Ok(TrustedKey {
            id: KeyId::of(key.keynum()),
            key,
        })
    }

    /// The one-line form written to `NAME.pub`.
    pub fn to_line(&self) -> String {
        self.key.to_base64()
    }
}

/// Reads every public key in a file: one per line; empty lines, `#`
/// comments and minisign's `untrusted comment:` lines are skipped.
pub fn read_public(path: &Path) -> Result<Vec<TrustedKey>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    let keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("untrusted comment:"))
        .map(|l| {
            TrustedKey::parse(l).map_err(|e| KeyError::BadPublic {
                what: path.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(KeyError::NoKey(path.into()));
    }
    Ok(keys)
}

/// A publisher's key pair, loaded to sign.
pub struct Signer {
    pub(super) secret: SecretKey,
    pub public: TrustedKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.public.id)
    }
}

impl Signer {
    /// Loads `NAME.key`. An encrypted key (made by `minisign -G`) takes its
    /// password from `SOMCAST_KEY_PASSWORD`, else from a prompt.
    pub fn load(path: &Path) -> Result<Signer, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        let bad = |reason: String| KeyError::BadSecret {
            path: path.into(),
            reason,
        };
        let boxed = SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
        let unencrypted = boxed
            .clone()
            .into_unencrypted_secret_key()
            .ok()
            .filter(|k| !k.is_encrypted());
        let secret = match unencrypted {
            Some(k) => k,
            None => boxed
                .into_secret_key(std::env::var("SOMCAST_KEY_PASSWORD").ok())
                .map_err(|e| bad(e.to_string()))?,
        };
        let key = PublicKey::from_secret_key(&secret).map_err(|e| bad(e.to_string()))?;
        Ok(Signer {
            public: TrustedKey {
                id: KeyId::of(key.keynum()),
                key,
            },
            secret,
        })
    }

    /// A fresh key pair in memory (the demo's and the tests').
    pub fn generate() -> Result<Signer, KeyError> {
        let KeyPair { pk, sk } = KeyPair::generate_unencrypted_keypair()
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(Signer {
            public: TrustedKey {
                id: KeyId::of(pk.keynum()),
                key: pk,
            },
            secret: sk,
        })
    }
}

/// `somcast key generate NAME`: writes `NAME.key` (0600, refused if it
/// exists) and `NAME.pub`; returns both paths and the key.
pub fn generate_files(name: &Path) -> Result<(PathBuf, PathBuf, Signer), KeyError> {
    let key_path = with_suffix(name, "key");
    let pub_path = with_suffix(name, "pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(KeyError::Exists(p.clone()));
        }
    }
    let signer = Signer::generate()?;
    let boxed = signer
        .secret
        .to_box(Some(&format!("somcast publisher key {}", signer.public.id)))
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    write_secret(&key_path, boxed.to_string().as_bytes())?;
    let io = |source| KeyError::Io {
        path: pub_path.clone(),
        source,
    };
    std::fs::write(&pub_path, format!("{}\n", signer.public.to_line())).map_err(io)?;
    Ok((key_path, pub_path, signer))
}

/// `NAME` + `.ext`, keeping any dots already in the name.
pub fn with_suffix(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Creates `path` for a secret: never over an existing file, readable by its
/// owner only from the first byte on (0600 where there are modes).
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.into())
        } else {
            io(e)
        }
    })?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// First word of a fleet key file.
const FLEET_HEADER: &str = "somcast-fleet-key-1";

/// `somcast key generate --fleet NAME`: writes `NAME.fleet` (0600, refused
/// if it exists): the header word and 256 random bits in hex, one line.
pub fn generate_fleet_file(name: &Path) -> Result<(PathBuf, u16), KeyError> {
    let path = with_suffix(name, "fleet");
    let secret = multicast::auth::new_secret();
    write_secret(
        &path,
        format!("{FLEET_HEADER} {}\n", crate::lab::hex(&secret)).as_bytes(),
    )?;
    Ok((path, multicast::auth::FleetKey::from_secret(&secret).id()))
}

/// Reads one fleet key file.
pub fn read_fleet(path: &Path) -> Result<multicast::auth::FleetKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    let bad = |reason: &str| KeyError::BadSecret {
        path: path.into(),
        reason: format!("not a somcast fleet key: {reason}"),
    };
    let mut words = text.split_whitespace();
    if words.next() != Some(FLEET_HEADER) {
        return Err(bad(&format!("it does not start with {FLEET_HEADER}")));
    }
    let hex = words.next().ok_or_else(|| bad("no key after the header"))?;
    if words.next().is_some() || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("the key must be 64 hex digits"));
    }
    let mut secret = [0u8; 32];
    for (i, b) in secret.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad("not hex"))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "{} is readable by others than its owner: anyone who reads it can speak for the fleet on the LAN (chmod 600 it)",
                path.display()
            );
        }
    }
    Ok(multicast::auth::FleetKey::from_secret(&secret))
}

/// The fleet keys from files: none, or one to [`multicast::auth::MAX_KEYS`].
pub fn read_fleet_keys(files: &[PathBuf]) -> Result<Option<multicast::auth::FleetKeys>, KeyError> {
    if files.is_empty() {
        return Ok(None);
    }
    if files.len() > multicast::auth::MAX_KEYS {
        return Err(KeyError::Generate(format!(
            "{} fleet keys given; at most {} (the current one and the next)",
            files.len(),
            multicast::auth::MAX_KEYS
        )));
    }
    let keys = files
        .iter()
        .map(|f| read_fleet(f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(multicast::auth::FleetKeys::new(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_back_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("publisher");
        let (key, public, signer) = generate_files(&name).unwrap();
        assert_eq!(key, dir.path().join("publisher.key"));
        let loaded = Signer::load(&key).unwrap();
        assert_eq!(loaded.public.id, signer.public.id);
        let keys = read_public(&public).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].id, signer.public.id);
        assert_eq!(std::fs::read_to_string(&public).unwrap().lines().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwritten.
        assert!(matches!(generate_files(&name), Err(KeyError::Exists(_))));
    }

    #[test]
    fn a_fleet_key_file_reads_back_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, id) = generate_fleet_file(&dir.path().join("lan")).unwrap();
        assert_eq!(read_fleet(&path).unwrap().id(), id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let bad = dir.path().join("bad.fleet");
        std::fs::write(&bad, "somcast-fleet-key-1 abcd\n").unwrap();
        assert!(read_fleet(&bad).unwrap_err().to_string().contains("64 hex"));
        std::fs::write(&bad, format!("somcast-fleet-key-1 a{}b\n", "é".repeat(31))).unwrap();
        assert!(read_fleet(&bad).unwrap_err().to_string().contains("64 hex"));
        std::fs::write(&bad, "hello\n").unwrap();
        assert!(
            read_fleet(&bad)
                .unwrap_err()
                .to_string()
                .contains("not a somcast fleet key")
        );
        let three = vec![path.clone(), path.clone(), path];
        assert!(read_fleet_keys(&three).is_err());
    }

    #[test]
    fn bad_public_keys_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.pub");
        std::fs::write(&f, "untrusted comment: x\nnot-a-key\n").unwrap();
        let e = read_public(&f).unwrap_err().to_string();
        assert!(
            e.contains("x.pub") && e.contains("not a minisign public key"),
            "{e}"
        );
        std::fs::write(&f, "# nothing\n\n").unwrap();
        assert!(matches!(read_public(&f), Err(KeyError::NoKey(_))));
    }
}
