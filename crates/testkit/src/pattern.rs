//! A deterministic, verifiable byte stream for end-to-end data checks.
//!
//! Byte `i` of the stream with seed `s` is a pure function of `(s, i)`: stream offset
//! `i` lies in 8-byte block `i / 8`, the block's 64-bit word is a strong mix of the block
//! number and the seed, and the byte is lane `i % 8` of that word. So any slice of the
//! stream can be produced or checked on its own, given only its offset, and
//!
//! * a missing, duplicated or reordered byte shifts the data against the offsets it is
//!   checked at, and [`Pattern::verify`] reports the first offset that differs (with
//!   probability 255/256 per shifted byte, so within a few bytes of the fault);
//! * two seeds give unrelated streams, so data crossing from one connection into
//!   another is caught too.
//!
//! [`Writer`] and [`Reader`] keep the stream offset for one direction of a connection:
//! the writer sends the next bytes, the reader checks whatever arrives against the
//! offsets it expects. Both work with non-blocking sockets (they stop at `WouldBlock`)
//! and have deadline-bounded `*_until` forms.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// The stream for one seed. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// The seed already mixed, so that nearby seeds give unrelated streams.
    key: u64,
}

/// The first byte that differs from the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Stream offset of the byte.
    pub offset: u64,
    pub expected: u8,
    pub got: u8,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pattern mismatch at stream offset {}: expected {:#04x}, got {:#04x}",
            self.offset, self.expected, self.got
        )
    }
}

impl std::error::Error for Mismatch {}

/// The splitmix64 finaliser: a cheap bijective mix with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern {
            key: mix(seed ^ 0x5851_f42d_4c95_7f2d),
        }
    }

    fn word(&self, block: u64) -> u64 {
        mix(block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.key)
    }

    /// The byte at stream offset `offset`.
    pub fn byte_at(&self, offset: u64) -> u8 {
        (self.word(offset >> 3) >> ((offset & 7) * 8)) as u8
    }

    /// Write the stream bytes for offsets `[offset, offset + buf.len())` into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut word = self.word(offset >> 3);
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = offset.wrapping_add(i as u64);
            if i > 0 && at & 7 == 0 {
                word = self.word(at >> 3);
            }
            *byte = (word >> ((at & 7) * 8)) as u8;
        }
    }

    /// The stream bytes for offsets `[offset, offset + len)`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(offset, &mut buf);
        buf
    }

    /// Check that `buf` holds the stream bytes for offsets `[offset, offset + buf.len())`;
    /// report the first byte that does not.
    pub fn verify(&self, offset: u64, buf: &[u8]) -> Result<(), Mismatch> {
        let mut word = self.word(offset >> 3);
        for (i, &got) in buf.iter().enumerate() {
            let at = offset.wrapping_add(i as u64);
            if i > 0 && at & 7 == 0 {
                word = self.word(at >> 3);
            }
            let expected = (word >> ((at & 7) * 8)) as u8;
            if got != expected {
                return Err(Mismatch {
                    offset: at,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// Size of the scratch buffer [`Writer`] and [`Reader`] move data through.
const CHUNK: usize = 64 * 1024;
/// How long the `*_until` loops sleep when a call made no progress.
const IDLE_SLEEP: Duration = Duration::from_millis(1);

fn would_block(err: &io::Error) -> bool {
    // A blocking socket with SO_SNDTIMEO/SO_RCVTIMEO reports EAGAIN as WouldBlock too.
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Sends a [`Pattern`] stream, remembering how far it got.
#[derive(Debug)]
pub struct Writer {
    pattern: Pattern,
    offset: u64,
    scratch: Vec<u8>,
}

impl Writer {
    /// A writer at stream offset 0.
    pub fn new(pattern: Pattern) -> Self {
        Writer {
            pattern,
            offset: 0,
            scratch: vec![0; CHUNK],
        }
    }

    /// Stream offset of the next byte to write (= bytes written so far).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Write the next bytes of the stream to `dst`, as many as it takes, up to `max`.
    /// Stops early, without error, when `dst` would block. Returns how many were written.
    pub fn write_available(&mut self, dst: &mut impl Write, max: u64) -> io::Result<u64> {
        let mut written = 0;
        while written < max {
            let len = (max - written).min(CHUNK as u64) as usize;
            let chunk = &mut self.scratch[..len];
            self.pattern.fill(self.offset, chunk);
            match dst.write(chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("writer accepted 0 bytes at stream offset {}", self.offset),
                    ))
                }
                Ok(n) => {
                    self.offset += n as u64;
                    written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Write until the stream offset reaches `end`, retrying while `dst` would block;
    /// fail with `TimedOut` if that takes longer than `timeout`.
    pub fn write_until(
        &mut self,
        dst: &mut impl Write,
        end: u64,
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.offset < end {
            if self.write_available(dst, end - self.offset)? == 0 {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "pattern writer stuck at stream offset {} of {end} after {timeout:?}",
                            self.offset
                        ),
                    ));
                }
                std::thread::sleep(IDLE_SLEEP);
            }
        }
        Ok(())
    }
}

/// Receives a [`Pattern`] stream and verifies every byte against its offset.
#[derive(Debug)]
pub struct Reader {
    pattern: Pattern,
    offset: u64,
    eof: bool,
    scratch: Vec<u8>,
}

impl Reader {
    /// A reader expecting stream offset 0 next.
    pub fn new(pattern: Pattern) -> Self {
        Reader {
            pattern,
            offset: 0,
            eof: false,
            scratch: vec![0; CHUNK],
        }
    }

    /// Stream offset of the next byte expected (= bytes read and verified so far).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether `src` reported end of stream.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Read and verify whatever `src` has, up to `max` bytes, stopping without error at
    /// `WouldBlock` or end of stream. Returns how many bytes were read. Bytes that do not
    /// match give an `InvalidData` error whose inner error is the [`Mismatch`].
    pub fn read_available(&mut self, src: &mut impl Read, max: u64) -> io::Result<u64> {
        let mut read = 0;
        while read < max && !self.eof {
            let len = (max - read).min(CHUNK as u64) as usize;
            match src.read(&mut self.scratch[..len]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.pattern
                        .verify(self.offset, &self.scratch[..n])
                        .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
                    self.offset += n as u64;
                    read += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(read)
    }

    /// Read and verify until the stream offset reaches `end`. Fails with `UnexpectedEof`
    /// if the stream ends first and `TimedOut` after `timeout`. Never reads past `end`.
    /// `src` must be non-blocking or have a read timeout, or a silent peer blocks forever.
    pub fn read_until(
        &mut self,
        src: &mut impl Read,
        end: u64,
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.offset < end {
            if self.read_available(src, end - self.offset)? == 0 {
                if self.eof {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("stream ended at offset {}, expected {end}", self.offset),
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "pattern reader stuck at stream offset {} of {end} after {timeout:?}",
                            self.offset
                        ),
                    ));
                }
                std::thread::sleep(IDLE_SLEEP);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 1024;

    #[test]
    fn fill_matches_byte_at_at_any_alignment() {
        let p = Pattern::new(7);
        for start in 0..17u64 {
            let buf = p.bytes(start, 40);
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, p.byte_at(start + i as u64), "start {start} index {i}");
            }
            assert_eq!(p.verify(start, &buf), Ok(()));
        }
    }

    #[test]
    fn slices_verify_at_their_own_offset_only() {
        let p = Pattern::new(1);
        let buf = p.bytes(1000, 64);
        assert_eq!(p.verify(1000, &buf), Ok(()));
        assert!(p.verify(999, &buf).is_err());
        assert!(p.verify(1001, &buf).is_err());
        assert!(
            p.verify(1008, &buf).is_err(),
            "a whole-block shift must be caught"
        );
    }

    #[test]
    fn different_seeds_give_different_streams() {
        let a = Pattern::new(1).bytes(0, LEN);
        for seed in [0, 2, 3, u64::MAX] {
            let b = Pattern::new(seed).bytes(0, LEN);
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            assert!(
                same < LEN / 32,
                "seed {seed}: {same} of {LEN} bytes equal seed 1's"
            );
        }
    }

    #[test]
    fn detects_a_missing_byte() {
        let p = Pattern::new(42);
        let good = p.bytes(0, LEN);
        for gap in 0..LEN - 1 {
            let mut bad = good.clone();
            bad.remove(gap);
            let m = p.verify(0, &bad).expect_err("missing byte not detected");
            assert!(
                m.offset >= gap as u64,
                "reported {} before the gap {gap}",
                m.offset
            );
            assert_eq!(m.got, bad[m.offset as usize]);
            assert_eq!(m.expected, p.byte_at(m.offset));
        }
    }

    #[test]
    fn detects_a_duplicated_byte() {
        let p = Pattern::new(43);
        let good = p.bytes(0, LEN);
        for at in 0..LEN - 1 {
            let mut bad = good.clone();
            bad.insert(at + 1, good[at]);
            bad.truncate(LEN);
            let m = p.verify(0, &bad).expect_err("duplicated byte not detected");
            assert!(m.offset > at as u64);
        }
    }

    #[test]
    fn detects_a_swap_of_different_bytes() {
        let p = Pattern::new(44);
        let good = p.bytes(0, LEN);
        let mut swaps_checked = 0;
        for at in 0..LEN - 1 {
            if good[at] == good[at + 1] {
                continue; // swapping equal bytes changes nothing
            }
            let mut bad = good.clone();
            bad.swap(at, at + 1);
            let m = p.verify(0, &bad).expect_err("swap not detected");
            assert_eq!(m.offset, at as u64);
            swaps_checked += 1;
        }
        assert!(swaps_checked > LEN * 9 / 10);
    }

    #[test]
    fn writer_and_reader_round_trip_in_odd_chunks() {
        let p = Pattern::new(9);
        let mut w = Writer::new(p);
        let mut wire = Vec::new();
        for step in [1u64, 7, 100_000, 3] {
            assert_eq!(
                w.write_available(&mut wire, step).expect("write to a Vec"),
                step
            );
        }
        assert_eq!(w.offset(), wire.len() as u64);

        let mut r = Reader::new(p);
        let mut src = io::Cursor::new(&wire);
        r.read_until(&mut src, 50, Duration::from_secs(1))
            .expect("first 50");
        assert_eq!(r.offset(), 50);
        r.read_available(&mut src, u64::MAX).expect("the rest");
        assert_eq!(r.offset(), wire.len() as u64);
        assert!(r.eof());
    }

    #[test]
    fn reader_reports_corruption_as_invalid_data() {
        let p = Pattern::new(10);
        let mut wire = p.bytes(0, 5000);
        wire[4321] ^= 0x40;
        let mut r = Reader::new(p);
        let err = r
            .read_available(&mut io::Cursor::new(&wire), u64::MAX)
            .expect_err("corruption not detected");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let m = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<Mismatch>())
            .expect("inner error is the Mismatch");
        assert_eq!(m.offset, 4321);
    }

    #[test]
    fn read_until_fails_on_early_eof() {
        let p = Pattern::new(11);
        let wire = p.bytes(0, 10);
        let err = Reader::new(p)
            .read_until(&mut io::Cursor::new(&wire), 11, Duration::from_secs(1))
            .expect_err("early EOF not reported");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
