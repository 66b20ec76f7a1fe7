//! Bounded reading of whole lines from a byte stream.
//!
//! Reads into a fixed buffer and hands out chunks that end at a newline, keeping a partial
//! last line for the next read (a line being written is never split). A line longer than
//! the buffer is dropped, with its remainder skipped up to the next newline: memory stays
//! bounded whatever the input. Offsets count every byte, dropped ones included, so a
//! checkpoint always points at the start of a line.

use std::io::{self, Read};

/// The smallest buffer; large reads keep the search fast.
const MIN_BUFFER: usize = 1 << 20;

pub struct ChunkReader {
    buf: Vec<u8>,
    filled: usize,
    /// Bytes at the front already handed out; moved away at the next read.
    consumed: usize,
    /// Dropping the rest of an over-long line.
    skipping: bool,
    /// Stream offset of the end of what has been handed out or dropped.
    offset: u64,
    /// Lines longer than the buffer that were dropped.
    pub dropped_long_lines: u64,
}

/// What one `read_chunk` produced.
pub enum Chunk<'a> {
    /// Whole lines, each ending with `\n`, and the stream offset after them.
    Lines(&'a [u8], u64),
    /// Read something, but no whole line yet (or skipped bytes of a long line).
    Partial,
    /// End of the stream for now.
    Eof,
}

impl ChunkReader {
    /// `max_line`: the longest line kept; the buffer is at least twice that.
    pub fn new(max_line: usize, offset: u64) -> ChunkReader {
        ChunkReader {
            buf: vec![0; MIN_BUFFER.max(max_line.saturating_mul(2))],
            filled: 0,
            consumed: 0,
            skipping: false,
            offset,
            dropped_long_lines: 0,
        }
    }

    /// Offset after the last whole line handed out (where a restart resumes).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes read but not yet handed out (a partial line).
    pub fn pending(&self) -> usize {
        self.filled - self.consumed
    }

    /// At the end of a finished stream (a saved log): the last line, if it has no newline.
    pub fn take_last_line(&mut self) -> Option<&[u8]> {
        if self.skipping || self.pending() == 0 {
            return None;
        }
        let line = &self.buf[self.consumed..self.filled];
        self.offset += line.len() as u64;
        self.consumed = self.filled;
        Some(line)
    }

    /// Forgets buffered bytes and restarts at `offset` (after truncation).
    pub fn reset(&mut self, offset: u64) {
        self.filled = 0;
        self.consumed = 0;
        self.skipping = false;
        self.offset = offset;
    }

    /// Reads once from `r` and returns the whole lines now available.
    pub fn read_chunk<R: Read>(&mut self, r: &mut R) -> io::Result<Chunk<'_>> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        let n = loop {
            match r.read(&mut self.buf[self.filled..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(Chunk::Eof);
        }
        let old = self.filled;
        self.filled += n;
        let mut begin = 0;
        if self.skipping {
            match memchr::memchr(b'\n', &self.buf[old..self.filled]) {
                Some(i) => {
                    begin = old + i + 1;
                    self.skipping = false;
                    self.offset += begin as u64;
                }
                None => {
                    self.offset += self.filled as u64;
                    self.filled = 0;
                    return Ok(Chunk::Partial);
                }
            }
        }
        // Only the new bytes can hold the newline that completes a line.
        match memchr::memrchr(b'\n', &self.buf[old.max(begin)..self.filled]) {
            Some(i) => {
                let end = old.max(begin) + i + 1;
                self.offset += (end - begin) as u64;
                self.consumed = end;
                Ok(Chunk::Lines(&self.buf[begin..end], self.offset))
            }
            None => {
                if begin > 0 {
                    self.consumed = begin;
                } else if self.filled == self.buf.len() {
                    // A line longer than the buffer: drop it and skip to its end.
                    self.offset += self.filled as u64;
                    self.filled = 0;
                    self.skipping = true;
                    self.dropped_long_lines += 1;
                }
                Ok(Chunk::Partial)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` one read at a time; returns the chunks and final offset.
    fn run(max_line: usize, parts: &[&[u8]]) -> (Vec<String>, u64, u64) {
        struct Parts<'a>(Vec<&'a [u8]>);
        impl Read for Parts<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let p = self.0[0];
                let n = p.len().min(out.len());
                out[..n].copy_from_slice(&p[..n]);
                if n == p.len() {
                    self.0.remove(0);
                } else {
                    self.0[0] = &p[n..];
                }
                Ok(n)
            }
        }
        let mut src = Parts(parts.to_vec());
        let mut r = ChunkReader::new(max_line, 0);
        let mut out = Vec::new();
        loop {
            match r.read_chunk(&mut src).unwrap() {
                Chunk::Lines(b, _) => out.push(String::from_utf8_lossy(b).into_owned()),
                Chunk::Partial => {}
                Chunk::Eof => break,
            }
        }
        (out, r.offset(), r.dropped_long_lines)
    }

    #[test]
    fn partial_lines_wait_for_newline() {
        let (out, off, _) = run(256, &[b"ab", b"c\nde", b"f\n", b"tail"]);
        assert_eq!(out, vec!["abc\n", "def\n"]);
        assert_eq!(off, 8);
    }

    #[test]
    fn overlong_line_is_dropped_and_memory_bounded() {
        let big = vec![b'x'; 5 * MIN_BUFFER];
        let (out, off, dropped) = run(256, &[b"a\n", &big, b"yy\nb\n"]);
        assert_eq!(out.first().map(String::as_str), Some("a\n"));
        assert_eq!(out.last().map(String::as_str), Some("b\n"));
        assert!(out.iter().all(|c| c.len() < 16));
        assert_eq!(dropped, 1);
        assert_eq!(off, (2 + big.len() + 5) as u64);
    }
}
