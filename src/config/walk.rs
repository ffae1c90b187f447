//! Walking a toml table: typed reads with defaults and ranges, unknown keys with a
//! suggestion, and the problems collected on the way.

use super::*;

/// Marker for "this value is unusable and the reason is already in [`Problems`]". Only
/// [`Problems::report`] and a [`Section`] whose own problem was reported make one, so an
/// `Err(Reported)` always comes with at least one line.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reported;

pub(super) type Checked<T> = Result<T, Reported>;

/// The lines of [`ConfigError::Invalid`], in the order they were found.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<String>);

impl Problems {
    pub(super) fn report(&mut self, key: &str, why: impl fmt::Display) -> Reported {
        self.0.push(format!("{key}: {why}"));
        Reported
    }
}

/// One table of the file (`name` is empty for the top level).
pub(super) struct Section<'t> {
    pub(super) name: &'static str,
    pub(super) table: Option<&'t Table>,
    /// The section is there but is not a table; that is reported once, and every key in it
    /// is then unusable without a line of its own.
    pub(super) bad: bool,
}

impl<'t> Section<'t> {
    /// Looks up a top-level section and reports its unknown keys. A missing section is empty.
    pub(super) fn open(
        root: &'t Table,
        name: &'static str,
        known: &[&str],
        p: &mut Problems,
    ) -> Self {
        match root.get(name) {
            None => Section {
                name,
                table: None,
                bad: false,
            },
            Some(Value::Table(table)) => {
                check_unknown(table, name, known, p);
                Section {
                    name,
                    table: Some(table),
                    bad: false,
                }
            }
            Some(other) => {
                p.report(name, wrong_type("a table", other));
                Section {
                    name,
                    table: None,
                    bad: true,
                }
            }
        }
    }

    /// The dotted name of `key`, as error lines show it.
    pub(super) fn key(&self, key: &str) -> String {
        qualified(self.name, key)
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(key))
    }

    pub(super) fn get(&self, key: &str) -> Checked<Option<&'t Value>> {
        if self.bad {
            // The section's own line is already in `Problems`.
            return Err(Reported);
        }
        Ok(self.table.and_then(|t| t.get(key)))
    }

    pub(super) fn string(&self, p: &mut Problems, key: &str) -> Checked<Option<&'t str>> {
        match self.get(key)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(p.report(&self.key(key), wrong_type("a string", other))),
        }
    }

    /// An array of strings, or empty when absent.
    pub(super) fn strings(&self, p: &mut Problems, key: &str) -> Checked<Vec<String>> {
        match self.get(key)? {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(p.report(
                        &self.key(key),
                        wrong_type("an array of strings", other).replace("got", "holding"),
                    )),
                })
                .collect(),
            Some(other) => Err(p.report(&self.key(key), wrong_type("an array of strings", other))),
        }
    }

    pub(super) fn boolean(&self, p: &mut Problems, key: &str, default: bool) -> Checked<bool> {
        match self.get(key)? {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(p.report(&self.key(key), wrong_type("a boolean", other))),
        }
    }

    pub(super) fn integer(
        &self,
        p: &mut Problems,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Checked<u64> {
        self.integer_with_note(p, key, default, range, "")
    }

    /// An integer in `range`, or `default` when absent; `note` follows the range in the error.
    pub(super) fn integer_with_note(
        &self,
        p: &mut Problems,
        key: &str,
        default: u64,
        range: RangeInclusive<u64>,
        note: &str,
    ) -> Checked<u64> {
        let n = match self.get(key)? {
            None => return Ok(default),
            Some(Value::Integer(n)) => *n,
            Some(other) => return Err(p.report(&self.key(key), wrong_type("an integer", other))),
        };
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => {
                let (min, max) = (range.start(), range.end());
                let bounds = if *max == u64::MAX {
                    format!("must be at least {min}")
                } else {
                    format!("must be between {min} and {max}")
                };
                Err(p.report(&self.key(key), format!("{bounds}{note}, got {n}")))
            }
        }
    }

    /// An optional number above zero; TOML integers are accepted too (`10` as well as `10.0`).
    pub(super) fn positive_number(&self, p: &mut Problems, key: &str) -> Checked<Option<f64>> {
        let n = match self.get(key)? {
            None => return Ok(None),
            Some(Value::Float(f)) => *f,
            // Precision loss above 2^53 does not matter for a rate.
            Some(Value::Integer(i)) => *i as f64,
            Some(other) => return Err(p.report(&self.key(key), wrong_type("a number", other))),
        };
        if n.is_finite() && n > 0.0 {
            Ok(Some(n))
        } else {
            Err(p.report(
                &self.key(key),
                format!("must be a number greater than 0, got {n}"),
            ))
        }
    }
}

pub(super) fn qualified(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// Reports every key of `table` that is not in `known`, with a suggestion for a likely typo.
pub(super) fn check_unknown(table: &Table, section: &str, known: &[&str], p: &mut Problems) {
    for (key, value) in table {
        if known.contains(&key.as_str()) {
            continue;
        }
        let what = if section.is_empty() && value.is_table() {
            "unknown section"
        } else {
            "unknown key"
        };
        let hint = known
            .iter()
            .map(|k| (edit_distance(key, k), k))
            .filter(|(d, k)| *d <= 2 && *d < k.len())
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| format!(" (did you mean {}?)", qualified(section, k)))
            .unwrap_or_default();
        p.report(&qualified(section, key), format!("{what}{hint}"));
    }
}

/// Levenshtein distance, for "did you mean" hints on short key names.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// "expected a string, got an integer".
pub(super) fn wrong_type(expected: &str, got: &Value) -> String {
    let got = match got {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    };
    format!("expected {expected}, got {got}")
}
