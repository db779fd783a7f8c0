//! The few hash spellings the binary cache needs: the daemon sends a NAR hash in base16, a
//! `.narinfo` carries it as `sha256:<nix32>`, and store paths and cache URLs are named by
//! 32-character nix32 hash parts. Nix's base32 ("nix32") is not RFC 4648: its own alphabet
//! (no e, o, t, u) and its own bit order (`printHash32` in Nix's hash.cc).

use std::fmt;

/// Nix's base32 alphabet.
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The length of a store path's hash part (160 bits in nix32).
pub const HASH_PART_LEN: usize = 32;

/// A SHA-256 digest, such as a NAR hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sha256(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 hash in base16 or nix32: {0:?}")]
pub struct BadHash(pub String);

impl Sha256 {
    /// Parses `[sha256:]<base16>` or `[sha256:]<nix32>`, the forms daemons send.
    pub fn parse(s: &str) -> Result<Self, BadHash> {
        let bad = || BadHash(s.chars().take(100).collect());
        let digits = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        match digits.len() {
            64 => {
                for (byte, pair) in out.iter_mut().zip(digits.as_bytes().chunks(2)) {
                    let hi = hex_value(pair[0]).ok_or_else(bad)?;
                    let lo = hex_value(pair[1]).ok_or_else(bad)?;
                    *byte = hi << 4 | lo;
                }
            }
            52 => out = nix32_decode::<32>(digits).ok_or_else(bad)?,
            _ => return Err(bad()),
        }
        Ok(Sha256(out))
    }

    /// The digest in nix32, as `.narinfo` files and `nix hash to-base32` spell it.
    pub fn to_nix32(&self) -> String {
        nix32_encode(&self.0)
    }
}

/// `sha256:<nix32>`: the form every Nix version accepts in a `.narinfo`.
impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// True for a 32-character string in Nix's base32 alphabet: a store path's hash part.
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_PART_LEN && s.bytes().all(|c| NIX32.contains(&c))
}

/// The hash part of a store path (`/nix/store/<hash>-<name>`), if it has one.
pub fn hash_part_of(store_path: &str) -> Option<&str> {
    let base = store_path.rsplit('/').next()?;
    let hash = base.get(..HASH_PART_LEN)?;
    (is_hash_part(hash) && base.as_bytes().get(HASH_PART_LEN) == Some(&b'-')).then_some(hash)
}

/// Nix's `printHash32`: the last character holds the lowest bits.
fn nix32_encode(bytes: &[u8]) -> String {
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
fn nix32_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
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

#[cfg(test)]
mod tests {
    use super::*;

    // `nix hash to-base32 sha256-J4gxebOKYk35sShUNtJBTGOuuanueaC9PslFTjXEJzw=` (Nix 2.8.0) and
    // the same hash in base16 (`nix hash to-base16`).
    const HEX: &str = "27883179b38a624df9b1285436d2414c63aeb9a9ee79a0bd3ec9454e35c4273c";
    const NIX32_FORM: &str = "0g17qhslwif97sys0ygfm6wswqsc8793cm18n7wlsqlandwk3217";

    #[test]
    fn base16_and_nix32_agree_with_nix() {
        let h = Sha256::parse(HEX).unwrap();
        assert_eq!(h.to_nix32(), NIX32_FORM);
        assert_eq!(h.to_string(), format!("sha256:{NIX32_FORM}"));
        assert_eq!(Sha256::parse(&format!("sha256:{HEX}")).unwrap(), h);
        assert_eq!(Sha256::parse(NIX32_FORM).unwrap(), h);
        assert_eq!(Sha256::parse(&format!("sha256:{NIX32_FORM}")).unwrap(), h);
    }

    #[test]
    fn bad_hashes_are_rejected() {
        for bad in [
            "",
            "sha256:",
            &HEX[1..],
            &HEX.replace('a', "g"),
            &NIX32_FORM.replace('0', "e"),
            // The top bits of a 52-digit nix32 value must fit in 256 bits.
            "zg17qhslwif97sys0ygfm6wswqsc8793cm18n7wlsqlandwk3217",
            "md5:0123456789abcdef0123456789abcdef",
        ] {
            assert!(Sha256::parse(bad).is_err(), "{bad:?}");
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
