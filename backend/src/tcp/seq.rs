//! TCP sequence numbers: 32-bit values compared modulo 2^32 (RFC 793 / RFC 1982).

use std::fmt;

/// A TCP sequence (or acknowledgement) number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Seq(pub u32);

impl Seq {
    /// `self + n` modulo 2^32.
    pub fn plus(self, n: u32) -> Seq {
        Seq(self.0.wrapping_add(n))
    }

    /// The distance from `earlier` to `self` (modulo 2^32): how many bytes lie between.
    pub fn since(self, earlier: Seq) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }

    /// `self < other` in sequence space (the signed distance is negative).
    pub fn before(self, other: Seq) -> bool {
        (self.0.wrapping_sub(other.0) as i32) < 0
    }

    /// `self <= other` in sequence space.
    pub fn before_eq(self, other: Seq) -> bool {
        (self.0.wrapping_sub(other.0) as i32) <= 0
    }

    /// `self > other` in sequence space.
    pub fn after(self, other: Seq) -> bool {
        other.before(self)
    }

    /// `start <= self < start + len`.
    pub fn in_window(self, start: Seq, len: u32) -> bool {
        self.since(start) < len
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_wraps_around() {
        let near_end = Seq(u32::MAX - 10);
        let wrapped = near_end.plus(20);
        assert_eq!(wrapped, Seq(9));
        assert!(near_end.before(wrapped));
        assert!(wrapped.after(near_end));
        assert!(!wrapped.before(near_end));
        assert_eq!(wrapped.since(near_end), 20);
        assert!(near_end.before_eq(near_end));
        assert!(!near_end.before(near_end));
    }

    #[test]
    fn windows_wrap_around() {
        let start = Seq(u32::MAX - 1);
        assert!(start.in_window(start, 1));
        assert!(Seq(3).in_window(start, 10));
        assert!(!Seq(8).in_window(start, 10));
        assert!(!Seq(u32::MAX - 2).in_window(start, 10));
        assert!(!start.in_window(start, 0));
    }

    #[test]
    fn half_the_space_apart_is_after() {
        let a = Seq(0);
        assert!(a.before(Seq(0x7fff_ffff)));
        assert!(a.after(Seq(0x8000_0001)));
    }
}
