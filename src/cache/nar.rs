//! Where a NAR ends. The daemon sends `NarFromPath`'s answer as a raw NAR with no length and no
//! framing, so the only way to know that it is complete (and not cut short by a dying tunnel) is
//! to follow the archive's own structure, as Nix's `copyNAR` does with `parseDump`. This module
//! is that parser as a push state machine with no I/O: feed it bytes, it says how many belong to
//! the archive and when the archive is over. It keeps no file contents, only the small tokens
//! (at most [`MAX_TOKEN`] bytes each) and one entry name per directory level.
//!
//! The grammar (every token a length-prefixed string padded to 8 bytes, as in `archive.cc`):
//!
//! ```text
//! nar   = "nix-archive-1" node
//! node  = "(" "type" ( "regular" ["executable" ""] "contents" BYTES
//!                    | "symlink" "target" STRING
//!                    | "directory" { "entry" "(" "name" NAME "node" node ")" } ) ")"
//! ```

/// The longest token other than file contents (names, symlink targets, keywords).
pub const MAX_TOKEN: usize = 64 * 1024;
/// The deepest directory nesting accepted.
pub const MAX_DEPTH: usize = 1024;

const MAGIC: &[u8] = b"nix-archive-1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarError {
    #[error("not a NAR (bad magic)")]
    BadMagic,
    #[error("NAR: expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: String },
    #[error("NAR: a token of {0} bytes is longer than {MAX_TOKEN}")]
    TokenTooLong(u64),
    #[error("NAR: non-zero padding")]
    NonZeroPadding,
    #[error("NAR: invalid entry name {0:?}")]
    InvalidName(String),
    #[error("NAR: directory entries not sorted ({0:?})")]
    Unsorted(String),
    #[error("NAR: nested deeper than {MAX_DEPTH} directories")]
    TooDeep,
}

/// What the parser expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    Open,
    Type,
    TypeValue,
    /// Inside a node: one of its fields, or ")".
    Field(Kind),
    ExecutableValue,
    /// A regular file's contents: counted, never kept.
    Contents,
    Target,
    EntryOpen,
    EntryField,
    EntryName,
    Done,
}

/// The node being read, and which of its fields have been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular { executable: bool, contents: bool },
    Symlink { target: bool },
    Directory,
}

/// Where the lexer is within the current token.
#[derive(Debug, Clone, Copy)]
enum Lex {
    /// Reading the 8-byte little-endian length; `have` bytes of it are in `len_buf`.
    Len { have: usize },
    /// Reading the token's bytes (kept in `token` unless the token is file contents).
    Bytes { left: u64, pad: usize },
    /// Reading the zero padding that rounds the token up to 8 bytes.
    Pad { left: usize },
}

/// Where a directory is within its current entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// After "(": a name comes next.
    Open,
    /// After the name: the node comes next.
    Named,
    /// After the node: ")" comes next.
    Complete,
}

/// One directory level: the previous entry's name (entries must be strictly sorted, as Nix
/// checks) and where the current entry is.
#[derive(Debug)]
struct Dir {
    prev: Vec<u8>,
    entry: Entry,
}

/// Follows a NAR as it streams past; see the module doc.
#[derive(Debug)]
pub struct NarFramer {
    expect: Expect,
    lex: Lex,
    len_buf: [u8; 8],
    token: Vec<u8>,
    dirs: Vec<Dir>,
    total: u64,
}

impl Default for NarFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl NarFramer {
    pub fn new() -> Self {
        NarFramer {
            expect: Expect::Magic,
            lex: Lex::Len { have: 0 },
            len_buf: [0; 8],
            token: Vec::new(),
            dirs: Vec::new(),
            total: 0,
        }
    }

    /// True once the archive's last byte has been fed.
    pub fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// The number of archive bytes fed so far.
    pub fn consumed(&self) -> u64 {
        self.total
    }

    /// Feeds `input` and returns how many of its bytes belong to the archive: all of them, or
    /// fewer if the archive ended inside `input` (then [`is_done`](Self::is_done) is true and
    /// the rest is not the archive's). Once the archive is over it consumes nothing.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, NarError> {
        let mut pos = 0;
        while pos < input.len() && !self.is_done() {
            let rest = &input[pos..];
            match self.lex {
                Lex::Len { have } => {
                    let n = (8 - have).min(rest.len());
                    self.len_buf[have..have + n].copy_from_slice(&rest[..n]);
                    pos += n;
                    self.lex = Lex::Len { have: have + n };
                    if have + n == 8 {
                        self.start_token(u64::from_le_bytes(self.len_buf))?;
                    }
                }
                Lex::Bytes { left, pad } => {
                    let n = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
                    if self.expect != Expect::Contents {
                        self.token.extend_from_slice(&rest[..n]);
                    }
                    pos += n;
                    // n <= left by construction.
                    let left = left - n as u64;
                    self.lex = Lex::Bytes { left, pad };
                    if left == 0 {
                        self.start_padding(pad)?;
                    }
                }
                Lex::Pad { left } => {
                    let n = left.min(rest.len());
                    if rest[..n].iter().any(|&b| b != 0) {
                        return Err(NarError::NonZeroPadding);
                    }
                    pos += n;
                    self.lex = Lex::Pad { left: left - n };
                    if left == n {
                        self.end_token()?;
                    }
                }
            }
        }
        self.total += pos as u64;
        Ok(pos)
    }

    fn start_token(&mut self, len: u64) -> Result<(), NarError> {
        if self.expect != Expect::Contents && len > MAX_TOKEN as u64 {
            return Err(NarError::TokenTooLong(len));
        }
        self.token.clear();
        let pad = ((8 - len % 8) % 8) as usize;
        if len == 0 {
            self.start_padding(pad)
        } else {
            self.lex = Lex::Bytes { left: len, pad };
            Ok(())
        }
    }

    fn start_padding(&mut self, pad: usize) -> Result<(), NarError> {
        if pad == 0 {
            self.end_token()
        } else {
            self.lex = Lex::Pad { left: pad };
            Ok(())
        }
    }

    fn end_token(&mut self) -> Result<(), NarError> {
        self.lex = Lex::Len { have: 0 };
        let token = std::mem::take(&mut self.token);
        let next = self.next_expect(&token);
        self.token = token;
        self.expect = next?;
        Ok(())
    }

    /// What comes after token `t`, read where `self.expect` said.
    fn next_expect(&mut self, t: &[u8]) -> Result<Expect, NarError> {
        Ok(match self.expect {
            Expect::Magic => {
                if t != MAGIC {
                    return Err(NarError::BadMagic);
                }
                Expect::Open
            }
            Expect::Open => {
                literal(t, b"(", "\"(\"")?;
                Expect::Type
            }
            Expect::Type => {
                literal(t, b"type", "\"type\"")?;
                Expect::TypeValue
            }
            Expect::TypeValue => match t {
                b"regular" => Expect::Field(Kind::Regular {
                    executable: false,
                    contents: false,
                }),
                b"symlink" => Expect::Field(Kind::Symlink { target: false }),
                b"directory" => {
                    if self.dirs.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep);
                    }
                    self.dirs.push(Dir {
                        prev: Vec::new(),
                        entry: Entry::Complete,
                    });
                    Expect::Field(Kind::Directory)
                }
                _ => return Err(unexpected("regular, symlink or directory", t)),
            },
            Expect::Field(kind) => match (kind, t) {
                (_, b")") => self.close_node(kind),
                (
                    Kind::Regular {
                        executable: false,
                        contents: false,
                    },
                    b"executable",
                ) => Expect::ExecutableValue,
                (
                    Kind::Regular {
                        contents: false, ..
                    },
                    b"contents",
                ) => Expect::Contents,
                (Kind::Symlink { target: false }, b"target") => Expect::Target,
                (Kind::Directory, b"entry") => Expect::EntryOpen,
                _ => return Err(unexpected("a field of this node, or \")\"", t)),
            },
            Expect::ExecutableValue => {
                literal(t, b"", "an empty string")?;
                Expect::Field(Kind::Regular {
                    executable: true,
                    contents: false,
                })
            }
            Expect::Contents => Expect::Field(Kind::Regular {
                executable: true,
                contents: true,
            }),
            Expect::Target => Expect::Field(Kind::Symlink { target: true }),
            Expect::EntryOpen => {
                literal(t, b"(", "\"(\"")?;
                self.set_entry(Entry::Open);
                Expect::EntryField
            }
            Expect::EntryField => match (self.dirs.last().map(|d| d.entry), t) {
                (Some(Entry::Open), b"name") => Expect::EntryName,
                (Some(Entry::Named), b"node") => Expect::Open,
                (Some(Entry::Complete), b")") => Expect::Field(Kind::Directory),
                _ => return Err(unexpected("\"name\", then \"node\", then \")\"", t)),
            },
            Expect::EntryName => {
                let valid = !t.is_empty()
                    && t != b"."
                    && t != b".."
                    && !t.contains(&b'/')
                    && !t.contains(&0);
                if !valid {
                    return Err(NarError::InvalidName(lossy(t)));
                }
                let Some(dir) = self.dirs.last_mut() else {
                    return Err(unexpected("no entry outside a directory", t));
                };
                if t <= dir.prev.as_slice() {
                    return Err(NarError::Unsorted(lossy(t)));
                }
                dir.prev.clear();
                dir.prev.extend_from_slice(t);
                dir.entry = Entry::Named;
                Expect::EntryField
            }
            Expect::Done => Expect::Done,
        })
    }

    /// After a node's ")": back in the enclosing directory's entry, or the end of the archive.
    fn close_node(&mut self, kind: Kind) -> Expect {
        if kind == Kind::Directory {
            self.dirs.pop();
        }
        if self.dirs.is_empty() {
            Expect::Done
        } else {
            self.set_entry(Entry::Complete);
            Expect::EntryField
        }
    }

    fn set_entry(&mut self, entry: Entry) {
        if let Some(dir) = self.dirs.last_mut() {
            dir.entry = entry;
        }
    }
}

fn literal(t: &[u8], literal: &[u8], expected: &'static str) -> Result<(), NarError> {
    if t == literal {
        Ok(())
    } else {
        Err(unexpected(expected, t))
    }
}

fn unexpected(expected: &'static str, t: &[u8]) -> NarError {
    NarError::Unexpected {
        expected,
        got: lossy(t),
    }
}

/// At most 64 bytes of `t`, for error messages.
fn lossy(t: &[u8]) -> String {
    String::from_utf8_lossy(&t[..t.len().min(64)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nix-store --dump` (Nix 2.8.0) of a directory holding `file.txt`, an executable `run.sh`,
    /// a symlink `link -> sub/deeper/leaf`, `sub/deeper/leaf`, an empty file `sub/empty` and an
    /// empty directory `sub/emptydir`.
    const TREE: &[u8] = include_bytes!("testdata/tree.nar");

    /// Appends `s` as a NAR token: length, bytes, zero padding.
    fn token(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }

    fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for t in tokens {
            token(&mut out, t);
        }
        out
    }

    /// Feeds `input` in pieces of `chunk` bytes; returns the bytes consumed.
    fn feed_in(framer: &mut NarFramer, input: &[u8], chunk: usize) -> Result<usize, NarError> {
        let mut total = 0;
        for piece in input.chunks(chunk) {
            let n = framer.feed(piece)?;
            total += n;
            if n < piece.len() {
                break;
            }
        }
        Ok(total)
    }

    #[test]
    fn the_tree_fixture_ends_exactly_at_its_last_byte() {
        for chunk in (1..=17).chain([64, 1000, TREE.len()]) {
            let mut framer = NarFramer::new();
            let n = feed_in(&mut framer, TREE, chunk).unwrap();
            assert_eq!(n, TREE.len(), "chunk {chunk}");
            assert!(framer.is_done(), "chunk {chunk}");
            assert_eq!(framer.consumed(), TREE.len() as u64);
        }
    }

    #[test]
    fn a_cut_tree_is_not_done_and_not_an_error() {
        for cut in [0, 1, 8, 100, TREE.len() - 8, TREE.len() - 1] {
            let mut framer = NarFramer::new();
            assert_eq!(framer.feed(&TREE[..cut]).unwrap(), cut);
            assert!(!framer.is_done(), "cut at {cut}");
        }
    }

    #[test]
    fn bytes_after_the_end_are_left_alone() {
        let mut input = TREE.to_vec();
        input.extend_from_slice(b"\x01\x00\x00\x00\x00\x00\x00\x00next reply");
        for chunk in [1, 7, 8, 4096] {
            let mut framer = NarFramer::new();
            assert_eq!(feed_in(&mut framer, &input, chunk).unwrap(), TREE.len());
            assert_eq!(framer.feed(b"more").unwrap(), 0);
        }
    }

    #[test]
    fn large_contents_are_counted_not_kept() {
        let size = 3 * 1024 * 1024 + 5;
        let mut input = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
        input.extend_from_slice(&(size as u64).to_le_bytes());
        input.resize(input.len() + size, 0xab);
        input.resize(input.len() + 3, 0);
        token(&mut input, b")");
        let mut framer = NarFramer::new();
        assert_eq!(feed_in(&mut framer, &input, 65536).unwrap(), input.len());
        assert!(framer.is_done());
        assert!(framer.token.capacity() <= MAX_TOKEN);
    }

    #[test]
    fn single_symlink_and_executable_archives() {
        for tokens in [
            &[
                &b"nix-archive-1"[..],
                b"(",
                b"type",
                b"symlink",
                b"target",
                b"/nix/store/x",
                b")",
            ][..],
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"",
                b"contents",
                b"#!/bin/sh\n",
                b")",
            ],
            &[b"nix-archive-1", b"(", b"type", b"directory", b")"],
        ] {
            let input = nar(tokens);
            let mut framer = NarFramer::new();
            assert_eq!(framer.feed(&input).unwrap(), input.len());
            assert!(framer.is_done(), "{tokens:?}");
        }
    }

    fn error_of(tokens: &[&[u8]]) -> NarError {
        let input = nar(tokens);
        NarFramer::new()
            .feed(&input)
            .expect_err("should be rejected")
    }

    #[test]
    fn malformed_archives_are_errors() {
        let dir: &[&[u8]] = &[b"nix-archive-1", b"(", b"type", b"directory"];
        let entry = |name: &'static [u8]| -> Vec<&'static [u8]> {
            vec![
                b"entry", b"(", b"name", name, b"node", b"(", b"type", b"symlink", b"target", b"t",
                b")", b")",
            ]
        };
        assert_eq!(error_of(&[b"nix-archive-2"]), NarError::BadMagic);
        assert!(matches!(
            error_of(&[b"nix-archive-1", b"(", b"type", b"fifo"]),
            NarError::Unexpected { .. }
        ));
        assert!(matches!(
            error_of(&[b"nix-archive-1", b"(", b"type", b"symlink", b"contents"]),
            NarError::Unexpected { .. }
        ));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            let mut t = dir.to_vec();
            t.extend(entry(bad));
            assert!(matches!(error_of(&t), NarError::InvalidName(_)), "{bad:?}");
        }
        let mut unsorted = dir.to_vec();
        unsorted.extend(entry(b"b"));
        unsorted.extend(entry(b"a"));
        assert!(matches!(error_of(&unsorted), NarError::Unsorted(_)));
        let mut twice = dir.to_vec();
        twice.extend(entry(b"a"));
        twice.extend(entry(b"a"));
        assert!(matches!(error_of(&twice), NarError::Unsorted(_)));
        let mut no_node = dir.to_vec();
        no_node.extend([&b"entry"[..], b"(", b"name", b"a", b")"]);
        assert!(matches!(error_of(&no_node), NarError::Unexpected { .. }));

        let mut long = nar(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
        long.extend_from_slice(&(MAX_TOKEN as u64 + 1).to_le_bytes());
        assert_eq!(
            NarFramer::new().feed(&long),
            Err(NarError::TokenTooLong(MAX_TOKEN as u64 + 1))
        );
        let mut padding = nar(&[b"nix-archive-1"]);
        padding[22] = 1;
        assert_eq!(
            NarFramer::new().feed(&padding),
            Err(NarError::NonZeroPadding)
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut t: Vec<&[u8]> = vec![b"nix-archive-1"];
        for _ in 0..=MAX_DEPTH {
            t.extend([
                &b"("[..],
                b"type",
                b"directory",
                b"entry",
                b"(",
                b"name",
                b"d",
                b"node",
            ]);
        }
        assert_eq!(error_of(&t), NarError::TooDeep);
    }

    #[test]
    fn corrupted_or_random_input_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut input = TREE.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % input.len() as u64) as usize;
                input[at] = next() as u8;
            }
            let mut framer = NarFramer::new();
            let _ = feed_in(&mut framer, &input, 1 + (next() % 64) as usize);
        }
        for _ in 0..200 {
            let random: Vec<u8> = (0..256).map(|_| next() as u8).collect();
            let _ = NarFramer::new().feed(&random);
        }
    }
}
