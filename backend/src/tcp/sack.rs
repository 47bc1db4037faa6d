//! The SACK scoreboard of one connection: which sequence ranges beyond SND.UNA the guest
//! reported holding (RFC 2018), so that a retransmission resends the holes only.
//!
//! Ranges are half-open `[start, end)`, sorted, disjoint and not touching, all within
//! SND.UNA..SND.MAX. The scoreboard is advisory: forgetting a range only costs a
//! redundant retransmission, so it is bounded ([`MAX_RANGES`]: the highest ranges are
//! dropped first) and cleared whenever it cannot be trusted. It is empty for nearly
//! every connection (a guest only sends SACK blocks after a loss), and allocates only
//! then.

use super::seq::Seq;

/// Most ranges remembered; the guest reports at most four per ACK.
pub const MAX_RANGES: usize = 32;

/// Ranges of baton's data the guest holds out of order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scoreboard {
    ranges: Vec<(Seq, Seq)>,
}

impl Scoreboard {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges = Vec::new();
    }

    /// End of the highest range the guest holds.
    pub fn highest(&self) -> Option<Seq> {
        self.ranges.last().map(|&(_, end)| end)
    }

    /// Whether `seq` lies in a reported range.
    pub fn covers(&self, seq: Seq) -> bool {
        self.ranges
            .iter()
            .any(|&(start, end)| !seq.before(start) && seq.before(end))
    }

    /// The cumulative acknowledgement moved to `una`: forget what lies below it.
    pub fn advance(&mut self, una: Seq) {
        self.ranges.retain_mut(|(start, end)| {
            if end.before_eq(una) {
                return false;
            }
            if start.before(una) {
                *start = una;
            }
            true
        });
        if self.ranges.is_empty() {
            self.clear();
        }
    }

    /// A block from a guest ACK, `una` being that ACK (already applied) and `max`
    /// SND.MAX. A block that is empty, reversed, not above `una` (a D-SACK, RFC 2883,
    /// or a stale one) or beyond `max` is ignored: a hostile guest cannot make baton
    /// skip data it never held, only data baton sent it.
    pub fn add(&mut self, start: Seq, end: Seq, una: Seq, max: Seq) {
        if !start.after(una) || !start.before(end) || end.after(max) {
            return;
        }
        // Merge with every range it overlaps or touches.
        let mut start = start;
        let mut end = end;
        self.ranges.retain(|&(s, e)| {
            let apart = e.before(start) || end.before(s);
            if !apart {
                if s.before(start) {
                    start = s;
                }
                if e.after(end) {
                    end = e;
                }
            }
            apart
        });
        let at = self
            .ranges
            .iter()
            .position(|&(s, _)| start.before(s))
            .unwrap_or(self.ranges.len());
        self.ranges.insert(at, (start, end));
        self.ranges.truncate(MAX_RANGES);
    }

    /// The ranges within `from..to` the guest did not report holding, in order.
    pub fn holes(&self, from: Seq, to: Seq) -> Vec<(Seq, Seq)> {
        let mut holes = Vec::new();
        let mut next = from;
        for &(start, end) in &self.ranges {
            if !next.before(to) {
                break;
            }
            if end.before_eq(next) {
                continue;
            }
            if next.before(start) {
                let hole_end = if start.before(to) { start } else { to };
                holes.push((next, hole_end));
            }
            next = end;
        }
        if next.before(to) {
            holes.push((next, to));
        }
        holes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(blocks: &[(u32, u32)], una: u32, max: u32) -> Scoreboard {
        let mut b = Scoreboard::default();
        for &(s, e) in blocks {
            b.add(Seq(s), Seq(e), Seq(una), Seq(max));
        }
        b
    }

    #[test]
    fn blocks_merge_and_stay_sorted() {
        let b = board(&[(500, 600), (200, 300), (300, 350), (550, 700)], 100, 1000);
        assert_eq!(
            b.ranges,
            [(Seq(200), Seq(350)), (Seq(500), Seq(700))],
            "touching and overlapping blocks merged"
        );
        assert_eq!(b.highest(), Some(Seq(700)));
        assert!(b.covers(Seq(200)) && b.covers(Seq(349)) && !b.covers(Seq(350)));
    }

    #[test]
    fn invalid_blocks_are_ignored() {
        // At or below the ACK (D-SACK), reversed, empty, beyond SND.MAX.
        let b = board(
            &[(50, 150), (100, 200), (300, 250), (400, 400), (900, 1001)],
            100,
            1000,
        );
        assert!(b.is_empty());
    }

    #[test]
    fn holes_between_ranges_and_up_to_the_limit() {
        let b = board(&[(200, 300), (500, 600)], 100, 1000);
        assert_eq!(
            b.holes(Seq(100), Seq(1000)),
            [
                (Seq(100), Seq(200)),
                (Seq(300), Seq(500)),
                (Seq(600), Seq(1000))
            ]
        );
        // Only below the highest range (fast retransmit).
        assert_eq!(
            b.holes(Seq(100), Seq(600)),
            [(Seq(100), Seq(200)), (Seq(300), Seq(500))]
        );
        // From inside a range, and ending inside a hole.
        assert_eq!(b.holes(Seq(250), Seq(400)), [(Seq(300), Seq(400))]);
        assert!(b.holes(Seq(200), Seq(300)).is_empty());
        assert_eq!(
            Scoreboard::default().holes(Seq(1), Seq(9)),
            [(Seq(1), Seq(9))]
        );
    }

    #[test]
    fn advancing_trims_and_drops() {
        let mut b = board(&[(200, 300), (500, 600)], 100, 1000);
        b.advance(Seq(250));
        assert_eq!(b.ranges, [(Seq(250), Seq(300)), (Seq(500), Seq(600))]);
        b.advance(Seq(600));
        assert!(b.is_empty());
    }

    #[test]
    fn sequence_numbers_wrap() {
        let una = u32::MAX - 100;
        let b = board(&[(u32::MAX - 50, 20), (40, 60)], una, 1000);
        assert_eq!(
            b.holes(Seq(una), Seq(100)),
            [
                (Seq(una), Seq(u32::MAX - 50)),
                (Seq(20), Seq(40)),
                (Seq(60), Seq(100))
            ]
        );
    }

    #[test]
    fn the_board_is_bounded() {
        let blocks: Vec<(u32, u32)> = (0..100).map(|i| (1000 + i * 10, 1005 + i * 10)).collect();
        let b = board(&blocks, 0, 100_000);
        assert_eq!(b.ranges.len(), MAX_RANGES);
        assert_eq!(
            b.ranges[0],
            (Seq(1000), Seq(1005)),
            "the lowest ranges are kept"
        );
    }
}
