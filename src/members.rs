//! Reading a snapshot's member list (NDJSON of `{"external_id"|"braze_id"}`, or CSV with a
//! header naming those columns) line by line, as it streams in: tens of millions of ids never
//! sit in memory, only the record being read (at most `MAX_LINE_BYTES`). It only reads:
//! sorting, diffing and queueing are `snapshot.rs`'s.

use serde_json::{Map, Value};

use crate::config::PreferId;
use crate::ingest::{self, BadInput};
use crate::record::UserId;

/// A line longer than this is refused rather than buffered without end.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
}

/// Turns the lines of a member list into user ids.
pub struct MemberReader {
    format: Option<Format>,
    /// Which id a line with both is taken by (`identity.prefer`).
    prefer: PreferId,
    header: Option<Vec<String>>,
    /// 1-based number of the last line seen.
    line: usize,
    members: usize,
    partial: Vec<u8>,
    /// Newlines inside a quoted CSV cell in `partial`: the record spans that many more lines.
    continued: usize,
}

impl MemberReader {
    /// `format` when the content type said; otherwise the first non-blank line decides.
    pub fn new(format: Option<Format>, prefer: PreferId) -> MemberReader {
        MemberReader {
            format,
            prefer,
            header: None,
            line: 0,
            members: 0,
            partial: Vec::new(),
            continued: 0,
        }
    }

    fn bad(&self, message: impl Into<String>) -> BadInput {
        BadInput {
            index: Some(self.members),
            line: Some(self.line),
            field: None,
            message: message.into(),
        }
    }

    /// Feeds the next bytes of the body; calls `member` for each complete line's user.
    /// Errors are the reader's own `BadInput` or whatever `member` returns.
    pub fn feed<E: From<BadInput>>(
        &mut self,
        bytes: &[u8],
        member: &mut impl FnMut(UserId) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            if self.in_quoted_cell() {
                // A CSV cell may hold a newline inside its quotes: the record goes on.
                self.partial.push(b'\n');
                self.continued += 1;
                if self.partial.len() > MAX_LINE_BYTES {
                    self.line += 1;
                    return Err(self.too_long().into());
                }
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            self.line(&line, member)?;
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE_BYTES {
            self.line += 1;
            return Err(self.too_long().into());
        }
        Ok(())
    }

    /// Whether the CSV record read so far ends inside a quoted cell: an odd number of quotes
    /// (a quote inside a cell is written twice). NDJSON lines never continue.
    fn in_quoted_cell(&self) -> bool {
        let csv = match self.format {
            Some(f) => f == Format::Csv,
            None => self
                .partial
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b != b'{'),
        };
        csv && ends_in_quoted_cell(&self.partial)
    }

    fn too_long(&self) -> BadInput {
        self.bad(format!("line is longer than {MAX_LINE_BYTES} bytes"))
    }

    /// Ends the body: the last line may lack its newline. Returns the number of members.
    pub fn finish<E: From<BadInput>>(
        mut self,
        member: &mut impl FnMut(UserId) -> Result<(), E>,
    ) -> Result<usize, E> {
        let line = std::mem::take(&mut self.partial);
        self.line(&line, member)?;
        Ok(self.members)
    }

    fn line<E: From<BadInput>>(
        &mut self,
        line: &[u8],
        member: &mut impl FnMut(UserId) -> Result<(), E>,
    ) -> Result<(), E> {
        // A record that spans several lines is reported at its first.
        self.line += 1;
        let first = self.line;
        let extra = std::mem::take(&mut self.continued);
        let result = self.record_at(line, member);
        self.line = first + extra;
        result
    }

    fn record_at<E: From<BadInput>>(
        &mut self,
        line: &[u8],
        member: &mut impl FnMut(UserId) -> Result<(), E>,
    ) -> Result<(), E> {
        // `feed` only sees the part of a line still waiting for its end: a long line that
        // ends inside one chunk is caught here, so where the network cut the body does
        // not decide whether it is taken.
        if line.len() > MAX_LINE_BYTES {
            return Err(self.too_long().into());
        }
        let user = match self.user_of(line)? {
            Some(u) => u,
            None => return Ok(()),
        };
        self.members += 1;
        member(user)
    }

    /// The user on one line; `None` for a blank line or the CSV header.
    fn user_of(&mut self, line: &[u8]) -> Result<Option<UserId>, BadInput> {
        let text = std::str::from_utf8(line).map_err(|_| self.bad("is not valid UTF-8"))?;
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return Ok(None);
        }
        let format = *self
            .format
            .get_or_insert(if text.trim_start().starts_with('{') {
                Format::Ndjson
            } else {
                Format::Csv
            });
        let value = match format {
            Format::Ndjson => {
                serde_json::from_str(text).map_err(|e| self.bad(format!("invalid JSON: {e}")))?
            }
            Format::Csv => {
                let cells = csv_cells(text).map_err(|e| self.bad(format!("bad CSV: {e}")))?;
                let Some(header) = &self.header else {
                    if !cells.iter().any(|c| c == "external_id" || c == "braze_id") {
                        return Err(
                            self.bad("the CSV header must name an external_id or braze_id column")
                        );
                    }
                    self.header = Some(cells);
                    return Ok(None);
                };
                let mut object = Map::new();
                for (column, cell) in header.iter().zip(cells) {
                    if !cell.is_empty() {
                        object.insert(column.clone(), Value::String(cell));
                    }
                }
                Value::Object(object)
            }
        };
        ingest::user(self.members, self.line, value, self.prefer).map(Some)
    }
}

/// Whether CSV text ends inside a quoted cell. A quote opens a quoted cell only at the start
/// of a cell (as the csv crate reads it: elsewhere it is an ordinary character), and inside
/// one a doubled quote is a quote.
fn ends_in_quoted_cell(text: &[u8]) -> bool {
    let (mut quoted, mut cell_start, mut i) = (false, true, 0);
    while i < text.len() {
        match (quoted, text[i]) {
            (false, b'"') if cell_start => quoted = true,
            (false, b',') => {
                cell_start = true;
                i += 1;
                continue;
            }
            (true, b'"') if text.get(i + 1) == Some(&b'"') => i += 1,
            (true, b'"') => quoted = false,
            _ => {}
        }
        cell_start = false;
        i += 1;
    }
    quoted
}

/// The cells of one CSV line (quoted cells included).
fn csv_cells(line: &str) -> Result<Vec<String>, csv::Error> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(line.as_bytes());
    match reader.records().next() {
        Some(r) => Ok(r?.iter().map(str::to_string).collect()),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: Option<Format>, chunks: &[&str]) -> Result<Vec<UserId>, BadInput> {
        let mut out = Vec::new();
        let mut reader = MemberReader::new(format, PreferId::External);
        let mut push = |u| {
            out.push(u);
            Ok::<(), BadInput>(())
        };
        for c in chunks {
            reader.feed(c.as_bytes(), &mut push)?;
        }
        reader.finish(&mut push)?;
        Ok(out)
    }

    #[test]
    fn lines_split_across_chunks_are_read_whole() {
        let users = read(
            None,
            &[
                "{\"external_id\":\"a\"}\n{\"bra",
                "ze_id\":\"b\"}\n",
                "{\"external_id\":\"c\"}",
            ],
        )
        .unwrap();
        assert_eq!(
            users,
            vec![
                UserId::External("a".into()),
                UserId::Braze("b".into()),
                UserId::External("c".into())
            ]
        );
    }

    #[test]
    fn a_quoted_csv_cell_may_hold_newlines() {
        let users = read(
            None,
            &[
                "external_id,note\n",
                "a,\"two\nlines, and \"\"quotes\"\"\"\nb,pl\"ain\n\"c\",\"x\n",
                "\ny\"\nd,\n",
            ],
        )
        .unwrap();
        assert_eq!(
            users,
            ["a", "b", "c", "d"].map(|u| UserId::External(u.into()))
        );
        // A record after a multi-line one is reported at its own line.
        let err = read(None, &["external_id,note\na,\"1\n2\"\n,\n"]).unwrap_err();
        assert_eq!(err.line, Some(4), "{err:?}");
    }

    #[test]
    fn csv_with_a_header_gives_the_same_users() {
        let users = read(None, &["external_id,braze_id\r\na,\n,b\n\"c\",x\n"]).unwrap();
        assert_eq!(
            users,
            vec![
                UserId::External("a".into()),
                UserId::Braze("b".into()),
                UserId::External("c".into())
            ]
        );
    }

    #[test]
    fn a_long_line_is_refused_however_the_body_is_cut() {
        let line = format!(
            "{{\"external_id\":\"a\",\"pad\":\"{}\"}}\n",
            "x".repeat(MAX_LINE_BYTES)
        );
        for size in [line.len(), 1000, 7] {
            let chunks: Vec<&str> = line
                .as_bytes()
                .chunks(size)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            let err = read(None, &chunks).unwrap_err();
            assert_eq!(err.line, Some(1), "chunks of {size}");
            assert!(err.message.contains("longer than"), "{err}");
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = read(None, &["{\"external_id\":\"a\"}\n\n{\"name\":1}\n"]).unwrap_err();
        assert_eq!(err.line, Some(3));
        let err = read(Some(Format::Csv), &["user\na\n"]).unwrap_err();
        assert_eq!(err.line, Some(1));
    }
}
