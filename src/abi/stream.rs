//! Inspecting a module as it arrives, without holding all of it: what `wasmfilter pull` does
//! while the module downloads, so a large module needs no buffer of its own size.
//!
//! The bytes go to wasmparser's incremental parser, which needs each section whole except the
//! code section (read one function at a time). Custom sections, which validation never reads
//! (names, DWARF, producers, padding), reach the parser with their name only: their contents
//! are counted and dropped. Error offsets are translated back to the module's own, so
//! [`Inspector::finish`] answers what [`super::inspect`] answers for the same bytes (one
//! exception: where a function body runs past its section, the parser's "unexpected
//! end-of-file" points at the body's start or past its size depending on how many bytes follow
//! the section, so that offset may differ).

use wasmparser::{BinaryReaderError, Chunk, FuncValidatorAllocations, Parser, Payload};

use super::{Gather, ModuleError, ModuleInfo, WASM_MAGIC};

/// Where the incoming bytes are in the module's section structure.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// This many bytes still go to the parser (the preamble, a section it reads).
    Forward(u64),
    /// At a section's start, or in a custom section's name: collecting them in `head`.
    Header,
    /// This many bytes of a custom section's contents are still to be dropped.
    Skip(u64),
}

/// Validates and inspects a module fed in pieces ([`Inspector::feed`]), holding at most one
/// section (or one function body) of it at a time, and no custom section's contents.
pub struct Inspector {
    gather: Gather,
    parser: Parser,
    /// Bytes for the parser, from `start` on not yet parsed.
    pending: Vec<u8>,
    start: usize,
    frame: Frame,
    /// A section header being collected (id, size and, for a custom section, its name).
    head: Vec<u8>,
    /// The module's first four bytes.
    magic: Vec<u8>,
    /// Bytes received.
    seen: u64,
    /// Bytes handed to the parser.
    forwarded: u64,
    /// For each dropped custom section's contents: where they were in the parser's stream,
    /// and how many bytes were dropped up to there, for translating error offsets.
    skips: Vec<(u64, u64)>,
    /// The custom section being dropped: its header and name (its size now the name's), where
    /// its contents begin in the module, and their length.
    held: Vec<u8>,
    skip_body_start: u64,
    skip_len: u64,
    allocs: Option<FuncValidatorAllocations>,
    /// The first structural error: parsing stops there.
    error: Option<ModuleError>,
    /// The first function body that failed validation: reported only if the structure is
    /// valid (as [`super::inspect`], which validates the bodies after the structure, does).
    body_error: Option<ModuleError>,
    done: bool,
}

impl Default for Inspector {
    fn default() -> Self {
        Inspector {
            gather: Gather::default(),
            parser: Parser::new(0),
            pending: Vec::new(),
            start: 0,
            // The preamble: magic and version.
            frame: Frame::Forward(8),
            head: Vec::new(),
            magic: Vec::with_capacity(4),
            seen: 0,
            forwarded: 0,
            skips: Vec::new(),
            held: Vec::new(),
            skip_body_start: 0,
            skip_len: 0,
            allocs: None,
            error: None,
            body_error: None,
            done: false,
        }
    }
}

impl Inspector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the module's next bytes.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        self.seen += chunk.len() as u64;
        if self.magic.len() < WASM_MAGIC.len() {
            let take = (WASM_MAGIC.len() - self.magic.len()).min(chunk.len());
            self.magic.extend_from_slice(&chunk[..take]);
        }
        if self.error.is_some() || !WASM_MAGIC.starts_with(&self.magic) {
            return;
        }
        while let Some((&first, rest)) = chunk.split_first() {
            match self.frame {
                Frame::Forward(n) => {
                    let k = n.min(chunk.len() as u64);
                    let (now, later) = chunk.split_at(k as usize);
                    self.forward(now);
                    chunk = later;
                    self.frame = if k == n {
                        Frame::Header
                    } else {
                        Frame::Forward(n - k)
                    };
                }
                Frame::Skip(n) => {
                    let k = n.min(chunk.len() as u64);
                    chunk = &chunk[k as usize..];
                    self.frame = if k == n {
                        self.skipped(self.skip_len);
                        Frame::Header
                    } else {
                        Frame::Skip(n - k)
                    };
                }
                Frame::Header => {
                    self.head.push(first);
                    chunk = rest;
                    self.frame = self.read_head();
                }
            }
        }
        self.drive(false);
    }

    /// The module is complete: what [`super::inspect`] says of all the bytes fed.
    pub fn finish(mut self) -> Result<ModuleInfo, ModuleError> {
        if self.magic.as_slice() != WASM_MAGIC {
            return Err(ModuleError::NotWasm {
                size: usize::try_from(self.seen).unwrap_or(usize::MAX),
            });
        }
        match self.frame {
            // A custom section longer than the module: the parser would stop at its contents.
            Frame::Skip(_) if self.error.is_none() => {
                self.error = Some(ModuleError::Invalid(format!(
                    "unexpected end-of-file (at offset {:#x})",
                    self.skip_body_start
                )));
            }
            Frame::Header if self.error.is_none() => {
                let head = std::mem::take(&mut self.head);
                self.forward(&head);
            }
            _ => {}
        }
        self.drive(true);
        if let Some(e) = self.error.or(self.body_error) {
            return Err(e);
        }
        if !self.done {
            return Err(ModuleError::Invalid(format!(
                "unexpected end-of-file (at offset {:#x})",
                self.seen
            )));
        }
        Ok(self.gather.finish())
    }

    fn forward(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        self.forwarded += bytes.len() as u64;
    }

    /// Looks at the section header collected so far: what comes next.
    fn read_head(&mut self) -> Frame {
        let (len, header) = match leb_u32(&self.head[1..]) {
            Leb::More => return Frame::Header,
            // Not a size the parser can read: it reports it from here on.
            Leb::Malformed => return self.forward_head(u64::MAX),
            Leb::Value(len, width) => (u64::from(len), 1 + width),
        };
        if self.head[0] != 0 {
            return self.forward_head(len);
        }
        // A custom section: its name (a size, then UTF-8), then the contents dropped here.
        let body = self.head.len() - header;
        let body_len = body as u64;
        let name_end = match leb_u32(&self.head[header..]) {
            Leb::More if body_len < len => return Frame::Header,
            Leb::Value(n, width) => width as u64 + u64::from(n),
            // A section too short for its name, or a name size the parser cannot read: it
            // reports that from the section as it is.
            Leb::More | Leb::Malformed => return self.forward_head(len - body_len),
        };
        if name_end > len {
            return self.forward_head(len - body_len);
        }
        if body_len < name_end {
            return Frame::Header;
        }
        let dropped = len - name_end;
        if dropped == 0 {
            return self.forward_head(0);
        }
        // The section now ends with its name: its size says so, in the same width, so every
        // offset before the dropped contents stays what it is in the module.
        let width = header - 1;
        for (i, byte) in self.head[1..header].iter_mut().enumerate() {
            let group = ((name_end >> (7 * i)) & 0x7f) as u8;
            *byte = if i + 1 < width { group | 0x80 } else { group };
        }
        // Held back until the contents are past: a section that runs past the module's end
        // is an error at its contents whatever its name.
        self.skip_body_start = self.module_offset() - body_len;
        self.held = std::mem::take(&mut self.head);
        self.skip_len = dropped;
        Frame::Skip(dropped)
    }

    /// A custom section's contents are past: the parser reads the section with its name.
    fn skipped(&mut self, dropped: u64) {
        let head = std::mem::take(&mut self.held);
        self.forward(&head);
        let before = self.skips.last().map_or(0, |&(_, d)| d);
        self.skips.push((self.forwarded, before + dropped));
    }

    /// The module offset just past the header byte last collected.
    fn module_offset(&self) -> u64 {
        let dropped = self.skips.last().map_or(0, |&(_, d)| d);
        self.forwarded + dropped + self.head.len() as u64
    }

    /// Hands the collected header to the parser, followed by `then` more bytes of it.
    fn forward_head(&mut self, then: u64) -> Frame {
        let head = std::mem::take(&mut self.head);
        self.forward(&head);
        if then == 0 {
            Frame::Header
        } else {
            Frame::Forward(then)
        }
    }

    /// Parses what the parser has, as far as it goes.
    fn drive(&mut self, eof: bool) {
        if self.error.is_some() || self.done {
            return;
        }
        let skips = &self.skips;
        let translate = |e: BinaryReaderError| {
            let offset = e.offset() as u64;
            let dropped = skips
                .iter()
                .take_while(|&&(at, _)| at <= offset)
                .last()
                .map_or(0, |&(_, d)| d);
            ModuleError::Invalid(format!(
                "{} (at offset {:#x})",
                e.message(),
                offset + dropped
            ))
        };
        loop {
            let data = &self.pending[self.start..];
            let (consumed, payload) = match self.parser.parse(data, eof) {
                Ok(Chunk::NeedMoreData(_)) => break,
                Ok(Chunk::Parsed { consumed, payload }) => (consumed, payload),
                Err(e) => {
                    self.error = Some(translate(e));
                    return;
                }
            };
            let end = matches!(payload, Payload::End(_));
            match self.gather.payload(&payload) {
                Ok(Some((func, body))) if self.body_error.is_none() => {
                    let mut v = func.into_validator(self.allocs.take().unwrap_or_default());
                    if let Err(e) = v.validate(&body) {
                        self.body_error = Some(translate(e));
                    }
                    self.allocs = Some(v.into_allocations());
                }
                Ok(_) => {}
                Err(e) => {
                    self.error = Some(e.into_module_error(translate));
                    return;
                }
            }
            self.start += consumed;
            if end {
                self.done = true;
                break;
            }
        }
        // Parsed bytes go once they are half the buffer: each byte is moved at most once more.
        if self.start * 2 >= self.pending.len() {
            self.pending.drain(..self.start);
            self.start = 0;
        }
    }
}

/// An unsigned LEB128 `u32` at the front of some bytes.
enum Leb {
    /// Its bytes have not all arrived.
    More,
    /// Over five bytes, or over `u32::MAX`.
    Malformed,
    /// The value, and how many bytes it took.
    Value(u32, usize),
}

fn leb_u32(bytes: &[u8]) -> Leb {
    let mut value = 0u64;
    for (i, b) in bytes.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value).map_or(Leb::Malformed, |v| Leb::Value(v, i + 1));
        }
    }
    if bytes.len() >= 5 {
        Leb::Malformed
    } else {
        Leb::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(bytes: &[u8], piece: usize) -> Result<ModuleInfo, ModuleError> {
        let mut inspector = Inspector::new();
        for chunk in bytes.chunks(piece.max(1)) {
            inspector.feed(chunk);
        }
        inspector.finish()
    }

    /// A custom section with `name` and `size` bytes of contents.
    fn custom(name: &str, size: usize) -> Vec<u8> {
        let mut body = Vec::new();
        leb(&mut body, name.len() as u64);
        body.extend_from_slice(name.as_bytes());
        body.resize(body.len() + size, 0xa5);
        let mut section = vec![0];
        leb(&mut section, body.len() as u64);
        section.extend(body);
        section
    }

    fn leb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A proxy-wasm-shaped module with custom sections before, between and after its others.
    fn module() -> Vec<u8> {
        let m = wat::parse_str(
            r#"(module
                 (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (data (i32.const 8) "hello")
                 (func (export "proxy_abi_version_0_2_1"))
                 (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                   (drop (call $log (i32.const 1) (i32.const 8) (i32.const 5)))
                   (i32.const 0))
                 (func (export "two") (param i64) (result i32 f64) i32.const 0 f64.const 0))"#,
        )
        .unwrap();
        // After the preamble, after the first section, and at the end.
        let first_section_end = 8 + 2 + m[9] as usize;
        let mut out = m[..8].to_vec();
        out.extend(custom("before", 300));
        out.extend_from_slice(&m[8..first_section_end]);
        out.extend(custom("", 2));
        out.extend(custom("name", 0));
        out.extend_from_slice(&m[first_section_end..]);
        out.extend(custom("padding", 20_000));
        out
    }

    #[test]
    fn answers_what_inspect_answers_for_a_whole_module_in_any_pieces() {
        let m = module();
        let whole = super::super::inspect(&m).unwrap();
        assert_eq!(whole.abi_version(), Some("0.2.1"));
        for piece in [1, 2, 3, 7, 64, 1000, m.len()] {
            assert_eq!(streamed(&m, piece), Ok(whole.clone()), "pieces of {piece}");
        }
    }

    #[test]
    fn answers_what_inspect_answers_for_every_truncation_and_corruption() {
        let m = module();
        let mut cases = Vec::new();
        for end in 0..m.len() {
            // Every prefix of the module's head and tail, a sample of the padding.
            if end < 400 || end + 400 > m.len() || end % 997 == 0 {
                cases.push(m[..end].to_vec());
            }
        }
        for at in (0..m.len()).filter(|&i| i < 600 || i + 50 > m.len()) {
            for byte in [0x00, 0xff, m[at] ^ 0x80, m[at].wrapping_add(1)] {
                let mut bad = m.clone();
                bad[at] = byte;
                cases.push(bad);
            }
        }
        // A custom section whose size runs past the module's end.
        let mut long = m[..8].to_vec();
        long.extend(custom("padding", 5000));
        long.truncate(3000);
        assert_eq!(
            streamed(&long, 7),
            Err(ModuleError::Invalid(
                "unexpected end-of-file (at offset 0xb)".into()
            ))
        );
        assert_eq!(streamed(&long, 7), super::super::inspect(&long));
        cases.push(long);
        // Where a function body's size runs past its section, the parser's offset depends on
        // how many bytes follow the section (the whole module: the body's start; fewer: past
        // its size), so for that one message only the message is compared.
        let comparable = |r: Result<ModuleInfo, ModuleError>| match r {
            Err(ModuleError::Invalid(m)) if m.starts_with("unexpected end-of-file (at offset") => {
                Err(ModuleError::Invalid("unexpected end-of-file".into()))
            }
            other => other,
        };
        for (n, case) in cases.iter().enumerate() {
            let expected = comparable(super::super::inspect(case));
            for piece in [1, 5, 4096] {
                assert_eq!(
                    comparable(streamed(case, piece)),
                    expected,
                    "case {n} ({} bytes, first difference at {:?}) in pieces of {piece}",
                    case.len(),
                    case.iter().zip(&m).position(|(a, b)| a != b)
                );
            }
        }
    }

    #[test]
    fn holds_no_custom_section_contents() {
        let mut m = wat::parse_str("(module)").unwrap();
        m.extend(custom("padding", 1 << 20));
        let mut inspector = Inspector::new();
        let mut most = 0;
        for chunk in m.chunks(16 * 1024) {
            inspector.feed(chunk);
            most = most.max(inspector.pending.capacity());
        }
        assert!(inspector.finish().is_ok());
        assert!(most < 1024, "held {most} bytes");
    }
}
