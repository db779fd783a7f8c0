//! The NAR hash as the binary cache spells it: the daemon sends it in base16, a `.narinfo`
//! carries it as `sha256:<nix32>`. Nix's base32 itself, and the hash parts that name store paths
//! and cache URLs, are in [`store_path`](crate::store_path).

use std::fmt;

use crate::store_path::{nix32_decode, nix32_encode};

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
}
