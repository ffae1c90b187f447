//! The `time` of an event or purchase, checked as Braze's event object page describes it
//! (braze.com/docs/api/objects_filters/event_object, "Event object"): "datetime as string in
//! ISO 8601 or in `yyyy-MM-dd'T'HH:mm:ss:SSSZ` format". Its examples are
//! `2013-07-16T19:20:30+01:00` and `2017-05-12T18:47:12Z`.
//!
//! Accepted here: a calendar date `YYYY-MM-DD`, `T`, `hh:mm`, optional `:ss` with an optional
//! fraction (`.` or `,` then digits), or `:ss:SSS` (the colon form), then an optional zone
//! `Z`, `±hh`, `±hhmm` or `±hh:mm`. Ranges are checked (month 1–12, the day within its
//! month, leap years, hour 0–23, minute and second 0–59, zone up to ±23:59). Not accepted:
//! week or ordinal dates, a date alone, basic (separator-free) forms: none appears in
//! Braze's pages, and a sender that uses one gets the object refused as it would risk with
//! Braze.

/// Whether `t` is a time Braze documents for events and purchases.
pub fn is_event_time(t: &str) -> bool {
    let mut p = Parser(t.as_bytes());
    p.date().is_some() && p.literal(b'T') && p.clock().is_some() && p.zone().is_some() && p.done()
}

struct Parser<'a>(&'a [u8]);

impl Parser<'_> {
    fn done(&self) -> bool {
        self.0.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn literal(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.0 = &self.0[1..];
        }
        hit
    }

    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<u32> {
        let taken = self.0.get(..n)?;
        if !taken.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.0 = &self.0[n..];
        Some(taken.iter().fold(0, |v, d| v * 10 + u32::from(d - b'0')))
    }

    /// A number of exactly `n` digits within `range`.
    fn field(&mut self, n: usize, range: std::ops::RangeInclusive<u32>) -> Option<u32> {
        self.digits(n).filter(|v| range.contains(v))
    }

    fn date(&mut self) -> Option<()> {
        let year = self.digits(4)?;
        self.literal(b'-').then_some(())?;
        let month = self.field(2, 1..=12)?;
        self.literal(b'-').then_some(())?;
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let last = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        self.field(2, 1..=last).map(drop)
    }

    fn clock(&mut self) -> Option<()> {
        self.field(2, 0..=23)?;
        self.literal(b':').then_some(())?;
        self.field(2, 0..=59)?;
        if !self.literal(b':') {
            return Some(());
        }
        self.field(2, 0..=59)?;
        if self.literal(b'.') || self.literal(b',') {
            // At least one digit of fraction.
            self.digits(1)?;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.0 = &self.0[1..];
            }
        } else if self.literal(b':') {
            // `yyyy-MM-dd'T'HH:mm:ss:SSS`: milliseconds after a colon.
            self.digits(3)?;
        }
        Some(())
    }

    fn zone(&mut self) -> Option<()> {
        if self.done() || self.literal(b'Z') {
            return Some(());
        }
        if !(self.literal(b'+') || self.literal(b'-')) {
            return None;
        }
        self.field(2, 0..=23)?;
        if self.done() {
            return Some(());
        }
        self.literal(b':');
        self.field(2, 0..=59).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::is_event_time;

    #[test]
    fn braze_examples_and_common_forms_are_times() {
        for t in [
            "2013-07-16T19:20:30+01:00",
            "2017-05-12T18:47:12Z",
            "2017-05-12T18:47:12.123Z",
            "2017-05-12T18:47:12:123Z",
            "2017-05-12T18:47:12:123+0100",
            "2017-05-12T18:47Z",
            "2017-05-12T18:47:12",
            "2024-02-29T00:00:00-05",
            "2026-11-28T10:00:00,5+05:30",
        ] {
            assert!(is_event_time(t), "{t}");
        }
    }

    #[test]
    fn anything_else_is_not() {
        for t in [
            "",
            "yesterday",
            "2017-05-12",
            "2017-05-12 18:47:12Z",
            "2017-13-12T18:47:12Z",
            "2023-02-29T00:00:00Z",
            "2017-05-12T24:00:00Z",
            "2017-05-12T18:60:00Z",
            "2017-05-12T18:47:12.Z",
            "2017-05-12T18:47:12:12Z",
            "2017-05-12T18:47:12+1",
            "2017-05-12T18:47:12Z ",
            "1494614832",
        ] {
            assert!(!is_event_time(t), "{t}");
        }
    }
}
