//! Nix's store paths, spelled once for both Nix wings: a store path is `/nix/store/` + a
//! 32-character hash part in Nix's base32 ("nix32") + `-` + a name. The served cache names paths
//! by their hash part ([`is_hash_part`], [`hash_part_of`]); the upload spool keeps and hands to
//! Nix only fully checked paths ([`StorePath`]). Nix's base32 is not RFC 4648: its own alphabet
//! (no e, o, t, u) and its own bit order (`printHash32` in Nix's hash.cc), both here alone.

use std::fmt;
use std::str::FromStr;

const NIX_STORE: &str = "/nix/store/";
const MAX_NAME_LEN: usize = 211;

/// Nix's base32 alphabet.
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The length of a store path's hash part (160 bits in nix32).
pub const HASH_PART_LEN: usize = 32;

/// True for a 32-character string in Nix's base32 alphabet: a store path's hash part.
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_PART_LEN && s.bytes().all(|c| NIX32.contains(&c))
}

/// The hash part of a store path (`/nix/store/<hash>-<name>`), if it has one.
pub fn hash_part_of(store_path: &str) -> Option<&str> {
    let base = store_path.rsplit('/').next()?;
    split_base(base).ok().map(|(hash, _)| hash)
}

/// A store path's last component split into its hash part and its name (`<hash>-<name>`), or
/// why it cannot be: the one reading of that shape, for [`hash_part_of`] and [`StorePath`].
fn split_base(base: &str) -> Result<(&str, &str), &'static str> {
    if base.as_bytes().get(HASH_PART_LEN) != Some(&b'-') {
        return Err("it lacks a 32-character hash, a dash and a name");
    }
    // A dash at HASH_PART_LEN: the hash part ends on a character boundary.
    let (hash, name) = (&base[..HASH_PART_LEN], &base[HASH_PART_LEN + 1..]);
    if !is_hash_part(hash) {
        return Err("its hash is not Nix base-32");
    }
    Ok((hash, name))
}

/// Nix's `printHash32`: the last character holds the lowest bits.
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let low = bytes[i] >> j;
            let high = match bytes.get(i + 1) {
                Some(next) if j > 0 => next << (8 - j),
                _ => 0,
            };
            NIX32[usize::from((low | high) & 0x1f)] as char
        })
        .collect()
}

/// The inverse of [`nix32_encode`] for an `N`-byte value; `None` if `s` is not one.
pub fn nix32_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != (N * 8).div_ceil(5) {
        return None;
    }
    let mut out = [0u8; N];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIX32.iter().position(|&d| d == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let shifted = digit << j;
        out[i] |= shifted as u8;
        let carry = (shifted >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

/// A string shown in a message: escaped, and cut after 100 characters, so that a hostile value
/// (newlines, escape sequences, megabytes) cannot forge or flood a log line.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 100;
        f.write_str("\"")?;
        for c in self.0.chars().take(MAX) {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.0.chars().nth(MAX).is_some() {
            write!(f, "\"… ({} bytes)", self.0.len())
        } else {
            f.write_str("\"")
        }
    }
}

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{shown} is not a store path: {reason}")]
pub struct StorePathError {
    shown: String,
    pub reason: &'static str,
}

/// A path in `/nix/store`, checked as Nix checks it: `/nix/store/` + 32 characters of Nix's
/// base-32 + `-` + a name of at most 211 characters of `[A-Za-z0-9+._?=-]`, not `.` or `..` nor
/// starting with `.-` or `..-` (Nix's current rule). Nothing else is ever written to the spool
/// or handed to a Nix command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the hash and its dash.
    pub fn name(&self) -> &str {
        &self.0[NIX_STORE.len() + HASH_PART_LEN + 1..]
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<StorePath, StorePathError> {
        let refuse = |reason| {
            Err(StorePathError {
                shown: Shown(s).to_string(),
                reason,
            })
        };
        let Some(base) = s.strip_prefix(NIX_STORE) else {
            return refuse("it does not start with /nix/store/");
        };
        if base.len() > HASH_PART_LEN + 1 + MAX_NAME_LEN {
            return refuse("its name is longer than 211 characters");
        }
        if base.len() < HASH_PART_LEN + 2 {
            return refuse("it lacks a 32-character hash, a dash and a name");
        }
        let name = match split_base(base) {
            Ok((_, name)) => name,
            Err(reason) => return refuse(reason),
        };
        let allowed = |c: char| c.is_ascii_alphanumeric() || "+-._?=".contains(c);
        if !name.chars().all(allowed) {
            return refuse("its name has a character outside [A-Za-z0-9+._?=-]");
        }
        if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
            return refuse("its name is `.` or `..`");
        }
        Ok(StorePath(s.to_string()))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "ljhxzj5aiqjdfm6yj1jks9p0dn8syznj";
    const DRV: &str = "/nix/store/p5fh7jg51y4pqpnm7afc44i54c8i9x0d-x0.drv";
    const OUT: &str = "/nix/store/ljhxzj5aiqjdfm6yj1jks9p0dn8syznj-x0";

    #[test]
    fn store_paths_are_checked_as_nix_checks_them() {
        let name211 = "a".repeat(211);
        for good in [
            OUT.to_string(),
            DRV.to_string(),
            format!("/nix/store/{HASH}-a+b_c?d=e.f-1.0"),
            format!("/nix/store/{HASH}-{name211}"),
            format!("/nix/store/{HASH}-.zshrc"),
            format!("/nix/store/{HASH}-..."),
        ] {
            assert!(good.parse::<StorePath>().is_ok(), "{good:?} refused");
        }
        let name212 = "a".repeat(212);
        let hostile = [
            String::new(),
            "x".into(),
            "/nix/store/".into(),
            format!("nix/store/{HASH}-x"),
            format!("/nix/store//{HASH}-x"),
            format!("/nix/store/{HASH}-x/bin/sh"),
            format!("/nix/store/{HASH}-x/"),
            format!("/nix/store/{HASH}x"),
            format!("/nix/store/{HASH}-"),
            format!("/nix/store/{}-x", &HASH[1..]),
            format!("/nix/store/{HASH}a-x"),
            format!("/nix/store/{}e-x", &HASH[1..]),
            format!("/nix/store/{}-x", HASH.to_uppercase()),
            format!("/nix/store/{HASH}-{name212}"),
            format!("/nix/store/{HASH}-."),
            format!("/nix/store/{HASH}-.."),
            format!("/nix/store/{HASH}-.-x"),
            format!("/nix/store/{HASH}-..-x"),
            format!("/nix/store/{HASH}-x y"),
            format!("/nix/store/{HASH}-x\"y"),
            format!("/nix/store/{HASH}-x'y"),
            format!("/nix/store/{HASH}-$(reboot)"),
            format!("/nix/store/{HASH}-x;id"),
            format!("/nix/store/{HASH}-x`id`"),
            format!("/nix/store/{HASH}-x\nout /etc/shadow"),
            format!("/nix/store/{HASH}-x\0"),
            format!("/nix/store/{HASH}-x\r"),
            format!("/nix/store/{HASH}-é"),
            format!("/nix/store/../../etc/{HASH}-x"),
            format!(" /nix/store/{HASH}-x"),
            format!("/nix/store/{HASH}-{}", "x".repeat(10 << 20)),
        ];
        for bad in &hostile {
            let err = bad.parse::<StorePath>().expect_err(bad);
            let message = err.to_string();
            assert!(message.len() < 400, "message of {} bytes", message.len());
            assert!(!message.contains('\n'), "{message:?}");
        }
    }

    #[test]
    fn hash_parts() {
        let path = "/nix/store/d6xhxnk87bzm95j6nka4wmvynsm61imz-small.txt";
        assert_eq!(hash_part_of(path), Some("d6xhxnk87bzm95j6nka4wmvynsm61imz"));
        assert!(is_hash_part("d6xhxnk87bzm95j6nka4wmvynsm61imz"));
        assert!(
            !is_hash_part("d6xhxnk87bzm95j6nka4wmvynsm61ime"),
            "no e in nix32"
        );
        assert!(!is_hash_part("d6xhxnk87bzm95j6nka4wmvynsm61im"));
        assert!(!is_hash_part("D6XHXNK87BZM95J6NKA4WMVYNSM61IMZ"));
        assert_eq!(
            hash_part_of("/nix/store/d6xhxnk87bzm95j6nka4wmvynsm61imz"),
            None
        );
        assert_eq!(hash_part_of("/nix/store/short-x"), None);
    }
}
