//! Where the stream reader takes its bytes from: a slice already in memory, or a reader
//! (the pipe QEMU hands over) through one reusable buffer.
//!
//! # Theory of operation
//!
//! The reader ([`super::reader`]) asks for the stream piece by piece — a header, a record
//! header, a record body — and is done with each piece before it asks for the next, so a
//! [`Source`] only ever holds the piece being looked at. From memory that is a sub-slice
//! (no copy). From a reader it is a window of a buffer that is reused for the whole
//! stream: it stays in the CPU cache and its pages stay mapped, which matters because a
//! pipe copies into the reader's memory with the pipe locked — reading a 40 MB stream
//! into fresh memory makes every page fault stall the writer on the other side too.
//!
//! The buffer starts at [`BUFFER_BYTES`] and grows (doubling, with the bytes that have
//! actually arrived) only for a record larger than that, so memory follows what the peer
//! sent, never what a length field claims. A reader is never read past the stream limit
//! plus one byte: one byte too many is enough to know the stream is too large.

use std::io::{self, Read};

use super::{Limits, StreamError};

/// Initial (and usual) size of the read buffer: larger than a pipe's default capacity
/// (64 KiB) so that one `read` takes all the pipe holds, small enough to stay in cache.
pub(super) const BUFFER_BYTES: usize = 256 << 10;

/// The bytes of one stream, consumed front to back.
pub(super) trait Source {
    /// The next `n` bytes of the stream; fewer only if the stream ends first, and then
    /// all that remain. The bytes are consumed.
    fn take(&mut self, n: usize) -> Result<&[u8], StreamError>;

    /// Consume the rest of the stream and say how long it was.
    fn rest_len(&mut self) -> Result<u64, StreamError>;
}

/// A stream already in memory (whose length the caller checked against the limit).
pub(super) struct SliceSource<'a> {
    bytes: &'a [u8],
}

impl<'a> SliceSource<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        SliceSource { bytes }
    }
}

impl Source for SliceSource<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StreamError> {
        let (piece, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        Ok(piece)
    }

    fn rest_len(&mut self) -> Result<u64, StreamError> {
        let len = self.bytes.len() as u64;
        self.bytes = &[];
        Ok(len)
    }
}

/// A stream read from `input` through one reusable buffer.
pub(super) struct ReadSource<R: Read> {
    input: R,
    /// `buf[start..end]` holds bytes read and not yet taken.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes read from `input` so far, and the most it may deliver (the stream limit).
    read: u64,
    limit: u64,
    eof: bool,
}

impl<R: Read> ReadSource<R> {
    pub(super) fn new(input: R, limits: &Limits) -> Self {
        ReadSource {
            input,
            buf: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            read: 0,
            limit: limits.max_stream_bytes,
            eof: false,
        }
    }

    /// Read once into the free end of the buffer (as much as the input has ready).
    /// Returns false at the end of the input.
    fn read_some(&mut self) -> Result<bool, StreamError> {
        if self.eof {
            return Ok(false);
        }
        // One byte past the limit is all it takes to know the stream is too long.
        let allowed = self.limit.saturating_add(1) - self.read;
        let room = (self.buf.len() - self.end).min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let got = loop {
            match self.input.read(&mut self.buf[self.end..self.end + room]) {
                Ok(got) => break got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if got == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.end += got;
        self.read += got as u64;
        if self.read > self.limit {
            return Err(StreamError::StreamTooLarge { limit: self.limit });
        }
        Ok(true)
    }

    /// Make room for `n` bytes from `start`: move what is left to the front, and grow the
    /// buffer if `n` is more than it holds (never past what has arrived plus one doubling).
    fn make_room(&mut self, n: usize) {
        if self.start > 0 && self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() && self.buf.len() < n {
            let grown = self.buf.len().saturating_mul(2).min(n);
            self.buf.resize(grown, 0);
        }
    }
}

impl<R: Read> Source for ReadSource<R> {
    fn take(&mut self, n: usize) -> Result<&[u8], StreamError> {
        while self.end - self.start < n {
            self.make_room(n);
            if !self.read_some()? {
                break;
            }
        }
        let at = self.start;
        self.start += n.min(self.end - at);
        Ok(&self.buf[at..self.start])
    }

    fn rest_len(&mut self) -> Result<u64, StreamError> {
        let mut len = (self.end - self.start) as u64;
        self.start = 0;
        self.end = 0;
        while self.read_some()? {
            len += self.end as u64;
            self.end = 0;
        }
        Ok(len)
    }
}
